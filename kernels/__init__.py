"""Triton kernels for compressed experts (GPU), with torch references beside them.

This package must stay import-free: transformers probes ``importlib.util.find_spec("kernels")`` (the
name of an unrelated PyPI package) and must not find a module that imports Triton or torch at import
time. Kernel modules are imported explicitly, e.g. ``from kernels import base_delta_triton`` (docs/kernels.md).
"""
