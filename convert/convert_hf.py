"""Convert a Hugging Face checkpoint to a larosa checkpoint (same as ``larosa convert``).

    python convert/convert_hf.py --model <local HF dir | hub id | file.gguf> --out DIR [--dtype bfloat16|float32] [--overwrite]
"""

import sys

from larosa_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
