"""The cost model: which class each op belongs to, and its FLOPs and bytes as sympy expressions.

Rules (per node, in the symbolic sizes written by ``shape_prop_pass``):

GEMM (linear, matmul, ``@``, bmm, mm, addmm, baddbmm, einsum with a contracted index,
scaled_dot_product_attention)
    Every product is written as an einsum equation (``gemm_equation``); its FLOPs are
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
OTHER (anything unknown)
    0 FLOPs, bytes counted as for any op; ``classify_pass`` lists them in its record.

Bytes moved = element size × numel, summed over every tensor input (parameters included)
and every output. Ops that return a view of their input (``meta["aliases_input"]``, e.g.
``view``, ``permute``, basic slicing) move 0 bytes; a getitem picking one tensor out of
a tuple moves 0 bytes.

Nodes that compute only Python integers (``x.shape[0] // 2``) are classed LAYOUT with zero
cost. Placeholders and get_attr nodes are classed ``INPUT`` and the output node ``OUTPUT``,
both with zero cost; totals leave them out.

Example (the totals of a classified graph, symbolic and evaluated at other sizes)::

    >>> from foldcompile.passes import classify_pass, shape_prop_pass
    >>> gm = torch.fx.symbolic_trace(lambda a, b: torch.matmul(a, b).relu())
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
from foldcompile.passes.shape_prop import (dim_symbol, einsum_operands, module_of, numel_expr, op_name,
                                           parse_einsum)

__all__ = ["OP_CLASSES", "op_class_of", "mask_only_nodes", "node_cost", "gemm_equation", "einsum_flops",
           "CostTotals", "cost_totals"]

OP_CLASSES = ("GEMM", "REDUCTION", "ELEMENTWISE", "LAYOUT", "COMM", "OTHER")

_GEMM = {"linear", "matmul", "bmm", "mm", "addmm", "baddbmm", "einsum", "scaled_dot_product_attention"}
_REDUCTION_FLOPS = {
    "softmax": 5, "log_softmax": 5, "_softmax": 5, "layer_norm": 8, "group_norm": 8, "rms_norm": 4,
    "normalize": 4, "var": 3, "std": 3, "logsumexp": 4, "norm": 2, "sum": 1, "mean": 1, "amax": 1,
    "amin": 1, "max": 1, "min": 1, "prod": 1, "all": 1, "any": 1, "argmax": 1, "argmin": 1,
    "nansum": 1, "cumsum": 1, "cumprod": 1, "linalg_vector_norm": 2,
}
_ELEMENTWISE_ARITH = set("""add sub mul div truediv floordiv mod neg pow rsub true_divide abs exp log log1p
 sqrt rsqrt sigmoid tanh relu relu_ gelu silu elu leaky_relu softplus erf sin cos reciprocal square clamp
 clamp_min clamp_max where masked_fill lt le gt ge eq ne logical_and logical_or logical_not and_ or_
 invert maximum minimum dropout dropout_ alpha_dropout feature_alpha_dropout sign floor ceil round trunc
 sub_ add_ mul_ div_ iadd imul isub itruediv bitwise_and bitwise_or bitwise_not logsigmoid nan_to_num
 masked_fill_ lerp addcmul addcdiv hardtanh threshold bernoulli""".split())
_ELEMENTWISE_MOVE = set("""float half double bfloat16 int long bool to type type_as cpu cuda fill_ zero_
 copy_ zeros ones empty full rand randn new_zeros new_ones new_empty new_full zeros_like ones_like
 empty_like full_like rand_like randn_like arange requires_grad_ one_hot eye linspace tensor""".split())
_LAYOUT = set("""view reshape view_as reshape_as expand expand_as flatten unflatten permute transpose
 swapaxes swapdims t movedim moveaxis unsqueeze squeeze getitem cat concat concatenate stack split chunk
 unbind select narrow pad repeat contiguous clone detach tril triu flip roll size getattr dim numel""".split())
_COMM_WORDS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce", "broadcast_", "collective")


def _is_tensor_node(n: Any) -> bool:
    return isinstance(n, torch.fx.Node) and n.meta.get("sym_shape") is not None and not n.meta.get("multi_output")


def op_class_of(node: torch.fx.Node, mask_only: bool = False) -> str:
    """The op class of one node (needs ``shape_prop_pass`` meta to tell tensor from integer ops).

    ``mask_only``: the node reads only mask values (see ``mask_only_nodes``); a matrix product of
    masks is a count of unmasked pairs, classed REDUCTION, not GEMM."""
    if node.op in ("placeholder", "get_attr"):
        return "INPUT"
    if node.op == "output":
        return "OUTPUT"
    name = op_name(node)
    if any(w in name for w in _COMM_WORDS):
        return "COMM"
    if node.meta.get("shape") is None and "sym_value" in node.meta:
        return "LAYOUT"  # Python-integer shape arithmetic
    if name in ("max", "min") and len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node) \
            and node.args[1].meta.get("shape") is not None:
        return "ELEMENTWISE"  # torch.max(a, b)
    if name == "einsum":
        eq, ops = einsum_operands(node.args)
        if len(ops) >= 2:
            return ("REDUCTION" if mask_only else "GEMM") if _einsum_contracts(node) else "ELEMENTWISE"
        terms, rhs = parse_einsum(eq, [len(o.meta["shape"]) for o in ops])
        return "REDUCTION" if set(terms[0]) - set(rhs) else "LAYOUT"
    if name in _GEMM:
        return "REDUCTION" if mask_only else "GEMM"
    if name in _REDUCTION_FLOPS:
        return "REDUCTION"
    if name in _ELEMENTWISE_ARITH or name in _ELEMENTWISE_MOVE:
        if node.meta.get("shape") is None and not node.meta.get("multi_output"):
            return "LAYOUT"  # Python-number arithmetic on non-shape values
        return "ELEMENTWISE"
    if name in _LAYOUT:
        return "LAYOUT"
    return "OTHER"


def _einsum_contracts(node: torch.fx.Node) -> bool:
    eq, ops = einsum_operands(node.args)
    terms, rhs = parse_einsum(eq, [len(o.meta["shape"]) for o in ops])
    return bool(set("".join(terms)) - set(rhs))


def _letter_sizes(terms: list[str], shapes: list[tuple], syms: list[tuple]) -> dict[str, sympy.Expr]:
    sizes: dict[str, sympy.Expr] = {}
    for t, c, s in zip(terms, shapes, syms):
        for ch, cv, sv in zip(t, c, s):
            if ch not in sizes or (cv != 1 and sizes[ch] == 1):
                sizes[ch] = sv if cv != 1 else sizes.get(ch, sympy.Integer(1))
    return sizes


def einsum_flops(terms: list[str], rhs: str, sizes: Mapping[str, sympy.Expr]) -> sympy.Expr:
    """2 × product of index sizes per pairwise product, contracting left to right (as torch does
    without a path optimiser); an index is kept after a step while later operands or the output use it."""
    if len(terms) == 1:
        return sympy.Integer(0)
    total = sympy.Integer(0)
    cur = terms[0]
    for k in range(1, len(terms)):
        nxt = terms[k]
        idx = set(cur) | set(nxt)
        total += 2 * sympy.Mul(*[sizes[c] for c in sorted(idx)])
        later = set("".join(terms[k + 1:])) | set(rhs)
        cur = "".join(sorted(c for c in idx if c in later))
    return total


def gemm_equation(node: torch.fx.Node) -> tuple[list[str], str, dict[str, sympy.Expr]]:
    """A GEMM node as an einsum: (operand terms, output term, letter -> symbolic size).

    ``linear(x[b, k], w[n, k]) -> "bk,nk->bn"``; ``matmul(a[..., m, k], b[..., k, n])`` broadcasts
    the batch dims; an existing ``einsum`` keeps its own equation (``...`` expanded).
    """
    name = op_name(node)
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    if name == "einsum":
        eq, ops = einsum_operands(node.args)
        shapes = [o.meta["shape"] for o in ops]
        terms, rhs = parse_einsum(eq, [len(s) for s in shapes])
        return terms, rhs, _letter_sizes(terms, shapes, [o.meta["sym_shape"] for o in ops])
    if name == "linear":
        x = node.args[0]
        mod = module_of(node)
        if mod is not None:
            wc = tuple(mod.weight.shape)
            ws = tuple(sympy.Integer(c) for c in wc)
        else:
            w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            wc, ws = w.meta["shape"], w.meta["sym_shape"]
        xc, xs = x.meta["shape"], x.meta["sym_shape"]
        batch = "".join(next(letters) for _ in range(len(xc) - 1))
        k, n = next(letters), next(letters)
        terms = [batch + k, n + k]
        return terms, batch + n, _letter_sizes(terms, [xc, wc], [xs, ws])
    if name in ("matmul", "bmm", "mm", "addmm", "baddbmm"):
        off = 1 if name in ("addmm", "baddbmm") else 0
        a, b = node.args[off], node.args[off + 1]
        ac, bc = a.meta["shape"], b.meta["shape"]
        nb = max(len(ac), len(bc)) - 2
        batch = "".join(next(letters) for _ in range(max(nb, 0)))
        m, k, n = next(letters), next(letters), next(letters)
        ta = (batch[len(batch) - (len(ac) - 2):] if len(ac) > 2 else "") + (m + k if len(ac) > 1 else k)
        tb = (batch[len(batch) - (len(bc) - 2):] if len(bc) > 2 else "") + (k + n if len(bc) > 1 else k)
        rhs = batch + (m if len(ac) > 1 else "") + (n if len(bc) > 1 else "")
        terms = [ta, tb]
        return terms, rhs, _letter_sizes(terms, [ac, bc], [a.meta["sym_shape"], b.meta["sym_shape"]])
    if name == "scaled_dot_product_attention":
        q, k_, v = node.args[:3]
        qc, kc, vc = q.meta["shape"], k_.meta["shape"], v.meta["shape"]
        batch = "".join(next(letters) for _ in range(len(qc) - 2))
        l, e, s, f = next(letters), next(letters), next(letters), next(letters)
        # two products: (l,e)x(s,e) -> (l,s) and (l,s)x(s,f) -> (l,f)
        terms = [batch + l + e, batch + s + e, batch + s + f]
        return terms, batch + l + f, _letter_sizes(terms, [qc, kc, vc],
                                                   [q.meta["sym_shape"], k_.meta["sym_shape"],
                                                    v.meta["sym_shape"]])
    raise PassError(f"{name} is not a GEMM")


def _gemm_flops(node: torch.fx.Node) -> sympy.Expr:
    terms, rhs, sizes = gemm_equation(node)
    if op_name(node) == "scaled_dot_product_attention":
        b, (l, e), (s, f) = terms[0][:-2], terms[0][-2:], terms[2][-2:]
        batch = sympy.Mul(*[sizes[c] for c in b])
        return 2 * batch * sizes[l] * sizes[s] * (sizes[e] + sizes[f])
    return einsum_flops(terms, rhs, sizes)


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


_CREATION = {"zeros", "ones", "empty", "full", "rand", "randn", "new_zeros", "new_ones", "new_empty", "new_full",
             "zeros_like", "ones_like", "empty_like", "full_like", "arange", "eye", "linspace", "tensor"}


def mask_only_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose tensor *values* come only from mask inputs and constants.

    Sources: placeholders whose name contains ``mask`` and creation ops (``new_ones``,
    ``torch.ones``, ``zeros_like``, ...: their values never depend on their input's values).
    A node is mask-only when every tensor it reads is mask-only (parameters and other inputs
    are not). Used to tell AlphaFold's mask normalisers (``einsum("si,sj->ij", mask, mask)``:
    the count of unmasked sequence pairs in the outer product mean) from model GEMMs.
    """
    out: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if "mask" in n.name.lower():
                out.add(n)
        elif n.op in ("call_function", "call_method"):
            if op_name(n) in _CREATION:
                out.add(n)
                continue
            tensors = [a for a in n.all_input_nodes if a.meta.get("shape") is not None]
            if tensors and all(a in out for a in tensors):
                out.add(n)
    return out


def node_cost(node: torch.fx.Node, op_class: str) -> dict[str, sympy.Expr]:
    """``{"flops": expr, "bytes": expr}``, plus ``bias_flops`` for a biased linear/addmm and
    ``product_flops`` (the 2·M·N·K count FlopCounterMode makes) for every matrix-product op."""
    zero = sympy.Integer(0)
    if op_class in ("INPUT", "OUTPUT") or (node.meta.get("shape") is None and "sym_value" in node.meta):
        return {"flops": zero, "bytes": zero}
    name = op_name(node)
    # bytes
    if op_class == "LAYOUT" and (node.meta.get("aliases_input") or
                                 (name == "getitem" and node.args[0].meta.get("multi_output"))
                                 or name in ("split", "chunk", "unbind")):  # these always return views
        nbytes = zero
    else:
        nbytes = zero
        for a in _tensor_inputs(node):
            nbytes += _bytes_of(a.meta["sym_shape"], a.meta["dtype"])
        mod = module_of(node)
        if mod is not None:
            for p in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                nbytes += p.numel() * p.dtype.itemsize
        if node.meta.get("multi_output"):
            for s, d in zip(node.meta["sym_shape"], node.meta["dtype"]):
                nbytes += _bytes_of(s, d)
        elif node.meta.get("sym_shape") is not None:
            nbytes += _bytes_of(node.meta["sym_shape"], node.meta["dtype"])
    cost = {"flops": zero, "bytes": sympy.expand(nbytes)}
    out_numel = numel_expr(node.meta["sym_shape"]) if _is_tensor_node(node) else zero
    if op_class == "GEMM" or (name in _GEMM and name != "einsum") or (
            name == "einsum" and len(einsum_operands(node.args)[1]) >= 2 and _einsum_contracts(node)):
        cost["product_flops"] = sympy.expand(_gemm_flops(node))
    if op_class == "GEMM":
        cost["flops"] = cost["product_flops"]
        has_bias = (name == "addmm" or name == "baddbmm" or
                    (name == "linear" and ((module_of(node) is not None and module_of(node).bias is not None)
                                           or (len(node.args) > 2 and node.args[2] is not None)
                                           or node.kwargs.get("bias") is not None)))
        if has_bias:
            cost["bias_flops"] = sympy.expand(out_numel)
    elif op_class == "REDUCTION" and "product_flops" in cost:  # a mask-only product
        cost["flops"] = cost["product_flops"]
    elif op_class == "REDUCTION":
        src = node.args[0] if node.args and _is_tensor_node(node.args[0]) else None
        if name == "einsum":
            src = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], torch.fx.Node) \
                else node.args[1][0]
        in_numel = numel_expr(src.meta["sym_shape"]) if src is not None else out_numel
        cost["flops"] = sympy.expand(_REDUCTION_FLOPS.get(name, 1) * in_numel)
    elif op_class == "ELEMENTWISE":
        if name in _ELEMENTWISE_ARITH or name in ("max", "min", "einsum"):
            cost["flops"] = sympy.expand(out_numel)
    return cost


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
