"""Perplexity grid (same as ``larosa ppl``): methods × sparsities, json + md + png in eval/results/.

    python eval/ppl.py --ckpt DIR --rotations DIR --methods dense,larosa,teal,cats,topk \
        --sparsity 0.25,0.4,0.5 --mode faithful,fused --alpha official,searched \
        --data-file wiki.test.raw --protocol full --out eval/results/NAME
"""

import sys

from larosa_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppl", *sys.argv[1:]]))
