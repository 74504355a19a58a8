"""The cost model: which class each op belongs to, and its FLOPs and bytes as sympy expressions.

The facts per op — class, FLOPs per element, matrix product or not, views, creation — are its
entry in the op registry (:mod:`foldcompile.passes.registry`); this module applies them, per
node, in the symbolic sizes written by ``shape_prop_pass``:

GEMM (linear, matmul, ``@``, bmm, mm, addmm, baddbmm, einsum with a contracted index,
scaled_dot_product_attention)
    Every product is an einsum equation (``meta["einsum"]``, :mod:`foldcompile.passes.einsum`); its FLOPs are
    ``2 × the product of all index sizes`` (2·M·N·K for a matrix product), summed over the
    pairwise products of an einsum with more than two operands (contracted left to right).
    This counts the products only, as ``torch.utils.flop_counter.FlopCounterMode`` does: the
    bias of ``linear``/``addmm`` is *not* in ``flops``; it is reported apart as
    ``cost["bias_flops"]`` (rows × out).
REDUCTION (softmax, layer_norm, sum, mean, max over a dim, var, ...)
    FLOPs per input element: softmax/log_softmax 5 (max, subtract, exp, sum, divide),
    layer_norm 8 (mean, centre, square, sum, scale by rstd, affine mul and add, + 1 for the
    statistics), rms_norm and normalize 4, var/std 3, logsumexp 4, norm 2, others 1.
ELEMENTWISE
    1 FLOP per output element for arithmetic (add, mul, sigmoid, exp, where, masked_fill,
    dropout, ...: a transcendental counts as one); 0 for dtype conversions, copies and
    tensor creation (they only move bytes).
LAYOUT (view, permute, getitem, cat, pad, ...), COMM (collectives)
    0 FLOPs.
OTHER (anything without a registry entry)
    0 FLOPs, bytes counted as for any op; ``classify_pass`` lists them in its record
    (``other`` and ``uncosted``) and ``explain`` prints them.

Bytes moved = element size × numel, summed over every tensor input (parameters included)
and every output. Ops that return a view of their input (``meta["aliases_input"]``, e.g.
``view``, ``permute``, basic slicing) move 0 bytes; a getitem picking one tensor out of
a tuple moves 0 bytes.

Nodes that compute only Python integers (``x.shape[0] // 2``) are classed LAYOUT with zero
cost. Placeholders and get_attr nodes are classed ``INPUT`` and the output node ``OUTPUT``,
both with zero cost; totals leave them out.

Example (the totals of a classified graph, symbolic and evaluated at other sizes)::

    >>> from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
    >>> gm = normalize_pass(torch.fx.symbolic_trace(lambda a, b: torch.matmul(a, b).relu())).graph_module
    >>> _ = shape_prop_pass(gm, (torch.randn(3, 5), torch.randn(5, 7)), dims={"M": 3, "K": 5, "N": 7})
    >>> _ = classify_pass(gm)
    >>> totals = cost_totals(gm)
    >>> totals.total()
    {'count': 2, 'flops': 2*K*M*N + M*N, 'bytes': 4*K*M + 4*K*N + 12*M*N}
    >>> totals.evaluate(M=64, K=32, N=16)["classes"]["GEMM"]
    {'count': 1, 'flops': 65536, 'bytes': 14336, 'intensity': 4.571428571428571}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import sympy
import torch
import torch.fx

from foldcompile.passes.base import PassError
from foldcompile.passes.einsum import contractions_of, gemm_operands
from foldcompile.passes.meta import DTYPE, MULTI_OUTPUT, SHAPE, SYM_SHAPE, SYM_VALUE, ALIASES_INPUT
from foldcompile.passes.registry import (COMM, ELEMENTWISE, GEMM, LAYOUT, OP_CLASSES, OTHER, REDUCTION, OpEntry,
                                         entry_of)
from foldcompile.passes.shape_prop import dim_symbol, numel_expr

__all__ = ["OP_CLASSES", "op_class_of", "mask_only_nodes", "mask_inputs", "node_cost", "CostTotals", "cost_totals"]


def _is_tensor_node(n: Any) -> bool:
    return isinstance(n, torch.fx.Node) and n.meta.get(SYM_SHAPE) is not None and not n.meta.get(MULTI_OUTPUT)


def op_class_of(node: torch.fx.Node, mask_only: bool = False) -> str:
    """The op class of one node, from its registry entry (needs ``shape_prop_pass`` meta to tell
    tensor from integer ops); an op without an entry is OTHER.

    ``mask_only``: the node reads only mask values (see ``mask_only_nodes``); a matrix product of
    masks is a count of unmasked pairs, classed REDUCTION, not GEMM."""
    if node.op in ("placeholder", "get_attr"):
        return "INPUT"
    if node.op == "output":
        return "OUTPUT"
    entry = entry_of(node)
    if entry is None:
        return OTHER
    if entry.op_class == COMM:
        return COMM
    if node.meta.get(SHAPE) is None and SYM_VALUE in node.meta:
        return LAYOUT  # Python-integer shape arithmetic
    cls = entry.class_of(node, mask_only)
    if cls == ELEMENTWISE and node.meta.get(SHAPE) is None and not node.meta.get(MULTI_OUTPUT):
        return LAYOUT  # Python-number arithmetic on non-shape values
    return cls


def _bytes_of(sym_shape: Iterable, dtype: torch.dtype) -> sympy.Expr:
    return numel_expr(tuple(sym_shape)) * dtype.itemsize


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    seen: list[torch.fx.Node] = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            if _is_tensor_node(a) and a not in seen:
                seen.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)
    visit(node.args)
    visit(node.kwargs)
    return seen


def _tensor_inputs_of(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if a.meta.get(SHAPE) is not None or a.meta.get(MULTI_OUTPUT)]


def mask_inputs(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The graph inputs used as masks, recognised by how they are used, not by their names.

    *Mask-valued* nodes are the candidate inputs and what layout and element-wise ops make of
    them alone (``mask[:, None]``, ``mask.to(x.dtype)``, ``(mask - 1) * 1e9``, ``m1 * m2``). An
    input is a mask when (1) every mask-valued node made from it is consumed only by element-wise
    or layout ops, by reductions of mask values (``mask.sum(-1)``) or by products of mask values
    (``einsum("si,sj->ij", mask, mask)``) — never by a normalisation, a softmax of features or a
    product with features — and (2) at least one element-wise use applies it to a value that is
    not mask-valued (``x * mask``, ``logits + bias``, ``masked_fill(x, mask == 0, ...)``). Model
    activations fail (1): they meet a layer norm or a projection; the two plain inputs of a
    matmul fail (2).
    """
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get(SHAPE) is not None]
    candidates = set(inputs)
    while True:
        sources: dict[torch.fx.Node, set[torch.fx.Node]] = {p: {p} for p in candidates}
        for n in gm.graph.nodes:
            if n.op not in ("call_function", "call_method") or n.meta.get(SHAPE) is None:
                continue
            entry = entry_of(n)
            ins = _tensor_inputs_of(n)
            if entry is not None and entry.op_class in (LAYOUT, ELEMENTWISE) and not entry.creation and ins \
                    and all(a in sources for a in ins):
                sources[n] = set().union(*(sources[a] for a in ins))
        bad: set[torch.fx.Node] = set()
        applied: set[torch.fx.Node] = set()
        for n, src in sources.items():
            for user in n.users:
                if user in sources or user.op == "output":
                    continue
                if user.meta.get(SHAPE) is None and not user.meta.get(MULTI_OUTPUT):
                    continue  # a size query (mask.shape[0]): not a use of the values
                entry = entry_of(user)
                cls = entry.op_class if entry is not None else OTHER
                all_masks = all(a in sources for a in _tensor_inputs_of(user))
                if cls == ELEMENTWISE:
                    applied |= src  # not all inputs mask-valued, or the user would be in sources
                elif cls == LAYOUT or (all_masks and (cls == REDUCTION or (entry is not None and entry.gemm))):
                    continue  # moved, counted (mask.sum(-1)) or a product of masks
                else:
                    bad |= src
        kept = candidates - bad
        if kept == candidates:
            return {c for c in kept if c in applied}
        candidates = kept


def mask_only_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose tensor *values* come only from mask inputs and constants.

    Sources: the inputs :func:`mask_inputs` finds and creation ops (``new_ones``, ``torch.ones``,
    ``zeros_like``, ...: registry entries with ``creation``, whose values never depend on their
    input's values). A node is mask-only when every tensor it reads is mask-only (parameters and
    other inputs are not). Used to tell AlphaFold's mask normalisers (``einsum("si,sj->ij", mask,
    mask)``: the count of unmasked sequence pairs in the outer product mean) from model GEMMs.
    """
    out: set[torch.fx.Node] = set(mask_inputs(gm))
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            entry = entry_of(n)
            if entry is not None and entry.creation:
                out.add(n)
                continue
            tensors = [a for a in n.all_input_nodes if a.meta.get(SHAPE) is not None]
            if tensors and all(a in out for a in tensors):
                out.add(n)
    return out


def _has_bias(node: torch.fx.Node, entry: OpEntry) -> bool:
    if entry.name in ("addmm", "baddbmm"):
        return True
    return entry.name == "linear" and ((len(node.args) > 2 and node.args[2] is not None)
                                       or node.kwargs.get("bias") is not None)


def _product_flops(node: torch.fx.Node) -> sympy.Expr:
    cons, sizes = contractions_of(node)
    return sympy.Add(*[c.flops(sizes) for c in cons])


def node_cost(node: torch.fx.Node, op_class: str) -> dict[str, sympy.Expr]:
    """``{"flops": expr, "bytes": expr}``, plus ``bias_flops`` for a biased linear/addmm and
    ``product_flops`` (the 2·M·N·K count FlopCounterMode makes, from ``meta["einsum"]``) for
    every op whose entry is a matrix product (``gemm``) and that contracts a letter."""
    zero = sympy.Integer(0)
    if op_class in ("INPUT", "OUTPUT") or (node.meta.get(SHAPE) is None and SYM_VALUE in node.meta):
        return {"flops": zero, "bytes": zero}
    entry = entry_of(node)
    # bytes
    if op_class == LAYOUT and (node.meta.get(ALIASES_INPUT) or (entry is not None and entry.views) or
                               (entry is not None and entry.name == "getitem"
                                and node.args[0].meta.get(MULTI_OUTPUT))):
        nbytes = zero
    else:
        nbytes = zero
        for a in _tensor_inputs(node):
            nbytes += _bytes_of(a.meta[SYM_SHAPE], a.meta[DTYPE])
        if node.meta.get(MULTI_OUTPUT):
            for s, d in zip(node.meta[SYM_SHAPE], node.meta[DTYPE]):
                nbytes += _bytes_of(s, d)
        elif node.meta.get(SYM_SHAPE) is not None:
            nbytes += _bytes_of(node.meta[SYM_SHAPE], node.meta[DTYPE])
    cost = {"flops": zero, "bytes": sympy.expand(nbytes)}
    if entry is None:
        return cost
    out_numel = numel_expr(node.meta[SYM_SHAPE]) if _is_tensor_node(node) else zero
    if entry.gemm and (op_class == GEMM or entry.name != "einsum" or _contracts(node)):
        cost["product_flops"] = sympy.expand(_product_flops(node))
    if op_class == GEMM:
        cost["flops"] = cost["product_flops"]
        if _has_bias(node, entry):
            cost["bias_flops"] = sympy.expand(out_numel)
    elif op_class == REDUCTION and "product_flops" in cost:  # a mask-only product
        cost["flops"] = cost["product_flops"]
    elif op_class == REDUCTION:
        src = node.args[0] if node.args and _is_tensor_node(node.args[0]) else None
        if entry.name == "einsum":
            src = gemm_operands(node)[0]
        in_numel = numel_expr(src.meta[SYM_SHAPE]) if src is not None else out_numel
        cost["flops"] = sympy.expand(entry.flops_per_element * in_numel)
    elif op_class == ELEMENTWISE:
        # an element-wise max(a, b) or an outer-product einsum: one op per output element
        per = 1 if entry.op_class != ELEMENTWISE else entry.flops_per_element
        cost["flops"] = sympy.expand(per * out_numel)
    return cost


def _contracts(node: torch.fx.Node) -> bool:
    ops = gemm_operands(node)
    if len(ops) < 2:
        return False
    cons, _ = contractions_of(node)
    return bool(cons[0].contracted)


def uncosted(node: torch.fx.Node) -> bool:
    """A node whose FLOPs the cost model does not know (an op without a registry entry)."""
    return node.op in ("call_function", "call_method") and entry_of(node) is None


# ----------------------------------------------------------------------------------------------
# totals


@dataclass
class CostTotals:
    """Costs summed per op class and per source module, symbolic, evaluable at any size.

    ``rows`` holds one ``(node name, op class, module path, flops, bytes)`` per classified
    node. ``dims`` are the example sizes the graph was captured at; ``guarded_dims`` the dims
    the graph's structure depends on (from ``gm.meta["guarded_dims"]``): ``evaluate``
    refuses other values for those.
    """

    rows: list[tuple[str, str, str, sympy.Expr, sympy.Expr]]
    dims: dict[str, int] = field(default_factory=dict)
    guarded_dims: frozenset[str] = frozenset()

    @staticmethod
    def _sum(rows) -> dict[str, Any]:
        flops = sympy.expand(sympy.Add(*[r[3] for r in rows])) if rows else sympy.Integer(0)
        nbytes = sympy.expand(sympy.Add(*[r[4] for r in rows])) if rows else sympy.Integer(0)
        return {"count": len(rows), "flops": flops, "bytes": nbytes}

    def by_class(self) -> dict[str, dict[str, Any]]:
        """``{class: {"count", "flops", "bytes"}}`` with sympy flops and bytes (every class listed)."""
        return {c: self._sum([r for r in self.rows if r[1] == c]) for c in OP_CLASSES}

    def by_module(self, depth: int | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """``{module path: {class: {"count", "flops", "bytes"}}}``; with ``depth`` the paths are cut to
        their first ``depth`` components (``blocks.0.tri_att_start.linear_q`` -> ``blocks.0`` at 2)."""
        groups: dict[str, list] = {}
        for r in self.rows:
            path = r[2] if depth is None else ".".join(r[2].split(".")[:depth]) if r[2] else ""
            groups.setdefault(path, []).append(r)
        return {p: {c: self._sum([r for r in rs if r[1] == c]) for c in OP_CLASSES if any(r[1] == c for r in rs)}
                for p, rs in groups.items()}

    def module(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Per-class totals of the nodes under one module path prefix (``"blocks.0.tri_att_start"``)."""
        rows = [r for r in self.rows if r[2] == prefix or r[2].startswith(prefix + ".") or prefix == ""]
        return {c: self._sum([r for r in rows if r[1] == c]) for c in OP_CLASSES}

    def total(self) -> dict[str, Any]:
        """All classified nodes together."""
        return self._sum(self.rows)

    def _subs(self, sizes: Mapping[str, int]) -> dict[sympy.Symbol, int]:
        unknown = set(sizes) - set(self.dims)
        if unknown:
            raise PassError(f"unknown dims {sorted(unknown)}; this graph's dims are {sorted(self.dims)}")
        for name, v in sizes.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PassError(f"{name} must be a positive int, got {v!r}")
            if name in self.guarded_dims and v != self.dims[name]:
                raise PassError(f"the graph's structure depends on {name} (captured at {name}={self.dims[name]}); "
                                f"its cost at {name}={v} needs a capture at that size")
        full = {**self.dims, **sizes}
        return {dim_symbol(k): v for k, v in full.items()}

    def evaluate(self, **sizes: int) -> dict[str, Any]:
        """Numeric totals at other sizes (dims not given keep their captured value)::

            {"classes": {CLASS: {"count", "flops", "bytes", "intensity"}},
             "modules": {path: {CLASS: {...}}}, "total": {...}, "dims": {...}}

        ``intensity`` is flops per byte (0 where no bytes move).
        """
        subs = self._subs(sizes)

        def num(d: dict[str, Any]) -> dict[str, Any]:
            f = int(sympy.sympify(d["flops"]).subs(subs))
            b = int(sympy.sympify(d["bytes"]).subs(subs))
            return {"count": d["count"], "flops": f, "bytes": b, "intensity": (f / b) if b else 0.0}

        return {
            "dims": {str(k): v for k, v in subs.items()},
            "classes": {c: num(d) for c, d in self.by_class().items()},
            "modules": {p: {c: num(d) for c, d in cs.items()} for p, cs in self.by_module().items()},
            "total": num(self.total()),
        }


def cost_totals(gm: torch.fx.GraphModule) -> CostTotals:
    """Collect the per-node costs written by ``classify_pass`` into a ``CostTotals``."""
    rows = []
    for n in gm.graph.nodes:
        cls = n.meta.get("op_class")
        if cls in ("INPUT", "OUTPUT"):
            continue
        if cls is None or "cost" not in n.meta:
            raise PassError(f"node {n.name!r} has no op_class/cost: run classify_pass first")
        rows.append((n.name, cls, str(n.meta.get("module_path") or ""), n.meta["cost"]["flops"],
                     n.meta["cost"]["bytes"]))
    dims = dict(gm.meta.get("dims", {}))
    guarded = set(gm.meta.get("guarded_dims") or ())
    if gm.meta.get("shape_fallbacks"):  # some sizes were matched by value: none may move
        guarded |= set(dims)
    return CostTotals(rows, dims, frozenset(guarded))
