"""Zero-shot accuracy through lm-evaluation-harness (same as ``larosa zeroshot``): json + md in eval/results/.

    python eval/zeroshot.py --ckpt DIR [--rotations DIR] --method dense,larosa --mode faithful \
        --sparsity 0.25,0.4,0.5 --alpha official --tasks arc_easy,piqa --limit 200 --out eval/results/NAME

Tasks (default all 7): arc_easy, arc_challenge, piqa, boolq, hellaswag, openbookqa, winogrande, read
offline from ../shared/data/zeroshot (or --data-dir, or $LAROSA_ZEROSHOT_DIR). Needs lm-eval 0.4.13.
"""

import sys

from larosa_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["zeroshot", *sys.argv[1:]]))
