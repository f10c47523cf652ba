#!/usr/bin/env bash
# The committed SmolLM2-135M zero-shot tables (lm-evaluation-harness 0.4.13, the 7 offline tasks), end to end.
#   RECIPE=faithful (default; smollm2_zeroshot.md): convert (float32) → calibrate the faithful flavour
#   (16 × 2048 tokens of WikiText-2 raw *valid*, as eval/smollm2_grid.sh) → the α search for p = 0.4, 0.5 on
#   that calibration (a searched α is tied to the rotations it was searched on) → one `larosa zeroshot`:
#   dense, larosa faithful (searched α) and teal at p = 0.4, 0.5.
#   RECIPE=best (smollm2_zeroshot_h100.md): the frontier's best deployable La RoSA (one global Q, rotated
#   thresholds, fused) beside dense and teal at p = 0.5 and 0.6, the sparsities nearest 1.5x and 1.8x under the
#   current dense plan (TEAL 1.53x and 1.69x in sparse_decode_frontier1_h100.md). All 7 tasks, full splits.
# Usage: eval/smollm2_zeroshot.sh GGUF_DIR WIKITEXT_RAW_DIR ZEROSHOT_DIR WORK_DIR RESULTS_STEM [LIMIT]
#   LIMIT: only the first LIMIT examples of each task (quick checks); default: full splits.
# Environment knobs: RECIPE (above), BATCH (rows per device call, default 1024: every scoring call 16384 tokens,
#   for a GPU; BATCH=16 for quick CPU checks), CALIB_SAMPLES (default 16: anything else
#   is for dry runs only), METHODS (default dense,larosa,teal: a subset splits the table over several
#   machines; --resume merges the rows), PYTHON (default python).
# Restartable: convert and calibrate are skipped when WORK_DIR already holds them, and the zero-shot runs
#   continue RESULTS_STEM.json (--resume); delete RESULTS_STEM.json to start the table afresh.
# (on a GPU, export JAX_DEFAULT_MATMUL_PRECISION=highest so float32 stays float32)
set -euo pipefail
src=$1; wiki=$2; zs=$3; work=$4; out=$5; limit=${6:-}
recipe=${RECIPE:-faithful}
thr=(--mode fused --select threshold --alpha official)
case "$recipe" in  # FLAVOUR:P,... per calibration
  faithful) runs="faithful:0.4,0.5"; how=(--mode faithful --alpha searched) ;;
  best) runs="global:0.5,0.6"; how=("${thr[@]}") ;;
  *) echo "RECIPE=$recipe: valid: faithful, best" >&2; exit 2 ;;
esac
batch=${BATCH:-1024}
calib=${CALIB_SAMPLES:-16}
repo=$(cd "$(dirname "$0")/.." && pwd)
L="${PYTHON:-python} -m larosa_jax.cli"
cd "$repo"

if [ ! -f "$work/ckpt.done" ]; then
  $L convert --model "$src" --out "$work/ckpt" --dtype float32 --overwrite
  touch "$work/ckpt.done"
fi
for run in $runs; do
  flavour=${run%%:*}; ps=${run#*:}
  rot=$work/rot_$flavour
  if [ ! -f "$rot.done" ] || [ "$(cat "$rot.done")" != "$calib" ]; then
    $L calibrate --ckpt "$work/ckpt" --data-file "$wiki/wiki.valid.raw" --samples "$calib" --seqlen 2048 \
      --flavour $flavour --batch 4 --out "$rot" --overwrite
    [ "$recipe" = faithful ] && $L search --ckpt "$work/ckpt" --rotations "$rot" --data-file "$wiki/wiki.valid.raw" \
      --samples 4 --seqlen 2048 --sparsity $ps --mode faithful --batch 4
    echo "$calib" > "$rot.done"
  fi
  $L zeroshot --ckpt "$work/ckpt" --rotations "$rot" --data-dir "$zs" \
    --method "${METHODS:-dense,larosa,teal}" "${how[@]}" --sparsity $ps \
    --batch "$batch" ${limit:+--limit "$limit"} --out "$out" --resume
done
