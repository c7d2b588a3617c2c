"""Perplexity over non-overlapping windows, as in GPTQ / SparseGPT / SVD-LLM."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens scored: windows * (seqlen - 1)
    windows: int
    seqlen: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def default_seqlen(config) -> int:
    """2048 tokens (the papers' setting), or the model maximum if smaller."""
    return min(2048, config.max_position_embeddings)


@torch.inference_mode()
def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seqlen: int,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `text`, GPTQ style.

    The text is tokenized once (no BOS added), cut into `numel // seqlen` non-overlapping windows
    (the tail is dropped; with `max_tokens`, only the first `max(1, max_tokens // seqlen)`), and in
    each window tokens 1..seqlen-1 are predicted from their prefix. The summed cross-entropy is
    accumulated exactly in float64 and ppl = exp(total_nll / total_predicted_tokens).
    """
    ids = tokenizer(text, return_tensors="pt").input_ids.reshape(-1)
    if ids.numel() < seqlen:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = ids.numel() // seqlen
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // seqlen))
    ids = ids[: windows * seqlen].view(windows, seqlen)

    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress):
        batch = ids[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="none")
        total += nll.double().sum().cpu()

    tokens = windows * (seqlen - 1)
    mean = total.item() / tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=tokens, windows=windows, seqlen=seqlen)


def checkpoint_perplexity(
    model_dir: str | Path, datasets: list[str], data_dir: str | Path | None, max_tokens: int | None = None,
    seqlen: int | None = None, batch_size: int = 1, dtype: str = "float32", dynamic_pruning: bool = False,
    progress: bool = True,
) -> dict[str, PerplexityResult]:
    """Perplexity of a dense or compressed checkpoint on each local dataset (the model is loaded once).
    ``dynamic_pruning`` (D²-MoE's per-batch base pruning) is off by default, as ``vllm serve`` runs it."""
    from transformers import AutoTokenizer

    from .datasets import load_eval_text, resolve_data_dir
    from .loading import load_model

    texts = {name: load_eval_text(name, resolve_data_dir(data_dir)) for name in datasets}
    model = load_model(model_dir, getattr(torch, dtype), dynamic_pruning=dynamic_pruning)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seqlen = seqlen or default_seqlen(model.config)
    return {name: evaluate_perplexity(model, tokenizer, text, seqlen, max_tokens, batch_size, progress)
            for name, text in texts.items()}
