"""Code generator behind ``foldcompile.kernels.elementwise``: op rules, fragment IR, Triton source.

Internal: the public API (``fuse_elementwise``, ``FusedElementwise``) lives in
``elementwise.py``. This module turns an fx fragment into a small IR (``_lower``),
specialises it to one call's shapes, dtypes and strides (``_layout``,
``_geometry``), writes the forward or backward kernel as Python source
(``_gen_kernel``) and imports it (``_compile``). The op vocabulary is the table
``_RULES``: adding an op is one rule plus its entries in ``_FUNCTIONS`` /
``_METHODS``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import operator
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
import triton

from foldcompile.kernels import _dispatch
from foldcompile.kernels.philox import _dropout_scale, _mask_shape, dropout


class UnsupportedElementwiseOp(ValueError):
    """A graph node is not an element-wise op this generator can fuse (the message names it)."""


# ---------------------------------------------------------------------------------
# Op rules: the whole op vocabulary, as data
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One element-wise op.

    ``arg_kinds``: per operand, "f" (float) or "b" (bool). ``triton``: the forward
    expression, with ``{0}``, ``{1}``.. for operands and ``{keep}`` for dropout's
    keep-mask. ``grads``: per operand, the adjoint contribution given the upstream
    gradient ``{g}`` and the op's output ``{y}``, or None (not differentiable).
    ``torch``: the same op in PyTorch, for the reference.
    """

    arg_kinds: str
    result_kind: str
    triton: str
    grads: tuple[str | None, ...]
    torch: Callable[..., Any]


_SQRT1_2 = "0.7071067811865476"
_INV_SQRT_2PI = "0.3989422804014327"
_SQRT_2_OVER_PI = "0.7978845608028654"
_TANH_INNER = f"{_SQRT_2_OVER_PI} * ({{0}} + 0.044715 * {{0}} * {{0}} * {{0}})"
# gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x sigmoid(2z): the sigmoid form has no 1 + tanh(z)
# cancellation for negative x (fp32 tanh(z) rounds to -1 there long before x sigmoid(2z) is 0).
_SIG_2INNER = f"tl.sigmoid(2.0 * ({_TANH_INNER}))"

_RULES: dict[str, _Rule] = {
    "add": _Rule("ff", "f", "{0} + {1}", ("{g}", "{g}"), operator.add),
    "sub": _Rule("ff", "f", "{0} - {1}", ("{g}", "-{g}"), operator.sub),
    "mul": _Rule("ff", "f", "{0} * {1}", ("{g} * {1}", "{g} * {0}"), operator.mul),
    "div": _Rule("ff", "f", "{0} / {1}", ("{g} / {1}", "-{g} * ({y} / {1})"), operator.truediv),
    "neg": _Rule("f", "f", "-{0}", ("-{g}",), operator.neg),
    "sigmoid": _Rule("f", "f", "tl.sigmoid({0})", ("{g} * {y} * (1.0 - {y})",), torch.sigmoid),
    # Special values follow eager PyTorch (checked in tests/kernels/test_elementwise_special.py):
    # relu(NaN) = NaN and its gradient there is g (eager's threshold_backward zeroes only
    # where the result is <= 0); -0.0 stays -0.0.
    "relu": _Rule("f", "f", "tl.where({0} < 0.0, 0.0, {0})", ("tl.where({0} <= 0.0, 0.0, {g})",), torch.relu),
    # silu(x) = x s(x); d/dx = s (1 + x (1 - s)), eager's formula (the same NaN at x = ±inf).
    "silu": _Rule("f", "f", "{0} * tl.sigmoid({0})", ("{g} * (tl.sigmoid({0}) * (1.0 + {0} * (1.0 - tl.sigmoid({0}))))",),
                  F.silu),
    "gelu": _Rule("f", "f", f"0.5 * {{0}} * (1.0 + tl.math.erf({{0}} * {_SQRT1_2}))",
                  (f"{{g}} * (0.5 * (1.0 + tl.math.erf({{0}} * {_SQRT1_2}))"
                   f" + {{0}} * {_INV_SQRT_2PI} * tl.exp(-0.5 * {{0}} * {{0}}))",), F.gelu),
    # d/dx x s(2z) = s + x s (1 - s) 2 z', z' = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    "gelu_tanh": _Rule("f", "f", f"{{0}} * {_SIG_2INNER}",
                       (f"{{g}} * ({_SIG_2INNER} + {{0}} * {_SIG_2INNER} * (1.0 - {_SIG_2INNER}) * 2.0"
                        f" * {_SQRT_2_OVER_PI} * (1.0 + 0.134145 * {{0}} * {{0}}))",),
                       lambda a: F.gelu(a, approximate="tanh")),
    # _fc_tanh is defined in every generated module (_HEADER): tl has no tanh that runs in the
    # interpreter and on every GPU, and 2 sigmoid(2x) - 1 loses all relative accuracy near 0.
    "tanh": _Rule("f", "f", "_fc_tanh({0})", ("{g} * (1.0 - {y} * {y})",), torch.tanh),
    # Eager's abs gradient is g * sign(x), sign(NaN) = 0: a product, so a NaN g still gives NaN.
    "abs": _Rule("f", "f", "tl.abs({0})", ("{g} * tl.where({0} > 0.0, 1.0, tl.where({0} < 0.0, -1.0, 0.0))",),
                 torch.abs),
    "exp": _Rule("f", "f", "tl.exp({0})", ("{g} * {y}",), torch.exp),
    "log": _Rule("f", "f", "tl.log({0})", ("{g} / {0}",), torch.log),
    "sqrt": _Rule("f", "f", "tl.sqrt({0})", ("{g} * 0.5 / {y}",), torch.sqrt),
    "rsqrt": _Rule("f", "f", "tl.rsqrt({0})", ("{g} * -0.5 * {y} * {y} * {y}",), torch.rsqrt),
    "where": _Rule("bff", "f", "tl.where({0}, {1}, {2})", (None, "tl.where({0}, {g}, 0.0)", "tl.where({0}, 0.0, {g})"),
                   torch.where),
    "masked_fill": _Rule("fbf", "f", "tl.where({1}, {2}, {0})",
                         ("tl.where({1}, 0.0, {g})", None, "tl.where({1}, {g}, 0.0)"),
                         lambda x, m, v: x.masked_fill(m, v)),
    # operands: x, p, scale; {keep} is tl.rand(seed, counter) >= p, drawn by the generator.
    # A multiply by 0 at dropped elements, not a select: torch's dropout is x * mask * scale, so a
    # dropped NaN or ±inf gives NaN (0 * NaN), and so does a NaN upstream gradient there.
    "dropout": _Rule("fff", "f", "{0} * tl.where({keep}, {2}, 0.0)", ("{g} * tl.where({keep}, {2}, 0.0)", None, None),
                     None),
    "cast": _Rule("f", "f", "{0}", ("{g}",), None),
    "gt": _Rule("ff", "b", "{0} > {1}", (None, None), operator.gt),
    "ge": _Rule("ff", "b", "{0} >= {1}", (None, None), operator.ge),
    "lt": _Rule("ff", "b", "{0} < {1}", (None, None), operator.lt),
    "le": _Rule("ff", "b", "{0} <= {1}", (None, None), operator.le),
    "logical_not": _Rule("b", "b", "{0} == 0", (None,), torch.logical_not),
    "logical_and": _Rule("bb", "b", "{0} & {1}", (None, None), torch.logical_and),
    "logical_or": _Rule("bb", "b", "{0} | {1}", (None, None), torch.logical_or),
}

# Casts whose target is narrower than the fp32 registers values are computed in: the
# generated code rounds through the target type (see _gen_kernel).
_ROUNDING_CASTS: dict[torch.dtype, str] = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}

# ---------------------------------------------------------------------------------
# The fragment IR and the fx -> IR lowering
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Val:
    """One value of a fragment: a placeholder input, a constant, or an op on earlier values."""

    kind: str  # "input" | "const" | "op"
    name: str  # the fx node's name (or the constant's repr), for errors and comments
    op: str = ""
    args: tuple[int, ...] = ()
    index: int = -1  # placeholder position
    value: float = 0.0  # constant
    shared_dims: tuple[int, ...] = ()  # dropout
    dtype: torch.dtype | None = None  # cast target


@dataclass
class _Fragment:
    vals: list[_Val]
    n_inputs: int
    input_names: list[str]
    outputs: list[int]
    multi_output: bool
    code: str  # the fx graph's Python code, for the generated source's header


class _Lowering:
    """Turns fx nodes into ``_Val`` entries, one converter per supported target."""

    def __init__(self, root: torch.nn.Module | None):
        self.root = root
        self.vals: list[_Val] = []
        self.env: dict[torch.fx.Node, int] = {}

    def add(self, val: _Val) -> int:
        self.vals.append(val)
        return len(self.vals) - 1

    def operand(self, node: torch.fx.Node, arg: Any, what: str) -> int:
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, (bool, int, float)):
            return self.add(_Val("const", repr(arg), value=float(arg)))
        raise UnsupportedElementwiseOp(
            f"node '{node.name}' ({_describe(node)}): {what} is {type(arg).__name__} {arg!r}; "
            "element-wise fragments take tensors, graph values or Python numbers")

    def op(self, node: torch.fx.Node, op: str, args: Sequence[Any], **extra: Any) -> int:
        ids = tuple(self.operand(node, a, f"operand {i} of {op}") for i, a in enumerate(args))
        return self.add(_Val("op", node.name, op=op, args=ids, **extra))


def _describe(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        mod = getattr(target, "__module__", None) or ""
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
        return f"call_function {mod + '.' if mod else ''}{name}"
    return f"{node.op} {target}"


def _only_kwargs(node: torch.fx.Node, kwargs: dict, allowed: dict[str, Callable[[Any], bool]]) -> None:
    for k, v in kwargs.items():
        check = allowed.get(k)
        if check is None or not check(v):
            raise UnsupportedElementwiseOp(
                f"node '{node.name}' ({_describe(node)}): keyword {k}={v!r} is not supported in a fused fragment")


def _inplace_ok(v: Any) -> bool:
    return v is False


def _binary(op: str) -> Callable:
    def convert(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
        kwargs = dict(kwargs)
        alpha = kwargs.pop("alpha", 1)
        rounding = kwargs.pop("rounding_mode", None)
        _only_kwargs(node, kwargs, {})
        if rounding is not None:
            raise UnsupportedElementwiseOp(f"node '{node.name}' ({_describe(node)}): rounding_mode={rounding!r} "
                                           "is not element-wise float arithmetic")
        if len(args) != 2:
            raise UnsupportedElementwiseOp(f"node '{node.name}' ({_describe(node)}): expected 2 operands")
        a, b = args
        if alpha != 1:
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
                raise UnsupportedElementwiseOp(f"node '{node.name}': alpha={alpha!r} must be a number")
            b_id = lw.add(_Val("op", node.name + "_alpha", op="mul",
                               args=(lw.operand(node, b, "operand 1"), lw.operand(node, alpha, "alpha"))))
            return lw.add(_Val("op", node.name, op=op, args=(lw.operand(node, a, "operand 0"), b_id)))
        return lw.op(node, op, (a, b))
    return convert


def _unary(op: str, **allowed: Callable[[Any], bool]) -> Callable:
    def convert(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
        _only_kwargs(node, kwargs, {"inplace": _inplace_ok, **allowed})
        if len(args) == 2 and args[1] is False:
            args = args[:1]  # F.relu(x, False): the positional inplace flag
        if len(args) != 1:
            raise UnsupportedElementwiseOp(f"node '{node.name}' ({_describe(node)}): expected one operand")
        return lw.op(node, op, args)
    return convert


def _gelu(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    _only_kwargs(node, {k: v for k, v in kwargs.items() if k != "approximate"}, {})
    if approximate not in ("none", "tanh"):
        raise UnsupportedElementwiseOp(f"node '{node.name}': gelu approximate={approximate!r}")
    return lw.op(node, "gelu" if approximate == "none" else "gelu_tanh", args[:1])


def _where(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
    _only_kwargs(node, kwargs, {})
    if len(args) != 3:
        raise UnsupportedElementwiseOp(f"node '{node.name}' ({_describe(node)}): only where(cond, a, b) is element-wise")
    return lw.op(node, "where", args)


def _masked_fill(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
    merged = list(args) + [kwargs[k] for k in ("mask", "value") if k in kwargs]
    _only_kwargs(node, {k: v for k, v in kwargs.items() if k not in ("mask", "value")}, {})
    if len(merged) != 3:
        raise UnsupportedElementwiseOp(f"node '{node.name}': masked_fill needs (x, mask, value)")
    return lw.op(node, "masked_fill", merged)


def _dropout_node(lw: _Lowering, node: torch.fx.Node, x: Any, p: Any, training: Any,
                  shared_dims: Any = ()) -> int:
    if not isinstance(training, bool):
        raise UnsupportedElementwiseOp(f"node '{node.name}': dropout training={training!r} must be a Python bool")
    if isinstance(p, torch.fx.Node) or isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise UnsupportedElementwiseOp(f"node '{node.name}': dropout p={p!r} must be a constant number in [0, 1]")
    if not training or p == 0:
        return lw.operand(node, x, "dropout input")  # identity in eval mode
    if not isinstance(shared_dims, (tuple, list)) or not all(isinstance(d, int) for d in shared_dims):
        raise UnsupportedElementwiseOp(f"node '{node.name}': dropout shared_dims={shared_dims!r} must be ints")
    return lw.op(node, "dropout", (x, float(p), _dropout_scale(float(p))), shared_dims=tuple(shared_dims))


def _f_dropout(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
    names = ("input", "p", "training", "inplace")
    bound = dict(zip(names, args)) | dict(kwargs)
    _only_kwargs(node, {k: v for k, v in bound.items() if k not in ("input", "p", "training")},
                 {"inplace": _inplace_ok})
    return _dropout_node(lw, node, bound["input"], bound.get("p", 0.5), bound.get("training", True))


def _torch_dropout(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
    bound = dict(zip(("input", "p", "train"), args)) | dict(kwargs)
    return _dropout_node(lw, node, bound["input"], bound["p"], bound["train"])


def _own_dropout(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
    bound = dict(zip(("x", "p"), args)) | dict(kwargs)
    if bound.get("seed") is not None or bound.get("offset", 0) != 0:
        raise UnsupportedElementwiseOp(f"node '{node.name}': inside a fused fragment, dropout's seed and offset "
                                       "come from the fused call (fused(..., seed=, offset=)), not the node")
    return _dropout_node(lw, node, bound["x"], bound.get("p", 0.5), bound.get("training", True),
                         bound.get("shared_dims", ()))


def _to_dtype(node: torch.fx.Node, args: tuple, kwargs: dict) -> torch.dtype:
    """The target dtype of ``Tensor.to(x, ...)``, refusing every form that does more than a dtype cast.

    Accepted: ``to(dtype, non_blocking=, copy=, memory_format=torch.preserve_format)`` and
    ``to(dtype=...)``. ``non_blocking`` only matters for a device copy and ``copy`` only for
    aliasing (a fused fragment's output is always a new tensor), so neither changes the values.
    Refused, with the reason: a device (``to("cuda")``, ``device=``), another tensor's dtype and
    device (``to(other)``), a memory format other than preserve_format (the output layout is
    the kernel's, contiguous), and a call without a dtype.
    """
    where = f"node '{node.name}' ({_describe(node)})"
    rest = list(args[1:])
    kw = dict(kwargs)
    if "device" in kw:
        if kw.pop("device") is not None:
            raise UnsupportedElementwiseOp(f"{where}: to(device=...) moves data between devices; only dtype casts "
                                           "are fused")
    if rest and not isinstance(rest[0], torch.dtype):
        first = rest[0]
        if isinstance(first, (torch.fx.Node, torch.Tensor)):
            raise UnsupportedElementwiseOp(f"{where}: to(other) takes another tensor's dtype and device; only "
                                           "to(dtype) casts are fused")
        if isinstance(first, (str, int, torch.device)) and not isinstance(first, bool):
            raise UnsupportedElementwiseOp(f"{where}: to({first!r}, ...) moves data to a device; only dtype casts "
                                           "are fused")
        raise UnsupportedElementwiseOp(f"{where}: to({first!r}) is not a dtype cast")
    names = ("dtype", "non_blocking", "copy")
    if len(rest) > len(names):
        raise UnsupportedElementwiseOp(f"{where}: too many positional arguments for Tensor.to(dtype, non_blocking, "
                                       "copy)")
    for name, value in zip(names, rest):
        if name in kw:
            raise UnsupportedElementwiseOp(f"{where}: {name} given twice")
        kw[name] = value
    target = kw.pop("dtype", None)
    if not isinstance(target, torch.dtype):
        raise UnsupportedElementwiseOp(f"{where}: Tensor.to without a dtype (got {target!r}); only dtype casts "
                                       "are fused")
    for name in ("non_blocking", "copy"):
        if name in kw and not isinstance(kw.pop(name), bool):
            raise UnsupportedElementwiseOp(f"{where}: {name} must be a bool")
    if "memory_format" in kw:
        fmt = kw.pop("memory_format")
        if fmt is not torch.preserve_format:
            raise UnsupportedElementwiseOp(f"{where}: memory_format={fmt} sets the output layout; a fused "
                                           "fragment writes its own (contiguous), so only torch.preserve_format "
                                           "is fused")
    _only_kwargs(node, kw, {})
    return target


def _cast(dtype: torch.dtype | None) -> Callable:
    def convert(lw: _Lowering, node: torch.fx.Node, args: tuple, kwargs: dict) -> int:
        if dtype is None:  # Tensor.to(x, ...), as a method or as normalize's torch.Tensor.to call
            target = _to_dtype(node, args, kwargs)
        else:  # .float() / .half() / .bfloat16(): only memory_format, which must not change the layout
            rest = dict(kwargs)
            fmt = rest.pop("memory_format", torch.preserve_format)
            if fmt is not torch.preserve_format:
                raise UnsupportedElementwiseOp(f"node '{node.name}' ({_describe(node)}): memory_format={fmt} is "
                                               "not fused (only torch.preserve_format)")
            _only_kwargs(node, rest, {})
            if len(args) != 1:
                raise UnsupportedElementwiseOp(f"node '{node.name}' ({_describe(node)}): expected one operand")
            target = dtype
        if not (target.is_floating_point or target == torch.bool):
            raise UnsupportedElementwiseOp(f"node '{node.name}': cast to {target} is not a float or bool dtype")
        if target == torch.bool:
            return lw.op(node, "ne0", args[:1])
        return lw.add(_Val("op", node.name, op="cast", args=(lw.operand(node, args[0], "operand"),), dtype=target))
    return convert


# Casting a float to bool is "!= 0": its own tiny rule.
_RULES["ne0"] = _Rule("f", "b", "{0} != 0.0", (None,), lambda a: a != 0)

_FUNCTIONS: dict[Any, Callable] = {
    operator.add: _binary("add"), torch.add: _binary("add"),
    operator.sub: _binary("sub"), torch.sub: _binary("sub"), torch.subtract: _binary("sub"),
    operator.mul: _binary("mul"), torch.mul: _binary("mul"), torch.multiply: _binary("mul"),
    operator.truediv: _binary("div"), torch.div: _binary("div"), torch.true_divide: _binary("div"),
    operator.neg: _unary("neg"), torch.neg: _unary("neg"), torch.negative: _unary("neg"),
    torch.sigmoid: _unary("sigmoid"), torch.special.expit: _unary("sigmoid"), F.sigmoid: _unary("sigmoid"),
    torch.relu: _unary("relu"), F.relu: _unary("relu"),
    F.silu: _unary("silu"), F.gelu: _gelu,
    torch.tanh: _unary("tanh"), F.tanh: _unary("tanh"),
    torch.abs: _unary("abs"), operator.abs: _unary("abs"),
    torch.exp: _unary("exp"), torch.log: _unary("log"), torch.sqrt: _unary("sqrt"), torch.rsqrt: _unary("rsqrt"),
    torch.where: _where, torch.masked_fill: _masked_fill,
    F.dropout: _f_dropout, torch.dropout: _torch_dropout, dropout: _own_dropout,
    operator.gt: _binary("gt"), torch.gt: _binary("gt"), operator.ge: _binary("ge"), torch.ge: _binary("ge"),
    operator.lt: _binary("lt"), torch.lt: _binary("lt"), operator.le: _binary("le"), torch.le: _binary("le"),
    operator.invert: _unary("logical_not"), torch.logical_not: _unary("logical_not"),
    operator.and_: _binary("logical_and"), torch.logical_and: _binary("logical_and"),
    operator.or_: _binary("logical_or"), torch.logical_or: _binary("logical_or"),
}

_METHODS: dict[str, Callable] = {
    "add": _binary("add"), "sub": _binary("sub"), "mul": _binary("mul"), "div": _binary("div"),
    "neg": _unary("neg"), "sigmoid": _unary("sigmoid"), "relu": _unary("relu"), "tanh": _unary("tanh"),
    "abs": _unary("abs"), "exp": _unary("exp"), "log": _unary("log"), "sqrt": _unary("sqrt"), "rsqrt": _unary("rsqrt"),
    "masked_fill": _masked_fill, "logical_not": _unary("logical_not"),
    "float": _cast(torch.float32), "half": _cast(torch.float16), "bfloat16": _cast(torch.bfloat16), "bool": _cast(torch.bool),
    "to": _cast(None),
}


# normalize (passes/normalize.py) spells a method it has no torch.<name> function for as
# ``torch.Tensor.<name>(x, ...)``: the same converters serve that spelling.
_FUNCTIONS.update({getattr(torch.Tensor, name): conv for name, conv in _METHODS.items()})


def _module_rule(mod: torch.nn.Module) -> Callable | None:
    """Converter for a leaf nn.Module, reading its settings (nn.Dropout's p and training flag)."""
    if isinstance(mod, torch.nn.Dropout):
        return lambda lw, node, args, kwargs: _dropout_node(lw, node, args[0], mod.p, mod.training)
    simple = {torch.nn.ReLU: "relu", torch.nn.Sigmoid: "sigmoid", torch.nn.SiLU: "silu", torch.nn.Tanh: "tanh"}
    for cls, op in simple.items():
        if type(mod) is cls:
            return lambda lw, node, args, kwargs: lw.op(node, op, args[:1])
    if type(mod) is torch.nn.GELU:
        return lambda lw, node, args, kwargs: _gelu(lw, node, args[:1], {"approximate": mod.approximate})
    if type(mod) is torch.nn.Identity:
        return lambda lw, node, args, kwargs: lw.operand(node, args[0], "input")
    return None


def _converter(node: torch.fx.Node, root: torch.nn.Module | None) -> Callable:
    if node.op == "call_function":
        try:
            conv = _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            conv = None
    elif node.op == "call_method":
        conv = _METHODS.get(node.target)
    elif node.op == "call_module":
        if root is None:
            raise UnsupportedElementwiseOp(f"node '{node.name}' (call_module {node.target}): a bare fx.Graph has no "
                                           "modules; pass the GraphModule")
        conv = _module_rule(root.get_submodule(node.target))
    else:
        conv = None
    if conv is None:
        raise UnsupportedElementwiseOp(f"node '{node.name}' ({_describe(node)}) is not a supported element-wise op "
                                       f"(supported: {', '.join(sorted(k for k in _RULES if k != 'ne0'))})")
    return conv


def unsupported_reason(node: torch.fx.Node, root: torch.nn.Module | None = None) -> str | None:
    """Why ``node`` cannot join a fused element-wise fragment, or None when its op can.

    Checks the op and its constant arguments only; shapes and dtypes are checked
    when the fragment is called. The fusion pass uses this to grow fragments.
    """
    if node.op in ("placeholder", "output"):
        return None
    try:
        conv = _converter(node, root)
        lw = _Lowering(root)
        for arg in node.all_input_nodes:
            lw.env[arg] = lw.add(_Val("input", arg.name, index=len(lw.env)))
        conv(lw, node, node.args, node.kwargs)
    except UnsupportedElementwiseOp as exc:
        return str(exc)
    return None


def _lower(gm: torch.fx.GraphModule | torch.fx.Graph) -> _Fragment:
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    root = gm if isinstance(gm, torch.nn.Module) else getattr(graph, "owning_module", None)
    lw = _Lowering(root)
    names: list[str] = []
    outputs: list[int] | None = None
    multi = False
    for node in graph.nodes:
        if node.op == "placeholder":
            lw.env[node] = lw.add(_Val("input", node.name, index=len(names)))
            names.append(node.name)
        elif node.op == "output":
            out = node.args[0]
            multi = isinstance(out, (tuple, list))
            items = list(out) if multi else [out]
            if not items:
                raise UnsupportedElementwiseOp("the fragment returns nothing")
            outputs = []
            for item in items:
                if not isinstance(item, torch.fx.Node):
                    raise UnsupportedElementwiseOp(f"the fragment returns {item!r}; outputs must be graph values")
                outputs.append(lw.env[item])
        else:
            lw.env[node] = _converter(node, root)(lw, node, node.args, node.kwargs)
    if outputs is None:
        raise UnsupportedElementwiseOp("the fragment's graph has no output node")
    try:
        code = graph.python_code("self").src
    except Exception:  # only used for a comment
        code = str(graph)
    return _Fragment(lw.vals, len(names), names, outputs, multi, code)


# ---------------------------------------------------------------------------------
# Specialisation: shapes, dtypes, strides -> a launch plan
# ---------------------------------------------------------------------------------


@dataclass
class _Operand:
    """A tensor the kernel indexes: its strides over the output's (collapsed) dims."""

    strides: tuple[int, ...]
    pattern: tuple[bool, ...] = ()  # per collapsed dim: indexed (stride != 0)
    dense: bool = False  # walks the output's flat index exactly


@dataclass
class _Layout:
    """Per-call facts: value kinds/dtypes/shapes and the broadcast geometry."""

    kinds: list[str]  # per value: "f", "b" (tensor) or "s" (Python scalar)
    dtypes: list[torch.dtype | None]
    shapes: list[tuple[int, ...] | None]
    live: list[int]  # values needed by the outputs, in order
    out_shape: tuple[int, ...]
    dropouts: list[int]  # value ids of the live dropout ops, in order
    mask_shapes: dict[int, tuple[int, ...]]  # dropout value id -> mask shape (out rank)
    mask_base: dict[int, int]  # dropout value id -> first counter


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _eager_result_dtype(frag: _Fragment, v: _Val, rule: _Rule, inputs: Sequence[Any],
                        dtypes: list[torch.dtype | None], shapes: list[tuple[int, ...] | None]) -> torch.dtype:
    """dtype eager PyTorch gives op ``v``: its torch function run on meta tensors of the
    operands' real ranks and dtypes (Python-number operands passed as numbers of their type);
    bool operands of arithmetic stay bool, as eager sees them (a float condition of ``where``
    is read as ``!= 0``, as the kernels read it)."""
    args: list[Any] = []
    for a, need in zip(v.args, rule.arg_kinds):
        if shapes[a] is None:
            av = frag.vals[a]
            if av.kind == "input":
                args.append(inputs[av.index])
            elif av.kind == "const":
                args.append(av.value)
            else:  # computed from Python numbers only: the reference computes it in float64 (a 0-dim tensor)
                args.append(torch.empty((), dtype=torch.float64, device="meta"))
            continue
        dt = dtypes[a]
        if need == "b" and dt != torch.bool:  # a float condition is read as != 0
            dt = torch.bool
        args.append(torch.empty(shapes[a], dtype=dt, device="meta"))
    try:
        return rule.torch(*args).dtype
    except RuntimeError as exc:  # e.g. negating a bool tensor
        raise ValueError(f"node '{v.name}' ({v.op}): eager PyTorch refuses these operands: {exc}") from None


def _layout(frag: _Fragment, inputs: Sequence[Any]) -> _Layout:
    if len(inputs) != frag.n_inputs:
        raise TypeError(f"fused fragment takes {frag.n_inputs} inputs ({', '.join(frag.input_names)}), "
                        f"got {len(inputs)}")
    n = len(frag.vals)
    kinds: list[str] = [""] * n
    dtypes: list[torch.dtype | None] = [None] * n
    shapes: list[tuple[int, ...] | None] = [None] * n
    for i, v in enumerate(frag.vals):
        if v.kind == "input":
            x = inputs[v.index]
            if isinstance(x, torch.Tensor):
                if not (x.dtype.is_floating_point or x.dtype == torch.bool):
                    raise TypeError(f"input '{v.name}' has dtype {x.dtype}; fused element-wise kernels take "
                                    "float16/bfloat16/float32/float64 or bool tensors")
                kinds[i], dtypes[i], shapes[i] = ("b" if x.dtype == torch.bool else "f"), x.dtype, tuple(x.shape)
            elif isinstance(x, (bool, int, float)):
                kinds[i] = "s"
            else:
                raise TypeError(f"input '{v.name}' is a {type(x).__name__}; expected a tensor or a Python number")
        elif v.kind == "const":
            kinds[i] = "s"
        else:
            rule = _RULES[v.op]
            arg_shapes = [shapes[a] for a in v.args if shapes[a] is not None]
            try:
                shapes[i] = torch.broadcast_shapes(*arg_shapes) if arg_shapes else None
            except RuntimeError:
                names = ", ".join(f"{frag.vals[a].name} {list(shapes[a])}" for a in v.args if shapes[a] is not None)
                raise ValueError(f"node '{v.name}' ({v.op}): operand shapes do not broadcast: {names}") from None
            if shapes[i] is None:
                kinds[i] = "s"
                continue
            kinds[i] = rule.result_kind
            tensor_dtypes = [dtypes[a] for a in v.args if dtypes[a] is not None]
            if rule.result_kind == "b":
                dtypes[i] = torch.bool
            elif v.op == "cast":
                dtypes[i] = v.dtype
            elif v.op in ("masked_fill", "dropout"):
                dtypes[i] = dtypes[v.args[0]] if dtypes[v.args[0]] not in (None, torch.bool) else torch.float32
            else:
                ranks = [len(shapes[a]) for a in v.args if shapes[a] is not None]
                bool_operand = any(k == "f" and dtypes[a] == torch.bool for a, k in zip(v.args, rule.arg_kinds))
                if (0 in ranks and any(r > 0 for r in ranks)) or bool_operand:
                    # A 0-dim tensor next to dimensioned ones, or a bool tensor in arithmetic:
                    # eager's result_type rule decides (a 0-dim fp32 tensor does not promote an
                    # fp16 [4, 8] tensor; bool [4] * fp16 0-dim is fp16, not fp32), so ask it.
                    d = _eager_result_dtype(frag, v, rule, inputs, dtypes, shapes)
                else:
                    float_args = [d for k, d in zip(rule.arg_kinds, [dtypes[a] for a in v.args]) if k == "f" and d]
                    d = _promote(float_args) if float_args else _promote(tensor_dtypes)
                if not d.is_floating_point:  # e.g. bool * bool is bool in eager
                    names = ", ".join(f"{frag.vals[a].name} {dtypes[a]}" for a in v.args if dtypes[a] is not None)
                    raise ValueError(f"node '{v.name}' ({v.op}): eager PyTorch computes it in {d} on {names}; "
                                     "the fused kernels compute floats, so it is not fused")
                dtypes[i] = d
    # Live values: those the outputs depend on.
    needed = set(frag.outputs)
    for i in range(n - 1, -1, -1):
        if i in needed:
            needed.update(frag.vals[i].args)
    live = sorted(needed)
    out_shapes = [shapes[o] for o in frag.outputs]
    for o, s in zip(frag.outputs, out_shapes):
        if s is None:
            raise ValueError(f"output '{frag.vals[o].name}' does not depend on any tensor input")
    out_shape = out_shapes[0]
    if any(s != out_shape for s in out_shapes):
        desc = ", ".join(f"{frag.vals[o].name} {list(s)}" for o, s in zip(frag.outputs, out_shapes))
        raise ValueError(f"a fused fragment's outputs must share one shape, got {desc}")
    rank = len(out_shape)
    dropouts, mask_shapes, mask_base, counter = [], {}, {}, 0
    for i in live:
        v = frag.vals[i]
        if v.op == "dropout":
            if shapes[v.args[0]] is None:
                raise ValueError(f"node '{v.name}': dropout of a Python scalar")
            own = _mask_shape(shapes[i], v.shared_dims, f"dropout '{v.name}' input")
            mask_shapes[i] = (1,) * (rank - len(own)) + own
            dropouts.append(i)
            mask_base[i] = counter
            counter += math.prod(mask_shapes[i])
    return _Layout(kinds, dtypes, shapes, live, out_shape, dropouts, mask_shapes, mask_base)


def _aligned_strides(x: torch.Tensor, out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """x's strides over out_shape's dims: 0 where x is broadcast (missing or size 1)."""
    pad = len(out_shape) - x.dim()
    strides = [0] * pad
    for d in range(x.dim()):
        strides.append(0 if x.shape[d] == 1 else x.stride(d))
    return tuple(strides)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc if s != 1 else 0)
        acc *= s
    return tuple(reversed(strides))


def _collapse(shape: tuple[int, ...], operands: list[tuple[int, ...]]) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims every operand walks contiguously (outer stride == inner stride * inner size)."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    if not dims:
        return [1], [[0] for _ in operands]
    sizes = [shape[dims[0]]]
    strides = [[op[dims[0]]] for op in operands]
    for d in dims[1:]:
        if all(st[-1] == op[d] * shape[d] for st, op in zip(strides, operands)):
            sizes[-1] *= shape[d]
            for st, op in zip(strides, operands):
                st[-1] = op[d]
        else:
            sizes.append(shape[d])
            for st, op in zip(strides, operands):
                st.append(op[d])
    return sizes, strides


def _geometry(out_shape: tuple[int, ...], operand_strides: list[tuple[int, ...]]):
    sizes, strides = _collapse(out_shape, operand_strides)
    dense_strides = [0] * len(sizes)
    acc = 1
    for d in range(len(sizes) - 1, -1, -1):
        dense_strides[d] = acc
        acc *= sizes[d]
    ops = []
    reach = math.prod(sizes)
    for st in strides:
        ops.append(_Operand(tuple(st), tuple(s != 0 for s in st), list(st) == dense_strides))
        reach = max(reach, sum((n - 1) * s for n, s in zip(sizes, st)) + 1)
    return sizes, ops, reach >= 2**31 - 1


# ---------------------------------------------------------------------------------
# Code generation
# ---------------------------------------------------------------------------------


def _convert(expr: str, have: str, need: str) -> str:
    if need == "f" and have == "b":
        return f"{expr}.to(tl.float32)"
    if need == "b" and have != "b":
        return f"({expr} != 0)"
    return expr


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "", indent: int = 1) -> None:
        self.lines.append("    " * indent + line if line else "")


def _gen_kernel(frag: _Fragment, lay: _Layout, sizes: list[int], loaded: list[int], ops: list[_Operand],
                int64: bool, backward: bool, grad_inputs: list[int], name: str,
                split: int | None = None, reduced: tuple[bool, ...] = ()) -> str:
    """Source of one kernel.

    ``loaded``: value ids of the tensor inputs it reads (then, in backward, the
    upstream gradients of the outputs that need one); ``ops``: their geometry,
    then one per live dropout mask. Forward stores the outputs; backward stores
    the adjoints of ``grad_inputs``.

    ``split``: when set, the kernel walks the output as a 2-D tile grid, rows =
    the collapsed dims before ``split`` and columns = those from it on, and every
    grad input flagged in ``reduced`` (broadcast over all the row dims, a bias) is
    summed over the tile's rows in registers and stored as one partial row per
    program: a [row blocks, C] float32 buffer instead of a full-size one.
    """
    rank = len(sizes)
    vals = frag.vals
    n_in = len(loaded)
    scalars = [i for i in lay.live if vals[i].kind in ("input", "const") and lay.kinds[i] == "s"]
    gouts = _live_gouts(frag, lay, grad_inputs) if backward else []
    w = _Writer()
    out_ptrs = ([f"gin{k}" for k in range(len(grad_inputs))] if backward
                else [f"out{k}" for k in range(len(frag.outputs))])
    in_ptrs = [f"in{k}" for k in range(n_in)] + [f"gout{k}" for k in range(len(gouts))]
    scalar_args = [f"s{i}" for i in scalars]
    drop_args = (["seed"] + [f"doff{i}" for i in lay.dropouts]) if lay.dropouts else []
    size_args = [f"n{d}" for d in range(1, rank)]
    stride_args = []
    operand_names = [f"in{k}" for k in range(n_in)] + [f"gout{k}" for k in range(len(gouts))] + \
        [f"mask{i}" for i in lay.dropouts]
    for nm, op in zip(operand_names, ops):
        if not op.dense:
            stride_args += [f"{nm}_s{d}" for d in range(rank) if op.pattern[d]]
    if split is None:
        args = out_ptrs + in_ptrs + scalar_args + drop_args + ["N"] + size_args + stride_args + ["BLOCK: tl.constexpr"]
    else:
        args = (out_ptrs + in_ptrs + scalar_args + drop_args + ["R", "C"] + size_args + stride_args
                + ["BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr"])
    w("@triton.jit", 0)
    w(f"def {name}(", 0)
    for a in args:
        w(f"{a},", 2)
    w("):", 0)
    w(f"# {'backward' if backward else 'forward'}: output shape {list(lay.out_shape)} collapsed to {sizes}")
    if split is None:
        w("pid = tl.program_id(0)")
        w(f"offs = pid{'.to(tl.int64)' if int64 else ''} * BLOCK + tl.arange(0, BLOCK)")
        w("valid = offs < N")
    else:
        w(f"# tiles: rows = dims {list(range(split))}, columns = dims {list(range(split, rank))}; "
          "bias-like gradients are summed over the tile's rows")
        w(f"pid_r = tl.program_id(0){'.to(tl.int64)' if int64 else ''}")
        w("rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)")
        w("cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)")
        w("offs = rows[:, None] * C + cols[None, :]")
        w("valid = (rows < R)[:, None] & (cols < C)[None, :]")
    if rank == 1:
        w("i0 = offs")
    else:
        w("rem = offs")
        for d in range(rank - 1, 0, -1):
            w(f"i{d} = rem % n{d}")
            w(f"rem = rem // n{d}")
        w("i0 = rem")

    def offset_expr(nm: str, op: _Operand) -> str:
        if op.dense:
            return "offs"
        terms = [f"i{d} * {nm}_s{d}" for d in range(rank) if op.pattern[d]]
        return " + ".join(terms) if terms else "offs * 0"

    names: dict[int, str] = {}
    for k, vid in enumerate(loaded):
        w(f"# {vals[vid].name}: {lay.dtypes[vid]} {list(lay.shapes[vid])}")
        load = f"tl.load(in{k} + ({offset_expr(f'in{k}', ops[k])}), mask=valid, other=0)"
        if lay.kinds[vid] == "b":
            w(f"x{vid} = {load} != 0")
        else:
            w(f"x{vid} = {load}.to(tl.float32)")
        names[vid] = f"x{vid}"
    for i in scalars:
        names[i] = f"s{i}"
    mask_ops = {vid: ops[n_in + len(gouts) + j] for j, vid in enumerate(lay.dropouts)}
    for i in lay.live:
        v = vals[i]
        if v.kind != "op":
            continue
        rule = _RULES[v.op]
        operands = [_convert(names[a], lay.kinds[a], need) for a, need in zip(v.args, rule.arg_kinds)]
        fmt = {}
        if v.op == "dropout":
            w(f"# dropout '{v.name}': mask shape {list(lay.mask_shapes[i])}, counter = mask index + doff{i}")
            cnt = offset_expr(f"mask{i}", mask_ops[i])
            w(f"keep{i} = tl.rand(seed, ({cnt}).to(tl.int64) + doff{i}) >= {names[v.args[1]]}")
            fmt["keep"] = f"keep{i}"
        expr = rule.triton.format(*operands, **fmt)
        if v.op == "cast" and v.dtype in _ROUNDING_CASTS:
            # Values live in fp32 registers; a cast to a 16-bit float must still round like
            # eager's ``.half()`` / ``.bfloat16()`` (``a.half().float() - a`` is not 0).
            expr = f"({expr}).to({_ROUNDING_CASTS[v.dtype]}).to(tl.float32)"
        w(f"v{i} = {expr}  # {v.name} = {v.op}("
          f"{', '.join(vals[a].name for a in v.args)})")
        names[i] = f"v{i}"
    if not backward:
        for k, o in enumerate(frag.outputs):
            w(f"tl.store(out{k} + offs, {names[o]}.to(out{k}.dtype.element_ty), mask=valid)")
        return "\n".join(w.lines)
    # Reverse sweep: adjoints of every value between the inputs that need a gradient and the outputs.
    diff = _differentiable_set(frag, lay, grad_inputs)
    adj: dict[int, str] = {}
    for k, o in enumerate(gouts):
        op = ops[n_in + k]
        expr = f"tl.load(gout{k} + ({offset_expr(f'gout{k}', op)}), mask=valid, other=0).to(tl.float32)"
        if o in adj:
            w(f"{adj[o]} = {adj[o]} + {expr}")
        else:
            w(f"g{o} = {expr}")
            adj[o] = f"g{o}"
    for i in reversed(lay.live):
        v = vals[i]
        if v.kind != "op" or i not in adj:
            continue
        rule = _RULES[v.op]
        operands = [_convert(names[a], lay.kinds[a], need) for a, need in zip(v.args, rule.arg_kinds)]
        fmt = {"g": adj[i], "y": names[i]}
        if v.op == "dropout":
            fmt["keep"] = f"keep{i}"
        for pos, (a, tmpl) in enumerate(zip(v.args, rule.grads)):
            if tmpl is None or a not in diff:
                continue
            contrib = tmpl.format(*operands, **fmt)
            if v.op == "cast" and v.dtype in _ROUNDING_CASTS:
                # Eager holds the gradient of a 16-bit value in that dtype (the cast's backward
                # rounds it): round the adjoint the same way before passing it on.
                contrib = f"({contrib}).to({_ROUNDING_CASTS[v.dtype]}).to(tl.float32)"
            if a in adj:
                w(f"{adj[a]} = {adj[a]} + {contrib}  # d{v.name}/d{vals[a].name}")
            else:
                w(f"g{a} = {contrib}  # d{v.name}/d{vals[a].name}")
                adj[a] = f"g{a}"
    for k, vid in enumerate(grad_inputs):
        if split is not None and reduced[k]:
            w(f"tl.store(gin{k} + pid_r * C + cols, tl.sum(tl.where(valid, {adj[vid]}, 0.0), axis=0), "
              "mask=cols < C)")
        else:
            w(f"tl.store(gin{k} + offs, {adj[vid]}.to(gin{k}.dtype.element_ty), mask=valid)")
    return "\n".join(w.lines)


def _adjoint_set(frag: _Fragment, lay: _Layout, grad_inputs: list[int]) -> set[int]:
    """Values that receive an adjoint in the reverse sweep (a subset of the differentiable set)."""
    diff = _differentiable_set(frag, lay, grad_inputs)
    adj = {o for o in frag.outputs if o in diff}
    for i in reversed(lay.live):
        v = frag.vals[i]
        if v.kind == "op" and i in adj:
            adj.update(a for a, g in zip(v.args, _RULES[v.op].grads) if g is not None and a in diff)
    return adj


def _live_gouts(frag: _Fragment, lay: _Layout, grad_inputs: list[int]) -> list[int]:
    """The distinct outputs whose upstream gradient the backward kernel reads, in output order."""
    diff = _differentiable_set(frag, lay, grad_inputs)
    return list(dict.fromkeys(o for o in frag.outputs if o in diff))


def _differentiable_set(frag: _Fragment, lay: _Layout, grad_inputs: list[int]) -> set[int]:
    """Values that depend differentiably on one of ``grad_inputs`` (those need adjoints)."""
    dep = set(grad_inputs)
    for i in lay.live:
        v = frag.vals[i]
        if v.kind == "op" and lay.kinds[i] == "f":
            rule = _RULES[v.op]
            if any(a in dep and g is not None for a, g in zip(v.args, rule.grads)):
                dep.add(i)
    return dep


# ---------------------------------------------------------------------------------
# Compiling generated source
# ---------------------------------------------------------------------------------

_COMPILED: dict[str, Any] = {}
_COMPILE_LOCK = threading.Lock()
_SOURCE_DIR: str | None = None


def _compile(source: str, name: str) -> Any:
    """Import the generated source as a module (triton.jit needs a real file to read)."""
    global _SOURCE_DIR
    with _COMPILE_LOCK:
        fn = _COMPILED.get(source)
        if fn is not None:
            return fn
        if _SOURCE_DIR is None:
            _SOURCE_DIR = tempfile.mkdtemp(prefix="foldcompile_elementwise_")
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        mod_name = f"foldcompile_ew_{digest}"
        path = os.path.join(_SOURCE_DIR, mod_name + ".py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        fn = getattr(module, name)
        _COMPILED[source] = fn
        return fn


_HEADER = '''"""Generated by foldcompile.kernels.elementwise: do not edit.

Fragment:
{code}
"""
import triton
import triton.language as tl


@triton.jit
def _fc_tanh(x):
    # |x| < 0.55: x + x^3 P(x^2) (a least-squares fit to tanh's relative error, about 1 ulp
    # in fp32 down to the smallest x); elsewhere 1 - 2 / (exp(2|x|) + 1), whose cancellation
    # is bounded there because tanh >= 0.5. NaN falls through to the exp branch and stays NaN.
    a = tl.abs(x)
    t = x * x
    p = (((-0.006264359237691209 * t + 0.021064131235418473) * t - 0.053850295059224396) * t
         + 0.13332564438021324) * t - 0.3333331679863419
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(a < 0.55, x + x * t * p, tl.where(x < 0.0, -big, big))


'''


def _block_config(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps): one config, chosen by size (no autotuning: it fails in the interpreter)."""
    if _dispatch.interpreting() or numel < (1 << 20):
        return 1024, 4
    return 2048, 8


def _tile_config(cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the backward's tile mode: ~4K elements a tile."""
    block_c = min(triton.next_power_of_2(cols), 256)
    return max(1, 4096 // block_c), block_c, 8 if not _dispatch.interpreting() else 4


def _leading_false(pattern: tuple[bool, ...]) -> int:
    n = 0
    for used in pattern:
        if used:
            break
        n += 1
    return n
