"""GPU kernel time by kernel, from a jax.profiler trace: what the device itself spent, free of the
host dispatch and harness costs that wall-clock timing of microsecond kernels cannot separate.

    summary = kernel_profile(lambda: jax.block_until_ready(f(*args)), steps=n)

``steps`` divides every total (decode steps, or calls chained in one jit). The summary holds the
GPU span and busy time per step, the kernel count per step and the top kernels by time.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time

import jax


def _profile_data(path):
    try:
        from jax.profiler import ProfileData
    except ImportError:
        from jaxlib.xla_client.profiler import ProfileData  # type: ignore
    return ProfileData.from_file(path)


def scope_of(op_name: str, scopes) -> str | None:
    """The first of ``scopes`` that is a component of an op's name path (``jax.named_scope``: the model names
    each site's ops ``…/qkv/…``, ``…/o/…``, ``…/gate_up/…``, ``…/down/…``, ``…/attention/…``)."""
    parts = op_name.split("/")
    return next((sc for sc in scopes if sc in parts), None)


def kernel_profile(run, steps: int, *, top: int = 40, scopes=()) -> dict:
    """Trace one call of ``run()`` (which must block until the device is done) and sum GPU kernel
    durations per kernel name, per step. Returns ``{"wall_seconds", ...}``; ``top`` is absent when
    the trace has no GPU stream events (CPU, or a profiler that wrote nothing). With ``scopes``, also
    ``scopes``: per named scope found in a kernel's op name (:func:`scope_of`), its kernels per step and
    µs per step (``None``: the kernels of no scope)."""
    d = tempfile.mkdtemp(prefix="trace_")
    try:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        summary: dict = {"wall_seconds": wall}
        if not files:
            summary["error"] = "no xplane.pb written"
            return summary
        try:
            pd = _profile_data(files[0])
        except Exception as e:  # noqa: BLE001  (a missing parser must not lose the run)
            summary["error"] = f"could not parse ({type(e).__name__}: {e})"
            return summary
        kernels: dict[str, list] = {}
        by_scope: dict[str | None, list] = {}
        intervals = []
        for plane in pd.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                for ev in line.events:
                    s, dur = ev.start_ns, ev.duration_ns
                    intervals.append((s, s + dur))
                    op, path = None, ""
                    try:
                        for k, v in ev.stats:
                            if k in ("hlo_op", "tf_op", "name") and op is None:
                                op = str(v)
                            if scopes and not path and scope_of(str(v), scopes):  # the op's name path
                                path = str(v)
                    except Exception:  # noqa: BLE001
                        pass
                    e = kernels.setdefault(ev.name if op is None else f"{ev.name} [{op}]", [0, 0.0])
                    e[0] += 1
                    e[1] += dur
                    if scopes:
                        e = by_scope.setdefault(scope_of(path, scopes), [0, 0.0])
                        e[0] += 1
                        e[1] += dur
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if not intervals:
        summary["error"] = "no GPU stream events"
        return summary
    intervals.sort()
    busy, (cur_s, cur_e) = 0.0, intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    summary.update(
        steps=steps, span_ms_per_step=(intervals[-1][1] - intervals[0][0]) / steps / 1e6,
        busy_ms_per_step=busy / steps / 1e6,
        kernel_sum_ms_per_step=sum(v[1] for v in kernels.values()) / steps / 1e6,
        kernels_per_step=sum(v[0] for v in kernels.values()) / steps,
        top=[{"kernel": k, "count_per_step": v[0] / steps, "us_per_step": v[1] / steps / 1e3,
              "us_per_call": v[1] / v[0] / 1e3} for k, v in ranked[:top]],
    )
    if scopes:
        summary["scopes"] = {str(k): {"kernels_per_step": v[0] / steps, "us_per_step": v[1] / steps / 1e3}
                             for k, v in by_scope.items()}
    return summary


def print_profile(name: str, summary: dict, rows: int = 30) -> None:
    if "top" not in summary:
        print(f"profile {name}: {summary.get('error', 'no kernels')}")
        return
    steps = summary["steps"]
    print(f"profile {name}: wall {summary['wall_seconds'] / steps * 1e3:.3f} ms/step, GPU span "
          f"{summary['span_ms_per_step']:.3f}, busy {summary['busy_ms_per_step']:.3f}, kernel sum "
          f"{summary['kernel_sum_ms_per_step']:.3f} ms/step, {summary['kernels_per_step']:.0f} kernels/step")
    print(f"{'us/step':>9} {'calls/step':>10} {'us/call':>8}  kernel")
    for r in summary["top"][:rows]:
        print(f"{r['us_per_step']:9.1f} {r['count_per_step']:10.1f} {r['us_per_call']:8.2f}  {r['kernel'][:150]}")
