r"""The HTML report: the page a user opens to decide what is slow and what will fuse.

``render_html(report, depth, at=..., optimized=..., profile=..., ceilings=...)`` returns one
self-contained page (inline CSS and JS, no network); ``write_html(path, report, ...)`` writes it
(``foldcompile explain TARGET --at N_res=1024 --html out.html --card H200``). Every number on it
is at one size, ``at`` (dims not named keep their captured value), never silently at the tiny
example size the model was captured at. It shows:

- **where the work is**: one row a module (paths cut to ``depth``) with bars of its FLOPs, its
  bytes (stacked by op class) and, with a ``profile`` taken at that size, its measured time; the
  bytes bar marks what is left after fusion. Rows sort by execution order, FLOPs, bytes or time
  (buttons, or ``report.html#sort=bytes``).
- **the roofline** against a card's measured ceilings (:mod:`foldcompile.ceilings`, read from
  ``bench/results/``): each module at its arithmetic intensity and the best rate its ops allow
  (every op its own kernel: the sum of each op's time at the roofs), before and after fusion,
  and, when profiled on that card, where it ran.
- **the memory-bound chains** and the kernel each fuses into, with the bytes it saves at that size;
  what was left unfused and why; rejected candidates with the rule's reason and the source line.
  For an explain report this is the plan (the fuse pass run on a copy at ``at``); for an optimized
  module (``optimized=fast.variant_for(*inputs)``) it is what was fused, before and after.
- the fused graph as Python, with the model's own argument names.

The page takes the :class:`~foldcompile.explain.Report` it draws (it does not import
``foldcompile.explain``); it runs the fuse pass for the plan and prints the fused graph with
``foldcompile.optimize.readable_code``.

Names are the user's: module paths, op names, ``forward``'s argument names and source lines,
never the tracer's placeholders. The page's script records any JavaScript error in the page
itself (``#fc-errors``) and marks ``<body data-fc-ready="1">`` when it has run, which is how the
headless-browser test checks it.

    >>> from foldcompile.models import zoo
    >>> import foldcompile
    >>> block, ex = zoo.get("pairformer_block")
    >>> report = foldcompile.explain(block, *ex)
    >>> page = page_data(report, depth=1, at={"N_res": 64})
    >>> page["dims"]
    {'N_res': 64}
    >>> sum(m["flops"] for m in page["modules"]) == report.cost(N_res=64)["total"]["flops"]
    True
    >>> top = page["chains"][0]                  # the chain whose kernel saves the most bytes there
    >>> top["kernel"], top["module"], top["ops"][:3], top["saved"] > 0
    ('fused_triangle_multiplication', 'tri_mul_out', ['layer_norm', 'linear', 'sigmoid'], True)
    >>> render_html(report, depth=1, at={"N_res": 64}).startswith("<!DOCTYPE html>")
    True
"""
from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import sympy
import torch
import torch.fx

from foldcompile.passes.registry import OP_CLASSES, op_name
from foldcompile.passes.shape_prop import dim_symbol
from foldcompile.tables import cut_path, human

if TYPE_CHECKING:  # for annotations only: this module never imports explain at run time
    from foldcompile.ceilings import Ceilings
    from foldcompile.explain import Report
    from foldcompile.optimize import Variant
    from foldcompile.profile import ProfileReport

__all__ = ["render_html", "write_html", "page_data", "CLASS_COLORS"]

CLASS_COLORS = {"GEMM": "#d62728", "REDUCTION": "#1f77b4", "ELEMENTWISE": "#2ca02c", "LAYOUT": "#9a9a9a",
                "COMM": "#9467bd", "OTHER": "#ff7f0e"}
_CLASS_MEANING = {
    "GEMM": "matrix products (tensor cores)", "REDUCTION": "softmax, layer norm, sums over a dim",
    "ELEMENTWISE": "add, mul, sigmoid, masking, dropout", "LAYOUT": "view, permute, slicing, cat (copies)",
    "COMM": "collectives", "OTHER": "ops the cost model does not know (0 FLOPs counted)"}


# ----------------------------------------------------------------------------- numbers at a size

class _At:
    """Evaluates a graph's symbolic costs and value sizes at one size (cached)."""

    def __init__(self, dims: Mapping[str, int]):
        self.subs = {dim_symbol(k): v for k, v in dims.items()}
        self._cache: dict[Any, int] = {}

    def num(self, expr: Any) -> int:
        e = expr if isinstance(expr, sympy.Basic) else sympy.sympify(expr)
        if e not in self._cache:
            v = e.subs(self.subs) if e.free_symbols else e
            if not v.is_number:
                raise ValueError(f"{e} has dims with no value here: {sorted(map(str, v.free_symbols))}")
            self._cache[e] = int(v)
        return self._cache[e]

    def cost(self, n: torch.fx.Node) -> tuple[int, int]:
        c = n.meta.get("cost") or {}
        return self.num(c.get("flops", 0)), self.num(c.get("bytes", 0))

    def value_bytes(self, n: torch.fx.Node) -> int:
        """Bytes of a node's value (a tuple's parts summed), from its symbolic shape and dtype."""
        sym, dt = n.meta.get("sym_shape"), n.meta.get("dtype")
        if sym is None:
            sym = n.meta.get("shape")
        if sym is None or dt is None:
            return 0
        if n.meta.get("multi_output"):
            return sum(self._bytes(s, d) for s, d in zip(sym, dt))
        return self._bytes(sym, dt)

    def _bytes(self, sym: Iterable[Any], dt: Any) -> int:
        if not isinstance(dt, torch.dtype):
            return 0
        numel = 1
        for d in sym:
            numel *= self.num(d)
        return numel * torch.empty((), dtype=dt).element_size()


def _graphs(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    return [gm] + [m for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]


def _costed(n: torch.fx.Node) -> bool:
    return n.op not in ("placeholder", "output") and "cost" in n.meta and n.meta.get("op_class") not in (
        "INPUT", "OUTPUT")


def _private_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy whose graph and sub-graphs (checkpoint bodies) can be rewritten without touching ``gm``."""
    from foldcompile.pass_manager import copy_graph_module

    out = copy_graph_module(gm)
    for name, child in list(out.named_children()):
        if isinstance(child, torch.fx.GraphModule):
            setattr(out, name, _private_copy(child))
    return out


def _model_dtype(gm: torch.fx.GraphModule) -> str:
    """The dtype of the model's matrix products (else of its floating inputs), e.g. ``bfloat16``."""
    seen: dict[str, int] = {}
    for n in gm.graph.nodes:
        dt = n.meta.get("dtype")
        if isinstance(dt, torch.dtype) and dt.is_floating_point and (
                n.meta.get("op_class") == "GEMM" or n.op == "placeholder"):
            key = str(dt).replace("torch.", "")
            seen[key] = seen.get(key, 0) + (10 if n.meta.get("op_class") == "GEMM" else 1)
    return max(seen, key=seen.get) if seen else "float32"


# ----------------------------------------------------------------------------- fusion

def _same_nodes(report_gm: torch.fx.GraphModule, traced: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """The traced graph's nodes by the names the fuse record uses.

    ``optimize`` names a variant's inputs after ``forward``'s arguments once it has fused (an op
    node that held such a name gets another), so its record still names the capture's nodes: the
    explain report's graph, captured from the same model and inputs, has those names, node for
    node in the same order. Any other difference is refused."""
    pairs = list(zip(_graphs(report_gm), _graphs(traced)))
    out: dict[str, torch.fx.Node] = {}
    for a, b in pairs:
        na, nb = list(a.graph.nodes), list(b.graph.nodes)
        if len(na) != len(nb) or any(x.op != y.op or x.target != y.target for x, y in zip(na, nb)):
            raise ValueError("the optimized variant's traced graph is not the report's graph (another capture, "
                             "other inputs or another mode?): explain the model on the inputs it was optimized on")
        out.update({x.name: y for x, y in zip(na, nb)})
    return out


def _cast_changes(traced: torch.fx.GraphModule, fused_graphs: list, surviving: set, replaced: set[str],
                  at: "_At") -> list[dict[str, Any]]:
    """The traffic fusion changed outside every kernel, as pseudo-chains (so that the chains' savings add up
    to the page's bytes before minus after): casts :mod:`foldcompile.passes.simplify_casts` removed (traced
    ops that no kernel replaced and that did not survive: they move their bytes no more) and casts
    :mod:`foldcompile.passes.explicit_autocast` wrote (fused-graph ops with no traced original: autocast made
    them inside the ops before, the graph makes them now)."""
    traced_costs = {id(n.meta["cost"]) for g in _graphs(traced) for n in g.graph.nodes if "cost" in n.meta}
    removed = [n for g in _graphs(traced) for n in g.graph.nodes
               if _costed(n) and id(n.meta.get("cost")) not in surviving and n.name not in replaced]
    written = [n for g in fused_graphs for n in g.graph.nodes
               if _costed(n) and not n.meta.get("match_id") and id(n.meta.get("cost")) not in traced_costs]
    out = []
    for rule, kernel, nodes, sign in (("simplify_casts", "none (casts that change no value, removed)", removed, 1),
                                      ("explicit_autocast", "none (autocast's casts, written into the graph)",
                                       written, -1)):
        if not nodes:
            continue
        moved = sum(at.cost(n)[1] for n in nodes)
        out.append({"id": f"{rule}", "rule": rule, "kernel": kernel, "module": "(whole graph)",
                    "ops": [op_name(n) for n in nodes], "kept": 0, "flops": 0,
                    "bytes_before": moved if sign > 0 else 0, "bytes_after": 0 if sign > 0 else moved,
                    "saved": sign * moved, "source": ""})
    return out


def _fusion(named: Mapping[str, torch.fx.Node], traced: torch.fx.GraphModule, fused: torch.fx.GraphModule,
            record: Mapping[str, Any], at: _At, depth: int | None) -> dict[str, Any]:
    """Chains with their kernel and bytes saved, per-module bytes and floors after fusion, what was
    left unfused and why, and the rejected candidates: all at ``at``.

    ``named``: the traced nodes by the record's names. A node of the fused graph that survived
    fusion shares its ``meta["cost"]`` object with its traced original (graph copies copy the
    meta dict, not its values): that is how a region's erased nodes are told from those kept."""
    fused_graphs = _graphs(fused)
    surviving = {id(n.meta["cost"]) for g in fused_graphs for n in g.graph.nodes if "cost" in n.meta}
    kernels = {n.meta["match_id"]: n for g in fused_graphs for n in g.graph.nodes if n.meta.get("match_id")}

    def value_bytes(n: torch.fx.Node) -> int:
        if n.meta.get("multi_output"):  # a kernel with several outputs: the values taken from it
            return sum(value_bytes(u) for u in n.users)
        if n.meta.get("fused_by"):  # a kernel's value: the traced node it computes
            replaced = named.get(n.meta.get("replaces", ""))
            return at.value_bytes(replaced) if replaced is not None else 0
        return at.value_bytes(n)

    kernel_cost: dict[torch.fx.Node, list[tuple[str, float, float]]] = {}
    chains = []
    replaced_names: set[str] = set()  # traced ops a kernel replaced
    for m in record.get("matches", []):
        if m["id"] not in kernels:
            continue
        k = kernels[m["id"]]
        region = [named[o] for o in m["origin"] if o in named]
        erased = [r for r in region if id(r.meta.get("cost")) not in surviving]
        flops = sum(at.cost(r)[0] for r in erased if _costed(r))
        before = sum(at.cost(r)[1] for r in erased if _costed(r))
        inputs = [a for a in dict.fromkeys(k.all_input_nodes)]
        after = sum(value_bytes(a) for a in inputs) + value_bytes(k)
        # a chain can cross module boundaries (a gate in one module, the residual add in its parent):
        # the kernel's traffic is shared among the modules of the ops it replaces, by their bytes
        share: dict[str, float] = {}
        for r in erased:
            if _costed(r):
                path = cut_path(str(r.meta.get("module_path") or ""), depth)
                share[path] = share.get(path, 0.0) + at.cost(r)[1]
        weight = sum(share.values())
        own = cut_path(str(k.meta.get("module_path") or ""), depth)
        kernel_cost[k] = [(path, flops * w / weight, after * w / weight) for path, w in share.items()] \
            if weight else [(own, flops, after)]
        chains.append({"id": m["id"], "rule": m["rule"], "kernel": getattr(k.target, "__name__", str(k.target)),
                       "module": m["site"], "ops": [op_name(r) for r in region], "kept": len(region) - len(erased),
                       "flops": flops, "bytes_before": before, "bytes_after": after, "saved": before - after,
                       "source": _short_source(m.get("source", ""))})
        replaced_names.update(r.name for r in erased)
    chains += _cast_changes(traced, fused_graphs, surviving, replaced_names, at)
    chains.sort(key=lambda c: -c["saved"])

    modules: dict[str, dict[str, float]] = {}
    for g in _graphs(traced):
        for n in g.graph.nodes:
            if _costed(n):
                f, b = at.cost(n)
                e = modules.setdefault(cut_path(str(n.meta.get("module_path") or ""), depth), _zero())
                e["bytes_before"] += b
                e["ops_before"] += 1
                e["nodes_before"].append((f, b))
    for g in fused_graphs:
        for n in g.graph.nodes:
            if n in kernel_cost:
                parts = kernel_cost[n]
                modules.setdefault(cut_path(str(n.meta.get("module_path") or ""), depth), _zero())["kernels"] += 1
            elif _costed(n):
                parts = [(cut_path(str(n.meta.get("module_path") or ""), depth), *at.cost(n))]
            else:
                continue
            for path, f, b in parts:
                e = modules.setdefault(path, _zero())
                e["bytes_after"] += b
                e["nodes_after"].append((f, b))
            modules.setdefault(parts[0][0], _zero())["ops_after"] += 1

    by_reason: dict[str, dict[str, Any]] = {}
    for u in record.get("unfused", []):
        n = named.get(u["node"])
        b = at.cost(n)[1] if n is not None and _costed(n) else int(u.get("bytes") or 0)
        reason = _plain_reason(u["reason"])
        e = by_reason.setdefault(reason, {"reason": reason, "count": 0, "bytes": 0, "sites": {}})
        e["count"] += 1
        e["bytes"] += b
        site = f"{u['op']} in {u['site']}"
        e["sites"][site] = e["sites"].get(site, 0) + b
    unfused = sorted(by_reason.values(), key=lambda e: -e["bytes"])
    for e in unfused:
        e["sites"] = [s for s, _ in sorted(e["sites"].items(), key=lambda kv: -kv[1])]

    rejections: dict[tuple[str, str], dict[str, Any]] = {}
    for r in record.get("rejections", []):
        e = rejections.setdefault((r["rule"], r["reason"]), {"rule": r["rule"], "reason": r["reason"], "count": 0,
                                                             "places": []})
        e["count"] += 1
        place = {"module": r["site"], "source": _short_source(r.get("source", ""))}
        if place not in e["places"]:
            e["places"].append(place)
    return {"chains": chains, "modules": modules, "unfused": unfused,
            "rejections": sorted(rejections.values(), key=lambda e: (e["rule"], -e["count"])),
            "counts": dict(record.get("counts", {})), "note": record.get("not_fused_because", "")}


def _zero() -> dict[str, Any]:
    return {"bytes_before": 0, "bytes_after": 0, "ops_before": 0, "ops_after": 0, "kernels": 0,
            "nodes_before": [], "nodes_after": []}


def _plain_reason(reason: str) -> str:
    """``not profitable (elementwise: not profitable: one op)`` -> ``not profitable: one op (elementwise)``:
    the fuse record prefixes the rule's own words with their category."""
    head, sep, inner = reason.partition(" (")
    if sep and inner.endswith(")"):
        rule, colon, words = inner[:-1].partition(": ")
        if colon and words.startswith(head) and rule.isidentifier():
            return f"{words} ({rule})"
    return reason


def _short_source(source: str) -> str:
    """``File ".../models/af2/attention.py", line 95, in forward: code`` -> ``attention.py:95  code``."""
    if not source.startswith("File "):
        return source
    try:
        path = source.split('"')[1]
        line = source.split("line ")[1].split(",")[0]
        code = source.split(": ", 1)[1] if ": " in source else ""
    except IndexError:
        return source
    return f"{path.rsplit('/', 1)[-1]}:{line}  {code}".strip()


def _plan(report: "Report", dims: Mapping[str, int]) -> tuple[torch.fx.GraphModule, dict]:
    """What optimize would do at ``dims``: optimize's fusion pipeline (chunk-loop merges, then the rules:
    ``fuse_annotated``) on a private copy of the classified graph; a merged loop is annotated again on
    the report's example inputs."""
    from foldcompile.optimize import CannotAnnotate, _annotate, fuse_annotated

    def annotate(g: torch.fx.GraphModule) -> None:
        if report.example_values is None:
            raise CannotAnnotate("the report holds no example inputs to annotate a merged chunk loop on")
        buffers = [(b, b.detach().clone()) for b in report.model.buffers()] if report.model is not None else []
        values = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in report.example_values]
        try:
            _annotate(g, values, dict(report.dims) or None)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

    return fuse_annotated(report.graph_module, annotate, at=dict(dims))


def _code(fused: torch.fx.GraphModule, model: torch.nn.Module | None, renamed: bool) -> str:
    """The fused graph as readable Python, its inputs named as ``forward``'s arguments."""
    from foldcompile.optimize import _name_inputs_after_the_model, readable_code

    if not renamed and model is not None:
        fused = _private_copy(fused)
        _name_inputs_after_the_model(fused, model)
    return readable_code(fused)


# ----------------------------------------------------------------------------- the page's data

def page_data(report: "Report", depth: int | None = None, *, at: Mapping[str, int] | None = None,
              optimized: "Variant | None" = None, profile: "ProfileReport | None" = None,
              ceilings: "Ceilings | None" = None) -> dict[str, Any]:
    """Every number of the page, as plain JSON-able values (see the module docstring).

    ``at``: the size (dims not named keep their captured value; the structure is checked there as
    ``Report.cost`` does). ``optimized``: a variant of an ``OptimizedModule``
    (``fast.variant_for(*inputs)``); without it the fusion is planned at ``at``. ``profile``: a
    ``ProfileReport`` taken at that size (its times become bars). ``ceilings``: a card's (roofline).
    """
    depth = report.module_depth() if depth is None else depth
    sizes = dict(at or {})
    cost = report.cost(depth=depth, **sizes)  # refuses unknown or guarded dims; checks the structure
    dims = dict(cost["dims"])
    evaluate = _At(dims)
    if profile is not None and dict(profile.dims) != dims:
        raise ValueError(f"the profile was taken at {profile.dims}, the page is at {dims}: profile at the "
                         "size the page shows")
    if optimized is not None:
        traced, fused, record, mode = optimized.traced, optimized.graph, optimized.record, "optimized"
        named = _same_nodes(report.graph_module, traced)
    else:
        traced, mode = report.graph_module, "plan"
        fused, record = _plan(report, dims)
        named = {n.name: n for g in _graphs(traced) for n in g.graph.nodes}
    fusion = _fusion(named, traced, fused, record, evaluate, depth)
    judged = {k: v for k, v in (record.get("at") or {}).items() if dims.get(k) != v}
    if judged and not fusion["note"]:
        fusion["note"] = (f"fusion was judged profitable at {', '.join(f'{k}={v}' for k, v in judged.items())}, "
                          "not at this page's size")
    times = profile.by_module(depth) if profile is not None else {}
    dtype = _model_dtype(traced)

    modules = []
    for order, (path, classes) in enumerate(cost["modules"].items()):
        f = fusion["modules"].get(path, _zero())
        modules.append({
            "path": path, "order": order,
            "flops": sum(e["flops"] for e in classes.values()), "bytes": sum(e["bytes"] for e in classes.values()),
            "ops": sum(e["count"] for e in classes.values()),
            "classes": {c: {"flops": e["flops"], "bytes": e["bytes"], "count": e["count"]} for c, e in classes.items()},
            "bytes_after": f["bytes_after"], "ops_after": f["ops_after"], "kernels": f["kernels"],
            "ms": times[path]["ms"] if path in times else None,
            "floor_before": _floor(f["nodes_before"], ceilings, dtype),
            "floor_after": _floor(f["nodes_after"], ceilings, dtype)})
    total_after = sum(m["bytes_after"] for m in modules)
    page = {
        "model": report.model_name, "mode": mode, "depth": depth, "dims": dims, "captured": dict(report.dims),
        "dtype": dtype, "capture": {k: report.capture.get(k) for k in ("graphs", "leaves", "tracer")},
        "guarded": dict(report.guarded_dims), "uncosted": report.uncosted(),
        "total": {"flops": cost["total"]["flops"], "bytes": cost["total"]["bytes"], "bytes_after": total_after,
                  "ops": cost["total"]["count"], "ops_after": sum(m["ops_after"] for m in modules),
                  "kernels": sum(m["kernels"] for m in modules)},
        "classes": {c: dict(e) for c, e in cost["classes"].items() if e["count"]},
        "modules": modules, "chains": fusion["chains"], "unfused": fusion["unfused"],
        "rejections": fusion["rejections"], "counts": fusion["counts"], "fusion_note": fusion["note"],
        "profile": None, "roofline": None, "code": _code(fused, report.model, renamed=optimized is not None),
    }
    if profile is not None:
        page["profile"] = {"device": profile.device, "timing": profile.timing, "reps": profile.reps,
                           "ms": profile.profiled_ms, "eager_ms": profile.eager_ms}
    if ceilings is not None:
        page["roofline"] = _roofline(page, ceilings, profile)
    return page


def _floor(nodes: list[tuple[int, int]], ceilings: "Ceilings | None", dtype: str) -> float | None:
    """Seconds the ops take at best, each its own kernel at the roofs (None without ceilings)."""
    if ceilings is None:
        return None
    total = 0.0
    for f, b in nodes:
        t = ceilings.floor_seconds(f, b, dtype)
        if t is None:
            return None
        total += t
    return total


def _roofline(page: dict[str, Any], ceilings: "Ceilings", profile: "ProfileReport | None") -> dict[str, Any]:
    dtype = page["dtype"]
    measured_here = (profile is not None and profile.timing == "cuda_events"
                     and ceilings.card.lower() in str(profile.device).lower())
    points = []
    for m in page["modules"]:
        if m["flops"] <= 0 or m["bytes"] <= 0:
            continue
        p = {"path": m["path"], "intensity": m["flops"] / m["bytes"],
             "intensity_after": m["flops"] / m["bytes_after"] if m["bytes_after"] else None,
             "bound": m["flops"] / m["floor_before"] / 1e12 if m["floor_before"] else None,
             "bound_after": m["flops"] / m["floor_after"] / 1e12 if m["floor_after"] else None,
             "achieved": (m["flops"] / (m["ms"] * 1e-3) / 1e12) if measured_here and m["ms"] else None}
        points.append(p)
    return {"card": ceilings.card, "copy_gbs": ceilings.copy_gbs, "peak_tflops": ceilings.compute_tflops(dtype),
            "peak_dtype": dtype, "ridge": ceilings.ridge(dtype), "sources": dict(ceilings.sources),
            "points": points, "measured_here": measured_here,
            "floor_before": _sum_or_none(m["floor_before"] for m in page["modules"]),
            "floor_after": _sum_or_none(m["floor_after"] for m in page["modules"]),
            "other_dtypes": sorted(set(ceilings.matmul_tflops) - {dtype})}


def _sum_or_none(values: Iterable[float | None]) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


# ----------------------------------------------------------------------------- rendering

def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _stacked_bar(parts: list[tuple[str, float]], scale: float, title_unit: str) -> str:
    """A bar of ``sum(parts)`` as a share of ``scale``, one coloured segment a class."""
    out = ["<div class='bar'>"]
    for cls, v in parts:
        if v <= 0 or scale <= 0:
            continue
        out.append(f"<span class='seg' style='width:{100 * v / scale:.2f}%;background:{CLASS_COLORS.get(cls, '#ccc')}'"
                   f" title='{_esc(cls)}: {_esc(human(v, title_unit))}'></span>")
    out.append("</div>")
    return "".join(out)


def _module_rows(page: dict[str, Any]) -> str:
    mods = page["modules"]
    max_f = max((m["flops"] for m in mods), default=0) or 1
    max_b = max((m["bytes"] for m in mods), default=0) or 1
    max_t = max((m["ms"] or 0 for m in mods), default=0) or 1
    timed = page["profile"] is not None
    rows = []
    for m in mods:
        flops_parts = [(c, m["classes"].get(c, {}).get("flops", 0)) for c in OP_CLASSES]
        bytes_parts = [(c, m["classes"].get(c, {}).get("bytes", 0)) for c in OP_CLASSES]
        after = (f"<span class='after' style='left:{100 * m['bytes_after'] / max_b:.2f}%' "
                 f"title='after fusion: {_esc(human(m['bytes_after'], 'B'))}'></span>")
        cells = [
            f"<td class='name'><code>{_esc(m['path'])}</code><div class='sub'>{m['ops']} ops"
            + (f", {m['kernels']} kernel{'s' if m['kernels'] != 1 else ''} after fusion" if m["kernels"] else "")
            + "</div></td>",
            f"<td class='barcell' data-value='{m['flops']}'>{_stacked_bar(flops_parts, max_f, 'FLOP')}"
            f"<span class='num'>{_esc(human(m['flops'], 'FLOP'))}</span></td>",
            f"<td class='barcell' data-value='{m['bytes']}'><div class='bytes'>{_stacked_bar(bytes_parts, max_b, 'B')}"
            f"{after}</div><span class='num'>{_esc(human(m['bytes'], 'B'))} → "
            f"{_esc(human(m['bytes_after'], 'B'))}</span></td>"]
        if timed:
            ms = m["ms"] or 0.0
            cells.append(f"<td class='barcell' data-value='{ms}'><div class='bar'><span class='seg time' "
                         f"style='width:{100 * ms / max_t:.2f}%'></span></div>"
                         f"<span class='num'>{_esc(human(ms * 1e-3, 's'))}</span></td>")
        rows.append(f"<tr data-order='{m['order']}' data-flops='{m['flops']}' data-bytes='{m['bytes']}' "
                    f"data-ms='{m['ms'] or 0}' data-path='{_esc(m['path'])}'>{''.join(cells)}</tr>")
    head = ["module", "FLOPs", "bytes moved: unfused → after fusion (▏)"] + (["time (measured)"] if timed else [])
    buttons = ["order", "flops", "bytes"] + (["ms"] if timed else [])
    labels = {"order": "execution order", "flops": "FLOPs", "bytes": "bytes", "ms": "time"}
    sort = "".join(f"<button type='button' data-sort='{k}'>{labels[k]}</button>" for k in buttons)
    return (f"<p class='sorter'>sort by: {sort}</p><table id='modules' class='modules'><thead><tr>"
            + "".join(f"<th>{_esc(h)}</th>" for h in head) + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _legend() -> str:
    items = "".join(f"<li><span class='swatch' style='background:{CLASS_COLORS[c]}'></span><b>{c}</b> "
                    f"<span class='sub'>{_esc(_CLASS_MEANING[c])}</span></li>" for c in OP_CLASSES)
    return (f"<ul class='legend' aria-label='legend'>{items}<li><span class='swatch after-swatch'></span>"
            "<span class='sub'>bytes left after fusion</span></li></ul>")


def _log_scale(lo: float, hi: float, size: float, flip: bool = False):
    import math
    a, b = math.log10(lo), math.log10(hi)

    def f(v: float) -> float:
        t = (math.log10(max(v, lo)) - a) / (b - a)
        return size * (1 - t) if flip else size * t
    return f


def _roofline_svg(r: dict[str, Any]) -> str:
    import math
    pts = r["points"]
    bw = r["copy_gbs"] * 1e9 if r["copy_gbs"] else None
    peak = r["peak_tflops"]
    xs = [p["intensity"] for p in pts] + [p["intensity_after"] for p in pts if p["intensity_after"]]
    if r["ridge"]:
        xs.append(r["ridge"])
    ys = [v for p in pts for v in (p["bound"], p["bound_after"], p["achieved"]) if v]
    if peak:
        ys.append(peak)
    if not xs:
        return "<p>No module does arithmetic at this size: nothing to place on a roofline.</p>"
    x_lo = 10 ** math.floor(math.log10(min(xs)) - 0.3)
    x_hi = 10 ** math.ceil(math.log10(max(xs)) + 0.3)
    if bw:  # the memory roof is drawn up to the ridge (where the compute roof takes over)
        ys += [bw * x_lo / 1e12, bw * min(r["ridge"] or x_hi, x_hi) / 1e12]
    y_lo = 10 ** math.floor(math.log10(min(ys)))
    y_hi = 10 ** math.ceil(math.log10(max(ys)) + 0.1)
    w, h, ml, mb, mt, mr = 640, 360, 64, 40, 12, 16
    fx, fy = _log_scale(x_lo, x_hi, w - ml - mr), _log_scale(y_lo, y_hi, h - mt - mb, flip=True)
    X, Y = (lambda v: ml + fx(v)), (lambda v: mt + fy(v))
    out = [f"<svg id='roofline' xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' "
           f"viewBox='0 0 {w} {h}' role='img' aria-label='roofline'>",
           f"<rect x='{ml}' y='{mt}' width='{w - ml - mr}' height='{h - mt - mb}' class='plot'/>"]
    for e in range(round(math.log10(x_lo)), round(math.log10(x_hi)) + 1):
        x = X(10 ** e)
        out.append(f"<line x1='{x:.1f}' y1='{mt}' x2='{x:.1f}' y2='{h - mb}' class='grid'/>"
                   f"<text x='{x:.1f}' y='{h - mb + 14}' class='tick' text-anchor='middle'>{10.0 ** e:g}</text>")
    for e in range(round(math.log10(y_lo)), round(math.log10(y_hi)) + 1):
        y = Y(10 ** e)
        out.append(f"<line x1='{ml}' y1='{y:.1f}' x2='{w - mr}' y2='{y:.1f}' class='grid'/>"
                   f"<text x='{ml - 6}' y='{y + 4:.1f}' class='tick' text-anchor='end'>{10.0 ** e:g}</text>")
    out.append(f"<text x='{ml + (w - ml - mr) / 2}' y='{h - 6}' class='axis' text-anchor='middle'>"
               "arithmetic intensity (FLOP / byte moved)</text>"
               f"<text x='14' y='{mt + (h - mt - mb) / 2}' class='axis' text-anchor='middle' "
               f"transform='rotate(-90 14 {mt + (h - mt - mb) / 2})'>TFLOP/s</text>")
    # the roofs: bandwidth x intensity up to the ridge, then the matmul rate
    ridge = r["ridge"] or x_hi
    if bw:
        x_end = min(ridge, x_hi)
        out.append(f"<line x1='{X(x_lo):.1f}' y1='{Y(bw * x_lo / 1e12):.1f}' x2='{X(x_end):.1f}' "
                   f"y2='{Y(bw * x_end / 1e12):.1f}' class='roof'><title>copy bandwidth {human(bw, 'B/s')}</title></line>")
    if peak:
        out.append(f"<line x1='{X(r['ridge'] if bw else x_lo):.1f}' y1='{Y(peak):.1f}' x2='{X(x_hi):.1f}' "
                   f"y2='{Y(peak):.1f}' class='roof'><title>{_esc(r['peak_dtype'])} matmul {peak:g} TFLOP/s</title>"
                   "</line>")
    for i, p in enumerate(pts, 1):
        if p["bound"]:
            x0, y0 = X(p["intensity"]), Y(p["bound"])
            if p["intensity_after"] and p["bound_after"]:
                x1, y1 = X(p["intensity_after"]), Y(p["bound_after"])
                out.append(f"<line x1='{x0:.1f}' y1='{y0:.1f}' x2='{x1:.1f}' y2='{y1:.1f}' class='move'/>"
                           f"<circle cx='{x1:.1f}' cy='{y1:.1f}' r='4' class='pt-after'><title>{_esc(p['path'])} after "
                           f"fusion: {p['intensity_after']:.3g} FLOP/B, at best {p['bound_after']:.3g} TFLOP/s"
                           "</title></circle>")
            out.append(f"<circle cx='{x0:.1f}' cy='{y0:.1f}' r='4' class='pt'><title>{_esc(p['path'])}: "
                       f"{p['intensity']:.3g} FLOP/B, at best {p['bound']:.3g} TFLOP/s</title></circle>"
                       f"<text x='{x0 + 6:.1f}' y='{y0 - 5:.1f}' class='label'>{i}</text>")
        if p["achieved"]:
            x0, y0 = X(p["intensity"]), Y(p["achieved"])
            out.append(f"<path d='M{x0 - 4:.1f},{y0 - 4:.1f}L{x0 + 4:.1f},{y0 + 4:.1f}M{x0 - 4:.1f},{y0 + 4:.1f}"
                       f"L{x0 + 4:.1f},{y0 - 4:.1f}' class='pt-measured'><title>{_esc(p['path'])}: measured "
                       f"{p['achieved']:.3g} TFLOP/s</title></path>")
    out.append("</svg>")
    return "".join(out)


def _roofline_section(page: dict[str, Any]) -> str:
    r = page["roofline"]
    if r is None:
        return ("<h2>Roofline</h2><p class='note'>No card chosen: give <code>--card NAME</code> (a card with "
                "measured results in <code>bench/results/</code>) to place each module against its ceilings.</p>")
    roofs = []
    if r["copy_gbs"]:
        roofs.append(f"memory: {human(r['copy_gbs'] * 1e9, 'B/s')} device-to-device copy "
                     f"<span class='sub'>({_esc(r['sources'].get('copy', ''))})</span>")
    else:
        roofs.append("memory: no copy bandwidth recorded for this card")
    if r["peak_tflops"]:
        roofs.append(f"compute: {r['peak_tflops']:.4g} TFLOP/s {_esc(r['peak_dtype'])} matmul "
                     f"<span class='sub'>({_esc(r['sources'].get('matmul ' + r['peak_dtype'], ''))})</span>")
    else:
        roofs.append(f"compute: no {_esc(r['peak_dtype'])} matmul rate is recorded for {_esc(r['card'])}"
                     + (f" (recorded: {_esc(', '.join(r['other_dtypes']))})" if r["other_dtypes"] else "")
                     + "; measure it on the card with <code>python -m bench.ceilings</code>")
    parts = [f"<h2>Roofline on {_esc(r['card'])}</h2>", "<ul class='roofs'>" + "".join(f"<li>{x}</li>" for x in roofs)
             + "</ul>"]
    if r["floor_before"] is not None:
        only = "" if (r["peak_tflops"] and r["copy_gbs"]) else (
            " (one roof only: " + ("memory" if r["copy_gbs"] else "compute") + ", so a looser bound)")
        parts.append(f"<p>At these ceilings{only}, with every op its own kernel, this graph takes at least "
                     f"<b class='floor'>{_esc(human(r['floor_before'], 's'))}</b>; with the fusion below at least "
                     f"<b class='floor'>{_esc(human(r['floor_after'], 's'))}</b>.</p>")
    parts.append("<div class='roofwrap'>" + _roofline_svg(r) + "<div class='rooflegend'><p><span class='dot'></span> "
                 "module, at the best rate its ops allow (each op at its roof); <span class='dot hollow'></span> after "
                 "fusion" + ("; <b>×</b> measured" if r["measured_here"] else "") + "</p><ol>"
                 + "".join(f"<li><code>{_esc(p['path'])}</code> {p['intensity']:.3g} FLOP/B"
                           + (f" → {p['intensity_after']:.3g}" if p["intensity_after"] else "") + "</li>"
                           for p in r["points"]) + "</ol></div></div>")
    if page["profile"] is not None and not r["measured_here"]:
        parts.append(f"<p class='note'>The times were measured on {_esc(page['profile']['device'])} "
                     f"({_esc(page['profile']['timing'])}), not on {_esc(r['card'])}: they are not placed on this "
                     "roofline.</p>")
    return "".join(parts)


def _chains_section(page: dict[str, Any]) -> str:
    chains = page["chains"]
    verb = "fused" if page["mode"] == "optimized" else "will fuse"
    saved = sum(c["saved"] for c in chains)
    parts = [f"<h2>Memory-bound chains and the kernel each {verb} into</h2>"]
    if page["fusion_note"]:
        parts.append(f"<p class='note'>{_esc(page['fusion_note'])}</p>")
    parts.append(f"<p>{len(chains)} kernel{'s' if len(chains) != 1 else ''}; bytes moved "
                 f"{_esc(human(page['total']['bytes'], 'B'))} → {_esc(human(page['total']['bytes_after'], 'B'))} "
                 f"(<b>{_esc(human(saved, 'B'))} saved</b>), {page['total']['ops']} ops → "
                 f"{page['total']['ops_after']}.</p>")
    chains_that_save = [c for c in chains if c["saved"] != 0 or len(c["ops"]) > 1]
    if chains_that_save:
        rows = "".join(
            f"<tr><td><code>{_esc(c['kernel'])}</code></td><td><code>{_esc(c['module'])}</code></td>"
            f"<td class='ops'>{_esc(' → '.join(c['ops']))}"
            + (f" <span class='sub'>({c['kept']} kept for other users)</span>" if c["kept"] else "")
            + f"</td><td class='n' data-value='{c['bytes_before']}'>{_esc(human(c['bytes_before'], 'B'))}</td>"
            f"<td class='n' data-value='{c['bytes_after']}'>{_esc(human(c['bytes_after'], 'B'))}</td>"
            f"<td class='n{' worse' if c['saved'] < 0 else ''}' data-value='{c['saved']}'>"
            f"<b>{_esc(human(c['saved'], 'B'))}</b></td>"
            f"<td class='src'><code>{_esc(c['source'])}</code></td></tr>" for c in chains_that_save)
        parts.append("<table id='chains'><thead><tr><th>kernel</th><th>module</th><th>ops it replaces</th>"
                     "<th>bytes unfused</th><th>kernel bytes</th><th>saved</th><th>source</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    # one op into its own kernel (a layer norm): the same bytes, a faster kernel; listed once a kind
    singles: dict[tuple[str, str], list[str]] = {}
    for c in chains:
        if c not in chains_that_save:
            singles.setdefault((c["kernel"], c["ops"][0] if c["ops"] else ""), []).append(c["module"])
    for (kernel, op), where in singles.items():
        parts.append(f"<p class='sub'><code>{_esc(kernel)}</code> ×{len(where)}: one <code>{_esc(op)}</code> each, "
                     "the same bytes as the op it replaces (a faster kernel, no traffic saved), in "
                     + ", ".join(f"<code>{_esc(w)}</code>" for w in where) + "</p>")
    counts = page["counts"]
    if counts:
        parts.append("<p class='sub'>rules: " + ", ".join(
            f"{_esc(k)} {v['matched']} matched" + (f", {v['rejected']} rejected" if v["rejected"] else "")
            for k, v in counts.items()) + "</p>")
    return "".join(parts)


def _before_after_section(page: dict[str, Any]) -> str:
    title = "Before / after optimize" if page["mode"] == "optimized" else "Before / after the planned fusion"
    timed = page["roofline"] is not None and page["roofline"]["floor_before"] is not None
    head = ["module", "ops", "fused kernels", "bytes moved", "saved"] + (["least time at the roofs"] if timed else [])
    rows = []
    for m in page["modules"] + [{"path": "total", **page["total"], "floor_before": (page["roofline"] or {}).get(
            "floor_before"), "floor_after": (page["roofline"] or {}).get("floor_after")}]:
        saved = m["bytes"] - m["bytes_after"]
        share = f" ({100 * saved / m['bytes']:.0f}%)" if m["bytes"] else ""
        cells = [f"<code>{_esc(m['path'])}</code>" if m["path"] != "total" else "<b>total</b>",
                 f"{m['ops']} → {m['ops_after']}", str(m["kernels"]),
                 f"{_esc(human(m['bytes'], 'B'))} → {_esc(human(m['bytes_after'], 'B'))}",
                 f"{_esc(human(saved, 'B'))}{share}"]
        if timed:
            cells.append(f"{_esc(human(m['floor_before'], 's'))} → {_esc(human(m['floor_after'], 's'))}")
        rows.append("<tr>" + "".join(f"<td class='n'>{c}</td>" if i else f"<td>{c}</td>" for i, c in enumerate(cells))
                    + "</tr>")
    return (f"<h2>{title}</h2><table id='before-after'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _left_section(page: dict[str, Any]) -> str:
    parts = ["<h2>Left unfused, and why</h2>"]
    if page["unfused"]:
        rows = "".join(f"<tr><td>{_esc(u['reason'])}</td><td class='n'>{u['count']}</td>"
                       f"<td class='n' data-value='{u['bytes']}'>{_esc(human(u['bytes'], 'B'))}</td>"
                       f"<td class='sites'>{_esc(', '.join(u['sites'][:6]))}"
                       + (f", … ({len(u['sites'])} places)" if len(u["sites"]) > 6 else "") + "</td></tr>"
                       for u in page["unfused"])
        parts.append("<table id='unfused'><thead><tr><th>reason</th><th>ops</th><th>bytes</th><th>largest first</th>"
                     f"</tr></thead><tbody>{rows}</tbody></table>")
    else:
        parts.append("<p>Every reduction and element-wise op is in a kernel.</p>")
    if page["rejections"]:
        def places(r: dict[str, Any]) -> str:
            shown = "".join(f"<div><code>{_esc(p['module'])}</code> <span class='src'>{_esc(p['source'])}</span></div>"
                            for p in r["places"][:4])
            more = len(r["places"]) - 4
            return shown + (f"<div class='sub'>… and {more} more</div>" if more > 0 else "")
        rows = "".join(f"<tr><td>{_esc(r['rule'])}</td><td>{_esc(r['reason'])}</td><td class='n'>{r['count']}</td>"
                       f"<td>{places(r)}</td></tr>" for r in page["rejections"])
        parts.append("<h3>Rejected candidates</h3><table id='rejections'><thead><tr><th>rule</th><th>reason</th>"
                     f"<th>times</th><th>where</th></tr></thead><tbody>{rows}</tbody></table>")
    return "".join(parts)


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:22px auto;max-width:1180px;color:#1d1d1f;padding:0 16px}
h1{font-size:21px;margin-bottom:2px} h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:15px} code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.sub{color:#666;font-size:12px} .note{background:#fff8e1;border-left:3px solid #f0b400;padding:6px 10px}
.size{background:#eef5ff;border-left:3px solid #2f6fdf;padding:8px 12px;font-size:15px}
.summary{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.summary div{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.summary b{display:block;font-size:18px}
table{border-collapse:collapse;margin:6px 0;width:100%} td,th{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{font-weight:600;font-size:12.5px;color:#444}
table.modules td.name{width:230px} table.modules td.barcell{width:30%}
.bar{position:relative;height:14px;background:#f3f3f3;display:flex;border-radius:2px;overflow:hidden}
.seg{display:block;height:100%} .seg.time{background:#555}
.bytes{position:relative} .after{position:absolute;top:-2px;height:18px;border-left:2px solid #000}
.num{font-size:12px;color:#333;white-space:nowrap}
ul.legend{list-style:none;padding:0;margin:8px 0;display:flex;flex-wrap:wrap;gap:4px 18px}
ul.legend li{font-size:12.5px} .swatch{display:inline-block;width:11px;height:11px;margin-right:5px;vertical-align:-1px}
.after-swatch{width:0;border-left:2px solid #000;height:13px}
.sorter button{font:inherit;font-size:12px;margin-left:4px;cursor:pointer}
.sorter button.on{font-weight:700}
.roofwrap{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
#roofline .plot{fill:#fff;stroke:#999} #roofline .grid{stroke:#eee} #roofline .tick{font-size:10px;fill:#555}
#roofline .axis{font-size:11px;fill:#333} #roofline .roof{stroke:#111;stroke-width:2}
#roofline .pt{fill:#2f6fdf} #roofline .pt-after{fill:#fff;stroke:#2f6fdf;stroke-width:1.5}
#roofline .move{stroke:#2f6fdf;stroke-dasharray:3 2} #roofline .pt-measured{stroke:#d62728;stroke-width:2}
#roofline .label{font-size:10px;fill:#2f6fdf}
.rooflegend{font-size:12.5px;max-width:440px} .rooflegend ol{padding-left:22px;margin:4px 0}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;background:#2f6fdf}
.dot.hollow{background:#fff;border:1.5px solid #2f6fdf}
td.n{white-space:nowrap} td.worse{color:#b00020}
td.ops{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px} td.src{font-size:11.5px;color:#555}
td.sites{font-size:12px;color:#444}
#fc-errors{background:#fde8e8;border:1px solid #d62728;padding:6px 10px;color:#900}
pre{background:#fafafa;border:1px solid #eee;padding:10px;overflow-x:auto;font-size:12px}
"""

# first in <head>: any error later on the page is written into the page itself (the
# headless-browser test reads it from the dumped DOM), and never lost before <body> exists
_ERROR_HOOK = """
window.fcErrors=[];
function fcShowErrors(){var e=document.getElementById('fc-errors');if(!e||!window.fcErrors.length)return;
e.hidden=false;e.textContent='JavaScript errors on this page: '+window.fcErrors.join(' | ');}
window.onerror=function(msg,src,line){window.fcErrors.push(msg+' (line '+line+')');fcShowErrors();};
"""

_SCRIPT = """
(function(){
  var table=document.getElementById('modules');
  if(table){
    var body=table.tBodies[0];
    var buttons=document.querySelectorAll('.sorter button');
    function sortBy(key){
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        if(key==='order')return (+a.dataset.order)-(+b.dataset.order);
        return (+b.dataset[key])-(+a.dataset[key]);});
      rows.forEach(function(r){body.appendChild(r);});
      buttons.forEach(function(b){b.classList.toggle('on',b.dataset.sort===key);});
    }
    buttons.forEach(function(b){b.addEventListener('click',function(){sortBy(b.dataset.sort);});});
    var keys=Array.prototype.map.call(buttons,function(b){return b.dataset.sort;});
    var asked=/sort=(\\w+)/.exec(location.hash);  // e.g. report.html#sort=bytes
    sortBy(asked&&keys.indexOf(asked[1])>=0?asked[1]:'order');
  }
  fcShowErrors();
  document.body.setAttribute('data-fc-ready','1');
})();
"""


def render_html(report: "Report", depth: int | None = None, *, at: Mapping[str, int] | None = None,
                optimized: "Variant | None" = None, profile: "ProfileReport | None" = None,
                ceilings: "Ceilings | None" = None) -> str:
    """The report page as a string (see the module docstring and :func:`page_data`)."""
    page = page_data(report, depth, at=at, optimized=optimized, profile=profile, ceilings=ceilings)
    dims = ", ".join(f"{k}={v}" for k, v in page["dims"].items()) or "the example size (no named dims)"
    captured = ", ".join(f"{k}={v}" for k, v in page["captured"].items())
    at_example = page["dims"] == page["captured"]
    title = f"foldcompile: {page['model']}" + (" (optimized)" if page["mode"] == "optimized" else "")
    t = page["total"]
    summary = [("FLOPs", human(t["flops"], "FLOP")), ("bytes moved, unfused", human(t["bytes"], "B")),
               ("after fusion", human(t["bytes_after"], "B")), ("ops → after fusion", f"{t['ops']} → {t['ops_after']}"),
               ("fused kernels", str(t["kernels"]))]
    if page["profile"] is not None:
        summary.append(("measured", human(page["profile"]["ms"] * 1e-3, "s")))
    if page["roofline"] is not None and page["roofline"]["floor_before"] is not None:
        r = page["roofline"]
        one_roof = "" if (r["peak_tflops"] and r["copy_gbs"]) else " (memory roof only)" if r["copy_gbs"] else \
            " (compute roof only)"
        summary.append(("least time on " + r["card"] + one_roof,
                        f"{human(page['roofline']['floor_before'], 's')} → {human(page['roofline']['floor_after'], 's')}"))
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>{_esc(title)}</title><script>{_ERROR_HOOK}</script><style>{_STYLE}</style></head><body>",
             "<div id='fc-errors' hidden></div>",
             f"<h1>{_esc(title)}</h1>",
             f"<p class='sub'>{page['capture']['graphs']} graph, {page['capture']['leaves']} leaves "
             f"({_esc(page['capture']['tracer'])}); {_esc(page['dtype'])}; captured at {_esc(captured) or '—'}</p>",
             f"<p class='size' id='size'>Every number on this page is at <b>{_esc(dims)}</b>"
             + (" — the size the model was captured at: pass <code>--at DIM=V</code> for the sizes you run"
                if at_example and page["captured"] else "") + ".</p>",
             "<div class='summary'>" + "".join(f"<div><span class='sub'>{_esc(k)}</span><b>{_esc(v)}</b></div>"
                                               for k, v in summary) + "</div>"]
    if page["guarded"]:
        parts.append("<p class='note'>The graph's structure depends on " + "; ".join(
            f"<b>{_esc(k)}</b> ({_esc(v)})" for k, v in page["guarded"].items()) + ": it is shown at its captured value.</p>")
    if page["uncosted"]:
        parts.append("<p class='note'>Ops with no known cost (0 FLOPs counted, bytes counted): " + ", ".join(
            f"<code>{_esc(op)}</code> ×{len(nodes)}" for op, nodes in page["uncosted"].items()) + "</p>")
    parts.append(f"<h2>Where the work is (modules at depth {page['depth']})</h2>")
    parts.append(_legend())
    if page["profile"] is not None:
        p = page["profile"]
        parts.append(f"<p class='sub'>time: {_esc(p['timing'])} on {_esc(p['device'])}, median of {p['reps']} runs"
                     + (" — CPU wall-clock, not GPU kernel time" if p["timing"] == "cpu_wall" else "") + "</p>")
    parts.append(_module_rows(page))
    parts.append(_roofline_section(page))
    parts.append(_before_after_section(page))
    parts.append(_chains_section(page))
    parts.append(_left_section(page))
    code_title = "the optimized graph" if page["mode"] == "optimized" else "the graph optimize would run at this size"
    parts.append(f"<h2>Code</h2><details><summary>{code_title}, as Python</summary><pre>{_esc(page['code'])}</pre>"
                 "</details>")
    parts.append(f"<script type='application/json' id='fc-data'>{_json_for_script(page)}</script>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _json_for_script(page: dict[str, Any]) -> str:
    """The page's numbers as JSON inside a <script> element (``</`` escaped)."""
    data = {k: v for k, v in page.items() if k != "code"}
    return json.dumps(data, default=str).replace("</", "<\\/")


def write_html(path: str, report: "Report", depth: int | None = None, **options: Any) -> str:
    """Write :func:`render_html` to ``path``; returns ``path``."""
    text = render_html(report, depth, **options)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
