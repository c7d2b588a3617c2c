"""Checkpoint tensor names of every scheme (docs/format.md §4, §9, §10).

``prefix`` is a layer's expert prefix (e.g. ``model.layers.3.mlp.experts``), ``proj`` a checkpoint projection
name (``gate_proj``/``up_proj``/``down_proj``, Mixtral ``w1``/``w3``/``w2``), ``expert`` an expert index.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------- shared by base_delta and sparse_lowrank


def base_name(prefix: str, proj: str) -> str:
    """The shared base of ``proj`` (base_delta: on the kept channels; sparse_lowrank: the full down base)."""
    return f"{prefix}.base.{proj}.weight"


# ---------------------------------------------------------------------------- base_delta


def delta_name(prefix: str, expert: int, proj: str, factor: str) -> str:
    """``factor`` is ``delta_u`` or ``delta_v``."""
    return f"{prefix}.{expert}.{proj}.{factor}"


def base_channels_name(prefix: str) -> str:
    """int32 [C]: the intermediate channels the base keeps."""
    return f"{prefix}.base.channels"


# ---------------------------------------------------------------------------- sparse_lowrank


def unit_channels_name(prefix: str, expert: int, kind: str) -> str:
    """``kind`` is ``sparse`` or ``lowrank``: the int32 channel index of that kind of unit of one expert."""
    return f"{prefix}.{expert}.{kind}.channels"


def unit_name(prefix: str, expert: int, proj: str, part: str) -> str:
    """``part`` is ``sparse``, ``lowrank_u`` or ``lowrank_v``."""
    return f"{prefix}.{expert}.{proj}.{part}"


# ---------------------------------------------------------------------------- basis_residual


def coef_name(prefix: str, expert: int, proj: str) -> str:
    return f"{prefix}.{expert}.{proj}.coef"


def dense_name(prefix: str, expert: int, proj: str) -> str:
    """A projection kept dense (not factorised)."""
    return f"{prefix}.{expert}.{proj}.weight"


def basis_name(prefix: str, basis: int, proj: str) -> str:
    return f"{prefix}.basis.{basis}.{proj}.weight"


def mix_name(prefix: str, proj: str) -> str:
    return f"{prefix}.basis.{proj}.mix"


def eta_name(prefix: str, group: int, proj: str) -> str:
    return f"{prefix}.residual.{group}.{proj}.eta"


def counts_name(prefix: str) -> str:
    return f"{prefix}.residual.counts"
