"""``quantization_config``: the block of config.json that marks and describes a compressed checkpoint (docs/format.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

QUANT_METHOD = "moe_compress"
FORMAT_VERSION = 1
STATS_FILE = "moe_compress_stats.json"
STORED_DTYPES = ("bfloat16", "float16", "float32")
"""Dtypes the compressed factors may be stored in (quantization_config.dtype)."""

PROJECTIONS = ("gate", "up", "down")
"""Canonical projection names (gate/up: [I, H], down: [H, I]); ``proj_names`` maps them to checkpoint names."""


class FormatError(ValueError):
    """A compressed checkpoint's quantization_config or tensors do not follow the format."""


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
    layers: list  # list[LayerSpec], one per compressed MoE layer
    dynamic_prune_ratio: float = 0.0
    method_options: dict = field(default_factory=dict)

    def to_config(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"] = {str(spec.layer): spec.to_json() for spec in self.layers}
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_config(cls, qc: dict | None) -> "CompressionInfo":
        from .layers import LayerSpec

        if not qc or qc.get("quant_method") != QUANT_METHOD:
            found = (qc or {}).get("quant_method")
            raise FormatError(f"not a {QUANT_METHOD} checkpoint (quantization_config.quant_method = {found!r})")
        if qc.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"unsupported format_version {qc.get('format_version')!r}; this version reads {FORMAT_VERSION}"
            )
        try:
            values = {k: qc[k] for k in cls.__dataclass_fields__ if k in qc}
            values["layers"] = [LayerSpec.from_json(spec) for spec in qc["layers"].values()]
            info = cls(**values)
        except (KeyError, TypeError, AttributeError) as err:
            raise FormatError(f"malformed quantization_config: {err}") from err
        info.validate()
        return info

    def validate(self) -> None:
        """Fields every loader relies on; each layer's own fields are checked by ``LayerSpec.validate``."""
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
