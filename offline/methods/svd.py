"""Per-expert low-rank baselines: plain truncated SVD and SVD-LLM's whitened (truncation-aware) SVD."""

from __future__ import annotations

from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer
from .base import CompressionMethod, LayerInputs, LayerResult, factorize_experts


class PlainSVD(CompressionMethod):
    """W_i ≈ U_i V_i from the truncated SVD of W_i itself, the same rank for every expert."""

    name = "svd"
    whitened = False

    @property
    def reads_grams(self) -> bool:
        return self.whitened

    def compress_layer(self, inputs: LayerInputs) -> LayerResult:
        shape, stats = inputs.shape, inputs.stats
        ranks = self.ranks_for(inputs.budget, shape, stats)
        factors = factorize_experts(inputs.weights, ranks, stats if self.whitened else None, inputs.device)
        return LayerResult(BaseDeltaLayer(shape.hidden_size, shape.intermediate_size, factors))


class WhitenedSVD(PlainSVD):
    """SVD-LLM: truncate the SVD of W_i S_i, S_i the Cholesky factor of expert i's own input Gram."""

    name = "whitened-svd"
    whitened = True
