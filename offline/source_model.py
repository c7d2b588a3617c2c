"""The source model, streamed: one decoder layer in memory at a time, read lazily from the safetensors shards.

The compressor never instantiates the whole model. :class:`StreamedModel` builds the architecture's own
transformers model from config.json on the ``meta`` device (no memory), then materialises on the CPU only
what is outside the decoder stack: the token embedding, the rotary embedding (recomputed from the config,
its buffers are not stored), the final norm and the LM head (tied to the embedding when the config says so).
Decoder layers stay on ``meta``; :meth:`StreamedModel.layer` builds one, fills it tensor by tensor from the
checkpoint (``safe_open``, offline/checkpoint_io.py), swaps it into the skeleton for the duration of a
``with`` block and drops it afterwards. Weights are upcast from their stored dtype to float32 (the compute
dtype) as they are read, so only one layer's float32 weights are alive at a time.

Checkpoints store routed experts one tensor per expert (``…experts.{i}.gate_proj.weight``); transformers 5
modules fuse them (``gate_up_proj [E, 2I, H]``, gate rows first, and ``down_proj [E, H, I]``), which is
what transformers' own loader does for these families (its ``conversion_mapping``: MergeModulelist +
Concatenate). :meth:`StreamedModel.expert_weights` gives one layer's experts to the methods without building
the rest of the layer: per projection an :class:`ExpertStack`, which reads one expert's matrix from the
checkpoint (float64) each time it is indexed, so a method never holds a layer's float64 [E, out, in] stack
(4.5 GiB for the three projections of one Qwen3-30B-A3B layer) unless it asks for it (``stacked``).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vllm_moe_compress.format import PROJECTIONS

from .architectures import MoEArchitecture, architecture_for
from .checkpoint_io import CheckpointError, SafetensorsCheckpoint, read_config
from .methods.base import ExpertWeights

COMPUTE_DTYPE = torch.float32


class StreamedModel:
    """A causal LM whose decoder layers are read from ``model_dir`` one at a time (module docstring).

    ``model`` is the transformers model: embedding, rotary embedding, final norm and head are real tensors,
    ``model.model.layers[i]`` are on ``meta`` except inside ``with streamed.layer(i)``.
    """

    def __init__(self, model_dir: str | Path, ckpt: SafetensorsCheckpoint | None = None,
                 arch: MoEArchitecture | None = None):
        self.model_dir = Path(model_dir)
        self.ckpt = ckpt if ckpt is not None else SafetensorsCheckpoint(model_dir)
        self.arch = arch if arch is not None else architecture_for(read_config(model_dir))
        self.config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=COMPUTE_DTYPE).eval()
        self.model.requires_grad_(False)  # a read-only source; offline/fisher.py enables the experts it needs
        self._expert_keys: dict[int, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
        self._keys: dict[str, str] = {}  # transformers parameter name -> checkpoint tensor name
        for key in self.ckpt.keys():
            m = self.arch.expert_key_pattern.match(key)
            if m:
                self._expert_keys[int(m["layer"])][int(m["expert"])][self.arch.canonical_proj(m["proj"])] = key
            else:
                self._keys[self.arch.checkpoint_to_module_name(key)] = key
        self._materialize_outer()

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def _materialize_outer(self) -> None:
        """Everything but the decoder layers, on the CPU in float32."""
        inner = self.model.model
        layers = inner.layers
        inner.layers = torch.nn.ModuleList()  # hide the decoder stack while materialising the rest
        try:
            self.model.to_empty(device="cpu")
            rotary = getattr(inner, "rotary_emb", None)
            if rotary is not None:  # non-persistent buffers (inv_freq) are computed from the config, not stored
                inner.rotary_emb = type(rotary)(config=self.config)
            tied = getattr(self.config, "tie_word_embeddings", False)
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    if name == "lm_head.weight" and tied:
                        continue
                    param.copy_(self._read(name, tuple(param.shape)))
            if tied:
                self.model.lm_head.weight = self.model.model.embed_tokens.weight
        finally:
            inner.layers = layers
        for name, buffer in self.model.named_buffers():
            if buffer.is_meta and not name.startswith("model.layers."):
                raise CheckpointError(f"{type(self.model).__name__}.{name} cannot be streamed (a buffer not in the checkpoint)")

    def _read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The checkpoint tensor of transformers parameter ``name``, checked against ``shape``."""
        if name not in self._keys:
            raise CheckpointError(f"tensor for {name} missing in {self.model_dir}")
        tensor = self.ckpt.get(self._keys[name])
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor {self._keys[name]} has shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    def build_layer(self, index: int, device: torch.device | str = "cpu") -> torch.nn.Module:
        """Decoder layer ``index`` with its weights read from the checkpoint (float32, on ``device``, eval mode)."""
        layer = copy.deepcopy(self.model.model.layers[index]).to_empty(device=device)
        prefix = f"model.layers.{index}."
        experts = self._expert_keys.get(index)
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if experts is not None and name.endswith("experts.gate_up_proj"):
                    inter = param.shape[1] // 2
                    for e in range(param.shape[0]):
                        param[e, :inter].copy_(self._expert(experts, e, "gate", param.shape[1:]))
                        param[e, inter:].copy_(self._expert(experts, e, "up", param.shape[1:]))
                elif experts is not None and name.endswith("experts.down_proj"):
                    for e in range(param.shape[0]):
                        param[e].copy_(self._expert(experts, e, "down", param.shape[1:]))
                else:
                    param.copy_(self._read(prefix + name, tuple(param.shape)))
        return layer.eval()

    def _expert(self, experts: dict[int, dict[str, str]], e: int, proj: str, fused: torch.Size) -> torch.Tensor:
        key = experts.get(e, {}).get(proj)
        if key is None:
            raise CheckpointError(f"expert {e}: tensor for {self.arch.proj_names[proj]} missing in {self.model_dir}")
        tensor = self.ckpt.get(key)
        expected = (fused[0] // 2, fused[1]) if proj != "down" else tuple(fused)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"tensor {key} has shape {tuple(tensor.shape)}, expected {expected}")
        return tensor

    @contextlib.contextmanager
    def layer(self, index: int, device: torch.device | str = "cpu"):
        """``with streamed.layer(i) as layer``: layer i materialised on ``device`` and in the skeleton, freed on
        exit, with the checkpoint pages its reading mapped (the rest of the model stays on the CPU: callers move
        the layer's inputs, calibration.forward_layerwise)."""
        layers = self.model.model.layers
        placeholder = layers[index]
        layers[index] = self.build_layer(index, device)
        try:
            yield layers[index]
        finally:
            layers[index] = placeholder
            self.ckpt.release_mapped_pages()

    def expert_weights(self, index: int) -> ExpertWeights:
        """MoE layer ``index``'s routed experts as the methods take them: per projection an :class:`ExpertStack`
        (gate/up [E, I, H], down [E, H, I], float64 per expert: the values transformers' loader gives, upcast)."""
        experts = self._expert_keys.get(index)
        if not experts:
            raise CheckpointError(f"layer {index} of {self.model_dir} has no routed experts")
        return {p: ExpertStack(self.ckpt, [experts[e][p] for e in range(len(experts))]) for p in PROJECTIONS}

    def fused_gate_up(self, index: int, expert: int) -> torch.Tensor:
        """Expert ``expert`` of MoE layer ``index``: its gate and up weights stacked, [2I, H] float32 (one row
        block of the layer's ``gate_up_proj``), read from the checkpoint."""
        keys = self._expert_keys[index][expert]
        return torch.cat([self.ckpt.get(keys["gate"]), self.ckpt.get(keys["up"])]).to(COMPUTE_DTYPE)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on the hidden states leaving the last decoder layer (final norm, then head)."""
        return self.model.lm_head(self.model.model.norm(hidden))


class ExpertStack:
    """One projection's routed experts of one MoE layer, read from the checkpoint an expert at a time.

    ``stack[e]`` is expert e's matrix in float64 (gate/up [I, H], down [H, I]), read and upcast on every access
    and owned by the caller; ``len`` and ``shape`` are those of the stacked [E, out, in] tensor it stands for.
    Methods index it expert by expert and hold one expert's matrix at a time (:func:`stack_experts` builds a
    whole projection where one is kept dense)."""

    def __init__(self, ckpt: SafetensorsCheckpoint, keys: list[str]):
        self.ckpt, self.keys = ckpt, keys
        self.shape = torch.Size([len(keys), *ckpt.shape(keys[0])])

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, expert: int) -> torch.Tensor:
        if not isinstance(expert, int):
            raise TypeError(f"an ExpertStack is indexed by one expert number, got {type(expert).__name__}; "
                            "use stack_experts() for the whole [E, out, in] tensor")
        return self.ckpt.get(self.keys[expert]).to(torch.float64)


def stack_experts(weights, dtype: torch.dtype) -> torch.Tensor:
    """All experts of ``weights`` (an ExpertStack or an [E, out, in] tensor) as one [E, out, in] tensor of
    ``dtype``, filled an expert at a time (no second copy while stacking)."""
    out = torch.empty(weights.shape, dtype=dtype)
    for e in range(len(weights)):
        out[e].copy_(weights[e])
    return out


