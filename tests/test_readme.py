"""The README as a user meets it: every ``larosa`` command in its shell blocks parses as written, and its
Python example runs (on the bundled stories260K, its paths pointed at the tests' checkpoint and
rotations)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

from _helpers import stories, stories_stats_dir
from larosa_jax.cli import parser
from larosa_jax.sparsity import SparseConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_every_readme_command_parses():
    cmds = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "larosa":
                    cmds.append(words[1:])
    assert len(cmds) >= 10
    for words in cmds:
        args = parser().parse_args(words)
        assert callable(args.func), words


def test_the_python_example_runs(tmp_path):
    (code,) = _blocks("python")
    saved = tmp_path / "alloc.json"
    saved.write_text(json.dumps({"sparse_config": SparseConfig("larosa", "fused", 0.4, select="threshold").to_dict()}))
    code = (code.replace('"ckpt/stories260K"', repr(str(stories().ckpt)))
            .replace('"rot/stories-joint"', repr(str(stories_stats_dir("joint"))))
            .replace('"runs/alloc.json"', repr(str(saved))))
    assert "ckpt/" not in code and "rot/" not in code and "runs/" not in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
    lines = out.getvalue().splitlines()
    assert 0.3 < float(lines[0]) < 0.5 and len(lines) >= 2  # the effective sparsity, then the story
    assert scope["tuned"].effective_sparsity == scope["sparse"].effective_sparsity


def test_no_pytorch_advice_without_torch():
    """Without torch (hidden here), loading a tokenizer prints nothing about PyTorch: larosa needs transformers'
    tokenizers only."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from larosa_jax.checkpoint import load_tokenizer\n"
            f"print(type(load_tokenizer({str(stories().ckpt)!r})).__name__)")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=README.parent, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PyTorch" not in r.stderr + r.stdout and r.stdout.strip()
