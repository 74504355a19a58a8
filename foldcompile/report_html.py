"""The picture of an ``explain`` report: one self-contained HTML page (inline SVG, a few lines of JS).

``render_html(report, depth)`` returns the page; ``Report.to_html(path)`` writes it. It shows

- the class table and the module table (cut to ``depth``), each with a bar of its class mix;
- the graph collapsed by module: the nodes in execution order grouped into contiguous runs of
  the same module path at ``depth`` (a module called twice, as in recycling, gives two boxes),
  each box with its class mix, FLOPs, bytes and where its inputs come from; a click on a box
  expands it into its own nodes, laid out as a layered dataflow graph coloured by op class;
- the whole node graph in one picture when it has at most ``full_graph_limit`` nodes.

Nothing is fetched from the network: styles, script and pictures are inline. Parameters and
buffers (``get_attr`` nodes) are left out of the pictures; they are inputs, not work.
"""
from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, Sequence

import torch.fx

from foldcompile.passes.registry import OP_CLASSES, op_name
from foldcompile.tables import cut_path

if TYPE_CHECKING:  # for the annotation only: this module never imports explain at run time
    from foldcompile.explain import Report

__all__ = ["render_html", "CLASS_COLORS", "module_runs", "svg_graph"]

CLASS_COLORS = {
    "GEMM": "#d62728", "REDUCTION": "#1f77b4", "ELEMENTWISE": "#2ca02c", "LAYOUT": "#9a9a9a",
    "COMM": "#9467bd", "OTHER": "#ff7f0e", "INPUT": "#ffffff", "OUTPUT": "#333333",
}
_NODE_W, _NODE_H, _GAP_X, _GAP_Y = 104, 22, 12, 26


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _run_key(n: torch.fx.Node, depth: int) -> str | None:
    if n.op == "get_attr":
        return None
    if n.op == "placeholder":
        return "(inputs)"
    if n.op == "output":
        return "(output)"
    return cut_path(str(n.meta.get("module_path") or ""), depth)


def module_runs(gm: torch.fx.GraphModule, depth: int) -> list[dict[str, Any]]:
    """The graph's nodes (parameters left out) in execution order, grouped into contiguous runs of
    one module path cut to ``depth``: ``[{"key", "label", "nodes": [Node], "sources": {label: edges}}]``."""
    runs: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    run_of: dict[torch.fx.Node, int] = {}
    for n in gm.graph.nodes:
        key = _run_key(n, depth)
        if key is None:
            continue
        if not runs or runs[-1]["key"] != key:
            seen[key] = seen.get(key, 0) + 1
            label = key if seen[key] == 1 else f"{key} #{seen[key]}"
            runs.append({"key": key, "label": label, "nodes": [], "sources": {}})
        runs[-1]["nodes"].append(n)
        run_of[n] = len(runs) - 1
    for i, run in enumerate(runs):
        for n in run["nodes"]:
            for a in n.all_input_nodes:
                j = run_of.get(a)
                if j is not None and j != i:
                    src = runs[j]["label"]
                    run["sources"][src] = run["sources"].get(src, 0) + 1
    return runs


def _tooltip(n: torch.fx.Node, costs: dict[str, tuple[int, int]]) -> str:
    cls = n.meta.get("op_class", "?")
    parts = [f"{n.name} = {op_name(n) if n.op not in ('placeholder', 'output') else n.op}", f"class {cls}"]
    if n.meta.get("module_path"):
        parts.append(f"module {n.meta['module_path']}")
    if n.meta.get("sym_shape") is not None:
        parts.append(f"shape {n.meta['sym_shape']}  {n.meta.get('shape')}")
    if n.meta.get("einsum"):
        parts.append(f"einsum {n.meta['einsum']}")
    if n.name in costs:
        f, b = costs[n.name]
        parts.append(f"{f / 1e6:.4g} MFLOP, {b / 1e6:.4g} MB")
    return "\n".join(parts)


def svg_graph(nodes: Sequence[torch.fx.Node], costs: dict[str, tuple[int, int]]) -> str:
    """A layered dataflow picture of ``nodes`` (edges among them only), coloured by op class.

    A node's layer is one below its deepest producer in the set; within a layer nodes keep
    execution order. Hover a node for its name, op, module, shapes and cost.
    """
    index = {n: i for i, n in enumerate(nodes)}
    layer: dict[torch.fx.Node, int] = {}
    for n in nodes:
        preds = [layer[a] for a in n.all_input_nodes if a in index]
        layer[n] = 1 + max(preds) if preds else 0
    rows: dict[int, list[torch.fx.Node]] = {}
    for n in nodes:
        rows.setdefault(layer[n], []).append(n)
    pos: dict[torch.fx.Node, tuple[int, int]] = {}
    for lyr, ns in rows.items():
        for col, n in enumerate(ns):
            pos[n] = (8 + col * (_NODE_W + _GAP_X), 8 + lyr * (_NODE_H + _GAP_Y))
    width = 16 + max((len(ns) for ns in rows.values()), default=1) * (_NODE_W + _GAP_X)
    height = 16 + (max(rows, default=0) + 1) * (_NODE_H + _GAP_Y)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="graph">']
    for n in nodes:
        x2, y2 = pos[n]
        for a in n.all_input_nodes:
            if a in pos:
                x1, y1 = pos[a]
                sx, sy, ex, ey = x1 + _NODE_W / 2, y1 + _NODE_H, x2 + _NODE_W / 2, y2
                my = (sy + ey) / 2
                out.append(f'<path d="M{sx:.0f},{sy:.0f} C{sx:.0f},{my:.0f} {ex:.0f},{my:.0f} {ex:.0f},{ey:.0f}" '
                           'class="edge"/>')
    for n in nodes:
        x, y = pos[n]
        cls = n.meta.get("op_class", "OTHER")
        fill = CLASS_COLORS.get(cls, "#cccccc")
        label = n.name if n.op in ("placeholder", "output") else op_name(n)
        label = label if len(label) <= 14 else label[:13] + "…"
        text_fill = "#000" if cls in ("INPUT", "LAYOUT") else "#fff"
        out.append(f'<g class="node" data-class="{_esc(cls)}"><title>{_esc(_tooltip(n, costs))}</title>'
                   f'<rect x="{x}" y="{y}" width="{_NODE_W}" height="{_NODE_H}" rx="4" fill="{fill}" '
                   f'stroke="#333" stroke-width="0.6"/>'
                   f'<text x="{x + _NODE_W / 2}" y="{y + 15}" text-anchor="middle" fill="{text_fill}">'
                   f'{_esc(label)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def _mix_bar(counts: dict[str, int], width: int = 180, height: int = 12) -> str:
    total = sum(counts.values())
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="mix">']
    x = 0.0
    for cls in OP_CLASSES:
        c = counts.get(cls, 0)
        if not c or not total:
            continue
        w = width * c / total
        out.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{CLASS_COLORS[cls]}">'
                   f'<title>{cls}: {c} nodes</title></rect>')
        x += w
    out.append("</svg>")
    return "".join(out)


def _num(x: float, unit: str) -> str:
    return f"{x:.4g} {unit}" if x else f"0 {unit}"


_STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:18px;color:#222}
h1{font-size:19px} h2{font-size:16px;margin-top:26px}
table{border-collapse:collapse;margin:6px 0} td,th{padding:2px 9px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #555;border-radius:3px}
.run{border:1px solid #999;border-radius:5px;margin:5px 0;padding:4px 8px;background:#fafafa}
.run>.head{cursor:pointer;display:flex;gap:14px;align-items:center}
.run>.head .name{font-weight:600;min-width:260px;font-family:monospace}
.run .src{color:#666;font-size:12px}
.run>.body{display:none;overflow-x:auto;margin-top:6px}
.run.open>.body{display:block}
.graph text{font:10px monospace;pointer-events:none}
.graph .edge{fill:none;stroke:#777;stroke-width:0.8}
.scroll{overflow:auto;max-height:900px;border:1px solid #ccc}
code,pre{font-family:monospace}
"""

_SCRIPT = """
function toggle(id){document.getElementById(id).classList.toggle('open')}
function setAll(open){document.querySelectorAll('.run').forEach(function(r){
  if(open){r.classList.add('open')}else{r.classList.remove('open')}})}
"""


def render_html(report: "Report", depth: int, full_graph_limit: int = 400) -> str:
    """The report page as a string (see the module docstring)."""
    gm = report.graph_module
    d = report.cost(depth=depth)
    costs = {name: (f, b) for name, _, _, f, b in report.node_costs()}
    cap = report.capture
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>foldcompile explain: {_esc(report.model_name)}</title>",
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>foldcompile explain: {_esc(report.model_name)}</h1>",
             f"<p>capture: {_esc(cap.get('graphs'))} graph(s), {_esc(cap.get('leaves'))} leaves, tracer "
             f"{_esc(cap.get('tracer'))}; dims: " +
             ", ".join(f"{_esc(k)}={v}" for k, v in report.dims.items()) + "</p>"]
    if report.guarded_dims:
        parts.append("<p>guarded dims (costs at other values refused): " +
                     "; ".join(f"<b>{_esc(k)}</b>: {_esc(v)}" for k, v in report.guarded_dims.items()) + "</p>")
    parts.append("<p class='legend'>" + "".join(
        f"<span style='background:{CLASS_COLORS[c]};color:{'#000' if c in ('LAYOUT', 'INPUT') else '#fff'}'>"
        f"{c}</span>" for c in (*OP_CLASSES, "INPUT", "OUTPUT")) + "</p>")

    # tables
    parts.append("<h2>By op class</h2><table><tr><th>op class</th><th>nodes</th><th>GFLOP</th><th>MB</th>"
                 "<th>FLOP/byte</th></tr>")
    for cls, e in list(d["classes"].items()) + [("total", d["total"])]:
        swatch = (f"<span style='display:inline-block;width:10px;height:10px;background:{CLASS_COLORS[cls]};"
                  f"border:1px solid #555'></span> " if cls in CLASS_COLORS else "")
        parts.append(f"<tr class='cls-row'><td>{swatch}{_esc(cls)}</td><td>{e['count']}</td>"
                     f"<td>{e['flops'] / 1e9:.4g}</td><td>{e['bytes'] / 1e6:.4g}</td>"
                     f"<td>{e['intensity']:.3g}</td></tr>")
    parts.append("</table>")
    parts.append(f"<h2>By module (depth {depth})</h2><table><tr><th>module</th><th>nodes</th><th>GFLOP</th>"
                 "<th>MB</th><th>FLOP/byte</th><th>class mix (nodes)</th></tr>")
    for path, cs in d["modules"].items():
        n = sum(e["count"] for e in cs.values())
        f = sum(e["flops"] for e in cs.values())
        b = sum(e["bytes"] for e in cs.values())
        parts.append(f"<tr><td><code>{_esc(path)}</code></td><td>{n}</td><td>{f / 1e9:.4g}</td>"
                     f"<td>{b / 1e6:.4g}</td><td>{(f / b if b else 0):.3g}</td>"
                     f"<td>{_mix_bar({c: e['count'] for c, e in cs.items()})}</td></tr>")
    parts.append("</table>")

    # graph collapsed by module
    runs = module_runs(gm, depth)
    parts.append(f"<h2>Graph by module (depth {depth}, execution order)</h2>"
                 "<p>Click a box to expand it into its nodes; hover a node for its shapes and cost. "
                 "<button onclick='setAll(true)'>expand all</button> "
                 "<button onclick='setAll(false)'>collapse all</button></p>")
    for i, run in enumerate(runs):
        counts: dict[str, int] = {}
        f = b = 0
        for n in run["nodes"]:
            cls = n.meta.get("op_class", "OTHER")
            counts[cls] = counts.get(cls, 0) + 1
            nf, nb = costs.get(n.name, (0, 0))
            f, b = f + nf, b + nb
        src = ", ".join(f"{_esc(k)} ({v})" for k, v in run["sources"].items()) or "—"
        parts.append(
            f"<div class='run' id='run{i}'><div class='head' onclick=\"toggle('run{i}')\">"
            f"<span class='name'>{_esc(run['label'])}</span>{_mix_bar(counts)}"
            f"<span>{len(run['nodes'])} nodes, {_num(f / 1e6, 'MFLOP')}, {_num(b / 1e6, 'MB')}</span>"
            f"<span class='src'>from: {src}</span></div>"
            f"<div class='body'>{svg_graph(run['nodes'], costs)}</div></div>")

    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    if len(nodes) <= full_graph_limit:
        parts.append(f"<h2>Whole graph ({len(nodes)} nodes)</h2><div class='scroll'>{svg_graph(nodes, costs)}</div>")
    else:
        parts.append(f"<h2>Whole graph</h2><p>{len(nodes)} nodes: too many for one picture "
                     f"(limit {full_graph_limit}); expand the module boxes above.</p>")
    parts.append("<h2>Code</h2><details><summary>the classified graph as Python</summary><pre>" +
                 _esc(report.code) + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
