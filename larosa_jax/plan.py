"""The decode plan: which kernel runs at each step of a decoder layer, chosen once and checked once.

A :class:`DecodePlan` is a frozen dataclass the model holds as static state (part of its graph
definition, so a new plan compiles a new program). It is built when a model is made, loaded or
sparsified, validated against the sparsity method then, and read by the decoder layer, which hands
each op the choices for its site. Where a kernel cannot take a shape or dtype the op runs its jnp
twin (with one warning naming the shape): the plan says which kernels may run, the op whether they
can.

On a GPU the default plan runs every kernel; elsewhere every op is its jnp twin. A plan with kernels
on a CPU runs them in Pallas interpret mode (the tests).

Text form (``DecodePlan.edit``, ``bench_decode --variants``): comma-separated ``key=value`` edits,
e.g. ``adapter=tail``, ``window=off``, ``o.gemv=masked``, ``*.gemv=masked``, ``down.tile=64x128x2``,
or ``kernels=off`` for the jnp twins everywhere.
"""

from __future__ import annotations

import dataclasses

import jax

SITES = ("qkv", "o", "gate_up", "down")
# what a decode needs, by sparse model: no selection (dense, CATS), per-token Top-K (topk, La RoSA's faithful
# simulation), calibrated thresholds (TEAL), and La RoSA's fused model (adapters) with either selection
KINDS = ("dense", "topk", "teal", "larosa", "larosa-threshold")
THRESHOLD_KINDS = ("teal", "larosa-threshold")
ADAPTER_KINDS = ("larosa", "larosa-threshold")
NORM_SITES = ("qkv", "gate_up")  # sites whose input is RMSNorm(h): a norm prologue can make the row
GEMVS = ("gather", "masked", "xla")
ADAPTERS = ("side", "tail", "xla")
WARPS = (1, 2, 4, 8, 16)


class PlanError(ValueError):
    """A decode plan that names an unknown option or an impossible combination."""


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """How one projection site finds its keep set and reads its weights.

    ``select``: the selection kernel makes the keep set (the exact Top-K search; with a norm prologue
    also for a given threshold), else its jnp twin. ``gemv``: ``gather`` (the selection compacts the
    kept indices and the GEMV reads dense tiles of kept rows), ``masked`` (masked tiles read the
    threshold pair in place; no compaction; for a dense decode the threshold path's launches with every
    entry kept) or ``xla`` (XLA's dot on the masked input; for a dense decode the dense GEMV of ``gemv``). ``prologue``:
    the residual add and RMSNorm run inside the selection kernel (q/k/v and gate/up sites).
    ``tile``: (rows, columns, warps) of the sparse GEMV's tile; None for the kernel's own choice.
    """

    select: bool = True
    gemv: str = "gather"
    prologue: bool = False
    tile: tuple[int, int, int] | None = None


_JNP_SITE = SitePlan(select=False, gemv="xla")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Kernel choices of a decode, per model and per site.

    ``gemv``: the dense batch-1 GEMV kernel (q/k/v, gate/up each one launch). ``attention``: the
    decode-step kernel (RoPE, KV-cache write and attention of a decode token in one launch).
    ``window``: the Top-K search starts in a window guessed from the row's mean |x| (same result,
    fewer counting steps). ``adapter``: where La RoSA's residual adapter product r·A is made —
    ``side`` (tiles on the spare programs of the down selection launch, zero-filled by the gate/up
    selection; the down GEMV adds onto that sum; where they cannot run, as ``tail``), ``tail`` (extra
    tiles of the down GEMV's launch), ``xla`` (XLA's dot). ``sites``: a :class:`SitePlan` for each of
    q/k/v, o, gate/up and down.
    """

    gemv: bool = True
    attention: bool = True
    window: bool = True
    adapter: str = "side"
    sites: tuple[SitePlan, ...] = (SitePlan(prologue=True), SitePlan(), SitePlan(prologue=True), SitePlan())

    # ------------------------------------------------------------------ construction
    @classmethod
    def kernels(cls, kind: str = "larosa") -> "DecodePlan":
        """Every kernel that serves a decode of ``kind`` (:data:`KINDS`): exact Top-K selects and gathers at
        every site; thresholds need no search (a search-free norm launch before q/k/v and gate/up, masked
        tiles reading the threshold in place at every site, La RoSA's adapter as tail tiles of the down
        GEMV); ``dense`` takes the threshold path's launches with every entry kept (at batch 1 they read
        the weights faster than the dense GEMV: ``eval/results/dense_decode_h100.md``)."""
        _check_kind(kind)
        if kind == "larosa":
            return cls()
        if kind == "topk":  # no adapters
            return cls(adapter="xla")
        norm = SitePlan(select=True, gemv="masked", prologue=True)
        plain = SitePlan(select=False, gemv="masked")
        return cls(adapter="tail" if kind in ADAPTER_KINDS else "xla", sites=(norm, plain, norm, plain))

    @classmethod
    def reference(cls) -> "DecodePlan":
        """No kernel: every op is its jnp twin."""
        return cls(gemv=False, attention=False, window=False, adapter="xla", sites=(_JNP_SITE,) * len(SITES))

    @classmethod
    def default(cls, kind: str = "dense") -> "DecodePlan":
        """:meth:`kernels` on a GPU, :meth:`reference` elsewhere."""
        _check_kind(kind)
        return cls.kernels(kind) if jax.default_backend() == "gpu" else cls.reference()

    def site(self, name: str) -> SitePlan:
        return self.sites[SITES.index(name)]

    def for_tensor_parallel(self) -> "DecodePlan":
        """The same plan under tensor parallelism: the adapters hold column blocks whose products are
        all-gathered, so r·A is XLA's dot (no side or tail tiles)."""
        return dataclasses.replace(self, adapter="xla")

    # ------------------------------------------------------------------ validation
    def check(self, kind: str = "larosa") -> "DecodePlan":
        """``self`` if every option is known and the combination can run a decode of ``kind``; else
        PlanError. The adapter route is checked where the model has adapters (La RoSA's fused model)."""
        _check_kind(kind)
        if len(self.sites) != len(SITES) or not all(isinstance(s, SitePlan) for s in self.sites):
            raise PlanError(f"a decode plan needs one SitePlan per site ({', '.join(SITES)}); got {self.sites!r}")
        if self.adapter not in ADAPTERS:
            raise PlanError(f"adapter={self.adapter!r}; valid: {', '.join(ADAPTERS)}")
        for name, sp in zip(SITES, self.sites):
            if sp.gemv not in GEMVS:
                raise PlanError(f"{name}.gemv={sp.gemv!r}; valid: {', '.join(GEMVS)}")
            if sp.gemv == "gather" and not sp.select:
                raise PlanError(f"{name}.gemv=gather needs {name}.select=on (the selection kernel compacts the kept "
                                "indices the gather GEMV reads); valid gemv without it: masked, xla")
            if sp.prologue and name not in NORM_SITES:
                raise PlanError(f"{name}.prologue=on: only the {' and '.join(NORM_SITES)} sites have a norm prologue")
            if sp.prologue and not sp.select:
                raise PlanError(f"{name}.prologue=on needs {name}.select=on (the prologue runs in the selection kernel)")
            if sp.tile is not None:
                _check_tile(name, sp.tile)
        if kind in ADAPTER_KINDS and self.adapter == "side":
            need = [f"{s}.select=on" for s in ("gate_up", "down") if not self.site(s).select]
            need += ["down.gemv=gather or masked"] if self.site("down").gemv == "xla" else []
            if need:
                raise PlanError(f"adapter=side needs {', '.join(need)} (the gate/up selection zero-fills the sum, the "
                                "down selection adds r·A onto it, its GEMV adds on); valid adapters here: tail, xla")
        if kind in ADAPTER_KINDS and self.adapter == "tail" and self.site("down").gemv == "xla":
            raise PlanError("adapter=tail needs down.gemv=gather or masked (r·A rides in the down GEMV's launch); "
                            "valid adapter here: xla")
        if kind in THRESHOLD_KINDS or kind == "dense":  # dense: masked tiles read every entry (the threshold path)
            for name, sp in zip(SITES, self.sites):
                if sp.gemv == "gather":
                    raise PlanError(f"{kind}: {name}.gemv=gather needs compacted Top-K indices; {kind} takes masked "
                                    "or xla")
                if sp.select and name not in NORM_SITES:
                    raise PlanError(f"{kind}: {name}.select=on has nothing to select (the GEMV reads the threshold in "
                                    "place); set it off")
                if kind == "dense" and sp.select and sp.gemv != "masked":
                    raise PlanError(f"dense: {name}.select=on runs only on the threshold path: it needs "
                                    f"{name}.gemv=masked (else the dense GEMV reads the row; set select off)")
        return self

    # ------------------------------------------------------------------ text form
    def edit(self, text: str) -> "DecodePlan":
        """This plan with the comma-separated ``key=value`` edits of ``text`` applied (see the module
        docstring); an unknown key or value is a PlanError listing the valid ones. Not checked:
        call :meth:`check` for the method at hand."""
        plan = self
        for item in (t.strip() for t in (text or "").split(",")):
            if not item:
                continue
            key, eq, val = item.partition("=")
            key, val = key.strip(), val.strip()
            if not eq:
                raise PlanError(f"plan edit {item!r}: expected key=value, e.g. adapter=tail or o.gemv=masked")
            if key == "kernels":
                if _flag(key, val):
                    raise PlanError("plan edit kernels=on: name the kernels to turn on instead (e.g. gemv=on)")
                plan = DecodePlan.reference()
            elif key in ("gemv", "attention", "window"):
                plan = dataclasses.replace(plan, **{key: _flag(key, val)})
            elif key == "adapter":
                plan = dataclasses.replace(plan, adapter=val)
            elif "." in key:
                site, _, field = key.partition(".")
                if site != "*" and site not in SITES:
                    raise PlanError(f"plan edit {item!r}: unknown site {site!r}; valid: {', '.join(SITES)} or *")
                if field not in ("select", "gemv", "prologue", "tile"):
                    raise PlanError(f"plan edit {item!r}: unknown site option {field!r}; valid: select, gemv, prologue, tile")
                value = {"select": _flag, "prologue": _flag, "gemv": lambda k, v: v, "tile": _tile}[field](key, val)
                names = SITES if site == "*" else (site,)
                plan = dataclasses.replace(plan, sites=tuple(
                    dataclasses.replace(sp, **{field: value}) if n in names else sp for n, sp in zip(SITES, plan.sites)))
            else:
                raise PlanError(f"plan edit {item!r}: unknown key {key!r}; valid: kernels, gemv, attention, window, adapter, "
                                "SITE.select, SITE.gemv, SITE.prologue, SITE.tile (SITE: " + ", ".join(SITES) + " or *)")
        return plan

    def describe(self) -> str:
        """The plan in the text form :meth:`edit` reads (every option spelled out)."""
        on = lambda b: "on" if b else "off"  # noqa: E731
        parts = [f"gemv={on(self.gemv)}", f"attention={on(self.attention)}", f"window={on(self.window)}",
                 f"adapter={self.adapter}"]
        for n, sp in zip(SITES, self.sites):
            parts += [f"{n}.select={on(sp.select)}", f"{n}.gemv={sp.gemv}", f"{n}.prologue={on(sp.prologue)}"]
            if sp.tile is not None:
                parts.append(f"{n}.tile={'x'.join(map(str, sp.tile))}")
        return ",".join(parts)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PlanError(f"decode kind {kind!r}; valid: {', '.join(KINDS)}")


def _flag(key: str, val: str) -> bool:
    if val in ("on", "1", "true"):
        return True
    if val in ("off", "0", "false"):
        return False
    raise PlanError(f"plan edit {key}={val!r}: expected on or off")


def _tile(key: str, val: str) -> tuple[int, int, int] | None:
    if val in ("default", "none"):
        return None
    try:
        tile = tuple(int(v) for v in val.split("x"))
    except ValueError:
        tile = ()
    if len(tile) != 3:
        raise PlanError(f"plan edit {key}={val!r}: expected ROWSxCOLSxWARPS (e.g. 64x128x2) or default")
    _check_tile(key, tile)
    return tile


def _check_tile(name: str, tile) -> None:
    rows, cols, warps = tile
    pow2 = lambda v: isinstance(v, int) and v >= 16 and not v & (v - 1)  # noqa: E731
    if not (pow2(rows) and pow2(cols) and warps in WARPS):
        raise PlanError(f"{name} tile {tuple(tile)}: rows and columns must be powers of two >= 16 and warps one of "
                        f"{', '.join(map(str, WARPS))}")
