"""The decode plan's validation and text form: every impossible combination and unknown option is refused
with a message naming it and the valid choices; every plan the library builds passes its own check."""

from __future__ import annotations

import pytest

from larosa_jax.plan import KINDS, SITES, DecodePlan, PlanError, SitePlan

DENSE_MASKED = "qkv.select=on,qkv.prologue=on,gate_up.select=on,gate_up.prologue=on,*.gemv=masked"

REFUSED = [  # (decode kind, edits on DecodePlan.kernels(kind), message)
    ("larosa", "adapter=gpu", "adapter='gpu'; valid: side, tail, xla"),
    ("larosa", "o.gemv=dense", "o.gemv='dense'; valid: gather, masked, xla"),
    ("topk", "o.select=off", "o.gemv=gather needs o.select=on"),
    ("larosa", "o.prologue=on", "o.prologue=on: only the qkv and gate_up sites have a norm prologue"),
    ("topk", "qkv.select=off,qkv.gemv=masked", "qkv.prologue=on needs qkv.select=on"),
    ("larosa", "down.select=off,down.gemv=masked", "adapter=side needs down.select=on"),
    ("larosa", "down.gemv=xla", "adapter=side needs down.gemv=gather or masked"),
    ("larosa-threshold", "down.gemv=xla", "adapter=tail needs down.gemv=gather or masked"),
    ("teal", "qkv.gemv=gather", "teal: qkv.gemv=gather needs compacted Top-K indices"),
    ("larosa-threshold", "down.select=on", "larosa-threshold: down.select=on has nothing to select"),
    ("dense", "*.select=on,*.gemv=gather", "dense: qkv.gemv=gather needs compacted Top-K indices; dense takes masked or xla"),
    ("dense", "qkv.gemv=xla", "dense: qkv.select=on runs only on the threshold path: it needs qkv.gemv=masked"),
    ("dense", "o.select=on,o.gemv=masked", "dense: o.select=on has nothing to select"),
]


@pytest.mark.parametrize("kind,edits,message", REFUSED)
def test_impossible_combinations_are_refused(kind, edits, message):
    plan = DecodePlan.kernels(kind).edit(edits)
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan.check(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_built_plans_pass_and_read_back(kind):
    """The kernels, reference and default plans of every kind check, and the text form reads back the same plan."""
    for plan in (DecodePlan.kernels(kind), DecodePlan.reference(), DecodePlan.default(kind)):
        assert plan.check(kind) is plan
        assert DecodePlan.reference().edit(plan.describe()) == plan
    if kind in ("dense", "teal"):  # masked tiles with the norm in the selection kernel: the threshold path
        assert DecodePlan.kernels(kind).edit(DENSE_MASKED).check(kind).site("gate_up") == SitePlan(True, "masked", True)


@pytest.mark.parametrize("edits,message", [
    ("gemv", "plan edit 'gemv': expected key=value"),
    ("gemv=maybe", "plan edit gemv='maybe': expected on or off"),
    ("kernels=on", "kernels=on: name the kernels to turn on instead"),
    ("tiles=on", "unknown key 'tiles'; valid: kernels, gemv, attention, window, adapter, SITE.select"),
    ("mlp.gemv=masked", "unknown site 'mlp'; valid: qkv, o, gate_up, down or \\*"),
    ("o.rows=64", "unknown site option 'rows'; valid: select, gemv, prologue, tile"),
    ("o.tile=64x128", "expected ROWSxCOLSxWARPS"),
    ("o.tile=48x128x2", "rows and columns must be powers of two >= 16 and warps one of 1, 2, 4, 8, 16"),
])
def test_unknown_options_are_refused(edits, message):
    with pytest.raises(PlanError, match=message):
        DecodePlan.kernels("larosa").edit(edits)


def test_unknown_kind_and_malformed_sites():
    with pytest.raises(PlanError, match="decode kind 'sparse'; valid: " + ", ".join(KINDS)):
        DecodePlan.kernels("sparse")
    with pytest.raises(PlanError, match="one SitePlan per site"):
        DecodePlan(sites=(SitePlan(),) * (len(SITES) - 1)).check("topk")
