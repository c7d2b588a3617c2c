#!/usr/bin/env bash
# The evaluation report of BENCHMARKS.md §6: every method at 20/40/60 % on the reference model.
#
#   bash benchmarks/full_report.sh [RUNS_DIR]        (default runs/brown; the report goes to RUNS_DIR/report)
#
# Perplexity is scored at 256-token windows, the context the reference models were trained at
# (../shared/models/README.md), on 40,960 tokens per test text.
# Compresses each missing checkpoint (an existing directory is kept: compression writes atomically, so a
# directory that exists is complete), then runs `moe-compress report`, which caches every model's
# perplexity and zero-shot results in RUNS_DIR/report/cache: an interrupted run resumes where it stopped.
# rfid and mobe keep down_proj dense by default, which caps them below 60 % of this model's parameters
# (gate/up are 54 % of it: the reachable range ends at 0.52), so their 60 and 70 % checkpoints factorise
# down too (--factorize-down).
set -euo pipefail
RUNS=${1:-runs/brown}
SHARED=${MOE_COMPRESS_SHARED:-../shared}
MODEL=$SHARED/models/brown-qwen3-moe
METHODS=${METHODS:-"d2 svd whitened-svd rs mobe rfid"}
RATIOS=${RATIOS:-"20 40 50 60 70"}
mkdir -p "$RUNS"
dirs=()
for method in $METHODS; do
  for rr in $RATIOS; do
    out=$RUNS/$method-$rr
    extra=()
    if [[ $rr -gt 52 && ( $method == rfid || $method == mobe ) ]]; then extra=(--factorize-down); fi
    if [[ ! -d $out ]]; then
      echo "== compress $method at 0.$rr -> $out" >&2
      moe-compress compress "$MODEL" -o "$out" --method "$method" --ratio "0.$rr" \
        --calib-file "$SHARED/data/brown/train.txt" --no-progress "${extra[@]}"
    fi
    dirs+=("$out")
  done
done
echo "== report over ${#dirs[@]} checkpoints" >&2
moe-compress report "${dirs[@]}" --original "$MODEL" --out "$RUNS/report" \
  --ppl-datasets brown wikitext2 ptb --ppl-max-tokens 40960 --ppl-seqlen 256 \
  --zeroshot-tasks arc_easy arc_challenge hellaswag piqa winogrande openbookqa mathqa boolq --zeroshot-limit 100 \
  --data-dir "$SHARED/data"
