"""vLLM plugin serving ``moe_compress`` checkpoints.

Installed as the ``vllm.general_plugins`` entry point ``moe_compress = vllm_moe_compress:register``;
vLLM calls :func:`register` in every process (front end, engine core, workers). The module stays
import-light: vLLM only logs a failing plugin import, so the real imports happen inside ``register``.
"""


def register() -> None:
    """Register the ``moe_compress`` quantization method with vLLM (idempotent)."""
    # config registers the quantization method; moe_method imports the scheme modules, which declare their
    # custom ops (torch.ops.moe_compress.*)
    from . import config, moe_method  # noqa: F401  (registration happens at import)
