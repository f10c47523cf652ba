#!/usr/bin/env bash
# The committed SmolLM2-135M speed–quality frontier (issue 24), end to end:
#   convert → calibrate each rotations flavour the recipes need (16 × 2048 tokens of WikiText-2 raw *valid*)
#   → larosa frontier on the WikiText-2 raw test split (allocations on held-out valid windows), speeds from a
#   committed bench_decode JSON ("none": the quality half alone).
# Usage: eval/smollm2_frontier.sh GGUF_DIR WIKITEXT_RAW_DIR WORK_DIR SPEEDS_JSON|none RESULTS_STEM [prep|frontier|all] [LIMIT]
# LIMIT: score only the first LIMIT test windows (a CPU run; the full split is ~140 windows of 2048).
# (on a GPU, export JAX_DEFAULT_MATMUL_PRECISION=highest so float32 stays float32; about 10 minutes on an H100)
set -euo pipefail
src=$1; wiki=$2; work=$3; speeds=$4; out=$5; stage=${6:-all}; limit=${7:-}
L="python -m larosa_jax.cli"
flavours="faithful fused joint global identity"
if [ "$stage" != frontier ]; then
  [ -d "$work/ckpt" ] || $L convert --model "$src" --out "$work/ckpt" --dtype float32
  for fl in $flavours; do
    [ -d "$work/rot_$fl" ] || $L calibrate --ckpt "$work/ckpt" --data-file "$wiki/wiki.valid.raw" --samples 16 \
      --seqlen 2048 --flavour "$fl" --batch 4 --out "$work/rot_$fl"
  done
fi
[ "$stage" = prep ] && exit 0
extra=()
[ -f "$out.json" ] && extra+=(--resume)
[ "$speeds" != none ] && extra+=(--speeds "$speeds" --shape llama2-7b)
[ -n "$limit" ] && extra+=(--limit "$limit")
$L frontier --ckpt "$work/ckpt" $(for fl in $flavours; do printf -- "--rotations %s=%s " "$fl" "$work/rot_$fl"; done) \
  --data-file "$wiki/wiki.test.raw" --protocol full --alloc-data-file "$wiki/wiki.valid.raw" \
  --sparsity 0.2,0.3,0.4,0.5,0.6 --batch 4 --out "$out" "${extra[@]}"
