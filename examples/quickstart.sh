#!/usr/bin/env bash
# The main job on the bundled tiny model: compress it with D²-MoE, show what was written, serve it with
# `vllm serve ... --quantization moe_compress` on 127.0.0.1 and answer one OpenAI request. Offline, CPU.
#
#   bash examples/quickstart.sh [OUT_DIR]      (default runs/tiny-qwen3-moe-d2-40)
#
# Environment: PORT (8471), READY_TIMEOUT (seconds to wait for the server, 900), QUICKSTART_EAGER (1: pass
# --enforce-eager, which skips vLLM's graph compilation and starts faster on CPU; 0: vLLM's compiled mode).
# The demo model is a 1.4 M-parameter toy: its completion is nonsense by design.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/tiny-qwen3-moe-d2-40}
port=${PORT:-8471}
ready_timeout=${READY_TIMEOUT:-900}
log=runs/quickstart-server.log
started=$SECONDS
mkdir -p runs
moe-compress compress examples/tiny-qwen3-moe-demo -o "$out" --method d2 --ratio 0.4 --overwrite
moe-compress inspect "$out"

eager=()
[[ ${QUICKSTART_EAGER:-1} == 1 ]] && eager=(--enforce-eager)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
echo "starting vllm serve $out on 127.0.0.1:$port ${eager[*]} (log: $log; this takes minutes on a small CPU machine)"
vllm serve "$out" --quantization moe_compress --host 127.0.0.1 --port "$port" --max-model-len 512 \
    --served-model-name tiny-d2 "${eager[@]}" > "$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

give_up() {
    echo "quickstart: $1; the last 40 lines of $log:" >&2
    tail -40 "$log" >&2
    exit 1
}
t0=$SECONDS
next_report=0
until python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v1/models')" 2>/dev/null; do
    waited=$((SECONDS - t0))
    kill -0 $server 2>/dev/null || give_up "the vLLM server exited during start-up"
    (( waited < ready_timeout )) || give_up "the vLLM server was not ready after ${ready_timeout} s (READY_TIMEOUT)"
    if (( waited >= next_report )); then
        echo "  waiting for the server: ${waited} s of at most ${ready_timeout} s; log: $(tail -1 "$log" | cut -c1-90)"
        next_report=$((waited + 15))
    fi
    sleep 1
done
echo "server ready after $((SECONDS - t0)) s"
python - "$port" <<'PY'
import sys
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
reply = client.completions.create(model="tiny-d2", prompt="The jury said", max_tokens=24, temperature=0)
print("completion (a toy model: nonsense by design):", repr("The jury said" + reply.choices[0].text))
PY
echo "quickstart done in $((SECONDS - started)) s"
