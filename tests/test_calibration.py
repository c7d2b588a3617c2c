"""The layer-by-layer calibration pass and the Fisher estimate against direct computations."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from vllm_moe_compress.offline.calibration import ExpertStatistics, calibration_windows, run_layerwise
from vllm_moe_compress.offline.fisher import expert_fisher
from vllm_moe_compress.offline.source_model import StreamedModel

from conftest import FAMILIES


def tiny_model(tiny_moe):
    path = tiny_moe("qwen3_moe")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_layerwise_statistics_equal_a_full_forward(tiny_moe):
    model = tiny_model(tiny_moe)
    samples = torch.randint(0, 4096, (6, 32), generator=torch.Generator().manual_seed(7))
    moe_layers = {l: (8, 64, 32) for l in range(2)}

    # direct: one full forward with hooks on the experts modules, every Gram computed at once
    experts = {l: model.model.layers[l].mlp.experts for l in moe_layers}
    direct = {l: ExpertStatistics.collect(*moe_layers[l], lambda e, l=l: experts[l].gate_up_proj[e].detach()) for l in moe_layers}
    handles = [experts[l].register_forward_pre_hook(lambda m, args, l=l: direct[l].accumulate(m, *args))
               for l in moe_layers]
    with torch.no_grad():
        model(input_ids=samples, use_cache=False)
    for h in handles:
        h.remove()

    seen = {}
    run_layerwise(StreamedModel(tiny_moe("qwen3_moe")), moe_layers, samples, batch_size=4,
                  on_moe_layer=lambda l, s, h: seen.setdefault(l, s), progress=False, expert_chunk=3)
    assert sorted(seen) == [0, 1]
    for l in moe_layers:
        assert torch.equal(seen[l].counts, direct[l].counts) and int(seen[l].counts.sum()) == 6 * 32 * 2
        # fp32 forwards batched differently (4 vs 6 sequences) differ by rounding: compare on the Gram's scale;
        # the streamed statistics are computed 3 experts at a time, in reverse order
        for name in ("input_gram", "inter_gram"):
            got = torch.stack([getattr(seen[l], name)[e] for e in reversed(range(8))][::-1])
            want = torch.stack([getattr(direct[l], name)[e] for e in range(8)])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            torch.testing.assert_close(getattr(seen[l], name).diagonal(dim1=1, dim2=2), got.diagonal(dim1=1, dim2=2))
        torch.testing.assert_close(seen[l].weight_sums, direct[l].weight_sums, rtol=1e-6, atol=1e-6)


def test_input_gram_is_the_sum_over_routed_tokens():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.gate_up_proj = torch.nn.Parameter(torch.randn(3, 8, 5, generator=g))
            self.act_fn = F.silu

    x, experts = torch.randn(4, 5), Experts()
    idx = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0]])
    for chunk in (1, 2, 3):
        stats = ExpertStatistics.collect(3, 5, 4, lambda e: experts.gate_up_proj[e].detach(), chunk=chunk)
        stats.accumulate(experts, x[:3], idx[:3], torch.full((3, 2), 0.5))  # two batches
        stats.accumulate(experts, x[3:], idx[3:], torch.full((1, 2), 0.5))
        xd = x.double()
        torch.testing.assert_close(stats.input_gram[2], xd[[0, 1, 3]].T @ xd[[0, 1, 3]])
        gate, up = (xd[[0, 1, 3]] @ experts.gate_up_proj[2].detach().double().T).chunk(2, dim=-1)
        h = F.silu(gate) * up
        torch.testing.assert_close(stats.inter_gram[2], h.T @ h, rtol=1e-5, atol=1e-5)  # computed in float32
        assert stats.counts.tolist() == [3, 2, 3] and stats.weight_sums.tolist() == [1.5, 1.0, 1.5]
        # once dropped (before a layer is written), no chunk is kept; asked again, a Gram is computed again, equal
        kept = stats.input_gram[2].clone(), stats.inter_gram[2].clone()
        stats.drop_cached_grams()
        assert stats.input_gram._cached is None and stats.inter_gram._cached is None
        assert torch.equal(stats.input_gram[2], kept[0]) and torch.equal(stats.inter_gram[2], kept[1])


def test_calibration_windows_are_seeded(tiny_moe):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe("qwen3_moe"))
    text = "The quick brown fox jumps over the lazy dog. " * 200
    a, b = (calibration_windows(tok, text, 5, 16, seed=3) for _ in range(2))
    assert a.shape == (5, 16) and torch.equal(a, b)
    assert not torch.equal(a, calibration_windows(tok, text, 5, 16, seed=4))


def test_expert_fisher_matches_autograd(tiny_moe):
    model = tiny_model(tiny_moe)
    samples = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))
    source = StreamedModel(tiny_moe("qwen3_moe"))
    fisher = expert_fisher(source, [0, 1], samples, labels="empirical", granularity="expert", progress=False)
    element = expert_fisher(source, [1], samples, labels="empirical", granularity="element", progress=False)

    fused = [model.model.layers[l].mlp.experts.gate_up_proj for l in (0, 1)]
    down = model.model.layers[1].mlp.experts.down_proj
    expected_down = torch.zeros_like(down, dtype=torch.float64)
    expected_gate_up0 = torch.zeros_like(fused[0], dtype=torch.float64)
    for ids in samples.split(1):
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        grad_down, grad_gate_up0 = torch.autograd.grad(loss, [down, fused[0]])
        expected_down += grad_down.double() ** 2 / 2
        expected_gate_up0 += grad_gate_up0.double() ** 2 / 2
    # the layer-streamed backward against one autograd backward through the whole loaded model: the last
    # layer, and layer 0 whose gradient flows back through layer 1 rebuilt and recomputed
    torch.testing.assert_close(element[1]["down"], expected_down, rtol=1e-4, atol=1e-6 * float(expected_down.max()))
    torch.testing.assert_close(fisher[1]["down"], expected_down.flatten(1).mean(1), rtol=1e-4, atol=0)
    torch.testing.assert_close(fisher[0]["gate"], expected_gate_up0[:, :32].flatten(1).mean(1), rtol=1e-4, atol=0)
    torch.testing.assert_close(fisher[0]["up"], expected_gate_up0[:, 32:].flatten(1).mean(1), rtol=1e-4, atol=0)
    assert fisher[0]["gate"].shape == (8,) and (fisher[0]["gate"] > 0).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_fisher_forms_no_layer_gradient_and_matches_autograd_in_every_family(tiny_moe, family):
    """Every family's streamed Fisher (expert gradients formed one expert at a time from the experts' output
    gradient) against one autograd backward through the whole loaded model; no weight of a rebuilt layer
    gets a gradient (the fused [E, ...] gradient is never allocated)."""
    path = tiny_moe(family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    moe = [l for l, layer in enumerate(model.model.layers) if hasattr(getattr(layer, "mlp", None), "experts")]
    assert moe
    samples = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(5))
    source = StreamedModel(path)
    built = []
    build_layer = source.build_layer
    source.build_layer = lambda *args, **kwargs: built.append(build_layer(*args, **kwargs)) or built[-1]
    fisher = expert_fisher(source, moe, samples, labels="empirical", granularity="expert", progress=False)
    assert built and all(p.grad is None for layer in built for p in layer.parameters())

    experts = {l: model.model.layers[l].mlp.experts for l in moe}
    expected = {l: {k: 0.0 for k in ("gate", "up", "down")} for l in moe}
    for ids in samples.split(1):
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, [p for l in moe for p in (experts[l].gate_up_proj, experts[l].down_proj)])
        for l, gate_up, down in zip(moe, grads[::2], grads[1::2]):
            half = gate_up.shape[1] // 2  # gate rows, then up rows
            for name, grad in (("gate", gate_up[:, :half]), ("up", gate_up[:, half:]), ("down", down)):
                expected[l][name] = expected[l][name] + (grad.double() ** 2).flatten(1).mean(1) / len(samples)
    for l in moe:
        assert (fisher[l]["gate"] > 0).any()
        for name, want in expected[l].items():
            torch.testing.assert_close(fisher[l][name], want, rtol=1e-4, atol=1e-6 * float(want.max()))
