#!/usr/bin/env bash
# The committed SmolLM2-135M perplexity grid (issue 4), end to end:
#   convert → calibrate (faithful and fused flavours, 16 × 2048 tokens of WikiText-2 raw *valid*)
#   → α search per p and mode (4 held-out valid windows) → perplexity on the full WikiText-2 test split.
# Usage: eval/smollm2_grid.sh GGUF_DIR WIKITEXT_RAW_DIR WORK_DIR RESULTS_STEM [all|prep|ppl]
# (on a GPU, export JAX_DEFAULT_MATMUL_PRECISION=highest so float32 stays float32)
set -euo pipefail
src=$1; wiki=$2; work=$3; out=$4; stage=${5:-all}
ps=0.25,0.4,0.5
L="python -m larosa_jax.cli"
if [ "$stage" != ppl ]; then
$L convert --model "$src" --out "$work/ckpt" --dtype float32 --overwrite
for fl in faithful fused; do
  $L calibrate --ckpt "$work/ckpt" --data-file "$wiki/wiki.valid.raw" --samples 16 --seqlen 2048 \
    --flavour $fl --batch 4 --out "$work/rot_$fl" --overwrite
  $L search --ckpt "$work/ckpt" --rotations "$work/rot_$fl" --data-file "$wiki/wiki.valid.raw" \
    --samples 4 --seqlen 2048 --sparsity $ps --mode $fl --batch 4
done
fi
[ "$stage" = prep ] && exit 0
$L ppl --ckpt "$work/ckpt" --rotations "$work/rot_faithful" --data-file "$wiki/wiki.test.raw" --protocol full \
  --methods dense,larosa,topk,teal,cats --mode faithful --alpha official,searched --sparsity $ps --batch 4 \
  --out "$out" --overwrite
$L ppl --ckpt "$work/ckpt" --rotations "$work/rot_fused" --data-file "$wiki/wiki.test.raw" --protocol full \
  --methods larosa --mode fused --alpha official,searched --sparsity $ps --batch 4 --out "$out" --resume
