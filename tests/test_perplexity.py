import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from vllm_moe_compress.offline.evaluation.datasets import DATASETS, load_eval_text, resolve_data_dir
from vllm_moe_compress.offline.evaluation.perplexity import default_seqlen, evaluate_perplexity, paired_delta

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "examples" / "tiny-qwen3-moe-demo"
SEQLEN = 32
TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 10
    + "Perplexity is computed over non-overlapping windows of tokens. " * 10
)


@pytest.fixture(scope="module")
def model() -> transformers.Qwen3MoeForCausalLM:
    config = transformers.Qwen3MoeConfig(
        vocab_size=4096,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture
def data_dir() -> Path:
    path = Path(os.environ.get("MOE_COMPRESS_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"evaluation data not found at {path}")
    return path


def test_matches_manual_cross_entropy(model, tokenizer):
    result = evaluate_perplexity(model, tokenizer, TEXT, SEQLEN, progress=False)

    ids = tokenizer(TEXT, return_tensors="pt").input_ids[0]
    windows = ids.numel() // SEQLEN
    total = 0.0
    means = []
    with torch.no_grad():
        for i in range(windows):
            window = ids[i * SEQLEN : (i + 1) * SEQLEN].unsqueeze(0)
            logits = model(window).logits[0, :-1].double()
            total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            means.append(F.cross_entropy(logits, window[0, 1:]).item())
    expected = math.exp(total / (windows * (SEQLEN - 1)))
    mean = sum(means) / windows
    expected_se = math.sqrt(sum((m - mean) ** 2 for m in means) / (windows - 1) / windows)

    assert windows >= 3
    assert result.windows == windows
    assert result.tokens == windows * (SEQLEN - 1)
    assert result.seqlen == SEQLEN
    assert result.ppl == pytest.approx(expected, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)
    assert result.window_nll == pytest.approx(means, rel=1e-6)
    assert result.nll_se == pytest.approx(expected_se, rel=1e-5)
    low, high = result.ppl_ci95
    assert low == pytest.approx(math.exp(mean - 1.96 * expected_se), rel=1e-6) and low < result.ppl < high
    assert set(result.to_dict()) == {"ppl", "nll", "tokens", "windows", "seqlen", "nll_se", "ppl_ci95", "window_nll"}


def test_paired_delta():
    a = [2.0, 3.0, 4.0, 5.0]
    b = [2.1, 3.3, 4.0, 5.2]
    delta, se = paired_delta(a, b)
    diffs = [0.1, 0.3, 0.0, 0.2]
    m = sum(diffs) / 4
    assert delta == pytest.approx(m)
    assert se == pytest.approx(math.sqrt(sum((d - m) ** 2 for d in diffs) / 3 / 4))
    with pytest.raises(ValueError, match="same windows"):
        paired_delta(a, b[:3])


def test_max_tokens_and_batching(model, tokenizer):
    full = evaluate_perplexity(model, tokenizer, TEXT, SEQLEN, progress=False)
    limited = evaluate_perplexity(model, tokenizer, TEXT, SEQLEN, max_tokens=2 * SEQLEN + 5, progress=False)
    assert limited.windows == 2 and limited.tokens == 2 * (SEQLEN - 1)
    tiny = evaluate_perplexity(model, tokenizer, TEXT, SEQLEN, max_tokens=1, progress=False)
    assert tiny.windows == 1 and math.isnan(tiny.nll_se)

    batched = evaluate_perplexity(model, tokenizer, TEXT, SEQLEN, batch_size=3, progress=False)
    assert batched.windows == full.windows
    assert batched.ppl == pytest.approx(full.ppl, rel=1e-5)


def test_short_text_raises(model, tokenizer):
    with pytest.raises(ValueError, match="tokens"):
        evaluate_perplexity(model, tokenizer, "too short", SEQLEN, progress=False)


def test_default_seqlen(model):
    assert default_seqlen(model.config) == 512
    assert default_seqlen(transformers.Qwen3MoeConfig(max_position_embeddings=32768)) == 2048


@pytest.mark.parametrize("name", DATASETS)
def test_load_eval_text(name, data_dir):
    text = load_eval_text(name, data_dir)
    assert text.strip()
    if name == "wikitext2":
        # HF rows: "" (blank first line), " = Robert Boulter = \n", "", " Robert Boulter is ...".
        assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
        assert len(text) == 1_294_336
    elif name == "ptb":
        assert text.startswith("no it was n't black monday\n\nbut while")
    elif name == "c4":
        # " ".join of the first 1100 of the 2000 documents (the whole file joins to much more).
        assert text.startswith("We offer valet parking")
        assert len(text) == 2_356_922
    elif name == "brown":
        assert text.startswith('" A Night in New Orleans "')


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COMPRESS_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(tmp_path / "..") == tmp_path / ".."

    monkeypatch.delenv("MOE_COMPRESS_DATA")
    with pytest.raises(FileNotFoundError, match="MOE_COMPRESS_DATA"):
        resolve_data_dir(None)
    with pytest.raises(FileNotFoundError, match="MOE_COMPRESS_DATA"):
        resolve_data_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="brown"):
        load_eval_text("brown", tmp_path)
    with pytest.raises(ValueError, match="wikitext2"):
        load_eval_text("lambada", tmp_path)
