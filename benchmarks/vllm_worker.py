"""One timed vLLM engine for vllm_throughput.py, run as ``python -m benchmarks.vllm_worker``."""

import json
import sys
import time


def weight_bytes(model) -> tuple[int, int]:
    """Bytes of all weights and of the MoE expert weights of the loaded model (runs in the worker): the
    parameters, plus the layouts the plugin's C++ CPU backend keeps as ``moe_compress_cpu_*`` buffers (it frees
    the parameters those copied, scheme.py ``release_copied_parameters``); a tensor shared by both counts once."""
    total = experts = 0
    seen = set()
    tensors = [*model.named_parameters(remove_duplicate=False),
               *((n, b) for n, b in model.named_buffers(remove_duplicate=False) if "moe_compress_cpu_" in n)]
    for name, t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if not t.numel() or key in seen:
            continue
        seen.add(key)
        n = t.numel() * t.element_size()
        total += n
        experts += n if ".experts." in name else 0
    return total, experts


def workload_engine(model: str, prompts: list[str], out_tokens: int, **options):
    """(LLM, SamplingParams) of the throughput workload: bf16, 1,024-token context, one sequence slot per prompt;
    greedy, ``out_tokens`` each, ``ignore_eos``. ``options``: further ``LLM`` arguments."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=1024, max_num_seqs=len(prompts), dtype="bfloat16", **options)
    return llm, SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True)


def main() -> None:
    from benchmarks.vllm_worker import weight_bytes as importable_weight_bytes  # picklable by reference

    model, prompts, out_tokens, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm, params = workload_engine(model, prompts, out_tokens)
    llm.generate(prompts, params, use_tqdm=False)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start))
    total, experts = llm.apply_model(importable_weight_bytes)[0]
    print("RESULT " + json.dumps({"rates": rates, "weight_bytes": total, "expert_bytes": experts}))


if __name__ == "__main__":
    main()
