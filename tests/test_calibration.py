"""The layer-by-layer calibration pass and the Fisher estimate against direct computations."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from vllm_moe_compress.offline.calibration import ExpertStatistics, calibration_windows, run_layerwise
from vllm_moe_compress.offline.fisher import _expert_gradient_squares, _experts_forward, expert_fisher, gradient_square_sum
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


@pytest.mark.parametrize("labels", ["sampled", "empirical"])
def test_batched_fisher_equals_batch_one_and_autograd(tiny_moe, labels):
    """The Fisher pass with its sequences batched (5 sequences: batches of 2, 2 and 1, and one of 5) equals the
    pass one sequence at a time and one autograd backward per sequence through the whole loaded model, both
    granularities: the sum over sequences of each sequence's squared gradient (Eq. 4), not the square of a batch's
    gradient (sequences routed to the same expert in one batch are kept apart). Sampled labels are drawn per
    sequence in order from one generator, as the reference draws them."""
    model = tiny_model(tiny_moe)
    samples = torch.randint(0, 4096, (5, 16), generator=torch.Generator().manual_seed(3))
    source = StreamedModel(tiny_moe("qwen3_moe"))
    runs = {(b, g): expert_fisher(source, [0, 1], samples, labels, g, seed=2, progress=False, batch_size=b)
            for b in (1, 2, 5) for g in ("expert", "element")}

    experts = [model.model.layers[l].mlp.experts for l in (0, 1)]
    weights = [p for e in experts for p in (e.gate_up_proj, e.down_proj)]
    expected = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    generator = torch.Generator().manual_seed(2)
    for ids in samples.split(1):
        logits = model(input_ids=ids).logits[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        target = (torch.multinomial(flat.detach().softmax(-1), 1, generator=generator).reshape(-1)
                  if labels == "sampled" else ids[0, 1:])
        for total, grad in zip(expected, torch.autograd.grad(F.cross_entropy(flat, target), weights)):
            total += grad.double() ** 2 / len(samples)
    for l in (0, 1):
        gate_up, down = expected[2 * l], expected[2 * l + 1]
        want = {"gate": gate_up[:, :32], "up": gate_up[:, 32:], "down": down}
        for (b, g), fisher in runs.items():
            for k, square in want.items():
                if g == "element":
                    torch.testing.assert_close(fisher[l][k], square, rtol=1e-4, atol=1e-6 * float(square.max()))
                else:
                    torch.testing.assert_close(fisher[l][k], square.flatten(1).mean(1), rtol=1e-4, atol=0)
            for k in want:  # batched against batch 1: float32 rounding of the batched products only
                torch.testing.assert_close(fisher[l][k], runs[1, g][l][k], rtol=1e-5,
                                           atol=1e-7 * float(runs[1, g][l][k].max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_fisher_forms_no_layer_gradient_and_matches_autograd_in_every_family(tiny_moe, family):
    """Every family's streamed Fisher (expert gradients formed one expert at a time from the experts' output
    gradient) against one autograd backward through the whole loaded model; no weight of a rebuilt layer
    gets a gradient (the fused [E, ...] gradient is never allocated), and no layer below the lowest MoE layer
    is rebuilt for the backward."""
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
    # every layer forward, then back down to the lowest MoE layer only (DeepSeek's dense layer 0 is not rebuilt)
    assert len(built) == 2 * len(model.model.layers) - min(moe)

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


@pytest.mark.parametrize("tokens", [1, 3, 9, 10, 40])
def test_gradient_square_sum_equals_the_formed_gradient(tokens):
    """‖Dᵀ X‖² by the T × T Grams (T·(out + in) < out·in: 1 to 9 tokens at out 24, in 16) and by forming Dᵀ X
    (10 and 40 tokens), against the formed gradient in float64; float32 inputs whose tokens nearly cancel."""
    g = torch.Generator().manual_seed(tokens)
    d, x = torch.randn(tokens, 24, generator=g), torch.randn(tokens, 16, generator=g)
    d[1::2] = -d[0::2][: d[1::2].shape[0]] + 1e-3 * torch.randn(d[1::2].shape, generator=g)
    x[1::2] = x[0::2][: x[1::2].shape[0]]
    want = (d.double().T @ x.double()).square().sum()
    got = gradient_square_sum(d, x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_gradient_square_sum_keeps_sequences_apart():
    """Rows in blocks, one per sequence (3, 30, 0 and 5 tokens: Grams, G formed, nothing, Grams at out 24, in 16):
    the sum of each block's ‖D_sᵀ X_s‖², not ‖Dᵀ X‖² of all rows, against each block's gradient formed in float64."""
    g = torch.Generator().manual_seed(2)
    counts = [3, 30, 0, 5]
    d, x = torch.randn(38, 24, generator=g), torch.randn(38, 16, generator=g)
    want = sum((d_s.double().T @ x_s.double()).square().sum() for d_s, x_s in zip(d.split(counts), x.split(counts)))
    torch.testing.assert_close(gradient_square_sum(d, x, counts), want, rtol=1e-9, atol=0)
    assert abs(float(gradient_square_sum(d, x)) / float(want) - 1) > 1e-3  # the batch's gradient is another value


def test_expert_gradient_squares_equal_float64_autograd():
    """The Fisher backward's experts forward against transformers' own (output, gradients of the input and of the
    routing weights), and every expert's squared weight gradients (both granularities) from the layer's backward
    against float64 autograd w.r.t. the fused weights; expert token counts on both sides of the Gram/formed
    threshold of :func:`gradient_square_sum` (out·in / (out + in) = 5.3 tokens at H 16, I 8)."""
    config = transformers.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    experts = Qwen3MoeExperts(config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(4, 16, 16, generator=g) / 4)
        experts.down_proj.copy_(torch.randn(4, 16, 8, generator=g) / 3)
    experts.requires_grad_(False)
    hidden, out_grad = torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g)
    index = torch.stack([torch.tensor([0] * 18 + [1, 2]), torch.tensor([1] * 4 + [2] * 16)], dim=1)  # 18, 5, 17, 0 tokens
    weights = torch.rand(20, 2, generator=g)

    calls = []
    inputs = [hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
    out = _experts_forward(experts, calls)(inputs[0], index, inputs[1])
    grads = torch.autograd.grad(out, inputs, out_grad)
    reference = [hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
    want_out = experts(reference[0], index, reference[1])
    want_grads = torch.autograd.grad(want_out, reference, out_grad)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (call,) = calls
    assert call.counts == [18, 5, 17, 0]

    gate_up = experts.gate_up_proj.double().requires_grad_(True)
    down = experts.down_proj.double().requires_grad_(True)
    out = torch.zeros(20, 16, dtype=torch.float64)
    for t in range(20):
        for slot in range(2):
            e = int(index[t, slot])
            gate, up = (gate_up[e] @ hidden[t].double()).chunk(2)
            out[t] += weights[t, slot].double() * (down[e] @ (F.silu(gate) * up))
    grad_gate_up, grad_down = torch.autograd.grad(out, (gate_up, down), out_grad.double())
    want = {"gate": grad_gate_up[:, :8] ** 2, "up": grad_gate_up[:, 8:] ** 2, "down": grad_down**2}

    per_expert = _expert_gradient_squares(call, "expert")
    element = _expert_gradient_squares(call, "element")
    for k, square in want.items():
        # float32 forward and backward of the expert (sums of ≤ 16 terms) against float64: relative 1e-6 expected
        torch.testing.assert_close(per_expert[k], square.flatten(1).mean(1), rtol=1e-5, atol=0)
        torch.testing.assert_close(element[k], square, rtol=1e-5, atol=1e-6 * float(square.max()))
        assert per_expert[k].dtype == element[k].dtype == torch.float64
    assert float(per_expert["down"][3]) == 0 and (per_expert["down"][:3] > 0).all()


def test_expert_fisher_frees_each_layer_without_the_cycle_collector(tiny_moe):
    """Every layer the Fisher pass builds is freed when dropped (no reference cycle through the experts' forward
    keeps a layer's weights alive until the cycle collector runs: at Qwen3-30B-A3B's shapes that is 2.3 GiB)."""
    source = StreamedModel(tiny_moe("qwen3_moe"))
    built = []
    build_layer = source.build_layer

    def build_and_watch(*args, **kwargs):
        layer = build_layer(*args, **kwargs)
        built.append([weakref.ref(module) for module in layer.modules()])  # the experts module among them
        return layer

    source.build_layer = build_and_watch
    samples = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(5))
    gc.collect()
    gc.disable()
    try:
        expert_fisher(source, [0, 1], samples, labels="empirical", progress=False)
        alive = [ref() is not None for refs in built for ref in refs]
    finally:
        gc.enable()
    assert len(built) == 4 and not any(alive)
