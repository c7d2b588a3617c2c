#!/usr/bin/env bash
# The main job on the bundled tiny model: compress it with D²-MoE, show what was written, and let the
# compressed model answer a prompt. Runs offline in well under a minute on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/tiny-qwen3-moe-d2-40}
moe-compress compress examples/tiny-qwen3-moe-demo -o "$out" --method d2 --ratio 0.4 --overwrite
moe-compress inspect "$out"
moe-compress generate "$out" --prompt "The jury said" --max-new-tokens 24
