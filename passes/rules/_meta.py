"""The one place the fusion rules read node meta written by the analysis passes.

The analysis passes (shape_prop, classify; being refactored into an op registry) write
``meta["shape"]``, ``"sym_shape"``, ``"dtype"``, ``"op_class"``, ``"cost"``, ``"einsum"``,
``"module_path"`` and ``"stack_trace"``. Every rule goes through these helpers, so a change
of how those facts are stored is a change here only.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Mapping

import sympy
import torch
import torch.fx

from foldcompile.passes.registry import changes_mode

__all__ = ["shape", "sym_shape", "dtype", "op_class", "einsum", "module_path", "source_line", "op_name",
           "bytes_at", "numel_at", "is_barrier", "site"]


def shape(n: Any) -> tuple[int, ...] | None:
    if not isinstance(n, torch.fx.Node) or n.meta.get("multi_output"):
        return None
    s = n.meta.get("shape")
    return tuple(s) if s is not None else None


def sym_shape(n: torch.fx.Node) -> tuple | None:
    s = n.meta.get("sym_shape")
    return tuple(s) if s is not None and not n.meta.get("multi_output") else None


def dtype(n: Any) -> torch.dtype | None:
    if not isinstance(n, torch.fx.Node) or n.meta.get("multi_output"):
        return None
    return n.meta.get("dtype")


def op_class(n: torch.fx.Node) -> str | None:
    return n.meta.get("op_class")


def einsum(n: torch.fx.Node) -> str | tuple[str, str] | None:
    """The product's explicit einsum equation (SDPA: its two products). normalize writes ``...``
    where the ranks were unknown to it; shape_prop's shapes make it explicit here."""
    eq = n.meta.get("einsum")
    if not eq or not isinstance(eq, str) or "..." not in eq:
        return eq
    from foldcompile.passes import einsum as _eq  # the one contraction module
    try:
        ops = _eq.gemm_operands(n)
    except Exception:
        return eq
    ranks = [len(shape(o)) if shape(o) is not None else None for o in ops]
    if any(r is None for r in ranks):
        return eq
    if n.target is torch.einsum:
        return _eq.expand_equation(n.args[0], ranks)
    if n.target is torch.matmul and len(ranks) == 2:
        return _eq._matmul_equation(*ranks)
    if n.target is torch.nn.functional.linear and ranks[0] >= 1:
        r = ranks[0]
        letters = "abcdefghijklmnopqrstuvwxyz"
        batch, k, out = letters[: r - 1], letters[r - 1], letters[r]
        return f"{batch}{k},{out}{k}->{batch}{out}"
    return eq


def module_path(n: torch.fx.Node) -> str:
    return n.meta.get("module_path", "") or ""


def site(n: torch.fx.Node) -> str:
    """Where a node is, for messages: its module path, or ``(root)``."""
    return module_path(n) or "(root)"


def source_line(n: torch.fx.Node) -> str:
    """The user's ``File ..., line N`` and code line the tracer recorded, or ``""``."""
    stack = n.meta.get("stack_trace")
    if not stack:
        return ""
    lines = [line.strip() for line in stack.strip().splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{lines[i]}: {code}"
    return ""


_OPERATOR_NAMES = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
                   operator.neg: "neg", operator.invert: "logical_not", operator.getitem: "getitem"}


def op_name(n: torch.fx.Node) -> str:
    """One lower-case name per op whatever the spelling (``torch.add``, ``operator.add``, ``Tensor.add``)."""
    if n.op != "call_function":
        return n.op
    return target_name(n.target)


def target_name(target: Any) -> str:
    """:func:`op_name` of a call_function target (``operator.add`` and ``torch.add`` are ``"add"``)."""
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    name = getattr(target, "__name__", str(target)).split(".")[-1]
    return {"truediv": "div", "true_divide": "div", "bitwise_not": "logical_not", "multiply": "mul",
            "subtract": "sub", "divide": "div"}.get(name, name)


def _size_at(expr: Any, subs: Mapping[sympy.Symbol, int]) -> int:
    e = sympy.sympify(expr)
    if e.free_symbols:
        e = e.subs(subs)
    if not e.is_number:
        raise ValueError(f"size {expr} has dims with no value at the stated size")
    return int(e)


def numel_at(n: torch.fx.Node, subs: Mapping[sympy.Symbol, int]) -> int:
    """Elements of ``n``'s value at the stated size (its symbolic shape evaluated there)."""
    sym = sym_shape(n)
    if sym is None:
        s = shape(n)
        return math.prod(s) if s is not None else 0
    return math.prod(_size_at(d, subs) for d in sym)


def dim_at(n: torch.fx.Node, d: int, subs: Mapping[sympy.Symbol, int]) -> int:
    """Size of ``n``'s dim ``d`` at the stated size (its symbolic size evaluated there; the example's
    size where the graph has no symbolic shape)."""
    sym = sym_shape(n)
    return _size_at(sym[d], subs) if sym is not None else shape(n)[d]


def bytes_at(n: torch.fx.Node, subs: Mapping[sympy.Symbol, int]) -> int:
    """Bytes of ``n``'s value at the stated size."""
    dt = dtype(n)
    if not isinstance(dt, torch.dtype):
        return 0
    return numel_at(n, subs) * torch.empty((), dtype=dt).element_size()


def is_barrier(n: torch.fx.Node) -> bool:
    """Nodes no rule crosses: collectives (the DAP pass shards before fusion) and the markers that enter
    or leave an autocast or grad-mode region (the registry's :func:`changes_mode`): a kernel spanning one
    would compute its two sides in one mode."""
    if op_class(n) == "COMM":
        return True
    if n.op != "call_function":
        return False
    mod = getattr(n.target, "__module__", "") or ""
    return "distributed" in mod or "c10d" in mod or changes_mode(n)


def cost_bytes_at(n: torch.fx.Node, subs: Mapping[sympy.Symbol, int]) -> int:
    """The classify pass's bytes-moved estimate of ``n`` at the stated size (0 where it has none)."""
    cost = n.meta.get("cost") or {}
    b = cost.get("bytes")
    if b is None:
        return 0
    try:
        return _size_at(b, subs)
    except (ValueError, TypeError):
        return 0
