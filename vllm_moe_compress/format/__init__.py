"""The ``moe_compress`` checkpoint format, version 1 (specification: docs/format.md).

The contract between the compressor (``vllm_moe_compress.offline``) and every loader (its reference loader,
the vLLM plugin): the ``quantization_config`` schema (:mod:`.config`), one typed :class:`LayerSpec` per
scheme with its validation and its table of tensors (:mod:`.layers`), the name of every checkpoint tensor
(:mod:`.names`), the checks a loader runs on the tensors it reads (:mod:`.checks`) and the header-level check
of a whole checkpoint (:mod:`.headers`), and per scheme the layer the compressor packs and the reference loader
unpacks (:mod:`.schemes`, imported on its own: its reference forwards use the torch kernels of
``vllm_moe_compress.kernels``). Like ``compressed-tensors`` between llm-compressor and vLLM, this package imports
neither side (only the standard library, torch, safetensors and those kernels).
"""

from .checks import check_channel_index, check_tensor, matrix_shape
from .config import (
    FORMAT_VERSION, PROJECTIONS, QUANT_METHOD, STATS_FILE, STORED_DTYPES, CompressionInfo, FormatError,
)
from .headers import TensorHeaders, check_checkpoint_headers, check_layer_headers
from .layers import ACTIVATION_NAMES, LAYER_SPECS, BaseDeltaSpec, BasisResidualSpec, LayerSpec, SparseLowRankSpec

__all__ = [
    "ACTIVATION_NAMES", "FORMAT_VERSION", "LAYER_SPECS", "PROJECTIONS", "QUANT_METHOD", "STATS_FILE",
    "STORED_DTYPES", "BaseDeltaSpec", "BasisResidualSpec", "CompressionInfo", "FormatError", "LayerSpec",
    "SparseLowRankSpec", "TensorHeaders", "check_channel_index", "check_checkpoint_headers", "check_layer_headers",
    "check_tensor", "matrix_shape",
]
