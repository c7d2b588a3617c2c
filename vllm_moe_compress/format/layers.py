"""One compressed MoE layer's entry in ``quantization_config.layers``: a :class:`LayerSpec` subclass per scheme.

A spec holds every size a loader needs before it reads a tensor. The fields common to all schemes live on
:class:`LayerSpec`; each scheme adds its own typed fields (docs/format.md §2, §4, §9, §10). On disk (format
version 1) the scheme's fields are stored as ``base_channels`` and the ``details`` object; :meth:`LayerSpec.to_json`
and :meth:`LayerSpec.from_json` are the only places that know this JSON shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import names
from .checks import check_channel_index, matrix_shape
from .config import PROJECTIONS, FormatError

ACTIVATION_NAMES = ("silu", "tanh", "identity")
"""φ applied to the bases of a ``basis_residual`` layer (the functions: kernels/basis_residual_torch.py)."""


JSON_FIELDS = ("layer", "prefix", "scheme", "num_experts", "hidden_size", "intermediate_size", "base_channels", "ranks",
               "details")
"""The fields of a ``quantization_config.layers`` entry on disk (``base_channels``, ``ranks``, ``details`` optional)."""


@dataclass(kw_only=True)
class LayerSpec:
    """Shapes common to every scheme; ``ranks`` maps a canonical projection to one rank per expert."""

    scheme: ClassVar[str]
    layer: int
    prefix: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    ranks: dict[str, list[int]]

    @property
    def where(self) -> str:
        return f"layer {self.layer} ({self.prefix})"

    # ------------------------------------------------------------------------------ JSON (format version 1)

    def to_json(self) -> dict:
        """The entry as config.json stores it: fields in ``JSON_FIELDS`` order, ``details`` keys sorted (the order
        format version 1 checkpoints have always been written in)."""
        return {"layer": self.layer, "prefix": self.prefix, "scheme": self.scheme, "num_experts": self.num_experts,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "base_channels": self._stored_base_channels(), "ranks": self.ranks,
                "details": dict(sorted(self._details().items()))}

    @staticmethod
    def from_json(entry: dict) -> "LayerSpec":
        """Parse one entry; an unknown scheme raises ``FormatError``, a missing or extra field ``KeyError``/``TypeError``
        (which ``CompressionInfo.from_config`` reports as a malformed quantization_config)."""
        scheme = entry["scheme"]
        if scheme not in LAYER_SPECS:
            where = f"layer {entry.get('layer')} ({entry.get('prefix')})"
            raise FormatError(f"{where}: unknown scheme {scheme!r}; this version knows {', '.join(LAYER_SPECS)}")
        unknown = sorted(set(entry) - set(JSON_FIELDS))
        if unknown:
            raise TypeError(f"layer entry has unexpected field(s) {', '.join(unknown)}")
        common = {k: entry[k] for k in ("layer", "prefix", "num_experts", "hidden_size", "intermediate_size")}
        return LAYER_SPECS[scheme]._from_json(common, entry.get("ranks", {}), entry.get("base_channels", 0),
                                              entry.get("details", {}))

    # ------------------------------------------------------------------------------ per scheme

    def validate(self) -> None:
        """Raise :class:`FormatError` naming the layer and field if the entry is inconsistent."""
        sizes = {"num_experts": self.num_experts, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size}
        for name, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise FormatError(f"{self.where}: {name} must be a positive integer, got {value!r}")
        self._validate_scheme()

    def _check_ranks(self, proj: str, cap: int) -> list[int]:
        ranks = self.ranks.get(proj)
        if ranks is None or len(ranks) != self.num_experts:
            raise FormatError(f"{self.where}: ranks[{proj!r}] must list one rank per expert ({self.num_experts})")
        bad = [r for r in ranks if not isinstance(r, int) or not 0 <= r <= cap]
        if bad:
            raise FormatError(f"{self.where}: ranks[{proj!r}] has {bad[0]!r}, outside [0, {cap}]")
        return ranks

    def num_params(self) -> int:
        """Stored weight parameters of the layer (index tensors are metadata, not counted)."""
        raise NotImplementedError

    def index_tensor_names(self) -> list[str]:
        """The small integer tensors a loader reads before building parameters (shapes may depend on them)."""
        return []

    def expected_tensors(self, proj_names: dict[str, str]) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor of the layer, name -> shape: the floating-point factors (stored in
        ``quantization_config.dtype``) and the integer :meth:`index_tensor_names`. ``proj_names`` maps a
        canonical projection to its checkpoint name. Nothing else may sit under :attr:`prefix`."""
        raise NotImplementedError

    def _validate_scheme(self) -> None:
        raise NotImplementedError

    def _stored_base_channels(self) -> int:
        return 0

    def _details(self) -> dict:
        return {}


@dataclass(kw_only=True)
class BaseDeltaSpec(LayerSpec):
    """``base_delta`` (D²-MoE, svd, whitened-svd): a shared base on ``base_channels`` kept intermediate channels
    (0: no base, the plain low-rank baselines) plus per-expert low-rank deltas (docs/format.md §4)."""

    scheme: ClassVar[str] = "base_delta"
    base_channels: int = 0

    @classmethod
    def _from_json(cls, common: dict, ranks, base_channels, details) -> "BaseDeltaSpec":
        return cls(**common, ranks=ranks, base_channels=base_channels)

    def _stored_base_channels(self) -> int:
        return self.base_channels

    def _validate_scheme(self) -> None:
        if not isinstance(self.base_channels, int) or not 0 <= self.base_channels <= self.intermediate_size:
            raise FormatError(f"{self.where}: base_channels {self.base_channels} outside [0, {self.intermediate_size}]")
        for proj in PROJECTIONS:
            self._check_ranks(proj, min(self.hidden_size, self.intermediate_size))

    def num_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        return sum(r * (h + i) for ranks in self.ranks.values() for r in ranks) + 3 * h * self.base_channels

    def index_tensor_names(self) -> list[str]:
        return [names.base_channels_name(self.prefix)] if self.base_channels else []

    def expected_tensors(self, proj_names: dict[str, str]) -> dict[str, tuple[int, ...]]:
        """Per expert and projection of rank r > 0: ``delta_u`` [out, r], ``delta_v`` [r, in]; with a base, the
        channel index [C] and per projection the base on the kept channels (gate/up [C, H], down [H, C])."""
        h, i, c = self.hidden_size, self.intermediate_size, self.base_channels
        out: dict[str, tuple[int, ...]] = {}
        for p in PROJECTIONS:
            out_dim, in_dim = matrix_shape(p, h, i)
            for e, r in enumerate(self.ranks[p]):
                if r:
                    out[names.delta_name(self.prefix, e, proj_names[p], "delta_u")] = (out_dim, r)
                    out[names.delta_name(self.prefix, e, proj_names[p], "delta_v")] = (r, in_dim)
        if c:
            out[names.base_channels_name(self.prefix)] = (c,)
            out.update({names.base_name(self.prefix, proj_names[p]): matrix_shape(p, h, c) for p in PROJECTIONS})
        return out

    def check_indices(self, indices: dict[str, list[int]]) -> None:
        """The stored channel index must hold ``base_channels`` strictly increasing values in [0, I)."""
        if self.base_channels:
            name = names.base_channels_name(self.prefix)
            check_channel_index(name, indices[name], self.base_channels, self.intermediate_size)


@dataclass(kw_only=True)
class SparseLowRankSpec(LayerSpec):
    """``sparse_lowrank`` (RS-MoE): per expert ``sparse_channels[e]`` dense units and ``lowrank_channels[e]``
    low-rank units (rank ``ranks[p][e]``), and a full shared down base if ``shared_down_base`` (docs/format.md §9)."""

    scheme: ClassVar[str] = "sparse_lowrank"
    sparse_channels: list[int]
    lowrank_channels: list[int]
    shared_down_base: bool = False

    @classmethod
    def _from_json(cls, common: dict, ranks, base_channels, details) -> "SparseLowRankSpec":
        if base_channels not in (0, common["intermediate_size"]):
            raise FormatError(f"layer {common['layer']} ({common['prefix']}): base_channels must be 0 or "
                              f"{common['intermediate_size']} (a full down base)")
        return cls(**common, ranks=ranks, sparse_channels=details.get("sparse_channels"),
                   lowrank_channels=details.get("lowrank_channels"), shared_down_base=bool(base_channels))

    def _stored_base_channels(self) -> int:
        return self.intermediate_size if self.shared_down_base else 0

    def _details(self) -> dict:
        return {"sparse_channels": self.sparse_channels, "lowrank_channels": self.lowrank_channels}

    def _validate_scheme(self) -> None:
        for key, values in self._details().items():
            if not isinstance(values, list) or len(values) != self.num_experts or any(
                    not isinstance(v, int) or v < 0 for v in values):
                raise FormatError(f"{self.where}: details[{key!r}] must list one count >= 0 per expert")
        for e, (s, m) in enumerate(zip(self.sparse_channels, self.lowrank_channels)):
            if s + m > self.intermediate_size:
                raise FormatError(f"{self.where}: expert {e} has {s} sparse + {m} low-rank channels > "
                                  f"{self.intermediate_size}")
        for proj in PROJECTIONS:
            ranks = self.ranks.get(proj)
            if ranks is None or len(ranks) != self.num_experts:
                raise FormatError(f"{self.where}: ranks[{proj!r}] must list one rank per expert ({self.num_experts})")
            for e, r in enumerate(ranks):
                cap = min(self.lowrank_channels[e], self.hidden_size)
                if not isinstance(r, int) or not 0 <= r <= cap:
                    raise FormatError(f"{self.where}: ranks[{proj!r}][{e}] = {r!r} outside [0, {cap}]")

    def num_params(self) -> int:
        h = self.hidden_size
        factors = sum(k * (h + m) for ranks in self.ranks.values() for k, m in zip(ranks, self.lowrank_channels))
        return 3 * h * sum(self.sparse_channels) + factors + h * self._stored_base_channels()

    def unit_counts(self, kind: str) -> list[int]:
        """``kind`` ``sparse`` or ``lowrank``: that kind's unit count per expert."""
        return self.sparse_channels if kind == "sparse" else self.lowrank_channels

    def index_tensor_names(self) -> list[str]:
        """One index tensor per expert and non-empty kind of unit."""
        return [names.unit_channels_name(self.prefix, e, kind)
                for e in range(self.num_experts) for kind in ("sparse", "lowrank") if self.unit_counts(kind)[e]]

    def expected_tensors(self, proj_names: dict[str, str]) -> dict[str, tuple[int, ...]]:
        """Per expert: each non-empty kind's channel index [s] / [m]; per projection the ``sparse`` units
        (gate/up [s, H], down [H, s]) and, at rank r > 0, ``lowrank_u``/``lowrank_v`` (gate/up [m, r], [r, H];
        down [H, r], [r, m]); with a shared down base, ``base`` [H, I]."""
        h = self.hidden_size
        out: dict[str, tuple[int, ...]] = {}
        for e, (s, m) in enumerate(zip(self.sparse_channels, self.lowrank_channels)):
            for kind, count in (("sparse", s), ("lowrank", m)):
                if count:
                    out[names.unit_channels_name(self.prefix, e, kind)] = (count,)
            for p in PROJECTIONS:
                name, r = proj_names[p], self.ranks[p][e]
                if s:
                    out[names.unit_name(self.prefix, e, name, "sparse")] = matrix_shape(p, h, s)
                if r:
                    u_shape, v_shape = ((h, r), (r, m)) if p == "down" else ((m, r), (r, h))
                    out[names.unit_name(self.prefix, e, name, "lowrank_u")] = u_shape
                    out[names.unit_name(self.prefix, e, name, "lowrank_v")] = v_shape
        if self.shared_down_base:
            out[names.base_name(self.prefix, proj_names["down"])] = (h, self.intermediate_size)
        return out

    def check_indices(self, indices: dict[str, list[int]]) -> None:
        """Each expert's sparse and low-rank channel lists: sorted, distinct, in [0, I), and disjoint."""
        for e in range(self.num_experts):
            lists = {}
            for kind in ("sparse", "lowrank"):
                name = names.unit_channels_name(self.prefix, e, kind)
                lists[kind] = indices.get(name, [])
                check_channel_index(name, lists[kind], self.unit_counts(kind)[e], self.intermediate_size)
            if set(lists["sparse"]) & set(lists["lowrank"]):
                raise FormatError(f"{self.prefix}: expert {e} lists a channel as both sparse and low-rank")


@dataclass(kw_only=True)
class BasisResidualSpec(LayerSpec):
    """``basis_residual`` (RFID-MoE, MoBE): experts in equal ``groups``; per factorised projection p (the keys of
    ``basis_ranks``) group-shared bases of ranks ``basis_ranks[p]`` (one per group, or ``mixed`` by every expert),
    φ = ``activation``, and a hashed residual of ``residual_size`` entries per group (docs/format.md §10)."""

    scheme: ClassVar[str] = "basis_residual"
    activation: str
    groups: list[list[int]]
    basis_ranks: dict[str, list[int]]
    mixed: bool
    residual_size: int
    residual_seed: int

    DETAILS: ClassVar[tuple[str, ...]] = ("activation", "groups", "basis_ranks", "mixed", "residual_size",
                                          "residual_seed")

    @classmethod
    def _from_json(cls, common: dict, ranks, base_channels, details) -> "BasisResidualSpec":
        missing = [k for k in cls.DETAILS if k not in details]
        if missing:
            raise FormatError(f"layer {common['layer']} ({common['prefix']}): details lacks {', '.join(missing)}")
        return cls(**common, ranks=ranks, **{k: details[k] for k in cls.DETAILS})

    def _details(self) -> dict:
        return {k: getattr(self, k) for k in self.DETAILS}

    @property
    def factorized(self) -> list[str]:
        """The factorised projections, in canonical order."""
        return [p for p in PROJECTIONS if p in self.basis_ranks]

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    def group_and_slot(self) -> list[tuple[int, int]]:
        """(group, slot in the group) per expert."""
        where = {e: (g, slot) for g, members in enumerate(self.groups) for slot, e in enumerate(members)}
        return [where[e] for e in range(self.num_experts)]

    def _validate_scheme(self) -> None:
        where = self.where
        if self.activation not in ACTIVATION_NAMES:
            raise FormatError(f"{where}: activation {self.activation!r} is not one of {', '.join(ACTIVATION_NAMES)}")
        groups = self.groups
        flat = sorted(e for g in groups for e in g) if isinstance(groups, list) and all(
            isinstance(g, list) for g in groups) else None
        if flat != list(range(self.num_experts)) or len({len(g) for g in groups}) != 1:
            raise FormatError(f"{where}: details.groups must split experts 0..{self.num_experts - 1} into equal groups")
        k = self.group_size
        for proj, ranks in self.basis_ranks.items():
            if proj not in PROJECTIONS:
                raise FormatError(f"{where}: basis_ranks has unknown projection {proj!r}")
            out_dim, in_dim = matrix_shape(proj, self.hidden_size, self.intermediate_size)
            cap = min(k * out_dim, in_dim)
            if not ranks or any(not isinstance(r, int) or not 1 <= r <= cap for r in ranks):
                raise FormatError(f"{where}: basis_ranks[{proj!r}] must hold ranks in [1, {cap}]")
            if self.mixed and len(set(ranks)) != 1:
                raise FormatError(f"{where}: mixed bases must share one rank, basis_ranks[{proj!r}] = {ranks}")
            if not self.mixed and len(ranks) != len(groups):
                raise FormatError(f"{where}: basis_ranks[{proj!r}] needs one rank per group ({len(groups)})")
            want = [ranks[0]] * self.num_experts if self.mixed else [
                ranks[g] for e in range(self.num_experts) for g, m in enumerate(groups) if e in m]
            if self.ranks.get(proj) != want:
                raise FormatError(f"{where}: ranks[{proj!r}] must be each expert's basis rank")
        a = self.residual_size
        if not isinstance(a, int) or not 0 <= a <= k * self.hidden_size * self.intermediate_size:
            raise FormatError(f"{where}: residual_size {a!r} outside [0, k·H·I]")
        if a and self.mixed:
            raise FormatError(f"{where}: a residual needs one basis per group (mixed is true)")

    def num_params(self) -> int:
        total = 0
        for p in PROJECTIONS:
            out_dim, in_dim = matrix_shape(p, self.hidden_size, self.intermediate_size)
            if p not in self.basis_ranks:
                total += self.num_experts * out_dim * in_dim
                continue
            bases = self.basis_ranks[p]
            total += out_dim * sum(self.ranks[p]) + in_dim * sum(bases) + len(bases) * self.residual_size
            total += self.num_experts * len(bases) if self.mixed else 0
        return total

    def index_tensor_names(self) -> list[str]:
        """The residual's bucket counts (checked against the seed by the loader, which owns the hash)."""
        return [names.counts_name(self.prefix)] if self.residual_size else []

    def expected_tensors(self, proj_names: dict[str, str]) -> dict[str, tuple[int, ...]]:
        """Per factorised projection q ([out, in]): bases [K_j, in], per expert ``coef`` [out, K], MoBE's ``mix``
        [E, m], per group the residual ``eta`` [a]; a projection kept dense: per expert ``weight`` [out, in];
        with a residual, its bucket counts [a]."""
        a = self.residual_size
        out: dict[str, tuple[int, ...]] = {}
        for p in PROJECTIONS:
            name = proj_names[p]
            out_dim, in_dim = matrix_shape(p, self.hidden_size, self.intermediate_size)
            if p not in self.basis_ranks:
                out.update({names.dense_name(self.prefix, e, name): (out_dim, in_dim) for e in range(self.num_experts)})
                continue
            bases = self.basis_ranks[p]
            out.update({names.basis_name(self.prefix, j, name): (r, in_dim) for j, r in enumerate(bases)})
            out.update({names.coef_name(self.prefix, e, name): (out_dim, r) for e, r in enumerate(self.ranks[p])})
            if self.mixed:
                out[names.mix_name(self.prefix, name)] = (self.num_experts, len(bases))
            if a:
                out.update({names.eta_name(self.prefix, g, name): (a,) for g in range(len(self.groups))})
        if a:
            out[names.counts_name(self.prefix)] = (a,)
        return out


LAYER_SPECS: dict[str, type[LayerSpec]] = {cls.scheme: cls for cls in (BaseDeltaSpec, SparseLowRankSpec,
                                                                        BasisResidualSpec)}
"""Every scheme this format version knows, by ``quantization_config.layers[*].scheme``."""
