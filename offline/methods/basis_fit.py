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

Memory: ``weights`` is the layer's projection as the methods get it (an ExpertStack, read an expert at a time,
or a stacked tensor) and is never stacked whole. The scale s is summed expert by expert (float64), each
group's truncated SVD is taken of its own group matrix (float64, [k·out, in], through its Gram:
group_basis.truncated_group_svd) on one-thread workers, two groups at a time on two cores
(group_basis.each_group), and each
Adam step re-reads the targets a group at a time and backpropagates the group's share of the loss before
forming the next, so besides the parameters (float32, with their gradients, Adam's two moments and the best
state) one group's target and autograd graph are alive. The gradients are those of the whole loss: RFID-MoE's
groups share no parameter (the same floats as one backward), MoBE's bases sum their gradient over the groups
(within float32 rounding of one backward).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vllm_moe_compress.kernels.residual_hash import bucket_counts, bucket_of, bucket_scales, project_onto_buckets

from ..calibration import clock, elapsed
from .group_basis import each_group, truncated_group_svd

log = logging.getLogger(__name__)

CPU = torch.device("cpu")

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
    """One projection's fitted factors in the units of W, float32 as fitted (the unscaling is computed in float64
    and rounded once; the output is stored in at most float32)."""

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


def projection_std(weights) -> float:
    """The standard deviation (unbiased) of every entry of ``weights`` [E, out, in], a stacked tensor or an
    ExpertStack: two passes (mean, then squared deviations) summed an expert at a time in float64."""
    count = math.prod(weights.shape)
    mean = sum(float(weights[e].sum()) for e in range(len(weights))) / count
    return math.sqrt(sum(float((weights[e] - mean).pow(2).sum()) for e in range(len(weights))) / (count - 1))


def scaled_members(weights, members: list[int], scale: float) -> torch.Tensor:
    """The fit's target for experts ``members``: their matrices divided by ``scale``, [len, out, in] float32."""
    return (torch.stack([weights[e] for e in members]) / scale).float()


def unscaled(fitted: torch.Tensor, scale: float) -> torch.Tensor:
    """A fitted float32 tensor back in the units of W: multiplied by ``scale`` in float64, rounded to float32."""
    return (fitted.double() * scale).float()


def per_expert(groups: list[list[int]], group_coefs: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """The experts' fitted coefficients in expert order, in the units of W on the CPU, from one [k, out, K] tensor
    per group (its experts in the group's order)."""
    coef_of: dict[int, torch.Tensor] = {}
    for group, coef in zip(groups, group_coefs):
        for j, e in enumerate(group):
            coef_of[e] = unscaled(coef[j], scale).cpu()
    return [coef_of[e] for e in sorted(coef_of)]


def _adam(params: list[torch.Tensor], loss_terms, count: int,
          options: FitOptions) -> tuple[list[float], int, list[torch.Tensor]]:
    """Full-batch Adam on Σ(terms)/``count``, ``loss_terms()`` yielding the loss's squared-error sums part by part
    (a group or a chunk of experts): each part is backpropagated before the next is formed, so one part's autograd
    graph and target are alive at a time, and the gradients add up to the whole loss's. The best parameters are
    copied into one set allocated at the start, so a new best never holds two. Returns the loss per step
    (step 0 = start), the best step and the best parameters."""
    optimizer = torch.optim.Adam(params, lr=options.lr)
    curve: list[float] = []
    best, best_step, best_state = math.inf, 0, [p.detach().clone() for p in params]
    for step in range(options.steps + 1):
        optimizer.zero_grad()
        total, learning = 0.0, step < options.steps  # the last step's loss is only recorded
        with torch.set_grad_enabled(learning):  # compression runs inside the calibration pass's no_grad
            for term in loss_terms():
                if learning:
                    (term / count).backward()
                total = total + term.detach()
        value = float(total / count)
        curve.append(value)
        if value < best:
            best, best_step = value, step
            for kept, p in zip(best_state, params):
                kept.copy_(p.detach())
        elif step - best_step >= options.patience:
            break
        if step == options.steps or not math.isfinite(value):
            break
        optimizer.step()
    return curve, best_step, best_state


def _log_times(model: str, weights, initialisation: tuple[float, float], fit: tuple[float, float],
               steps: int) -> None:
    """One log line per fitted projection: wall (CPU) seconds of the grouped SVDs and of the Adam steps."""
    log.info("%s fit of %s: initialisation %.1f s (CPU %.1f), %d Adam steps %.1f s (CPU %.1f)", model,
             "x".join(map(str, weights.shape)), *initialisation, steps, *fit)


def fit_grouped(weights, groups: list[list[int]], ranks: list[int], options: FitOptions,
                residual_size: int = 0, seed: int = 0, device: torch.device = CPU) -> FittedProjection:
    """RFID-MoE's model: one basis B_g of rank K_g per group, optional residual η_g of size ``residual_size``.

    ``weights`` [E, out, in] is read a group at a time (an ExpertStack is never stacked): the groups share no
    parameter, so the loss is summed and backpropagated group by group, each group's target re-read every step.
    The group SVDs and the fit run on ``device`` (each group's matrix moved there); the result is on the CPU."""
    started = clock()
    scale = projection_std(weights)
    k, out_dim, in_dim = len(groups[0]), weights.shape[1], weights.shape[2]
    slope = SLOPE_AT_ZERO[options.activation]
    bases, coefs = [], []
    for left, basis in each_group(weights, groups, lambda g, matrix: truncated_group_svd(matrix, ranks[g]), device,
                                  scale):
        bases.append(basis.float().requires_grad_())
        coefs.append((left / slope).view(k, out_dim, -1).float().requires_grad_())

    def low_rank(g):
        return coefs[g] @ activate(bases[g], options.activation)

    params = bases + coefs
    etas = None
    if residual_size:
        counts = bucket_counts(k * out_dim * in_dim, seed, residual_size)
        scales = bucket_scales(counts, torch.float32).to(device)
        positions = residual_positions(k, out_dim, in_dim, seed, residual_size).to(device)
        with torch.no_grad():  # the closed form is computed on the CPU (residual_hash)
            init = [project_onto_buckets((scaled_members(weights, group, scale) - low_rank(g).cpu()).reshape(-1)
                                         .double(), seed, residual_size, counts) for g, group in enumerate(groups)]
        etas = torch.stack(init).float().to(device).requires_grad_()
        params.append(etas)

    def loss_terms():
        for g, group in enumerate(groups):
            pred = low_rank(g)
            if etas is not None:
                pred = pred + (etas[g] * scales)[positions]
            yield ((pred - scaled_members(weights, group, scale).to(device)) ** 2).sum()

    initialisation, fit_started = elapsed(started), clock()
    curve, best_step, best = _adam(params, loss_terms, math.prod(weights.shape), options)
    _log_times("grouped", weights, initialisation, elapsed(fit_started), len(curve) - 1)
    m = len(groups)
    best_bases, best_coefs = best[:m], best[m : 2 * m]
    return FittedProjection(
        groups=groups, bases=[b.cpu() for b in best_bases], coefs=per_expert(groups, best_coefs, scale),
        etas=[unscaled(eta, scale).cpu() for eta in best[2 * m]] if residual_size else None,
        loss_curve=curve, best_step=best_step,
    )


def fit_mixed(weights, groups: list[list[int]], rank: int, options: FitOptions,
              device: torch.device = CPU) -> FittedProjection:
    """MoBE's model: m = len(groups) bases of one rank shared by all experts through softmax mixing weights.

    ``weights`` [E, out, in] is read a group at a time (an ExpertStack is never stacked): the loss is summed
    and backpropagated over the groups' experts in turn (the bases' gradients accumulate over them), each
    group's target re-read every step. The coefficients are one parameter per group, so a group's backward
    makes a gradient of its own coefficients only (of one [E, out, K] tensor indexed by the group, it would make
    a zero-filled one of the whole tensor, and Adam's step temporaries of that size). The group SVDs and the fit
    run on ``device``; the result is on the CPU."""
    started = clock()
    scale = projection_std(weights)
    num_experts, out_dim = len(weights), weights.shape[1]
    bases = torch.zeros(len(groups), rank, weights.shape[2], device=device)
    coefs = []
    logits = torch.zeros(num_experts, len(groups), device=device)
    inits = each_group(weights, groups, lambda g, matrix: truncated_group_svd(matrix, rank), device)
    for j, (group, (left, basis)) in enumerate(zip(groups, inits)):
        bases[j] = basis.float()
        coefs.append(left.view(len(group), out_dim, rank).float())  # SVD of the unscaled W, as MoBE train.py
        logits[group, j] = 1.0
    params = [bases.requires_grad_(), *(c.requires_grad_() for c in coefs), logits.requires_grad_()]

    def loss_terms():
        for j, group in enumerate(groups):  # softmax is row-wise: each group's mixing weights on their own
            right = activate(torch.einsum("em,mri->eri", logits[group].softmax(dim=1), bases), options.activation)
            yield ((coefs[j] @ right - scaled_members(weights, group, scale).to(device)) ** 2).sum()

    initialisation, fit_started = elapsed(started), clock()
    curve, best_step, best = _adam(params, loss_terms, math.prod(weights.shape), options)
    _log_times("mixed", weights, initialisation, elapsed(fit_started), len(curve) - 1)
    best_bases, best_coefs, best_logits = best[0], best[1:-1], best[-1]
    return FittedProjection(
        groups=groups, bases=list(best_bases.cpu()), coefs=per_expert(groups, best_coefs, scale),
        mix=best_logits.double().softmax(dim=1).cpu(), loss_curve=curve, best_step=best_step,
    )
