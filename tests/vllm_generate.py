"""Run vLLM's offline LLM on one or more models in turn; print greedy tokens and prompt logprobs (subprocess helper).

Usage: python tests/vllm_generate.py JOBS_JSON

JOBS_JSON is a list of jobs, each ``{"model": DIR, "prompts": [[token ids], ...]}`` plus optional ``"eager"``
(bool, default false: vLLM's compiled mode), ``"max_num_seqs"`` (8), ``"tp"`` (1), ``"cpu_mla"`` (false:
DeepSeek's MLA on the reference CPU backend, which runs float32). For each job, in order, one line
``RESULT {"outputs": [{"tokens": [...], "prompt_logprobs": [...]}, ...], "quantization": ...}`` or
``RESULT {"error": "..."}`` is printed.

vLLM imports once and every job's engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni``
executor at TP=1): an engine then starts in seconds instead of three process start-ups that each import vLLM.
The multi-process layout of ``vllm serve`` is what tests/test_server.py runs; TP > 1 jobs use the ``mp``
executor (one worker process per rank).
"""

import gc
import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    tp = job.get("tp", 1)
    llm = LLM(model=job["model"], max_model_len=512, dtype="float32", enforce_eager=job.get("eager", False),
              max_num_seqs=job.get("max_num_seqs", 8), tensor_parallel_size=tp,
              distributed_executor_backend="uni" if tp == 1 else "mp",
              model_loader_extra_config={"enable_weights_track": True},
              **({"attention_config": {"backend": "CPU_MLA"}} if job.get("cpu_mla") else {}))
    try:
        params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False)
        return {
            "outputs": [{"tokens": list(o.outputs[0].token_ids),
                         "prompt_logprobs": [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]}
                        for o in outputs],
            # None unless vLLM picked a quantization method (from config.json: no job passes one)
            "quantization": llm.llm_engine.model_config.quantization,
        }
    finally:
        del llm
        gc.collect()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def main() -> None:
    for job in json.loads(sys.argv[1]):
        try:
            result = run_job(job)
        except Exception:  # report it and go on with the next job: one broken model must not hide the others
            result = {"error": traceback.format_exc()[-6000:]}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
