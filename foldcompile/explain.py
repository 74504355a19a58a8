"""``explain``: what the compiler sees in a model — op classes, FLOPs, bytes, by class and by module.

``explain(model, *example_inputs, dims=None, **example_kwargs)`` captures the model
(:func:`foldcompile.capture.trace`) and runs normalize -> shape_prop -> classify through the
:class:`~foldcompile.pass_manager.PassManager`. The :class:`Report` it returns holds the
classified graph and the symbolic costs, so one capture at small sizes gives the cost at any
size where the graph's structure does not depend on the size::

    >>> from foldcompile.models import zoo
    >>> block, ex = zoo.get("evoformer_block")              # tiny: N_seq=5, N_res=11
    >>> report = explain(block, *ex)
    >>> print(report)                                       # class and module tables
    EvoformerBlock: 1 graph(s), 0 leaves, tracer dynamo; dims N_seq=5, N_res=11
    <BLANKLINE>
    op class     nodes      GFLOP       MB  FLOP/B
    -----------  -----  ---------  -------  ------
    GEMM            53  0.0008881   0.4551   1.952
    ...
    >>> report.to_dict()["classes"]["GEMM"]["count"]
    53
    >>> report.cost(N_seq=128, N_res=256)["classes"]["GEMM"]["flops"]  # same graph, other sizes
    2682257408
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:          # the HTML report (foldcompile.report_html)
    ...     os.path.basename(report.to_html(os.path.join(tmp, "evoformer.html")))
    'evoformer.html'

Sizes at which the structure is specialised are *guarded* (``report.guarded_dims``, with the
reason) and ``report.cost`` refuses other values for them. A dim is guarded when the capture
recorded it (``gm.meta["guarded_dims"]``), when the graph holds a size fixed to a dim's
example value (an unrolled chunk loop concatenating its pieces back to ``N_res``), when a
literal ``narrow`` cuts the tail of a dim-sized axis (the last chunk), or when the model was
called with a chunk size (an argument or module attribute named ``*chunk*`` holding an int):
chunk loops unroll differently at other sizes. Python branches on sizes that leave no trace in
the graph (``if x.shape[-2] <= 16``) can only be caught by the capture; see DESIGN.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping, Sequence

import sympy
import torch
import torch.fx

from foldcompile.capture import flat_inputs, trace
from foldcompile.guards import global_module_hooks
from foldcompile.pass_manager import PassManager
from foldcompile.passes.base import PassError
from foldcompile.passes.classify import classify_pass
from foldcompile.passes.cost_model import CostTotals, cost_totals
from foldcompile.passes.registry import OP_CLASSES, op_name
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.shape_prop import dim_symbol, shape_prop_pass
from foldcompile.size_check import check_structure_at
from foldcompile.tables import ROOT, cut_path, entry, format_table

__all__ = ["explain", "explain_graph", "Report", "structure_dependent_dims", "ROOT", "cut_path",
           "format_table"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _literal_cuts(n: torch.fx.Node) -> list[tuple[int, int, int | None, str]]:
    """``(input axis, start, stop, why)`` for every cut a node makes with literal bounds along an
    axis of its tensor input; ``why`` is set when the cut's *count* of pieces is size-specialised
    (``split`` by an int or a list of literal sizes, ``unbind``)."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], torch.fx.Node):
        return []
    src = n.args[0]
    shape = src.meta.get("shape")
    if shape is None or src.meta.get("sym_shape") is None or src.meta.get("multi_output"):
        return []
    ndim = len(shape)
    name = op_name(n)

    def axis_of(d: Any) -> int | None:
        if not _is_int(d) or not -ndim <= d < ndim:
            return None
        return d + ndim if d < 0 else d

    if name == "narrow" and len(n.args) >= 4 and all(_is_int(a) for a in n.args[1:4]):
        ax = axis_of(n.args[1])
        return [] if ax is None else [(ax, n.args[2], n.args[2] + n.args[3], "")]
    if name in ("split", "unbind"):
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        if name == "unbind":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        ax = axis_of(dim)
        if ax is None:
            return []
        if name == "unbind":
            return [(ax, 0, None, f"unbinds an axis into {shape[ax]} pieces")]
        return [(ax, 0, None, f"splits an axis into {len(n.meta.get('shape') or ())} pieces of literal sizes")]
    if name == "getitem" and isinstance(n.args[1], (tuple, slice)):
        index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if any(isinstance(i, torch.fx.Node) for i in index) or sum(i is Ellipsis for i in index) > 1:
            return []
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        cuts, ax = [], 0
        for i in index:
            if i is Ellipsis:
                ax += ndim - consumed
            elif i is None:
                continue
            elif isinstance(i, slice):
                if _is_int(i.start) and (i.stop is None or _is_int(i.stop)) and ax < ndim:
                    cuts.append((ax, i.start, i.stop, ""))
                ax += 1
            else:
                ax += 1
        return cuts
    return []


def structure_dependent_dims(gm: torch.fx.GraphModule) -> dict[str, str]:
    """The named dims the graph's structure was specialised on, each with the reason.

    Needs ``shape_prop_pass`` meta (``gm.meta["dims"]``, ``sym_shape``). See the module
    docstring for the rules; they err on the side of refusing.
    """
    dims: dict[str, int] = dict(gm.meta.get("dims", {}))
    reasons: dict[str, str] = {}
    known = gm.meta.get("guarded_dim_reasons") or {}
    for d in gm.meta.get("guarded_dims") or ():
        reasons.setdefault(str(d), known.get(str(d), "recorded by the capture"))

    # a chunk size given to the model: chunk loops unroll into a number of pieces set by the sizes
    guards = getattr(gm, "guards", None)
    chunk_flags: list[str] = []
    if guards is not None:
        for name, (_, leaves) in guards.inputs.items():
            if "chunk" in name.lower() and any(_is_int(v) for v in leaves):
                chunk_flags.append(f"argument {name}={[v for v in leaves if _is_int(v)][0]}")
        for attr, v in guards.module_attrs.items():
            if "chunk" in attr.rsplit(".", 1)[-1].lower() and _is_int(v):
                chunk_flags.append(f"module attribute {attr}={v}")
    if chunk_flags:
        for d in dims:
            reasons.setdefault(d, f"captured with {chunk_flags[0]}: chunk loops unroll by the sizes")

    by_value = {v: k for k, v in dims.items()}
    for n in gm.graph.nodes:
        shape, sym = n.meta.get("shape"), n.meta.get("sym_shape")
        if shape is None or sym is None or n.meta.get("multi_output"):
            continue
        for c, s in zip(shape, sym):
            s = sympy.sympify(s)
            if s.is_Integer and int(c) in by_value:
                d = by_value[int(c)]
                reasons.setdefault(d, f"node {n.name!r} ({op_name(n)}) has a size fixed at {c}, the captured "
                                      f"{d}: an unrolled loop or a specialised shape")
        for axis, start, stop, why in _literal_cuts(n):
            src = n.args[0]
            in_c, in_s = src.meta["shape"][axis], sympy.sympify(src.meta["sym_shape"][axis])
            if in_s.free_symbols and (why or (start > 0 and stop is not None and stop >= in_c)):
                for sym_d in sorted(in_s.free_symbols, key=str):
                    reasons.setdefault(str(sym_d), f"node {n.name!r} ({op_name(n)}) " + (
                        why or f"cuts [{start}:{stop}] out of an axis of size {in_s} with literal bounds "
                               "reaching its end (a chunk loop's tail)"))
    return {d: reasons[d] for d in sorted(reasons)}


def _num(expr: Any, subs: Mapping[sympy.Symbol, int], cache: dict) -> int:
    key = expr if isinstance(expr, sympy.Basic) else sympy.sympify(expr)
    if key not in cache:
        val = key.subs(subs) if key.free_symbols else key
        if not val.is_number:
            raise PassError(f"cost {key} has dims with no value: {sorted(map(str, val.free_symbols))}")
        cache[key] = int(val)
    return cache[key]


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, sympy.Basic) and x.is_Integer:
        return int(x)
    return str(x)


@dataclass
class Report:
    """What ``explain`` found: op classes and costs of the classified graph, by class and by module.

    ``graph_module`` is the classified graph (``node.meta["op_class"]``, ``["cost"]``,
    ``["module_path"]``), ``totals`` the symbolic :class:`CostTotals`, ``capture`` the
    capture's ``{"graphs", "leaves", "tracer"}``, ``dims`` the captured sizes,
    ``guarded_dims`` the dims ``cost`` will not move (with reasons), ``passes`` each pass's
    ``{"changed", "record"}``.
    """

    graph_module: torch.fx.GraphModule
    totals: CostTotals
    capture: dict[str, Any]
    dims: dict[str, int]
    guarded_dims: dict[str, str] = field(default_factory=dict)
    passes: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_name: str = "model"
    # the model and the graph's example input values, so that costs asked at other sizes
    # can be checked against a capture there (foldcompile.size_check); None skips the check
    model: torch.nn.Module | None = field(default=None, repr=False)
    example_values: list[Any] | None = field(default=None, repr=False)
    _checked_sizes: set = field(default_factory=set, repr=False)
    # explain(..., world_size=P): the DAP plan at P and its scaling over world sizes (foldcompile.dap_scaling)
    dap: Any = field(default=None, repr=False)

    @property
    def code(self) -> str:
        """The classified graph as readable Python."""
        return self.graph_module.code

    # ---------------------------------------------------------------- numbers

    def _subs(self, sizes: Mapping[str, int]) -> dict[sympy.Symbol, int]:
        unknown = set(sizes) - set(self.dims)
        if unknown:
            raise PassError(f"unknown dims {sorted(unknown)}; this graph's dims are {sorted(self.dims)}")
        for name, v in sizes.items():
            if not _is_int(v) or v < 1:
                raise PassError(f"{name} must be a positive int, got {v!r}")
            if name in self.guarded_dims and v != self.dims[name]:
                raise PassError(f"the graph's structure depends on {name} (captured at {name}={self.dims[name]}; "
                                f"{self.guarded_dims[name]}): its cost at {name}={v} needs a capture at that size")
        self._check_structure(sizes)
        return {dim_symbol(k): v for k, v in {**self.dims, **sizes}.items()}

    def _check_structure(self, sizes: Mapping[str, int]) -> None:
        """Re-capture on the meta device at ``sizes`` and require the same graph (see size_check):
        the rules behind ``guarded_dims`` cannot see a Python branch on a size that left no trace."""
        key = frozenset((k, v) for k, v in sizes.items() if v != self.dims.get(k))
        if not key or key in self._checked_sizes:
            return
        if self.model is None or self.example_values is None:
            # without the model nothing can re-capture at the new sizes, and a size branch that left
            # no trace in the graph would make the cost silently wrong: refuse rather than guess
            raise PassError(f"cannot check the graph's structure at {dict(key)}: the report holds no model "
                            f"(a hand-built graph, or the captured model is gone); its cost is known only at "
                            f"the captured sizes {self.dims}: explain the model at these sizes instead")
        check_structure_at(self.model, self.graph_module, self.example_values, dict(key))
        self._checked_sizes.add(key)

    def node_costs(self, **sizes: int) -> list[tuple[str, str, str, int, int]]:
        """``(node, op class, module path, flops, bytes)`` per classified node, at ``sizes``
        (dims not given keep their captured value); refuses guarded dims like ``cost``."""
        subs, cache = self._subs(sizes), {}
        return [(name, cls, path, _num(f, subs, cache), _num(b, subs, cache))
                for name, cls, path, f, b in self.totals.rows]

    def cost(self, depth: int | None = None, **sizes: int) -> dict[str, Any]:
        """Numeric totals at other sizes, from the symbolic costs::

            {"dims": {...}, "classes": {CLASS: {"count", "flops", "bytes", "intensity"}},
             "modules": {path: {CLASS: {...}}}, "total": {...}}

        Module paths are cut to ``depth`` components when given (the root is ``"(root)"``).
        Raises ``PassError`` for an unknown dim or a guarded dim moved off its captured value.
        """
        rows = self.node_costs(**sizes)
        classes = {c: [0, 0, 0] for c in OP_CLASSES}
        modules: dict[str, dict[str, list[int]]] = {}
        for _, cls, path, f, b in rows:
            for acc in (classes.setdefault(cls, [0, 0, 0]),
                        modules.setdefault(cut_path(path, depth), {}).setdefault(cls, [0, 0, 0])):
                acc[0] += 1
                acc[1] += f
                acc[2] += b
        total = [sum(v[i] for v in classes.values()) for i in range(3)]
        return {
            "dims": {**self.dims, **sizes},
            "classes": {c: entry(*v) for c, v in classes.items()},
            "modules": {p: {c: entry(*v) for c, v in cs.items()} for p, cs in modules.items()},
            "total": entry(*total),
        }

    def module_depth(self, max_groups: int = 24) -> int:
        """The deepest module depth whose table has at most ``max_groups`` rows (at least 1)."""
        paths = {r[2] for r in self.totals.rows}
        best = 1
        for depth in range(1, 1 + max((len(p.split(".")) for p in paths if p), default=1)):
            if len({cut_path(p, depth) for p in paths}) <= max_groups:
                best = depth
        return best

    def to_dict(self, depth: int | None = None) -> dict[str, Any]:
        """Everything as plain JSON-able values, at the captured sizes::

            {"model", "classes": {CLASS: {"count", "flops", "bytes", "intensity"}},
             "modules": {path: {CLASS: {...}}}, "total", "capture": {"graphs", "leaves", "tracer"},
             "dims", "guarded_dims": {dim: reason}, "passes": {name: {"changed", "record"}}}
        """
        c = self.cost(depth=depth)
        return {
            "model": self.model_name,
            "classes": c["classes"],
            "modules": c["modules"],
            "total": c["total"],
            "capture": _jsonable(self.capture),
            "dims": dict(self.dims),
            "guarded_dims": dict(self.guarded_dims),
            "passes": _jsonable(self.passes),
        }

    def to_json(self, path: str | None = None, depth: int | None = None, indent: int = 1) -> str:
        """``to_dict`` as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(depth=depth), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    # ---------------------------------------------------------------- text

    def table(self, depth: int | None = None, with_dap: bool = True, **sizes: int) -> str:
        """The class table and the module table (paths cut to ``depth``, chosen by
        ``module_depth`` when not given), at the captured sizes or at ``sizes``; then, for a report
        made with ``world_size=``, the DAP scaling (``with_dap``)."""
        depth = self.module_depth() if depth is None else depth
        c = self.cost(depth=depth, **sizes)
        cap = self.capture
        lines = [f"{self.model_name}: {cap.get('graphs')} graph(s), {cap.get('leaves')} leaves, "
                 f"tracer {cap.get('tracer')}; dims " + ", ".join(f"{k}={v}" for k, v in c["dims"].items())]
        if self.guarded_dims:
            lines.append("guarded (cost refuses other values): " +
                         "; ".join(f"{d}: {why}" for d, why in self.guarded_dims.items()))
        # -- capture limitation (foldcompile.guards.global_module_hooks): said where it applies now
        hooks = global_module_hooks()
        if hooks:
            lines.append(f"note: global module hooks are registered ({', '.join(hooks)}): eager runs them around "
                         "every module, the captured graph runs none (its guards refuse calls while any is registered)")
        missing = self.uncosted()
        if missing:
            lines.append("un-costed ops (no registry entry: 0 FLOPs counted, bytes counted): " +
                         ", ".join(f"{op} ({len(nodes)} node{'s' if len(nodes) > 1 else ''}: {', '.join(nodes)})"
                                   for op, nodes in missing.items()))
        lines.append("")
        lines += format_table(["op class", "nodes", "GFLOP", "MB", "FLOP/B"],
                              [[cls, e["count"], e["flops"] / 1e9, e["bytes"] / 1e6, e["intensity"]]
                               for cls, e in c["classes"].items()] +
                              [["total", c["total"]["count"], c["total"]["flops"] / 1e9,
                                c["total"]["bytes"] / 1e6, c["total"]["intensity"]]])
        lines.append("")
        rows = []
        for path, cs in c["modules"].items():
            n = sum(e["count"] for e in cs.values())
            f = sum(e["flops"] for e in cs.values())
            b = sum(e["bytes"] for e in cs.values())
            mix = " ".join(f"{k[0]}{cs[k]['count']}" for k in OP_CLASSES if k in cs)
            rows.append([path, n, f / 1e9, b / 1e6, f / b if b else 0.0, mix])
        lines += format_table([f"module (depth {depth})", "nodes", "GFLOP", "MB", "FLOP/B",
                               "mix (G/R/E/L/C/O nodes)"], rows)
        if self.graph_module.meta.get("shard_plan"):  # a graph planned by shard_pass: its DAP plan
            from foldcompile.passes.shard import plan_table
            lines += ["", plan_table(self.graph_module.meta["shard_plan"])]
        if self.dap is not None and with_dap and not sizes:
            lines += ["", str(self.dap)]
        return "\n".join(lines)

    def uncosted(self) -> dict[str, list[str]]:
        """``{op: [node names]}`` for the ops whose FLOPs the cost model does not know (counted 0)."""
        out: dict[str, list[str]] = {}
        for item in (self.passes.get("classify", {}).get("record", {}).get("uncosted") or []):
            out.setdefault(item["op"], []).append(item["node"])
        return out

    def __str__(self) -> str:
        return self.table()

    def to_html(self, path: str, depth: int | None = None, **options: Any) -> str:
        """Write the self-contained HTML report (:func:`foldcompile.report_html.render_html`; inline
        CSS and JS, no network): per-module bars of FLOPs and bytes, the fusion plan, and with
        ``at=``, ``optimized=``, ``profile=``, ``ceilings=`` those sizes, an optimized variant's
        before/after, measured times and a roofline. Returns ``path``."""
        from foldcompile.report_html import write_html

        return write_html(path, self, self.module_depth() if depth is None else depth, **options)


def explain_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                  example_kwargs: Mapping[str, Any] | None = None, dims: dict[str, int] | None = None,
                  model_name: str = "model") -> Report:
    """``explain`` on a graph already captured by :func:`foldcompile.capture.trace` (the
    examples must be those it was captured with).

    The report's ``model`` is the model the guards of ``gm`` refer to (a weak reference taken at
    capture), so costs at other sizes are checked against a capture there; without one (a
    hand-built graph, or the model is gone) ``Report.cost`` refuses sizes other than the captured."""
    flat = flat_inputs(gm, example_inputs, example_kwargs)
    pm = PassManager([
        ("normalize", normalize_pass),
        ("shape_prop", partial(shape_prop_pass, example_inputs=flat, dims=dims)),
        ("classify", classify_pass),
    ])
    out = pm.run(gm)
    capture = dict(gm.meta.get("capture") or {"graphs": 1, "leaves": 0, "tracer": "unknown"})
    guarded = structure_dependent_dims(out)
    out.meta["guarded_dims"] = set(guarded)  # read by cost_totals (CostTotals.evaluate refuses them too)
    out.meta["guarded_dim_reasons"] = dict(guarded)
    totals = cost_totals(out)
    passes = {name: {"changed": step.result.changed, "record": step.result.record}
              for name, step in pm.history.items()}
    # the model the graph was captured from (the guards hold a weak reference), so that costs at
    # other sizes are checked against a capture there (Report._check_structure)
    guards = getattr(gm, "guards", None)
    model = guards.model_ref() if guards is not None and guards.model_ref is not None else None
    return Report(out, totals, capture, dict(out.meta.get("dims", {})), guarded, passes, model_name,
                  model=model, example_values=flat if model is not None else None)


def explain(model: torch.nn.Module, *example_inputs: Any, dims: dict[str, int] | None = None,
            world_size: int | None = None, link_GBps: float | None = None,
            world_sizes: Sequence[int] | None = None, dap_at: Mapping[str, int] | None = None,
            **example_kwargs: Any) -> Report:
    """Capture ``model`` on the examples, classify every op, and return a :class:`Report`.

    ``dims`` names sizes explicitly (``{"N_seq": 11, "N_res": 13}``); by default they are
    inferred from the input names (see ``shape_prop_pass``). Example sizes must be distinct
    from each other and from every channel size, or shape propagation raises asking for them.

    ``world_size=P`` (or ``world_sizes``) adds DAP on paper (``report.dap``,
    :mod:`foldcompile.dap_scaling`): the plan at P and, for P = 2 ... 512, each collective's
    volume and time per block next to the compute per rank and the memory per rank, at the sizes
    ``dap_at`` (default the training crop) with a link of ``link_GBps`` (default 300 GB/s).
    """
    dap = world_size is not None or world_sizes is not None
    if (link_GBps is not None or dap_at is not None) and not dap:
        raise ValueError("explain: link_GBps and dap_at are for the DAP scaling; give world_size= (or world_sizes=) too")
    gm = trace(model, *example_inputs, **example_kwargs)
    report = explain_graph(gm, example_inputs, example_kwargs, dims=dims, model_name=type(model).__name__)
    report.model = model
    report.example_values = flat_inputs(gm, example_inputs, example_kwargs)
    if dap:
        from foldcompile.dap_scaling import dap_scaling
        report.dap = dap_scaling(report, world_size=world_size, link_GBps=link_GBps, world_sizes=world_sizes,
                                 at=dap_at)
    return report
