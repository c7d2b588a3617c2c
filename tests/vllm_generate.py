"""Run vLLM's offline LLM on a model and print greedy tokens and prompt logprobs as JSON (subprocess helper).

Usage: python tests/vllm_generate.py MODEL_DIR TOKEN_ID_LISTS_JSON [--eager] [--max-num-seqs N] [--tp N] [--dtype D] [--cpu-mla]
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    from vllm import LLM, SamplingParams

    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    args = sys.argv[3:]
    max_num_seqs = int(args[args.index("--max-num-seqs") + 1]) if "--max-num-seqs" in args else 8
    tp = int(args[args.index("--tp") + 1]) if "--tp" in args else 1
    dtype = args[args.index("--dtype") + 1] if "--dtype" in args else "float32"
    llm = LLM(model=model, max_model_len=512, dtype=dtype, enforce_eager="--eager" in args,
              max_num_seqs=max_num_seqs, tensor_parallel_size=tp,
              model_loader_extra_config={"enable_weights_track": True},
              # DeepSeek's MLA: the reference CPU backend runs float32 (the AMX one only bf16)
              **({"attention_config": {"backend": "CPU_MLA"}} if "--cpu-mla" in args else {}))
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    result = [{
        "tokens": list(o.outputs[0].token_ids),
        "prompt_logprobs": [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]],
    } for o in outputs]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
