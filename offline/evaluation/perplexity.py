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
    nll_se: float  # standard error of `nll`: std of the per-window mean NLLs / sqrt(windows) (nan for 1 window)
    ppl_ci95: tuple[float, float]  # exp(nll ± 1.96 nll_se)
    window_nll: list[float]  # mean NLL of each window, in order: paired comparisons of two models on one text

    def to_dict(self) -> dict[str, float | int | list]:
        return asdict(self)


def paired_delta(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean NLL difference b − a over the same windows and its standard error (paired over windows).

    Two models scored on the same text share most of the window-to-window variance, so the SE of their
    difference is far smaller than either model's own `nll_se`; ppl_b / ppl_a = exp(delta).
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same windows ({len(a)} vs {len(b)})")
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    se = (d.std(unbiased=True) / math.sqrt(d.numel())).item() if d.numel() > 1 else math.nan
    return d.mean().item(), se


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
    accumulated exactly in float64 and ppl = exp(total_nll / total_predicted_tokens). The standard error
    treats windows as the independent samples (tokens within a window are correlated): with equal window
    lengths, nll is the mean of the per-window means, and nll_se = std(window means) / sqrt(windows).
    """
    ids = tokenizer(text, return_tensors="pt").input_ids.reshape(-1)
    if ids.numel() < seqlen:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = ids.numel() // seqlen
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // seqlen))
    ids = ids[: windows * seqlen].view(windows, seqlen)

    device = next(model.parameters()).device
    window_nll = []
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress):
        batch = ids[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="none")
        window_nll += nll.double().view(batch.size(0), -1).mean(dim=1).cpu().tolist()

    per_window = torch.tensor(window_nll, dtype=torch.float64)
    mean = per_window.mean().item()
    se = (per_window.std(unbiased=True) / math.sqrt(windows)).item() if windows > 1 else math.nan
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=windows * (seqlen - 1), windows=windows,
                            seqlen=seqlen, nll_se=se, ppl_ci95=(math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)),
                            window_nll=window_nll)


def checkpoint_perplexity(
    model_dir: str | Path, datasets: list[str], data_dir: str | Path | None, max_tokens: int | None = None,
    seqlen: int | None = None, batch_size: int = 1, dtype: str = "float32", dynamic_pruning: bool = False,
    progress: bool = True,
) -> dict[str, PerplexityResult]:
    """Perplexity of a dense or compressed checkpoint on each local dataset (the model is loaded once).
    ``dynamic_pruning`` (D²-MoE's per-batch base pruning) is off by default, as ``vllm serve`` runs it."""
    from transformers import AutoTokenizer

    from .datasets import load_eval_text, resolve_data_dir
    from ..loading import load_model

    texts = {name: load_eval_text(name, resolve_data_dir(data_dir)) for name in datasets}
    model = load_model(model_dir, getattr(torch, dtype), dynamic_pruning=dynamic_pruning)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seqlen = seqlen or default_seqlen(model.config)
    return {name: evaluate_perplexity(model, tokenizer, text, seqlen, max_tokens, batch_size, progress)
            for name, text in texts.items()}
