"""The fragment IR and the fx -> IR lowering of the element-wise generator.

``_lower`` turns an fx fragment into ``_Val`` entries, one converter per supported target
(``_FUNCTIONS`` for functions, including normalize's ``torch.Tensor.<name>`` spelling,
``_METHODS`` for methods, ``_module_rule`` for leaf modules); ``unsupported_reason`` says
why a node cannot join a fragment. Part of the generator behind
``foldcompile.kernels.elementwise`` (see ``elementwise_codegen`` for the map).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn.functional as F

from foldcompile.kernels.elementwise_rules import _RULES, UnsupportedElementwiseOp
from foldcompile.kernels.philox import _dropout_scale, dropout



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
                  shared_dims: Any = (), rescale: Any = True) -> int:
    if not isinstance(training, bool):
        raise UnsupportedElementwiseOp(f"node '{node.name}': dropout training={training!r} must be a Python bool")
    if isinstance(p, torch.fx.Node) or isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise UnsupportedElementwiseOp(f"node '{node.name}': dropout p={p!r} must be a constant number in [0, 1]")
    if not training or p == 0:
        return lw.operand(node, x, "dropout input")  # identity in eval mode
    if not isinstance(shared_dims, (tuple, list)) or not all(isinstance(d, int) for d in shared_dims):
        raise UnsupportedElementwiseOp(f"node '{node.name}': dropout shared_dims={shared_dims!r} must be ints")
    if not isinstance(rescale, bool):
        raise UnsupportedElementwiseOp(f"node '{node.name}': dropout rescale={rescale!r} must be a Python bool")
    scale = _dropout_scale(float(p)) if rescale else 1.0
    return lw.op(node, "dropout", (x, float(p), scale), shared_dims=tuple(shared_dims))


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
    _only_kwargs(node, {k: v for k, v in bound.items()
                        if k not in ("x", "p", "training", "shared_dims", "seed", "offset", "rescale")}, {})
    return _dropout_node(lw, node, bound["x"], bound.get("p", 0.5), bound.get("training", True),
                         bound.get("shared_dims", ()), bound.get("rescale", True))


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
