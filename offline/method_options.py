"""The options of every compression method: one frozen dataclass per method, torch-free.

Each method class (``offline/methods/``) names its dataclass as ``Options`` and reads its settings from it, and the
methods' registry (``offline.methods.METHODS``) pairs each method name with its dataclass; the command line builds ``moe-compress compress``'s per-method arguments from these fields (offline/option_args.py:
help, choices and defaults come from here), and ``record()`` is what the checkpoint keeps in
``quantization_config.method_options`` (docs/format.md). Nothing here imports torch, so ``--help`` stays fast.

Field conventions: ``option(default, help, ...)`` gives a field its help text; the command-line flag is
``--`` + the class's ``flag_prefix`` + the field name with dashes, unless ``flag`` says otherwise. A field
whose value is itself an options dataclass is expanded into one flag per sub-field (``MIOptions``), or read as
one flag with a value per sub-field when ``flag`` is given (``ACIWeights``). Values are checked in
``__post_init__`` (ValueError), so a bad value is refused before any model is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .choices import ACTIVATION_NAMES, ALLOCATIONS, EFFECTIVE_RANK_MODES, MERGES, RS_BASES, RS_LOWRANK_SVDS, RS_SCORES


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
           cli: bool = True, from_arg: str | None = None) -> Any:
    """A dataclass field with its command-line description. ``cli=False``: not on the command line;
    ``from_arg``: taken from that general argument of the run (e.g. ``seed``) instead of a flag of its own."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli": cli,
                                            "from_arg": from_arg})


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def _check_range(value: float, low: float, high: float, what: str, *, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{what} must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value}")


def _check_positive(value: int, what: str) -> None:
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options; a method without options uses it as is (``svd``, ``whitened-svd``)."""

    flag_prefix: ClassVar[str] = ""

    def record(self) -> dict:
        """What quantization_config.method_options records (docs/format.md)."""
        return asdict(self)


@dataclass(frozen=True)
class D2Options(MethodOptions):
    """D²-MoE options (--method d2; docs/methods.md)"""

    merge: str = option("fisher", "how the base is merged: fisher (Eq. 5), or the Table 5 ablations mean / "
                        "frequency", choices=MERGES)
    base_prune: float = option(0.0, "base pruning ratio, half static (stored) and half dynamic (per batch at "
                               "inference); 0 is our choice, measured (BENCHMARKS.md §11.3); 0.1 = the paper's "
                               "5%+5% 'performance' setting")
    trim_experts: int = option(0, "drop the deltas of the N least-routed experts per layer")

    def __post_init__(self):
        _check_choice(self.merge, MERGES, "merge")
        _check_range(self.base_prune, 0.0, 1.0, "base prune ratio", high_open=True)
        if self.trim_experts < 0:
            raise ValueError(f"trim_experts must be >= 0, got {self.trim_experts}")

    def record(self) -> dict:
        return {"merge": self.merge, "base_prune": self.base_prune, "static_prune_ratio": self.base_prune / 2,
                "trim_experts": self.trim_experts}


@dataclass(frozen=True)
class ACIWeights:
    """Algorithm 1's hyperparameters (RS-MoE), App. A.2 defaults."""

    w_mean: float = 0.4
    w_var: float = 0.05
    w_peak: float = 0.8
    gamma: float = 0.05


@dataclass(frozen=True)
class MIOptions:
    """RS-MoE's mutual-information layer budgets (offline/layer_allocation.py)."""

    steps: int = option(300, "MINE training steps per layer pair", flag="--rs-mine-steps")
    hidden: int = option(64, "hidden units of the MINE statistics network", cli=False)
    lr: float = option(1e-3, "Adam learning rate of MINE", cli=False)
    seed: int = option(0, "seed of MINE's initialisation and shuffles", from_arg="seed")
    bound: float = option(0.1, "largest deviation of a layer's kept fraction from the mean")
    smooth: float = option(0.5, "QP smoothness weight λ_smooth")
    reg: float = option(0.1, "QP regularisation weight λ_reg")

    def __post_init__(self):
        _check_positive(self.steps, "MINE steps")
        _check_positive(self.hidden, "MINE hidden units")
        if not (self.bound >= 0 and self.smooth >= 0 and self.reg >= 0 and self.lr > 0):
            raise ValueError(f"MI bound, smooth and reg must be >= 0 and lr > 0, got {self.bound}, {self.smooth}, "
                             f"{self.reg}, {self.lr}")


@dataclass(frozen=True)
class RSOptions(MethodOptions):
    """RS-MoE options (--method rs; docs/methods.md)"""

    flag_prefix: ClassVar[str] = "rs-"

    score: str = option("aci", "unit importance: aci (Algorithm 1) or the Figure 3 ablations weight / activation / "
                        "peak", choices=RS_SCORES)
    base: str = option("ridge", "shared down base: ridge regression (§3.4), mean / frequency merge (Table 4), none",
                       choices=RS_BASES)
    allocation: str = option("mi", "layer budgets: mi (MINE + QP, §3.5), uniform, reverse (Table 2)",
                             choices=ALLOCATIONS)
    sparse_share: float = option(0.8, "fraction of each layer's budget spent on dense (sparse-component) units")
    lowrank_share: float = option(0.5, "fraction of the remaining units approximated low-rank; the rest are pruned")
    ridge_lambda: float = option(1e-3, "ridge λ, relative to the Gram's mean diagonal")
    ridge_samples: int = option(2048, "routed tokens kept per expert for the ridge fit and the unit scores")
    lowrank_svd: str = option("activation", "SVD of the low-rank units: activation-aware via the EVD of XᵀX "
                              "(§3.4) or plain (Table 3)", choices=RS_LOWRANK_SVDS)
    aci: ACIWeights = option(ACIWeights(), "ACI weights", flag="--rs-aci")
    mi: MIOptions = option(MIOptions(), "MI layer budgets")

    def __post_init__(self):
        for value, allowed, what in ((self.score, RS_SCORES, "score"), (self.base, RS_BASES, "base"),
                                     (self.allocation, ALLOCATIONS, "allocation"),
                                     (self.lowrank_svd, RS_LOWRANK_SVDS, "lowrank_svd")):
            _check_choice(value, allowed, what)
        _check_range(self.sparse_share, 0.0, 1.0, "sparse_share")
        _check_range(self.lowrank_share, 0.0, 1.0, "lowrank_share")
        if self.ridge_lambda < 0:
            raise ValueError(f"ridge_lambda must be >= 0, got {self.ridge_lambda}")
        _check_positive(self.ridge_samples, "ridge_samples")


@dataclass(frozen=True)
class BasisOptions(MethodOptions):
    """MoBE and RFID-MoE options (--method mobe, --method rfid)"""

    group_size: int = option(4, "experts per group k; MoBE uses E/k bases, RFID-MoE E/k groups")
    activation: str = option("silu", "φ applied to the bases (identity = plain grouped SVD, an ablation)",
                             choices=ACTIVATION_NAMES)
    fit_steps: int = option(200, "full-batch Adam steps per projection")
    fit_lr: float = option(0.07, "Adam learning rate on the scaled loss")
    fit_patience: int = option(50, "stop after this many steps without a new best loss; the best state is kept")
    factorize_down: bool = option(False, "factorise down_proj too (default: dense, as the papers); needed for high "
                                  "total ratios")

    def __post_init__(self):
        _check_positive(self.group_size, "group size")
        _check_choice(self.activation, ACTIVATION_NAMES, "activation")
        if self.fit_steps < 0 or self.fit_patience < 1 or not self.fit_lr > 0:
            raise ValueError(f"need fit_steps >= 0, fit_patience >= 1 and fit_lr > 0, got {self.fit_steps}, "
                             f"{self.fit_patience}, {self.fit_lr}")

    @property
    def factorized(self) -> tuple[str, ...]:
        """The projections replaced by bases; the others stay dense."""
        return ("gate", "up", "down") if self.factorize_down else ("gate", "up")

    def record(self) -> dict:
        return {"group_size": self.group_size, "activation": self.activation, "fit_steps": self.fit_steps,
                "fit_lr": self.fit_lr, "fit_patience": self.fit_patience, "factorized": list(self.factorized)}


@dataclass(frozen=True)
class RFIDOptions(BasisOptions):
    """RFID-MoE options (--method rfid)"""

    xi: float = option(0.75, "weight of information density vs routing frequency, C = ξE + (1−ξ)F")
    effective_rank: str = option("energy", "spectrum normalisation of the effective rank: σ² (energy, the paper) "
                                 "or σ (singular)", choices=EFFECTIVE_RANK_MODES)
    residual_fraction: float = option(0.0, "size of each group's residual vector η as a fraction of its parameters; "
                                      "0 = off is our choice, measured (BENCHMARKS.md §11.4); the paper's 0.03 = 3 %")
    residual_seed: int = option(0, "seed of the shared projection P")

    def __post_init__(self):
        super().__post_init__()
        _check_range(self.xi, 0.0, 1.0, "xi")
        _check_choice(self.effective_rank, EFFECTIVE_RANK_MODES, "effective rank")
        _check_range(self.residual_fraction, 0.0, 1.0, "residual fraction", high_open=True)

    def record(self) -> dict:
        return {**super().record(), "xi": self.xi, "effective_rank": self.effective_rank,
                "residual_fraction": self.residual_fraction, "residual_seed": self.residual_seed}
