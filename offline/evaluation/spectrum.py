"""Singular-value energy of original expert weights, the shared base and the deltas (D²-MoE Figures 1–2).

For a matrix with singular values s_1 >= s_2 >= ..., the cumulative energy retained by the top k of them is
E(k) = sum_{j<=k} s_j^2 / sum_j s_j^2 (the fraction of the squared Frobenius norm a rank-k truncation keeps).
D²-MoE's argument is that the deltas W_i - B reach a given E(k) at a smaller k than the experts W_i themselves.

Here, for one MoE layer of a compressed checkpoint and each projection:

- ``original``: every expert W_i read from the original (dense) model directory;
- ``base``: the checkpoint's shared base B, scattered onto its kept intermediate channels (zero elsewhere);
- ``delta``: W_i - B for every expert (equal to W_i when the checkpoint has no base, e.g. ``svd``).

All curves are computed in float64 with the index k normalised by the full rank min(out, in), so matrices of
any shape share one axis. ``stored_rank`` is the rank the checkpoint keeps for each expert's delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_moe_compress.format import PROJECTIONS, CompressionInfo, FormatError

from ..checkpoint_io import SafetensorsCheckpoint, read_config
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer


def cumulative_energy(matrix: torch.Tensor) -> torch.Tensor:
    """E(k) for k = 1..min(shape): cumulative share of the squared singular values (float64)."""
    s = torch.linalg.svdvals(matrix.double())
    energy = s.square().cumsum(0)
    return energy / energy[-1].clamp_min(torch.finfo(torch.float64).tiny)


@dataclass
class ProjectionSpectra:
    """Cumulative-energy curves of one projection: ``original`` and ``delta`` are [experts, k], ``base`` is [k]."""

    original: torch.Tensor
    delta: torch.Tensor
    base: torch.Tensor | None
    stored_rank: list[int]

    def retained_at_stored_rank(self, curves: torch.Tensor) -> float:
        """Mean over experts of E(r_i) at the stored rank r_i (0 for a rank-0 expert)."""
        values = [float(c[r - 1]) if r else 0.0 for c, r in zip(curves, self.stored_rank)]
        return sum(values) / len(values)


def layer_spectra(original_dir: str | Path, compressed_dir: str | Path, layer: int) -> dict[str, ProjectionSpectra]:
    """Energy curves of MoE layer ``layer``, per canonical projection (gate, up, down)."""
    info = CompressionInfo.from_config(read_config(compressed_dir).get("quantization_config"))
    specs = {spec.layer: spec for spec in info.layers}
    if layer not in specs:
        raise ValueError(f"layer {layer} is not a compressed MoE layer of {compressed_dir} "
                         f"(compressed layers: {sorted(specs)})")
    spec = specs[layer]
    if spec.scheme != BaseDeltaLayer.scheme:
        raise FormatError(f"layer {layer} uses scheme {spec.scheme!r}; the energy plot reads {BaseDeltaLayer.scheme!r} only")
    compressed = BaseDeltaLayer.from_tensors(spec, info.proj_names, SafetensorsCheckpoint(compressed_dir).get)
    original = SafetensorsCheckpoint(original_dir)
    out = {}
    for proj in PROJECTIONS:
        base = compressed.base_weight(proj) if compressed.base is not None else None
        originals, deltas = [], []
        for expert in range(spec.num_experts):
            key = f"{spec.prefix}.{expert}.{info.proj_names[proj]}.weight"
            if key not in original:
                raise FormatError(f"{original_dir} has no tensor {key}: --original must be the model "
                                  f"{compressed_dir} was compressed from")
            w = original.get(key).double()
            originals.append(cumulative_energy(w))
            deltas.append(cumulative_energy(w - base) if base is not None else originals[-1])
        out[proj] = ProjectionSpectra(torch.stack(originals), torch.stack(deltas),
                                      None if base is None else cumulative_energy(base), spec.ranks[proj])
    return out
