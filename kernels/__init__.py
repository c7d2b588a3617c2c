"""Compute paths for compressed experts (``vllm_moe_compress.kernels``, docs/kernels.md): per scheme a torch path
(``*_torch.py``, CPU and the reference forward) and a Triton path (``*_triton.py``, GPU), imported explicitly,
e.g. ``from vllm_moe_compress.kernels import base_delta_triton``, so that importing the package loads neither."""
