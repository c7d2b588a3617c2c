"""Fit group bases to one projection's expert matrices: grouped-SVD init, then full-batch Adam (MoBE train.py).

Two shapes of the same model, for the stacked experts W [E, out, in] of one layer and projection:

- ``one basis per group`` (RFID-MoE):  Ŵ_i = A_i · φ(B_g(i)) + reshape_i(P η_g(i))   (Eq. 14 read with one basis
  per group, + Eq. 15–17 when a residual size a > 0);
- ``mixed`` (MoBE):                     Ŵ_i = A_i · φ(Σ_j α_ij B_j),  α_i = softmax(logits_i).

Choices (the papers' code does the first three the same way, the fourth differently):

- the loss is MoBE's *scaled* MSE, mean((Ŵ/s − W/s)²) with s the global std of W (no mean subtracted); this is
  the "training scaled loss" of RFID-MoE Fig. 4, recorded per step;
- full batch, Adam (default lr 0.07), the best state kept (every step is checked, MoBE checks every 200),
  early stop after ``patience`` steps without a new best;
- the bases are the truncated SVD of each group matrix (Alg. 1 l.17) and MoBE's mixing logits start one-hot
  on the expert's own group;
- one basis per group (RFID-MoE): A is initialised as U_K Σ_K / φ'(0) of the *scaled* group matrix, so that
  A·φ(B) matches the grouped SVD to first order (φ = SiLU has slope 1/2 at 0, and the basis entries are small);
  η starts at the closed form Pᵀ vec(R) of the initial residual (App. C.1) and is then trained jointly with A
  and B (the paper's "lightweight reconstruction training");
- mixed (MoBE): exactly inclusionAI/MoBE train.py's init: A = U_K Σ_K and B from the SVD of the *unscaled*
  group matrix, although the fit targets W/s (s = std W), so the product starts about s times too small;
  the softmax of the one-hot logits puts only e/(e + m − 1) on the own basis anyway, so no first-order match
  exists. Measured on the reference model (r = 44, m = 8, 200 steps, scaled MSE): layer 0 gate / layer 2
  gate / layer 3 up end at 0.1692 / 0.2193 / 0.2154, the official code's own 0.1689 / 0.2197 / 0.2158 (its
  target is cast to fp16), against 0.1707 / 0.2289 / — with the first-order-matched init used before
  issue 18 (BENCHMARKS.md §9.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vllm_moe_compress.kernels.residual_hash import bucket_counts, bucket_of, bucket_scales, project_onto_buckets

from .group_basis import group_matrix, truncated_group_svd

ACTIVATIONS = {"silu": F.silu, "tanh": torch.tanh, "identity": lambda t: t}
SLOPE_AT_ZERO = {"silu": 0.5, "tanh": 1.0, "identity": 1.0}


@dataclass
class FitOptions:
    activation: str = "silu"
    steps: int = 200
    lr: float = 0.07
    patience: int = 50

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.steps < 0 or self.patience < 1 or not self.lr > 0:
            raise ValueError(f"need steps >= 0, patience >= 1 and lr > 0, got {self.steps}, {self.patience}, {self.lr}")


@dataclass
class FittedProjection:
    """One projection's fitted factors in the units of W (float64)."""

    groups: list[list[int]]
    bases: list[torch.Tensor]  # per basis [K_j, in], before the activation
    coefs: list[torch.Tensor]  # per expert [out, K]
    mix: torch.Tensor | None = None  # [E, m] softmax weights (mixed model only)
    etas: list[torch.Tensor] | None = None  # per group [a]
    loss_curve: list[float] = field(default_factory=list)  # scaled MSE per step, step 0 = initialisation
    best_step: int = 0


def activate(bases: torch.Tensor, activation: str) -> torch.Tensor:
    return ACTIVATIONS[activation](bases)


def residual_positions(group_size: int, out_dim: int, in_dim: int, seed: int, size: int) -> torch.Tensor:
    """π(t) for every entry of a group matrix, shaped [k, out, in] (shared by every group: one P)."""
    t = torch.arange(group_size * out_dim * in_dim, dtype=torch.int64)
    return bucket_of(t, seed, size).view(group_size, out_dim, in_dim)


def _adam(params: list[torch.Tensor], loss_fn, options: FitOptions) -> tuple[list[float], int, list[torch.Tensor]]:
    """Full-batch Adam; returns the loss per step (step 0 = start), the best step and the best parameters."""
    optimizer = torch.optim.Adam(params, lr=options.lr)
    curve: list[float] = []
    best, best_step, best_state = math.inf, 0, [p.detach().clone() for p in params]
    for step in range(options.steps + 1):
        optimizer.zero_grad()
        with torch.enable_grad():  # compression runs inside the calibration pass's no_grad
            loss = loss_fn()
        value = float(loss.detach())
        curve.append(value)
        if value < best:
            best, best_step, best_state = value, step, [p.detach().clone() for p in params]
        elif step - best_step >= options.patience:
            break
        if step == options.steps or not math.isfinite(value):
            break
        loss.backward()
        optimizer.step()
    return curve, best_step, best_state


def fit_grouped(weights: torch.Tensor, groups: list[list[int]], ranks: list[int], options: FitOptions,
                residual_size: int = 0, seed: int = 0) -> FittedProjection:
    """RFID-MoE's model: one basis B_g of rank K_g per group, optional residual η_g of size ``residual_size``."""
    scale = float(weights.std())
    target = weights / scale
    k, out_dim, in_dim = len(groups[0]), weights.shape[1], weights.shape[2]
    slope = SLOPE_AT_ZERO[options.activation]
    bases, coefs, targets = [], [], []
    for group, rank in zip(groups, ranks):
        matrix = group_matrix(target, group)
        left, basis = truncated_group_svd(matrix, rank)
        bases.append(basis.float().requires_grad_())
        coefs.append((left / slope).view(k, out_dim, rank).float().requires_grad_())
        targets.append(matrix.view(k, out_dim, in_dim).float())

    def low_rank(g):
        return coefs[g] @ activate(bases[g], options.activation)

    params = bases + coefs
    etas = None
    if residual_size:
        counts = bucket_counts(k * out_dim * in_dim, seed, residual_size)
        scales = bucket_scales(counts, torch.float32)
        positions = residual_positions(k, out_dim, in_dim, seed, residual_size)
        with torch.no_grad():
            init = [project_onto_buckets((targets[g] - low_rank(g)).reshape(-1).double(), seed, residual_size, counts)
                    for g in range(len(groups))]
        etas = torch.stack(init).float().requires_grad_()
        params.append(etas)

    def loss_fn():
        total = 0.0
        for g in range(len(groups)):
            pred = low_rank(g)
            if etas is not None:
                pred = pred + (etas[g] * scales)[positions]
            total = total + ((pred - targets[g]) ** 2).sum()
        return total / weights.numel()

    curve, best_step, best = _adam(params, loss_fn, options)
    m = len(groups)
    best_bases, best_coefs = best[:m], best[m : 2 * m]
    coef_of: dict[int, torch.Tensor] = {}
    for group, coef in zip(groups, best_coefs):
        for j, e in enumerate(group):
            coef_of[e] = coef[j].double() * scale
    return FittedProjection(
        groups=groups, bases=[b.double() for b in best_bases],
        coefs=[coef_of[e] for e in range(weights.shape[0])],
        etas=[eta.double() * scale for eta in best[2 * m]] if residual_size else None,
        loss_curve=curve, best_step=best_step,
    )


def fit_mixed(weights: torch.Tensor, groups: list[list[int]], rank: int, options: FitOptions) -> FittedProjection:
    """MoBE's model: m = len(groups) bases of one rank shared by all experts through softmax mixing weights."""
    scale = float(weights.std())
    target = (weights / scale).float()
    num_experts, out_dim = weights.shape[0], weights.shape[1]
    bases = torch.zeros(len(groups), rank, weights.shape[2])
    coefs = torch.zeros(num_experts, out_dim, rank)
    logits = torch.zeros(num_experts, len(groups))
    for j, group in enumerate(groups):
        left, basis = truncated_group_svd(group_matrix(weights, group), rank)
        bases[j] = basis.float()
        coefs[group] = left.view(len(group), out_dim, rank).float()  # SVD of the unscaled W, as MoBE train.py
        logits[group, j] = 1.0
    params = [bases.requires_grad_(), coefs.requires_grad_(), logits.requires_grad_()]

    def loss_fn():
        right = activate(torch.einsum("em,mri->eri", logits.softmax(dim=1), bases), options.activation)
        return ((coefs @ right - target) ** 2).mean()

    curve, best_step, (best_bases, best_coefs, best_logits) = _adam(params, loss_fn, options)
    return FittedProjection(
        groups=groups, bases=list(best_bases.double()), coefs=list(best_coefs.double() * scale),
        mix=best_logits.double().softmax(dim=1), loss_curve=curve, best_step=best_step,
    )
