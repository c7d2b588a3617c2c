#!/usr/bin/env bash
# The main job on the bundled tiny model: compress it with D²-MoE, show what was written, serve it with
# `vllm serve ... --quantization moe_compress` on 127.0.0.1 and answer one OpenAI request. Offline, CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/tiny-qwen3-moe-d2-40}
port=${PORT:-8471}
mkdir -p runs
moe-compress compress examples/tiny-qwen3-moe-demo -o "$out" --method d2 --ratio 0.4 --overwrite
moe-compress inspect "$out"

export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
vllm serve "$out" --quantization moe_compress --host 127.0.0.1 --port "$port" --max-model-len 512 \
    --served-model-name tiny-d2 > runs/quickstart-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v1/models')" 2>/dev/null && break
    kill -0 $server 2>/dev/null || { tail -40 runs/quickstart-server.log; exit 1; }
    sleep 1
done
python - "$port" <<'PY'
import sys
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
reply = client.completions.create(model="tiny-d2", prompt="The jury said", max_tokens=24, temperature=0)
print("completion:", repr("The jury said" + reply.choices[0].text))
PY
