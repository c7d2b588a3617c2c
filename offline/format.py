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

QUANT_METHOD = "moe_compress"
FORMAT_VERSION = 1
STATS_FILE = "moe_compress_stats.json"
STORED_DTYPES = ("bfloat16", "float16", "float32")
"""Dtypes the compressed factors may be stored in (quantization_config.dtype)."""


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
    base_channels: int = 0
    ranks: dict[str, list[int]] = field(default_factory=dict)  # canonical proj -> rank per expert
    details: dict = field(default_factory=dict)  # scheme-specific sizes beyond ranks/base_channels

    def validate(self) -> None:
        """Common checks here; the scheme's layer class checks its own fields (offline/schemes/)."""
        from .schemes import SCHEME_LAYERS  # the schemes import this module

        where = f"layer {self.layer} ({self.prefix})"
        if self.scheme not in SCHEME_LAYERS:
            raise FormatError(f"{where}: unknown scheme {self.scheme!r}; this version knows {', '.join(SCHEME_LAYERS)}")
        sizes = {"num_experts": self.num_experts, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size}
        for name, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise FormatError(f"{where}: {name} must be a positive integer, got {value!r}")
        SCHEME_LAYERS[self.scheme].validate_spec(self)


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
        info.validate()
        return info

    def validate(self) -> None:
        """Fields every loader relies on; each layer's own fields are checked by :meth:`LayerSpec.validate`."""
        from .architectures import PROJECTIONS

        if not isinstance(self.proj_names, dict) or sorted(self.proj_names) != sorted(PROJECTIONS):
            raise FormatError(f"quantization_config.proj_names must map {', '.join(PROJECTIONS)}, got {self.proj_names}")
        if self.dtype not in STORED_DTYPES:
            raise FormatError(f"quantization_config.dtype {self.dtype!r} is not one of {', '.join(STORED_DTYPES)}")
        if not isinstance(self.dynamic_prune_ratio, (int, float)) or not 0 <= self.dynamic_prune_ratio < 1:
            raise FormatError(f"quantization_config.dynamic_prune_ratio {self.dynamic_prune_ratio!r} is outside [0, 1)")
        if not self.layers:
            raise FormatError("quantization_config.layers is empty: no compressed MoE layer")
        for spec in self.layers:
            spec.validate()
