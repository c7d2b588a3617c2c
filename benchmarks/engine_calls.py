"""The MoE op's calls as vLLM's engine makes them: recorded from a served model, replayed through both ops.

    VLLM_CPU_KVCACHE_SPACE=2 python -m benchmarks.engine_calls record ../shared/models/brown-qwen3-moe \
        --prompts ../shared/data/brown/test.txt --out runs/calls-dense.safetensors
    VLLM_CPU_KVCACHE_SPACE=2 python -m benchmarks.engine_calls record runs/ref/d2-60 \
        --prompts ../shared/data/brown/test.txt --out runs/calls-d2.safetensors
    python -m benchmarks.engine_calls replay runs/calls-d2.safetensors runs/calls-dense.safetensors --threads 2
    VLLM_CPU_KVCACHE_SPACE=2 python -m benchmarks.engine_calls in-engine runs/ref/d2-60 \
        --prompts ../shared/data/brown/test.txt

``record`` runs ``benchmarks/vllm_throughput.py``'s workload (the first ``--num-prompts`` lines of over 80
characters, cut to ``--prompt-chars``; greedy, ``--output-tokens`` each, ``ignore_eos``) in an engine kept in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) in eager mode, so that Python runs at every MoE call: the plugin's
``apply_cpu`` for a compressed model, vLLM CPU's ``cpu_fused_moe`` for a dense one. After one warm-up generation it
writes every call of one generation (the layer, x, topk_ids, topk_weights: the trained router's real routing) and
each layer's op arguments once (the compressed layer's prepared CPU layout, or vLLM's prepacked dense w13 / w2).

``replay`` takes a compressed recording and a dense one of the same architecture and sends the compressed model's
calls, in their order, through both ops — ours on its layouts, vLLM's dense op on the same layer's dense weights —
in alternating rounds at ``--threads`` (vLLM's CPU worker runs one thread per bound core), and prints, per call
size (tokens), the calls, the experts active per call, and the median ms per call of each op. ``--uniform``
replaces the recorded routing with uniform random top-k (what ``benchmarks/cpu_moe.py`` times), ``--sizes`` the
calls themselves with one call per layer of each given size (random x, uniform routing); ``--compare-source``
adds the calls through the op built from another ``lowrank_moe_cpu.cpp`` (an earlier commit's) on the same layouts
(timed, not checked: an op from before the pair layout's column tiles, BENCHMARKS.md §10.22, reads the tiled
tensors at the addresses of its own layout). This separates what the engine's own calls cost from what the op
benchmark's random inputs cost (BENCHMARKS.md §10.20). ``in-engine`` times each call where the engine makes it
(the same workload, a warm-up generation, then ``--generations`` timed ones): replayed back to back the calls
find the op's data and threads as the previous call left them, in the engine after the model's other ops
(BENCHMARKS.md §10.22). A compressed recording holds the prepared layout as this
checkout wrote it (``cpu_extension.PAIR_TILE`` and whether the op has ``bf16_dots``, which decides how a bf16 base
down is stored, in its metadata); ``replay`` refuses one from another layout.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.vllm_throughput import workload_prompts
from benchmarks.vllm_worker import workload_engine
from vllm_moe_compress.kernels.cpu_extension import PAIR_TILE, cpu_ops


def on_moe_calls(hook) -> set:
    """Send every MoE call of an engine in this process through ``hook(key, arguments, x, topk_ids, topk_weights,
    call)``: the plugin's ``apply_cpu`` (key: the scheme object's id, arguments: its op's layout) and vLLM CPU's
    ``cpu_fused_moe`` (key: w13's address, arguments: (w13, w2, isa, activation, apply_router_weight_on_input));
    ``call()`` runs the op and returns its output, which the hook returns. Gives the set of schemes seen (filled as
    the calls come)."""
    import vllm.model_executor.layers.fused_moe.experts.cpu_moe as vllm_cpu_moe

    from vllm_moe_compress.scheme import CompressedMoEScheme

    schemes = set()
    apply_cpu = CompressedMoEScheme.apply_cpu

    def hooked_apply_cpu(self, layer, x, topk_weights, topk_ids):
        schemes.add(self.scheme)
        return hook(id(self), self.cpu_args, x, topk_ids, topk_weights,
                    lambda: apply_cpu(self, layer, x, topk_weights, topk_ids))

    fused_moe = vllm_cpu_moe.cpu_fused_moe

    def hooked_fused_moe(output, x, w13, w2, b13, b2, topk_weights, topk_ids, activation, isa, on_input):
        if b13 is not None or b2 is not None:
            raise SystemExit("experts with biases; replay calls vLLM's op without them")
        return hook(w13.data_ptr(), (w13, w2, isa, activation, bool(on_input)), x, topk_ids, topk_weights,
                    lambda: fused_moe(output, x, w13, w2, b13, b2, topk_weights, topk_ids, activation, isa, on_input))

    CompressedMoEScheme.apply_cpu = hooked_apply_cpu
    vllm_cpu_moe.cpu_fused_moe = hooked_fused_moe
    return schemes


def eager_engine(args):
    """(llm, prompts, params): the workload's engine in this process, eager (Python runs at every MoE call), no
    prefix caching (each generation repeats the warm-up's prompts, whose prefill must not be cached)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    prompts = workload_prompts(args.prompts, args.num_prompts, args.prompt_chars)
    llm, params = workload_engine(args.model, prompts, args.output_tokens, enforce_eager=True,
                                  enable_prefix_caching=False)
    return llm, prompts, params


def record(args) -> None:
    layers: dict[int, tuple[int, tuple]] = {}  # a layer's identity -> (its index, first seen first; the op's arguments
    # after the routing)
    calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    recording = [False]

    def kept(key, arguments, x, topk_ids, topk_weights, call):
        layer = layers.setdefault(key, (len(layers), arguments))[0]
        if recording[0]:
            calls.append((layer, x.clone(), topk_ids.clone(), topk_weights.clone()))
        return call()

    schemes = on_moe_calls(kept)
    llm, prompts, params = eager_engine(args)
    llm.generate(prompts, params, use_tqdm=False)
    recording[0] = True
    llm.generate(prompts, params, use_tqdm=False)
    if not calls:
        raise SystemExit(f"{args.model}: no MoE op call was seen (neither the plugin's CPU op nor vLLM's cpu_fused_moe)")
    if len(schemes) > 1:
        raise SystemExit(f"{args.model}: layers of several schemes ({sorted(schemes)}); replay takes one")
    save_recording(args.out, str(args.model), schemes.pop() if schemes else None,
                   [arguments for _, arguments in layers.values()], calls)
    sizes = sorted({c[1].shape[0] for c in calls})
    print(f"{args.model}: {len(calls)} calls over {len(layers)} layers (tokens per call {sizes}) -> {args.out}")


def in_engine(args) -> None:
    """Each MoE call timed where the engine makes it (between the engine's other ops, its threads as the worker set
    them): per call size, the calls per generation and their median and mean ms, and the MoE ms per generation."""
    times: dict[int, list[float]] = {}
    timing = [False]

    def timed(key, arguments, x, topk_ids, topk_weights, call):
        start = time.perf_counter()
        out = call()
        if timing[0]:
            times.setdefault(x.shape[0], []).append((time.perf_counter() - start) * 1e3)
        return out

    on_moe_calls(timed)
    llm, prompts, params = eager_engine(args)
    llm.generate(prompts, params, use_tqdm=False)
    timing[0] = True
    for _ in range(args.generations):
        llm.generate(prompts, params, use_tqdm=False)
    if not times:
        raise SystemExit(f"{args.model}: no MoE op call was seen (neither the plugin's CPU op nor vLLM's cpu_fused_moe)")
    print(f"{args.model}: MoE calls in the engine, {args.generations} generations, {torch.get_num_threads()} "
          "torch thread(s); ms per call")
    print("| tokens | calls per generation | median | mean | ms per generation |")
    print("|---|---|---|---|---|")
    for size, ms in sorted(times.items()):
        print(f"| {size} | {len(ms) / args.generations:g} | {statistics.median(ms):.4f} | {statistics.mean(ms):.4f} | "
              f"{sum(ms) / args.generations:.2f} |")
    print(f"| all | | | | {sum(map(sum, times.values())) / args.generations:.2f} |")


def save_recording(path: Path, model: str, scheme: str | None, layers: list, calls: list) -> None:
    """Write a recording (atomically): ``scheme`` None for a dense model (layers: (w13, w2, isa, activation,
    apply_router_weight_on_input)), else the
    plugin's scheme (layers: its C++ op's arguments after the routing); calls: (layer, x, topk_ids,
    topk_weights)."""
    tensors, scalars = {}, {}
    for i, arguments in enumerate(layers):
        for j, value in enumerate(arguments):
            if isinstance(value, torch.Tensor):
                tensors[f"layer.{i}.{j}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{i}.{j}"] = value
    for n, (layer, x, topk_ids, topk_weights) in enumerate(calls):
        tensors |= {f"call.{n}.x": x.contiguous(), f"call.{n}.topk_ids": topk_ids.contiguous(),
                    f"call.{n}.topk_weights": topk_weights.contiguous()}
    meta = {"kind": "compressed" if scheme else "dense", "model": model,
            "call_layers": json.dumps([c[0] for c in calls]), "arguments": json.dumps([len(a) for a in layers]),
            "scalars": json.dumps(scalars)}
    if scheme:
        meta |= {"scheme": scheme, "pair_tile": str(PAIR_TILE), "bf16_dots": str(int(cpu_ops().bf16_dots()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata=meta)
    partial.replace(path)


def layout_arguments(op) -> int:
    """How many arguments ``op`` (one of the CPU ops) takes after x, topk_ids and topk_weights."""
    return len(op.default._schema.arguments) - 3


def load_recording(path: Path):
    """(kind, scheme, per-layer op arguments, calls [(layer, x, topk_ids, topk_weights)]) of a recording."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    dots = str(int(cpu_ops().bf16_dots()))
    if meta["kind"] == "compressed" and meta.get("bf16_dots", "0") != dots:
        raise SystemExit(f"{path}: its layout was prepared for an op with bf16_dots={meta.get('bf16_dots', '0')}, "
                         f"this checkout's has {dots} (it decides how bf16 base downs and dense weights are "
                         "stored: cpu_extension.base_down_projected, dense_projected); record it again")
    if meta["kind"] == "compressed" and meta.get("pair_tile") != str(PAIR_TILE):
        raise SystemExit(f"{path}: its layout was prepared with another pair layout (pair_tile "
                         f"{meta.get('pair_tile', 'absent')}, this checkout's {PAIR_TILE}: BENCHMARKS.md §10.22); "
                         "record it again")
    if meta["kind"] == "compressed":
        taken, recorded = layout_arguments(getattr(cpu_ops(), meta["scheme"])), set(json.loads(meta["arguments"]))
        if recorded != {taken}:
            raise SystemExit(f"{path}: its layers hold {sorted(recorded)} op arguments each, this checkout's "
                             f"{meta['scheme']} op takes {taken} after the activations; record it again")
    # each tensor copied into memory of its own: load_file's tensors are views of one buffer at the file's offsets,
    # none of them 64-byte aligned, where the engine's are; vLLM's dense op ran ~1.4x slower on them (§10.23)
    tensors = {name: tensor.clone() for name, tensor in load_file(path).items()}
    scalars = json.loads(meta["scalars"])
    layers = [[tensors[f"layer.{i}.{j}"] if f"layer.{i}.{j}" in tensors else scalars[f"{i}.{j}"] for j in range(count)]
              for i, count in enumerate(json.loads(meta["arguments"]))]
    calls = [(layer, tensors[f"call.{n}.x"], tensors[f"call.{n}.topk_ids"], tensors[f"call.{n}.topk_weights"])
             for n, layer in enumerate(json.loads(meta["call_layers"]))]
    return meta["kind"], meta.get("scheme"), layers, calls


def replay(args) -> None:
    from vllm import _custom_ops as vllm_ops

    from vllm_moe_compress import request_amx_tile_state

    kind, scheme, ours_layers, calls = load_recording(args.compressed)
    dense_kind, _, dense_layers, _ = load_recording(args.dense)
    if kind != "compressed" or dense_kind != "dense":
        raise SystemExit("replay takes a compressed model's recording, then a dense model's")
    if len(ours_layers) != len(dense_layers):
        raise SystemExit(f"the recordings have {len(ours_layers)} and {len(dense_layers)} MoE layers")
    request_amx_tile_state()  # vLLM's AMX kernel does not ask for the tile state itself
    torch.set_num_threads(args.threads)
    op = getattr(cpu_ops(), scheme)
    num_experts = dense_layers[0][0].shape[0]
    gen = torch.Generator().manual_seed(0)

    def uniform_ids(tokens: int, like: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randperm(num_experts, generator=gen)[: like.shape[1]]
                            for _ in range(tokens)]).to(like.dtype)

    if args.sizes:  # one call per layer and size: x with the recorded calls' width and dtype
        _, x0, ids0, w0 = calls[0]
        calls = [(layer, torch.randn(size, x0.shape[1], generator=gen).to(x0.dtype), uniform_ids(size, ids0),
                  torch.rand(size, ids0.shape[1], generator=gen).softmax(1).to(w0.dtype))
                 for size in args.sizes for layer in range(len(ours_layers))]
    elif args.uniform:
        calls = [(layer, x, uniform_ids(x.shape[0], ids), w) for layer, x, ids, w in calls]

    def ours(layer, x, ids, w):
        return op(x, ids, w, *ours_layers[layer])

    def dense(layer, x, ids, w):
        w13, w2, isa, activation, on_input = dense_layers[layer]
        out = torch.empty_like(x)
        vllm_ops.cpu_fused_moe(out, x, w13, w2, None, None, w, ids, activation, isa, on_input)
        return out

    paths = {"ours": ours, "vLLM dense": dense}
    if args.compare_source is not None:  # the same layouts through another source's op (same arguments)
        from benchmarks.cpu_moe import other_ops

        other = getattr(other_ops(args.compare_source), scheme)
        if layout_arguments(other) != layout_arguments(op):
            raise SystemExit(f"{args.compare_source}: its {scheme} op takes {layout_arguments(other)} arguments after "
                             f"the activations, this checkout's {layout_arguments(op)}: replay compares ops on the "
                             "same layouts")
        paths[f"ours ({args.compare_source.name})"] = lambda layer, x, ids, w: other(x, ids, w, *ours_layers[layer])
    ours_paths = [name for name in paths if name != "vLLM dense"]
    routing = "uniform random" if args.uniform or args.sizes else "recorded"
    print(f"{args.compressed} ({scheme}) against {args.dense}, {args.threads} thread(s), {routing} routing, "
          f"{args.rounds} rounds; ms per call, median")
    print("| tokens | calls | experts per call | " + " | ".join(paths) + " | "
          + " | ".join(f"vLLM ÷ {name}" for name in ours_paths) + " |")
    print("|---" * (3 + len(paths) + len(ours_paths)) + "|")
    for size, calls_of_size, experts, times in timed_sizes(paths, calls, args.rounds, args.calls):
        dense_ms = times["vLLM dense"]
        print(f"| {size} | {calls_of_size} | {experts:.1f} | " + " | ".join(f"{times[n]:.4f}" for n in paths) + " | "
              + " | ".join(f"{dense_ms / times[n]:.2f}×" for n in ours_paths) + " |")


def timed_sizes(paths: dict, calls: list, rounds: int, at_least: int):
    """Per call size (tokens): (size, calls, mean experts active per call, {path: median ms per call}), each
    path timed over that size's calls in order, repeated to ``at_least`` calls, in rounds of alternating order."""
    for size in sorted({x.shape[0] for _, x, _, _ in calls}):
        chosen = [c for c in calls if c[1].shape[0] == size]
        repeats = -(-at_least // len(chosen))  # ceiling: at least at_least calls
        times = {name: [] for name in paths}
        for forward in paths.values():  # warm
            for call in chosen:
                forward(*call)
        for r in range(rounds):
            for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                start = time.perf_counter()
                for _ in range(repeats):
                    for call in chosen:
                        paths[name](*call)
                times[name].append((time.perf_counter() - start) / repeats / len(chosen) * 1e3)
        experts = statistics.mean(len(ids.unique()) for _, _, ids, _ in chosen)
        yield size, len(chosen), experts, {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record one generation's MoE calls of a model served in-process")
    timed = sub.add_parser("in-engine", help="time each MoE call where the engine makes it (eager, in-process)")
    for workload in (rec, timed):
        workload.add_argument("model")
        workload.add_argument("--prompts", required=True, help="text file; one prompt per line of over 80 characters")
        workload.add_argument("--num-prompts", type=int, default=16)
        workload.add_argument("--prompt-chars", type=int, default=400)
        workload.add_argument("--output-tokens", type=int, default=64)
    rec.add_argument("--out", type=Path, required=True, help="the recording (.safetensors)")
    timed.add_argument("--generations", type=int, default=3, help="timed generations after the warm-up (3)")
    rep = sub.add_parser("replay", help="time a compressed recording's calls through ours and vLLM's dense op")
    rep.add_argument("compressed", type=Path)
    rep.add_argument("dense", type=Path)
    rep.add_argument("--threads", type=int, default=2, help="torch threads (2: vLLM's worker on 2 cores)")
    rep.add_argument("--rounds", type=int, default=9)
    rep.add_argument("--calls", type=int, default=400, help="calls timed per path and round, at least (400)")
    rep.add_argument("--uniform", action="store_true", help="uniform random top-k routing instead of the recorded")
    rep.add_argument("--sizes", type=int, nargs="+",
                     help="instead of the recorded calls, one call per layer of each of these sizes (tokens): random "
                     "x of the recorded width and dtype, uniform random top-k routing")
    rep.add_argument("--compare-source", type=Path,
                     help="also time the calls through the op compiled from this lowrank_moe_cpu.cpp (same layout "
                     "arguments, e.g. `git show <commit>:kernels/csrc/lowrank_moe_cpu.cpp > old.cpp`)")
    args = parser.parse_args()
    {"record": record, "in-engine": in_engine, "replay": replay}[args.command](args)


if __name__ == "__main__":
    main()
