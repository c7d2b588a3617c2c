"""The ``moe_compress`` checkpoint format, version 1 (specification: docs/format.md).

A compressed checkpoint is the original model directory with the routed-expert tensors replaced.
Per MoE layer with expert prefix ``P`` (e.g. ``model.layers.3.mlp.experts``) and checkpoint projection
names ``gate_proj/up_proj/down_proj`` (Mixtral: ``w1/w3/w2``), scheme ``base_delta`` stores::

    P.{i}.{proj}.delta_u   [out, r_i]   left low-rank factor of expert i (absent when r_i == 0)
    P.{i}.{proj}.delta_v   [r_i, in]    right low-rank factor
    P.base.{proj}.weight   gate/up [C, H], down [H, C]   shared base, C kept intermediate channels
    P.base.channels        int32 [C]    which intermediate channels the base keeps (sorted)

so that expert i computes  W_i x = B x + U_i (V_i x)  with B scattered onto the kept channels.
Plain low-rank baselines (``svd``, ``whitened-svd``) are ``base_delta`` layers with ``base_channels == 0``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .architectures import PROJECTIONS

QUANT_METHOD = "moe_compress"
FORMAT_VERSION = 1
SCHEMES = ("base_delta",)
STATS_FILE = "moe_compress_stats.json"


class FormatError(ValueError):
    """A compressed checkpoint's quantization_config or tensors do not follow the format."""


def delta_name(prefix: str, expert: int, proj: str, factor: str) -> str:
    """``factor`` is ``delta_u`` or ``delta_v``; ``proj`` is the checkpoint projection name."""
    return f"{prefix}.{expert}.{proj}.{factor}"


def base_name(prefix: str, proj: str) -> str:
    return f"{prefix}.base.{proj}.weight"


def base_channels_name(prefix: str) -> str:
    return f"{prefix}.base.channels"


@dataclass
class LayerSpec:
    """Shapes of one compressed MoE layer: everything a loader needs before reading a tensor."""

    layer: int
    prefix: str
    scheme: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    base_channels: int
    ranks: dict[str, list[int]] = field(default_factory=dict)  # canonical proj -> rank per expert

    def validate(self) -> None:
        where = f"layer {self.layer} ({self.prefix})"
        if self.scheme not in SCHEMES:
            raise FormatError(f"{where}: unknown scheme {self.scheme!r}; this version knows {', '.join(SCHEMES)}")
        if not 0 <= self.base_channels <= self.intermediate_size:
            raise FormatError(f"{where}: base_channels {self.base_channels} outside [0, {self.intermediate_size}]")
        max_rank = min(self.hidden_size, self.intermediate_size)
        for proj in PROJECTIONS:
            ranks = self.ranks.get(proj)
            if ranks is None or len(ranks) != self.num_experts:
                raise FormatError(f"{where}: ranks[{proj!r}] must list one rank per expert ({self.num_experts})")
            bad = [r for r in ranks if not isinstance(r, int) or not 0 <= r <= max_rank]
            if bad:
                raise FormatError(f"{where}: ranks[{proj!r}] has {bad[0]!r}, outside [0, {max_rank}]")


    def check_base_channels(self, channels: list[int]) -> None:
        """The stored channel index must hold ``base_channels`` strictly increasing values in [0, I)."""
        c, i_size = self.base_channels, self.intermediate_size
        if len(channels) != c or any(b <= a for a, b in zip(channels, channels[1:])) or (
                channels and not 0 <= channels[0] <= channels[-1] < i_size):
            raise FormatError(f"tensor {base_channels_name(self.prefix)} must hold sorted distinct channels ({c} of them) "
                              f"in [0, {i_size})")


@dataclass
class CompressionInfo:
    """The ``quantization_config`` block of config.json."""

    method: str
    target_ratio: float
    achieved_ratio: float
    expert_ratio: float
    original_params: int
    compressed_params: int
    dtype: str
    proj_names: dict[str, str]
    layers: list[LayerSpec]
    dynamic_prune_ratio: float = 0.0
    method_options: dict = field(default_factory=dict)

    def to_config(self) -> dict:
        d = asdict(self)
        d["layers"] = {str(spec["layer"]): spec for spec in d["layers"]}
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_config(cls, qc: dict | None) -> "CompressionInfo":
        if not qc or qc.get("quant_method") != QUANT_METHOD:
            found = (qc or {}).get("quant_method")
            raise FormatError(f"not a {QUANT_METHOD} checkpoint (quantization_config.quant_method = {found!r})")
        if qc.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"unsupported format_version {qc.get('format_version')!r}; this version reads {FORMAT_VERSION}"
            )
        try:
            fields = {k: qc[k] for k in cls.__dataclass_fields__ if k in qc}
            fields["layers"] = [LayerSpec(**spec) for spec in qc["layers"].values()]
            info = cls(**fields)
        except (KeyError, TypeError, AttributeError) as err:
            raise FormatError(f"malformed quantization_config: {err}") from err
        for spec in info.layers:
            spec.validate()
        return info
