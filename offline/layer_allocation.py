"""Layer-wise parameter budgets from mutual information (RS-MoE §3.5, App. A.3).

1. Feed the calibration windows through the original model (streamed layer by layer); the output of every
   MoE layer l is mean-pooled over each window's tokens (masked pooling; our windows have no padding) into
   z^l [N, H].
2. For each pair of adjacent MoE layers train a MINE statistics network T(z^l, z^{l+1}) (Belghazi et al.
   2018) on the Donsker–Varadhan bound  I ≥ E_joint[T] − log E_marginal[e^T]  (marginal pairs: z^{l+1}
   shuffled across windows) and keep the bound on all windows as the MI estimate. Choices: features are
   standardised per dimension, T is a 2-layer MLP (``MIOptions.hidden`` units), full-batch Adam for
   ``steps`` steps, seeded.
3. Redundancy R_l = mean MI of layer l with its neighbours.
4. Save ratios s_l (kept fraction of layer l's expert parameters) from the QP
       min  Σ_l (s_l − t_l)²  +  λ_smooth Σ_l (s_{l+1} − s_l)²  +  λ_reg Σ_l (s_l − s̄)²
       s.t. Σ_l n_l s_l / Σ_l n_l = s̄,   s̄ − bound ≤ s_l ≤ s̄ + bound,  0 ≤ s_l ≤ 1,
   solved by scipy's SLSQP. Choice (the paper gives no fidelity target): t_l = s̄ + bound·(mean R̂ − R̂_l)
   with R̂ the redundancies rescaled to [0, 1], so more redundant layers get less.

``allocation="uniform"`` returns no weights (budget.py splits evenly); ``"reverse"`` mirrors the MI
allocation around s̄ (s_l → 2s̄ − s_l: the redundant layers get more), the paper's Table 2 ablations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .budget import LayerShape
from .calibration import clock, elapsed, forward_layerwise
from .choices import ALLOCATIONS
from .options import check_positive, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MIOptions:
    """RS-MoE's mutual-information layer budgets (``RSOptions.mi``): the settings of this module's MINE and QP."""

    steps: int = option(300, "MINE training steps per layer pair", flag="--rs-mine-steps")
    hidden: int = option(64, "hidden units of the MINE statistics network", cli=False)
    lr: float = option(1e-3, "Adam learning rate of MINE", cli=False)
    seed: int = option(0, "seed of MINE's initialisation and shuffles", from_arg="seed")
    bound: float = option(0.1, "largest deviation of a layer's kept fraction from the mean")
    smooth: float = option(0.5, "QP smoothness weight λ_smooth")
    reg: float = option(0.1, "QP regularisation weight λ_reg")

    def __post_init__(self):
        check_positive(self.steps, "MINE steps")
        check_positive(self.hidden, "MINE hidden units")
        if not (self.bound >= 0 and self.smooth >= 0 and self.reg >= 0 and self.lr > 0):
            raise ValueError(f"MI bound, smooth and reg must be >= 0 and lr > 0, got {self.bound}, {self.smooth}, "
                             f"{self.reg}, {self.lr}")


def pooled_layer_outputs(source, samples: torch.Tensor, layers: list[int], batch_size: int) -> dict[int, torch.Tensor]:
    """z^l [N, H]: every MoE layer's output hidden states, mean-pooled over each window's tokens, from one
    layer-streamed pass through ``source`` (offline/source_model.py)."""
    pooled: dict[int, torch.Tensor] = {}

    def after_layer(index: int, hidden: list[torch.Tensor]) -> None:
        if index in layers:
            pooled[index] = torch.cat([h.float().mean(1) for h in hidden])

    forward_layerwise(source, samples, batch_size, after_layer, progress=False)
    return pooled


def _standardise(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(0)) / z.std(0).clamp_min(1e-6)


def mine_estimate(a: torch.Tensor, b: torch.Tensor, options: MIOptions) -> float:
    """Donsker–Varadhan MI lower bound between paired rows of ``a`` [N, Da] and ``b`` [N, Db] (nats).

    Runs single-threaded: the network is tiny, and intra-op threads on a shared CPU cost far more in
    synchronisation than they save (measured 30x slower with 2 threads on the busy 2-core box).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_mine(a, b, options)
    finally:
        torch.set_num_threads(threads)


def _train_mine(a: torch.Tensor, b: torch.Tensor, options: MIOptions) -> float:
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    a, b = _standardise(a.float()), _standardise(b.float())
    net = nn.Sequential(nn.Linear(a.shape[1] + b.shape[1], options.hidden), nn.ReLU(), nn.Linear(options.hidden, 1))
    optimiser = torch.optim.Adam(net.parameters(), lr=options.lr)
    n = a.shape[0]

    def bound(shuffle: torch.Tensor) -> torch.Tensor:
        joint = net(torch.cat([a, b], 1)).mean()
        marginal = net(torch.cat([a, b[shuffle]], 1)).squeeze(1)
        return joint - (torch.logsumexp(marginal, 0) - np.log(n))

    with torch.enable_grad():
        for _ in range(options.steps):
            optimiser.zero_grad()
            loss = -bound(torch.randperm(n, generator=generator))
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        return float(bound(torch.randperm(n, generator=generator)))


def redundancy_scores(adjacent_mi: list[float]) -> list[float]:
    """R_l = mean of the MI between layer l and each neighbour (len(adjacent_mi) + 1 layers)."""
    layers = len(adjacent_mi) + 1
    return [float(np.mean([adjacent_mi[j] for j in (l - 1, l) if 0 <= j < len(adjacent_mi)])) for l in range(layers)]


def solve_save_ratios(redundancy: list[float], sizes: list[int], mean_keep: float, options: MIOptions) -> list[float]:
    """The constrained QP of §3.5 (module docstring, step 4) with scipy SLSQP."""
    from scipy.optimize import minimize  # not at the top: every compress command imports MIOptions from here

    r = np.asarray(redundancy, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64) / np.sum(sizes)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread if spread > 0 else np.zeros_like(r)
    target = mean_keep + options.bound * (scaled.mean() - scaled)
    diff = np.diff(np.eye(len(r)), axis=0)  # (s_{l+1} − s_l) = diff @ s
    quad = np.eye(len(r)) * (1 + options.reg) + options.smooth * diff.T @ diff
    linear = -2 * (target + options.reg * mean_keep)

    def objective(s):
        return float(s @ quad @ s + linear @ s)

    def gradient(s):
        return 2 * quad @ s + linear

    lo, hi = max(0.0, mean_keep - options.bound), min(1.0, mean_keep + options.bound)
    result = minimize(objective, np.full(len(r), mean_keep), jac=gradient, method="SLSQP",
                      bounds=[(lo, hi)] * len(r),
                      constraints=[{"type": "eq", "fun": lambda s: n @ s - mean_keep, "jac": lambda s: n}],
                      options={"ftol": 1e-12, "maxiter": 500})
    if not result.success:
        raise RuntimeError(f"layer-budget QP failed: {result.message}")
    return result.x.tolist()


def layer_keep_fractions(allocation: str, source, samples: torch.Tensor, shapes: dict[int, LayerShape],
                         mean_keep: float, batch_size: int, options: MIOptions) -> dict[int, float]:
    """Per-layer kept fraction of expert parameters (``allocation`` one of ALLOCATIONS); {} for uniform."""
    layers = sorted(shapes)
    if allocation == "uniform" or len(layers) < 2:
        return {}
    started = clock()
    pooled = pooled_layer_outputs(source, samples, layers, batch_size)
    pooled_seconds, mine_started = elapsed(started), clock()
    mi = [mine_estimate(pooled[a], pooled[b], options) for a, b in zip(layers, layers[1:])]
    log.info("layer budgets, seconds wall (CPU): pooled outputs %.1f (%.1f), MINE %.1f (%.1f)", *pooled_seconds,
             *elapsed(mine_started))
    redundancy = redundancy_scores(mi)
    keep = solve_save_ratios(redundancy, [shapes[l].dense_expert_params for l in layers], mean_keep, options)
    if allocation == "reverse":
        keep = [2 * mean_keep - s for s in keep]
    log.info("MINE between adjacent MoE layers %s; redundancy %s; kept fractions (%s) %s",
             [round(v, 4) for v in mi], [round(v, 4) for v in redundancy], allocation, [round(s, 4) for s in keep])
    return dict(zip(layers, keep))
