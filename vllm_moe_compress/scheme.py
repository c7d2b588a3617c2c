"""What every plugin scheme provides: one subclass per checkpoint scheme (``base_delta.py``, ``sparse_lowrank.py``,
``basis_residual.py``), on the model of vLLM's ``CompressedTensorsScheme``.

``CompressedMoEMethod`` (moe_method.py) drives a scheme through a layer's life:

1. ``__init__``: the tensor-parallel slice (this rank holds intermediate channels ``[lo, lo + part)``) and,
   from the layer's ``LayerSpec`` and its index tensors, ``shapes`` (parameter name -> shape on this rank);
2. ``register_buffers``: the small integer metadata the compute reads on the device;
3. ``load_shard`` per checkpoint tensor (vLLM's expert mapping gives a shard id ``w1``/``w3``/``w2`` and an
   expert index): the format's tensor check, then ``load`` copies this rank's part into its slice;
4. ``unloaded``: the checkpoint name of a tensor whose slice still holds the NaN fill;
5. ``prepare`` once every tensor is loaded: weights-only precomputation (``process_loaded``), then the backend,
   chosen once: on CUDA devices the Triton kernels, whose per-layer layouts ``prepare_triton`` builds now (from
   host lists, before any CUDA graph capture); on CPUs the C++ CPU op where the scheme has one and it builds
   here (``prepare_cpu`` lays the factors out per expert now, and the parameters it copied are freed:
   ``release_copied_parameters``; kernels/cpu_extension.py), else the torch custom op;
6. ``apply``: Σ_k w_k·expert_k(x) for this rank's slice through that backend. On CPUs that is the C++ op
   ``torch.ops.moe_compress_cpu.<scheme>`` itself, called on the layout's tensors kept at load (no Python between
   the plugin and the op; the op's fake implementation, registered where the extension loads, lets vLLM's compiled
   graph trace it).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from vllm_moe_compress.format import FormatError, LayerSpec, check_tensor
from vllm_moe_compress.kernels.cpu_extension import available, cpu_ops

PROJ_OF_SHARD = {"w1": "gate", "w3": "up", "w2": "down"}
"""vLLM's expert-mapping shard id -> canonical projection."""

CHECKPOINT_PROJ = r"(gate_proj|up_proj|down_proj|w1|w2|w3)"
"""A checkpoint projection name of any supported architecture, as a regex group (for ``WEIGHT_RENAMES``)."""

SHARED_BASE_RENAME = {re.compile(rf"\.experts\.base\.{CHECKPOINT_PROJ}\.weight$"): r".experts.0.\1.base"}
"""``experts.base.<proj>.weight`` -> ``experts.0.<proj>.base``: a shared base reaches vLLM's expert mapping as
expert 0's (``base_delta``: w13_base / w2_base; ``sparse_lowrank``: w2_base)."""

def _output_like_x(x: torch.Tensor, *args) -> torch.Tensor:
    """What every scheme op returns, for tracing (torch.compile's fake tensors): a tensor shaped like ``x``."""
    return torch.empty_like(x)


def scheme_op(name: str):
    """Declare ``torch.ops.moe_compress.<name>``: a torch custom op, so the compressed-MoE compute is opaque to
    Dynamo and vLLM's compiled CPU graph (fullgraph) can call code that loops over experts and reads ranks on
    the host. Each scheme module declares its torch path ``<scheme>_moe``; importing the module registers it.
    (The C++ CPU ops ``torch.ops.moe_compress_cpu.<scheme>`` are called directly: ``apply_cpu``.)"""

    def declare(function):
        op = torch.library.custom_op(f"moe_compress::{name}", mutates_args=())(function)
        op.register_fake(_output_like_x)
        return op

    return declare


class CompressedMoEScheme(ABC):
    scheme: ClassVar[str]
    has_cpu_path: ClassVar[bool] = False
    """Whether the scheme has a C++ CPU op (``prepare_cpu`` / ``apply_cpu``); without one CPUs use the torch op."""
    WEIGHT_RENAMES: ClassVar[dict[re.Pattern, str | None]] = {}
    """Checkpoint name regex -> vLLM expert-mapping name, for tensors that are not per expert (``None``: dropped,
    read at start-up instead)."""

    shapes: dict[str, tuple[int, ...]]

    def __init__(self, spec: LayerSpec, proj_names: dict[str, str], tp_rank: int, tp_size: int):
        if spec.intermediate_size % tp_size:
            raise ValueError(f"moe_compress: intermediate size {spec.intermediate_size} of {spec.prefix} "
                             f"is not divisible by tensor-parallel size {tp_size}")
        self.spec, self.proj_names = spec, proj_names
        self.part = spec.intermediate_size // tp_size  # intermediate channels per TP rank
        self.lo = tp_rank * self.part  # this rank's first channel
        self.backend: str | None = None  # "triton", "cpu" or "torch", chosen by prepare()

    @staticmethod
    def check_indices(spec: LayerSpec, indices: dict[str, list[int]]) -> None:
        """Check the int index tensors ``spec.index_tensor_names()`` read at start-up."""
        spec.check_indices(indices)

    # ------------------------------------------------------------------------------------ loading

    @abstractmethod
    def register_buffers(self, layer: torch.nn.Module) -> None:
        """Register the integer metadata the compute reads on the device (non-persistent buffers)."""

    def load_shard(self, param_name: str, param: torch.Tensor, loaded: torch.Tensor, shard_id: str,
                   expert: int) -> None:
        """vLLM's weight loader: one checkpoint tensor into its slice of ``param``."""
        self.load(param_name, param, loaded, PROJ_OF_SHARD[shard_id], expert)

    @abstractmethod
    def load(self, param_name: str, param: torch.Tensor, loaded: torch.Tensor, proj: str, index: int) -> None:
        """Copy ``loaded`` (after :meth:`check_loaded`) into the slice of ``param`` that holds it on this rank."""

    @staticmethod
    def check_loaded(name: str, loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
        """The format's tensor check (shape, floating-point dtype, no NaN/Inf), reported as a start-up error."""
        try:
            check_tensor(name, loaded, expected, floating=True)
        except FormatError as err:
            raise ValueError(f"moe_compress: {err}") from err

    def unloaded(self, param_name: str, param: torch.Tensor) -> str | None:
        """Checkpoint name of a tensor whose slice still holds the NaN fill (missing, or NaN in the file)."""
        return self.first_unloaded(param_name, param) if torch.isnan(param).any() else None

    @abstractmethod
    def first_unloaded(self, param_name: str, param: torch.Tensor) -> str:
        """Which checkpoint tensor's slice of ``param`` (known to hold a NaN) is the first unloaded one."""

    # ------------------------------------------------------------------------------------ compute

    def prepare(self, layer: torch.nn.Module, backend: str | None = None) -> None:
        """Once after loading: :meth:`process_loaded`, then the backend (default: Triton on CUDA; on CPUs the C++
        op where the scheme has one and it builds, else the torch op) and that backend's layout."""
        self.process_loaded(layer)
        device = getattr(layer, next(iter(self.shapes))).device
        self.backend = backend or self.default_backend(device)
        if self.backend == "triton":
            self.prepare_triton(layer, device)
        elif self.backend == "cpu":
            self.prepare_cpu(layer)
            self.release_copied_parameters(layer)
        self._forward = {"triton": self.apply_triton, "cpu": self.apply_cpu, "torch": self.apply_torch}[self.backend]

    def default_backend(self, device: torch.device) -> str:
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and self.has_cpu_path and available():
            return "cpu"
        return "torch"

    def process_loaded(self, layer: torch.nn.Module) -> None:
        """Weights-only precomputation once every tensor is loaded and checked (none by default)."""

    @abstractmethod
    def prepare_triton(self, layer: torch.nn.Module, device: torch.device) -> None:
        """Build the Triton path's per-layer layout (host lists only: no device sync)."""

    def prepare_cpu(self, layer: torch.nn.Module) -> None:
        """Build the C++ CPU op's per-expert layout (schemes with ``has_cpu_path``), registered with
        :meth:`register_cpu_layout`."""
        raise NotImplementedError(f"scheme {self.scheme} has no C++ CPU path")

    def register_cpu_layout(self, layer: torch.nn.Module, layout, *scalars) -> None:
        """Keep a CPU layout (a NamedTuple of tensors) on the layer as non-persistent buffers (so the layer's
        buffers show the memory it holds), and, for :meth:`apply_cpu`, the C++ op ``torch.ops.moe_compress_cpu.
        <scheme>`` and its arguments after the activations: the same tensors in the layout's field order, then
        ``scalars`` (the op's trailing non-tensor arguments)."""
        for name, tensor in layout._asdict().items():
            layer.register_buffer(f"moe_compress_cpu_{name}", tensor, persistent=False)
        self.cpu_op = getattr(cpu_ops(), self.scheme).default
        self.cpu_args = (*layout, *scalars)

    def release_copied_parameters(self, layer: torch.nn.Module) -> None:
        """Free the loaded parameters whose values the CPU layout copied (reordered, transposed or converted):
        each becomes an empty tensor of its dtype, so one copy of the weights stays alive, not two. Parameters the
        layout holds as they are (same storage) are kept."""
        layout = [t for name, t in layer.named_buffers(recurse=False, remove_duplicate=False)  # a layout field may be
                  if name.startswith("moe_compress_cpu_")]  # a parameter itself
        shared = {t.untyped_storage().data_ptr() for t in layout if t.numel()}
        for name in self.shapes:
            param = getattr(layer, name)
            if param.numel() and param.untyped_storage().data_ptr() not in shared:
                param.data = param.data.new_empty((0,) * param.dim())

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k·expert_k(x) for this rank's intermediate slice, through the backend chosen by :meth:`prepare`."""
        return self._forward(layer, x, topk_weights, topk_ids)

    @abstractmethod
    def apply_torch(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        """The torch custom op ``torch.ops.moe_compress.<scheme>_moe`` (CPU; opaque to Dynamo)."""

    def apply_cpu(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        """The C++ CPU op ``torch.ops.moe_compress_cpu.<scheme>`` on the layout :meth:`prepare_cpu` built, called
        directly (schemes with ``has_cpu_path``; ``layer`` is not read: the arguments were kept at load)."""
        return self.cpu_op(x, topk_ids, topk_weights, *self.cpu_args)

    @abstractmethod
    def apply_triton(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        """The Triton kernels (GPU; docs/kernels.md) on the layout :meth:`prepare_triton` built."""
