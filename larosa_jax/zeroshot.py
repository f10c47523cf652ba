"""Zero-shot evaluation through lm-evaluation-harness: ``LarosaLM``, the 7 offline tasks, ``larosa zeroshot``.

``LarosaLM`` is an ``lm_eval`` model (a ``TemplateLM``, the base of the harness's own HF model)
wrapping any of our models — a dense :class:`~larosa_jax.models.Transformer` or a
:class:`~larosa_jax.sparse_model.SparseModel` — and its Hugging Face tokenizer. Tokenization is the
harness's HF model's (``lm_eval.models.huggingface.HFLM``, lm-eval 0.4.13): context and continuation
are encoded whole and split (``TemplateLM._encode_pair``, inherited unchanged), special tokens follow
the tokenizer's own default unless ``add_bos_token`` says otherwise (a Llama tokenizer adds BOS, a
GPT-2-style one such as SmolLM2's adds nothing), an empty context becomes ``prefix_token_id`` (BOS, else
EOS), and a context + continuation longer than ``max_length + 1`` tokens is cut from the left.

Scoring is one jitted function over right-padded batches: requests are sorted by length (longest
first), cut into batches of ``batch_size`` rows, and each batch is padded to a power-of-two length
bucket (and the last one to ``batch_size`` rows), so jit compiles a handful of shapes per run.

``lm_eval`` is imported only when a function here needs it (``LarosaLM`` is built on first access),
so ``larosa`` commands other than ``zeroshot`` do not pay for it or need it installed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import outputs

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "LAROSA_ZEROSHOT_DIR"
SUFFIX = "_local"

# our task name → (the harness's task yaml to include, under lm_eval/tasks; the split it scores)
TASKS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
    "winogrande": ("winogrande/default.yaml", "validation"),
}


class ZeroShotError(ValueError):
    """Bad task names, missing data, or an lm-eval that cannot be used."""


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ZeroShotError("zero-shot evaluation needs lm-evaluation-harness: pip install 'lm-eval==0.4.13'") from None
    return lm_eval


# ----------------------------------------------------------------------------- the offline tasks
def default_data_dir() -> Path:
    """``$LAROSA_ZEROSHOT_DIR``, else ``shared/data/zeroshot`` beside the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else REPO.parent / "shared" / "data" / "zeroshot"


def task_name(name: str) -> str:
    """``arc_easy`` or ``arc_easy_local`` → ``arc_easy_local``; anything else is an error listing the 7."""
    base = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if base not in TASKS:
        raise ZeroShotError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return base + SUFFIX


def local_tasks(data_dir: str | Path | None = None, out_dir: str | Path | None = None,
                tasks: Sequence[str] | None = None) -> str:
    """Write the harness task yamls for the offline splits; returns the directory (an ``include_path``).

    Each yaml includes the installed harness task (its prompt, choices and metrics) and replaces only
    the data source with ``<data_dir>/<task>/<split>.jsonl`` (see shared/data/zeroshot/README.md).
    ``tasks`` (default all 7) limits which are written; their data files must exist.
    """
    import yaml

    lm_eval = _lm_eval()
    harness = Path(lm_eval.__file__).parent / "tasks"
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    names = [task_name(t)[: -len(SUFFIX)] for t in (tasks if tasks is not None else list(TASKS))]
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="larosa-zeroshot-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        include, split = TASKS[name]
        src, data = harness / include, (data_dir / name / f"{split}.jsonl").resolve()
        if not src.is_file():
            raise ZeroShotError(f"{src}: the installed lm-eval ({lm_eval.__version__}) has no such task yaml")
        if not data.is_file():
            raise FileNotFoundError(f"{data}: missing {name} {split} split (set --data-dir or ${DATA_ENV})")
        cfg = {
            "include": str(src), "task": name + SUFFIX, "tag": ["larosa_zeroshot"],
            "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(data)}},
            "training_split": None, "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
        }
        (out / f"{name}{SUFFIX}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(out)


# ----------------------------------------------------------------------------- scoring
def _bucket(n: int, cap: int) -> int:
    """Round a length up to a power of two (at least 16), at most ``cap``. Every new shape is a compile, and
    compiles, not the scoring, dominate a full-split run on a GPU; padding costs little."""
    return min(1 << (max(16, n) - 1).bit_length(), max(cap, n))


@functools.cache
def _score_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @functools.partial(jax.jit, static_argnames=("graphdef",))
    def score(graphdef, state, tokens, targets, mask):
        """Per row: summed log p(target) over ``mask`` and whether every masked target is the argmax."""
        logits, _ = nnx.merge(graphdef, state)(tokens)
        logits = logits.astype(jnp.float32)
        lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
        greedy = jnp.argmax(logits, axis=-1) == targets
        return jnp.sum(jnp.where(mask, lp, 0.0), axis=1), jnp.all(greedy | ~mask, axis=1)

    return score


class _StopGeneration(Exception):
    def __init__(self, ids):
        self.ids = ids


def _make_lm_class():
    import numpy as np
    from lm_eval.api.model import TemplateLM
    from tqdm.auto import tqdm

    class LarosaLM(TemplateLM):
        """lm-eval model over one of our models (dense or sparse) and its HF tokenizer.

        ``batch_size``: rows per device call (fewer for long buckets: at most ``max_batch_tokens``
        tokens a call). With ``batch_size >= max_batch_tokens / 16`` every loglikelihood call holds the same
        number of tokens, so XLA reuses its matmul tuning across length buckets. ``max_length`` defaults to
        the model's ``max_position_embeddings`` (as HFLM).
        With a ``mesh`` the loglikelihood batches are split over its ``data`` axis (rows rounded up to a
        multiple of it, the extra rows padding); generation stays on one device.
        """

        backend = "causal"

        def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                     add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                     max_gen_toks: int = 256, max_batch_tokens: int = 16384, progress: bool = True, seed: int = 0,
                     mesh=None):
            super().__init__()
            from flax import nnx

            from . import parallel

            self.model, self.tokenizer = model, tokenizer
            self.add_bos_token, self.custom_prefix_token_id = add_bos_token, prefix_token_id
            self._batch_size, self._max_length, self._max_gen_toks = int(batch_size), max_length, int(max_gen_toks)
            self.max_batch_tokens, self.progress, self.seed = int(max_batch_tokens), progress, seed
            if self._batch_size < 1:
                raise ZeroShotError(f"batch_size={batch_size}: must be >= 1")
            self._graphdef, state = nnx.split(model)
            self.mesh, self._state = mesh, parallel.replicate(state, mesh)
            self.stats = {"requests": 0, "tokens": 0, "padded_tokens": 0, "calls": 0, "seconds": 0.0}
            self._encoded: dict[tuple, list[int]] = {}  # tok_encode's answers, filled in batches by loglikelihood

        # ------------------------------------------------------------ harness properties (as HFLM)
        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            if self.custom_prefix_token_id is not None:
                return self.custom_prefix_token_id
            if self.tokenizer.bos_token_id is not None:
                return self.tokenizer.bos_token_id
            return self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return int(self._max_length or self.model.config.max_position_embeddings)

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        @property
        def batch_size(self) -> int:
            return self._batch_size

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

        def _special(self, string: str, add_special_tokens: bool | None) -> dict:
            """HFLM.tok_encode's rule: an explicit flag wins, then ``add_bos_token``, else the
            tokenizer's default, except that a string already starting with BOS gets none added."""
            if add_special_tokens is not None:
                return {"add_special_tokens": add_special_tokens}
            if string.startswith(self._prefix_text):
                return {"add_special_tokens": False}
            return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

        @functools.cached_property
        def _prefix_text(self) -> str:
            return self.tokenizer.decode(self.prefix_token_id)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            special = self._special(string, add_special_tokens)
            ids = self._encoded.get((string, *special.values()))
            if ids is None:
                ids = self.tokenizer.encode(string, **special)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            """The harness's own (``TemplateLM.loglikelihood``, unchanged), after every string its
            ``_encode_pair`` will encode (context + continuation and context, a trailing space moved
            to the continuation) is encoded in one batched tokenizer call per special-token rule
            (one string at a time was a large share of a full-split run's host time)."""
            groups: dict[tuple, set[str]] = {}
            for context, continuation in (req.args for req in requests):
                if context:
                    n = len(context) - len(context.rstrip())
                    ctx, cont = (context[:-n], context[-n:] + continuation) if n else (context, continuation)
                    for text in (ctx + cont, ctx):
                        groups.setdefault(tuple(self._special(text, None).values()), set()).add(text)
            for flag, texts in groups.items():
                texts = sorted(texts)
                kw = {"add_special_tokens": flag[0]} if flag else {}
                self._encoded.update(zip(((t, *flag) for t in texts), self.tokenizer(texts, **kw)["input_ids"]))
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self._encoded.clear()

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

        # ------------------------------------------------------------ loglikelihood
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """``requests``: ``(cache key or None, context ids, continuation ids)``; one
            ``(log p(continuation), continuation is greedy)`` each, in order."""
            import jax.numpy as jnp

            from .parallel import data_size, shard_batch

            score = _score_fn()
            L = self.max_length
            dp = data_size(self.mesh)
            seqs = []
            for _, ctx, cont in requests:
                if not ctx or not cont:
                    raise ZeroShotError("a loglikelihood request needs a non-empty context and continuation")
                if len(cont) > L:
                    raise ZeroShotError(f"continuation of {len(cont)} tokens is longer than max_length={L}")
                seqs.append((ctx + cont)[-(L + 1):])  # left-truncated like HFLM; the input drops the last
            order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), tuple(seqs[i])))
            res: list[tuple[float, bool] | None] = [None] * len(seqs)
            bar = tqdm(total=len(seqs), desc="loglikelihood", disable=disable_tqdm or not self.progress, leave=False)
            t0 = time.perf_counter()
            i = 0
            while i < len(order):  # longest first: a batch's first row sets its bucket
                T = _bucket(len(seqs[order[i]]) - 1, L)
                rows = max(1, min(self.batch_size, self.max_batch_tokens // T))
                rows = -(-rows // dp) * dp  # split evenly over the data axis
                batch = order[i : i + rows]
                i += len(batch)
                tokens = np.zeros((rows, T), np.int32)
                targets = np.zeros((rows, T), np.int32)
                mask = np.zeros((rows, T), bool)
                for r, j in enumerate(batch):
                    s, n_cont = seqs[j], len(requests[j][2])
                    n = len(s) - 1
                    tokens[r, :n], targets[r, :n] = s[:-1], s[1:]
                    mask[r, n - n_cont : n] = True
                    self.stats["tokens"] += n
                lp, greedy = score(self._graphdef, self._state,
                                   *(shard_batch(jnp.asarray(a), self.mesh) for a in (tokens, targets, mask)))
                lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
                if not np.all(np.isfinite(lp[: len(batch)])):
                    raise FloatingPointError("non-finite log-likelihood")
                for r, j in enumerate(batch):
                    res[j] = (float(lp[r]), bool(greedy[r]))
                    if requests[j][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[j][0], res[j])
                self.stats["calls"] += 1
                self.stats["padded_tokens"] += rows * T
                bar.update(len(batch))
            bar.close()
            self.stats["requests"] += len(seqs)
            self.stats["seconds"] += time.perf_counter() - t0
            return res  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Whole-string log-likelihood over non-overlapping windows of ``max_length`` (as HFLM)."""
            from lm_eval import utils

            windows, owner = [], []
            for k, (string,) in enumerate(req.args for req in requests):
                for w in utils.get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, 1):
                    windows.append((None, *utils.make_disjoint_window(w)))
                    owner.append(k)
            scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
            out = [0.0] * len(requests)
            for k, (lp, _) in zip(owner, scores):
                out[k] += lp
            for req, total in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return out

        # ------------------------------------------------------------ generation
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy (or sampled, per the request's ``do_sample``/``temperature``/``top_p``) generation
            with :func:`larosa_jax.generate`; output cut at the first stop string, like HFLM."""
            groups: dict[str, list[int]] = {}
            for k, req in enumerate(requests):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
            out: list[str | None] = [None] * len(requests)
            bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress, leave=False)
            for ks in groups.values():
                kw = dict(requests[ks[0]].args[1])
                until = kw.pop("until", None)
                until = [until] if isinstance(until, str) else list(until or [])
                eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
                if eos not in until:
                    until.append(eos)
                max_gen = int(next((kw.pop(a) for a in ("max_gen_toks", "max_new_tokens", "max_tokens") if a in kw), self.max_gen_toks))
                # lm-eval's rule: no do_sample → sample iff temperature > 0; do_sample False → greedy
                temperature = float(kw.pop("temperature", 0.0) or 0.0)
                do_sample = kw.pop("do_sample", None)
                do_sample = temperature > 0 if do_sample is None else bool(do_sample)
                temperature = (temperature or 1.0) if do_sample else 0.0
                top_p = float(kw.pop("top_p", 1.0) or 1.0) if do_sample else 1.0
                # our generate pads prompts to a multiple of 8: keep prompt + generation inside max_length
                room = (self.max_length - max_gen) // 8 * 8
                if room < 1:
                    raise ZeroShotError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_length={self.max_length}")
                prompts = {k: self.tok_encode(requests[k].args[0], left_truncate_len=room) for k in ks}
                order = sorted(ks, key=lambda k: (-len(prompts[k]), requests[k].args[0]))
                for i in range(0, len(order), self.batch_size):
                    batch = order[i : i + self.batch_size]
                    ids = self._generate([prompts[k] for k in batch], max_gen, temperature, top_p, until)
                    for k, row in zip(batch, ids):
                        text = self.tok_decode(row)
                        for term in until:
                            if term:
                                text = text.split(term)[0]
                        out[k] = text
                        self.cache_hook.add_partial("generate_until", requests[k].args, text)
                    bar.update(len(batch))
            bar.close()
            return out  # type: ignore[return-value]

        def _generate(self, prompts, max_new, temperature, top_p, until) -> list[list[int]]:
            from .generate import generate

            eos = set(self.model.config.eos_token_ids) | {self.eot_token_id}
            stops = [s for s in until if s]

            def cut(row) -> tuple[list[int], bool]:
                ids = []
                for t in row:
                    if int(t) in eos:
                        return ids, True
                    ids.append(int(t))
                return ids, False

            def stopper(ids) -> None:  # every chunk of tokens: end the loop once each row has a stop
                rows = [cut(r) for r in ids]
                if all(done or any(s in self.tok_decode(r) for s in stops) for r, done in rows):
                    raise _StopGeneration([r for r, _ in rows])

            try:
                ids = generate(self.model, prompts, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                               seed=self.seed, eos_token_ids=sorted(eos), on_tokens=stopper, chunk=16)
                return [cut(r)[0] for r in ids]
            except _StopGeneration as s:
                return s.ids

    return LarosaLM


@functools.cache
def _lm_class():
    _lm_eval()
    return _make_lm_class()


def __getattr__(name: str):
    if name == "LarosaLM":
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- running the harness
def run_zeroshot(model, tok, tasks: Sequence[str], limit: int | float | None = None, include_path: str | Path | None = None,
                 batch_size: int = 16, *, num_fewshot: int | None = None, include_defaults: bool = False,
                 lm=None, **lm_kwargs) -> dict:
    """``lm_eval.simple_evaluate`` of ``model`` on harness task names (e.g. ``arc_easy_local``) found
    under ``include_path``; returns the harness's results dict (``log_samples`` off).

    ``lm`` reuses an existing :class:`LarosaLM` (its model and tokenizer are then ignored).
    """
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        avail = ", ".join(tm.all_subtasks) if not include_defaults else "see `lm_eval ls tasks`"
        raise ZeroShotError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; available: {avail}")
    if lm is None:
        lm = _lm_class()(model, tok, batch_size=batch_size, **lm_kwargs)
    with _compiled_templates():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                       task_manager=tm, log_samples=False)


@contextlib.contextmanager
def _compiled_templates():
    """lm-eval (0.4.13) compiles a task's Jinja template anew for every document it renders (a large share
    of a full-split run's host time); the same template text renders through one compiled template here (the
    harness's own environment, so the same text comes out). Restored on exit."""
    from lm_eval import utils

    original, cache = utils.apply_template, {}

    def apply_template(template: str, doc: dict) -> str:
        if template not in cache:
            cache[template] = utils.env.from_string(template)
        return cache[template].render(**doc)

    utils.apply_template = apply_template
    try:
        yield
    finally:
        utils.apply_template = original


# ----------------------------------------------------------------------------- results files
def _run_label(method: str, mode: str, alpha, select: str = "topk", flavour: str | None = None) -> str:
    """A row's name; the fused model's names its rotations flavour (rows of several calibrations share a table)."""
    a = alpha if alpha is None or isinstance(alpha, str) else f"α {alpha[0]:g},{alpha[1]:g}"
    if method == "larosa":
        q = f", {flavour} Q" if mode == "fused" and flavour else ""
        return f"larosa {mode}{' thresholds' if select == 'threshold' else ''} ({a}{q})"
    if method == "topk":
        return f"topk ({a})"
    return method


def _metric(res: dict, task: str, name: str) -> float | None:
    v = res.get(task, {}).get(f"{name},none")
    return None if v is None or isinstance(v, str) else float(v)


def markdown(result: dict) -> str:
    m = result["meta"]
    tasks = m["tasks"]
    env = m["env"]
    devices = sorted({(r.get("env") or env)["device"] for r in result["rows"]})
    where = (f"Device {env['device']}, jax {env['jax']}, {env['date']}" if devices in ([], [env["device"]])
             else f"Devices {', '.join(devices)} (each row's in the last table)")
    lim = "all examples" if m.get("limit") is None else f"limit {m['limit']} examples per task"
    lines = [
        f"# Zero-shot accuracy: {m['model']}",
        "",
        f"lm-eval {m['lm_eval']} ({lim}; {m.get('num_fewshot') or 0}-shot), tasks from {m['data_dir']}; "
        f"calibration: {m.get('calibration') or '-'}. {where}. "
        "Accuracy in % ± the harness's standard error (the mean's: the tasks' combined as independent).",
        "",
    ]
    short = [t[: -len(SUFFIX)] if t.endswith(SUFFIX) else t for t in tasks]
    for metric in ("acc", "acc_norm"):
        have = [t for t in tasks if any(_metric(r["results"], t, metric) is not None for r in result["rows"])]
        if not have:
            continue
        lines += [f"**{metric}**", "", "| method | nominal p | effective | " + " | ".join(short[tasks.index(t)] for t in have) + " | mean |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in have) + " | ---: |"]
        for r in result["rows"]:
            vals = [_metric(r["results"], t, metric) for t in have]
            ses = [_metric(r["results"], t, f"{metric}_stderr") for t in have]
            mean = "-"
            if all(v is not None for v in vals):
                mean = f"{100 * sum(vals) / len(vals):.2f}"
                if all(e is not None for e in ses):  # the tasks are independent samples
                    mean += f" ± {100 * math.sqrt(sum(e * e for e in ses)) / len(ses):.2f}"
            cells = " | ".join("-" if v is None else f"{100 * v:.2f}" + ("" if e is None else f" ± {100 * e:.2f}")
                               for v, e in zip(vals, ses))
            lines.append(f"| {r['label']} | {r['sparsity']:.2f} | {r['effective']:.3f} | {cells} | {mean} |")
        lines.append("")
    lines += ["| method | nominal p | requests | seconds | s / 100 requests | device, jax, date |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        n, e = r["stats"]["requests"], r.get("env") or env
        per = f"{100 * r['seconds'] / n:.1f}" if n else "-"
        lines.append(f"| {r['label']} | {r['sparsity']:.2f} | {n} | {r['seconds']:.0f} | {per} | "
                     f"{e['device']}, {e['jax']}, {e['date']} |")
    return "\n".join(lines) + "\n"


def _parse_alpha(s: str):
    if s in ("official", "uniform", "searched"):
        return s
    try:
        a = tuple(float(x) for x in s.split(","))
    except ValueError:
        a = ()
    if len(a) != 2:
        raise ZeroShotError(f"--alpha {s!r}: expected official, uniform, searched or 'α_rot,α_plain'")
    return a


def add_parser(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot accuracy (lm-evaluation-harness) on the 7 offline tasks; json + md")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--rotations", default=None, help="directory from larosa calibrate (larosa, teal, cats need it)")
    p.add_argument("--method", default="dense", help="dense, larosa, teal, cats or topk (a comma list runs each)")
    p.add_argument("--mode", default="faithful", choices=["faithful", "fused"], help="larosa mode")
    p.add_argument("--sparsity", default="0.5", help="one or more, e.g. 0.25,0.4,0.5 (ignored by dense)")
    p.add_argument("--alpha", default="official", help="official, uniform, searched, or 'α_rot,α_plain' (larosa, topk)")
    p.add_argument("--select", default="topk", choices=["topk", "threshold"],
                   help="how larosa --mode fused keeps entries: per-token Top-K, or the thresholds calibrated on the "
                        "rotated rows (TEAL's decode; with a 'global' calibration, no adapters)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--data-dir", default=None, help=f"the offline splits (default ${DATA_ENV} or ../shared/data/zeroshot)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task (quick runs)")
    p.add_argument("--batch", type=int, default=16,
                   help="sequences per device call (scoring holds at most 16384 tokens a call; on a GPU --batch 1024 "
                        "makes every scoring call that size, so its length buckets share XLA's matmul tuning)")
    p.add_argument("--max-length", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--mesh", default=None, metavar="data=D",
                   help="device mesh; default: every local device on data (batches split over the devices)")
    p.add_argument("--add-bos-token", default=None, choices=["true", "false"],
                   help="force BOS on or off (default: the tokenizer's own behaviour, as lm-eval's HF model)")
    p.add_argument("--out", required=True, help="results path without extension, e.g. eval/results/smollm2_zeroshot")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="skip runs already in --out")
    p.set_defaults(func=cmd_zeroshot)


def cmd_zeroshot(args) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the splits are local; never reach for the hub
    from .sparsity import METHODS, MODES, SparseConfig, SparsityError

    methods = [m for m in args.method.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SparsityError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    if args.mode not in MODES:
        raise SparsityError(f"unknown mode {args.mode!r}; valid: {', '.join(MODES)}")
    try:
        ps = [float(x) for x in args.sparsity.split(",") if x]
    except ValueError:
        raise ZeroShotError(f"--sparsity {args.sparsity!r}: expected numbers, e.g. 0.25,0.4") from None
    alpha = _parse_alpha(args.alpha)
    tasks = [task_name(t) for t in args.tasks.split(",") if t]
    if not tasks:
        raise ZeroShotError(f"--tasks is empty; available: {', '.join(TASKS)}")
    grid = []
    for m in methods:
        grid += [(m, 0.0)] if m == "dense" else [(m, p) for p in ps]
    if alpha == "searched" and "topk" in methods:
        raise ZeroShotError("--alpha searched applies to larosa only (topk: official, uniform or a,b)")
    if args.select == "threshold" and ("larosa" not in methods or args.mode != "fused"):
        raise ZeroShotError(f"--select threshold applies to --method larosa with --mode fused, not --method "
                            f"{args.method} --mode {args.mode}")
    from . import cli
    from .calibration import CalibrationStats, rotations_fingerprint
    from .evaluate import check_resumed_row, check_results, resume_rows

    cfg = cli.checkpoint_config(args.ckpt)
    if args.max_length is not None and args.max_length > cfg.max_position_embeddings:
        raise ZeroShotError(f"--max-length {args.max_length}: must be in [2, {cfg.max_position_embeddings}] "
                            "(the model's max_position_embeddings)")
    needs_rot = any(m in ("larosa", "teal", "cats") for m, _ in grid)
    if needs_rot and args.rotations is None:
        raise ZeroShotError("methods larosa, teal and cats need --rotations (from larosa calibrate)")
    stats = CalibrationStats.load(args.rotations) if needs_rot else None  # validated before any work
    rot_id = rotations_fingerprint(args.rotations) if needs_rot else None
    from .search import stored_alpha
    from .sparsity import effective_sparsity_of

    cells = []
    for m, p in grid:  # every cell checked before the first run
        a = stored_alpha(args.rotations, p, args.mode, rot_id) if alpha == "searched" and m == "larosa" else alpha
        a = "official" if a == "searched" else a
        sel = args.select if m == "larosa" else "topk"
        sc = SparseConfig("dense") if m == "dense" else SparseConfig(m, args.mode, p, a, select=sel)
        effective_sparsity_of(cfg, sc)
        cells.append((m, p, sc))
    files = check_results(args.out, overwrite=args.overwrite, resume=args.resume, exts=(".json", ".md"))
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    include = local_tasks(data_dir, tasks=[t[: -len(SUFFIX)] for t in tasks])

    from lm_eval.utils import make_table

    from .calibration import fingerprint
    from .checkpoint import load, load_tokenizer
    from .evaluate import _atomic_write, environment
    from .parallel import make_mesh
    from .sparse_model import sparsify

    mesh = make_mesh(args.mesh, cfg=cfg)
    model, tok = load(args.ckpt), load_tokenizer(args.ckpt)
    if stats is not None:
        stats.check_model(model, where=args.rotations)
    lm_eval = _lm_eval()
    add_bos = None if args.add_bos_token is None else args.add_bos_token == "true"
    max_length = args.max_length or model.config.max_position_embeddings
    settings = {"model_fingerprint": fingerprint(model), "tasks": tasks, "limit": args.limit, "num_fewshot": 0,
                "data_dir": str(data_dir.resolve()), "max_length": max_length, "add_bos_token": add_bos}
    rows: list[dict] = resume_rows(files[0], settings) if args.resume and files[0].exists() else []
    if rows:  # rows from before per-row environments were recorded ran where the file's meta says
        old_env = json.loads(files[0].read_text()).get("meta", {}).get("env")
        for r in rows:
            r.setdefault("env", old_env)
    done = {(r["label"], r["sparsity"]): r for r in rows}
    labelled = []
    for m, p, sc in cells:
        label = _run_label(m, args.mode, alpha if m in ("larosa", "topk") else None, sc.select,
                           stats.flavour if stats is not None else None)
        if (label, p) in done:
            check_resumed_row(files[0], done[(label, p)], rot_id if m in ("larosa", "teal", "cats") else None,
                              list(sc.alphas()) if m in ("larosa", "topk") else None)
        labelled.append((m, p, sc, label))
    meta = {
        "model": str(args.ckpt), "tasks": tasks, "limit": args.limit, "num_fewshot": 0, "data_dir": str(data_dir),
        "batch": args.batch, "max_length": max_length, "add_bos_token": add_bos, "settings": settings,
        "lm_eval": lm_eval.__version__, "env": environment(),
        "calibration": None if stats is None else f"{stats.metadata.get('data_source')} "
        f"({stats.metadata.get('samples')} x {stats.metadata.get('seqlen')}, flavour {stats.flavour})",
    }
    result = {"meta": meta, "rows": rows}
    with outputs.results_files(files, resume=args.resume) as targets:  # --overwrite: the old files stay until the end
        for m, p, sc, label in labelled:
            if (label, p) in done:
                continue
            sm = sparsify(model, stats, sc)
            lm = _lm_class()(sm, tok, batch_size=args.batch, max_length=args.max_length, add_bos_token=add_bos, mesh=mesh)
            t0 = time.perf_counter()
            res = run_zeroshot(sm, tok, tasks, args.limit, include, lm=lm)
            secs = time.perf_counter() - t0
            rows.append({
                "label": label, "method": m, "mode": args.mode if m == "larosa" else None, "select": sc.select,
                "alpha": (alpha if isinstance(alpha, str) else list(alpha)) if m in ("larosa", "topk") else None,
                "alpha_values": list(sc.alphas()) if m in ("larosa", "topk") else None,
                "sparsity": p, "effective": sm.effective_sparsity, "seconds": secs, "stats": lm.stats,
                "results": res["results"], "n_samples": res.get("n-samples"), "versions": res.get("versions"),
                "rotations_flavour": None if stats is None or m in ("dense", "topk") else stats.flavour,
                "rotations": rot_id if m in ("larosa", "teal", "cats") else None, "env": environment(),
            })
            _atomic_write(targets[0], json.dumps(result, indent=2, default=str))
            _atomic_write(targets[1], markdown(result))
            # saved first: the harness's table is display only (it once failed on a GPU image missing pytz)
            print(f"\n{label}, p = {p:g} (effective {sm.effective_sparsity:.3f}): {secs:.0f} s, "
                  f"{lm.stats['requests']} requests")
            print(make_table(res))
    print(markdown(result))
    print(f"wrote {files[0]} and {files[1]}")
