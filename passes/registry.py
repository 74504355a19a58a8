"""The op registry: one entry per op, keyed by the op's callables, holding every fact a pass needs.

An entry (:class:`OpEntry`) holds the op's class, its symbolic shape rule, its FLOPs per
element (or ``gemm=True``: FLOPs from its einsum equation), whether it always returns views,
whether its values are independent of its inputs' values (creation ops), whether it draws from
torch's random number generator (``random``), the spelling ``normalize_pass`` gives a method call
of it, whether a fused kernel may take it, an empty slot for its sharding rule, and the sample
inputs the registry's tests run it on.

The keys are the callables themselves — ``torch.permute``, ``torch.Tensor.permute``,
``operator.add``, ``torch.ops._c10d_functional.all_to_all_single.default`` — never a name
string. :func:`register_op` is a decorator put on the op's shape rule; a name given as a
string is resolved once, at registration, to every callable of that name in torch's
namespaces (``torch``, ``torch.Tensor``, ``torch.nn.functional``, ``torch._C._nn``,
``torch._C._linalg``, ``operator``), so ``x.add(y)``, ``torch.add`` and ``x + y`` find one entry.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup, register_op, ELEMENTWISE
    >>> def twice(x): return 2 * x
    >>> @register_op(twice, op_class=ELEMENTWISE, flops_per_element=1,
    ...              samples=lambda: [((torch.randn(3, 5),), {})])
    ... def _rule_twice(ctx): return ctx.tshape(0)[1]
    >>> lookup(twice).op_class, lookup(torch.Tensor.permute).name
    ('ELEMENTWISE', 'permute')
"""
from __future__ import annotations

import builtins
import functools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["OpEntry", "register_op", "register_sharding", "lookup", "entry_of", "entries", "resolve_name", "op_name", "target_of",
           "writes_in_place", "functional_form", "draws_random", "changes_mode", "MODE_CHANGES", "enters_autocast",
           "exits_autocast", "FIXED_FLOAT_CASTS", "fixed_float_cast", "register_trait",
           "has_trait", "HOST_SYNC", "CAST_COMMUTES", "cast_target", "holds_every_value", "Piecewise", "piecewise",
           "OP_CLASSES", "GEMM", "REDUCTION", "ELEMENTWISE", "LAYOUT", "COMM", "OTHER"]

GEMM, REDUCTION, ELEMENTWISE, LAYOUT, COMM, OTHER = "GEMM", "REDUCTION", "ELEMENTWISE", "LAYOUT", "COMM", "OTHER"
OP_CLASSES = (GEMM, REDUCTION, ELEMENTWISE, LAYOUT, COMM, OTHER)

# where a name given to register_op is looked up (getattr is Python's own: fx records x.shape so)
_NAMESPACES: tuple[Any, ...] = (torch, torch.Tensor, F, torch._C._nn, torch._C._linalg, operator)
_BUILTINS = {"getattr": builtins.getattr}
# callables whose name matches an op but which are other functions (operator.concat joins sequences)
_NOT_THE_OP = (operator.concat,)

Sample = tuple[tuple, dict]  # (args, kwargs) of one call; tensors are real, small and distinct-sized


@dataclass
class OpEntry:
    """Everything the passes know about one op (see the module docstring)."""

    name: str
    op_class: str
    shape_rule: Callable[..., Any] | None
    targets: tuple[Any, ...]
    flops_per_element: int = 0          # ELEMENTWISE: per output element; REDUCTION: per input element
    gemm: bool = False                  # FLOPs are the products of meta["einsum"]
    views: bool = False                 # always returns views of its input: moves no bytes
    creation: bool = False              # output values never depend on input values (torch.ones_like)
    canonical: Any = None               # what normalize writes for a method call of this op
    fusible: str | None = None          # "pointwise": a generated element-wise kernel may take it;
    #                                     "kernel": one of foldcompile's own kernels computes it
    classify: Callable[[torch.fx.Node, bool], str] | None = None  # per-node class where it varies
    sharding: Callable[..., Any] | None = None   # the DAP planning pass's rule (passes/placement.py: the vocabulary)
    size_arg: int | None = None         # position of the argument listing the output's sizes (view, zeros)
    samples: Callable[[], list[Sample]] | None = None
    doc: str = ""
    random: bool = False                # draws from torch's random number generator (dropout, rand, uniform_):
    #                                     never erased as dead code, its draws replayed by verify (draws_random)
    literal_sizes: Callable[[torch.fx.Node, Any], dict[int, Any] | None] | None = None
    #                                     the symbolic meaning of literal sizes in other arguments than a
    #                                     size list at ``size_arg`` (split sections, unflatten sizes),
    #                                     given the node and its symbolic output: ``meta["sym_args"]``

    def class_of(self, node: torch.fx.Node, mask_only: bool = False) -> str:
        return self.classify(node, mask_only) if self.classify is not None else self.op_class


_REGISTRY: dict[Any, OpEntry] = {}
_ENTRIES: list[OpEntry] = []


def resolve_name(name: str) -> tuple[Any, ...]:
    """Every callable called ``name`` in the registry's namespaces (dtypes and modules excluded)."""
    found: list[Any] = []
    if name in _BUILTINS:
        found.append(_BUILTINS[name])
    for ns in _NAMESPACES:
        obj = getattr(ns, name, None)
        if obj is None or not callable(obj) or isinstance(obj, type) or isinstance(obj, torch.dtype) \
                or any(obj is x for x in _NOT_THE_OP):
            continue
        if not any(obj is f for f in found):
            found.append(obj)
    return tuple(found)


def register_op(*ops: str | Any, op_class: str, flops_per_element: int = 0, gemm: bool = False,
                views: bool = False, creation: bool = False, random: bool = False, torch_spelling: bool = False,
                fusible: str | None = None, size_arg: int | None = None, classify: Callable[[torch.fx.Node, bool], str] | None = None,
                samples: Callable[[str], list[Sample]] | Callable[[], list[Sample]] | None = None,
                name: str | None = None,
                literal_sizes: Callable[[torch.fx.Node, Any], dict[int, Any] | None] | None = None,
                ) -> Callable[[Callable], Callable]:
    """Decorate a shape rule to register the ops it serves (one entry per op).

    ``ops``: op names (resolved by :func:`resolve_name`; each is its own entry) or callables
    (together one entry, named ``name`` or after the first callable). ``torch_spelling``:
    normalize writes a method call ``x.m(...)`` as ``torch.m(x, ...)`` (the same op with the same
    arguments), else as ``torch.Tensor.m(x, ...)``. ``samples(name)`` (or ``samples()`` for
    callables) returns ``[(args, kwargs)]`` calls the registry tests run the op on.
    """
    if op_class not in OP_CLASSES:
        raise ValueError(f"op_class must be one of {OP_CLASSES}, got {op_class!r}")

    def deco(rule: Callable) -> Callable:
        names = [o for o in ops if isinstance(o, str)]
        fns = tuple(o for o in ops if not isinstance(o, str))
        groups: list[tuple[str, tuple[Any, ...], Callable | None]] = []
        for n in names:
            targets = resolve_name(n)
            if not targets:
                raise ValueError(f"register_op: no callable named {n!r} in {_NAMESPACES}")
            groups.append((n, targets, (lambda n=n: samples(n)) if samples is not None else None))
        if fns:
            groups.append((name or getattr(fns[0], "__name__", str(fns[0])), fns, samples))
        for n, targets, smp in groups:
            canonical = None
            if torch_spelling and callable(getattr(torch, n, None)):
                canonical = getattr(torch, n)
            elif hasattr(torch.Tensor, n) and callable(getattr(torch.Tensor, n)):
                canonical = getattr(torch.Tensor, n)
            entry = OpEntry(n, op_class, rule, targets, flops_per_element, gemm, views, creation, canonical,
                            fusible, classify, None, size_arg, smp, (rule.__doc__ or "").strip(), random=random,
                            literal_sizes=literal_sizes)
            for t in targets:
                if t in _REGISTRY:
                    raise ValueError(f"register_op: {t!r} is already registered as {_REGISTRY[t].name!r}")
                _REGISTRY[t] = entry
            _ENTRIES.append(entry)
        return rule

    return deco


def register_sharding(*ops: str | Any) -> Callable[[Callable], Callable]:
    """Decorate a DAP sharding rule (:mod:`foldcompile.passes.sharding_rules`) to put it into the
    ``sharding`` slot of the entries of ``ops`` (names or callables, as for :func:`register_op`)."""
    def deco(rule: Callable) -> Callable:
        for op in ops:
            targets = resolve_name(op) if isinstance(op, str) else (op,)
            found = {id(e): e for e in (lookup(t) for t in targets) if e is not None}
            if not found:
                raise ValueError(f"register_sharding: {op!r} has no registry entry")
            for e in found.values():
                if e.sharding is not None and e.sharding is not rule:
                    raise ValueError(f"register_sharding: {e.name!r} already has a sharding rule")
                e.sharding = rule
        return rule
    return deco


def lookup(target: Any) -> OpEntry | None:
    """The entry of a callable (``torch.permute``, an OpOverload, ...), ``None`` if unregistered."""
    _ensure_loaded()
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "foldcompile" and target not in _REGISTRY:
        # the kernels' ops exist once foldcompile.kernels.ops is imported (a graph holding one did);
        # their entries load with them, so analysing a plain model never imports Triton
        import foldcompile.passes.op_kernels  # noqa: F401
    try:
        return _REGISTRY.get(target)
    except TypeError:  # an unhashable target
        return None


def target_of(node: torch.fx.Node) -> Any:
    """The callable a node calls: its target, or ``torch.Tensor.<m>`` for a method call ``x.m()``."""
    if node.op == "call_method":
        return getattr(torch.Tensor, str(node.target), None)
    if node.op == "call_function":
        return node.target
    return None


def entry_of(node: torch.fx.Node) -> OpEntry | None:
    """The entry of the op a node calls (placeholders, outputs, unknown ops: ``None``)."""
    if node.op not in ("call_function", "call_method"):
        return None
    _ensure_loaded()
    return lookup(target_of(node))


def entries(kernels: bool = True) -> Iterator[OpEntry]:
    """Every registered entry, in registration order (with ``kernels``, the kernels' ops too,
    which imports :mod:`foldcompile.kernels.ops`)."""
    _ensure_loaded()
    if kernels:
        import foldcompile.passes.op_kernels  # noqa: F401
    return iter(list(_ENTRIES))


def op_name(node: torch.fx.Node) -> str:
    """A node's op as one name, for records and tables: the entry's name where registered
    (``torch.reshape``, ``Tensor.view`` and ``x.view`` give their op's name), else the callable's
    own: ``operator.add`` gives ``add``, an ATen overload its op (``aten.add.Tensor`` -> ``add``),
    any other ``torch.ops`` overload ``namespace.op`` (``_c10d_functional.all_to_all_single``)."""
    entry = entry_of(node)
    if entry is not None:
        return entry.name
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            ns, op = t._schema.name.split("::")
            return op if ns == "aten" else f"{ns}.{op}"
        name = getattr(t, "__name__", str(t))
        return name.split(".")[-1]
    return node.op


def draws_random(node: torch.fx.Node) -> bool:
    """Whether a node's op draws from torch's random number generator: its entry says so (``random``);
    an op without an entry, when torch tags its ATen op ``nondeterministic_seeded``
    (``aten.native_dropout.default``, and ``torch.native_dropout`` through the ATen op of its name).
    A dropout called with ``training=False`` still counts: what it draws is decided at run time.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: torch.nn.functional.dropout(x, 0.1) + torch.rand_like(x).sin())
        >>> [n.name for n in gm.graph.nodes if draws_random(n)]
        ['dropout', 'rand_like']
    """
    entry = entry_of(node)
    if entry is not None:
        return entry.random
    target = target_of(node)
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    if target is not None and any(getattr(ns, getattr(target, "__name__", ""), None) is target
                                  for ns in (torch, torch.Tensor)):
        return _aten_op_is_seeded(target.__name__)
    return False


@functools.lru_cache(maxsize=None)
def _aten_op_is_seeded(name: str) -> bool:
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    return any(torch.Tag.nondeterministic_seeded in getattr(packet, o).tags for o in packet.overloads())


# Calls that change how the ops after them run (grad mode, autocast): not tensor ops, no entries; a
# pass moving nodes across one of them changes what those nodes compute.
MODE_CHANGES: frozenset[Any] = frozenset({torch._C._set_grad_enabled, torch.amp.autocast_mode._enter_autocast,
                                          torch.amp.autocast_mode._exit_autocast})


def changes_mode(node: torch.fx.Node) -> bool:
    """Whether a node enters or leaves a grad-mode or autocast region (:data:`MODE_CHANGES`)."""
    return node.op == "call_function" and node.target in MODE_CHANGES


# Tensor methods that cast to one floating dtype, named by the method rather than by a dtype argument
# (``x.float()``): a pass that changes a graph's precision (verify's float64 truth) must see them.
FIXED_FLOAT_CASTS: dict[Any, torch.dtype] = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
                                             torch.Tensor.bfloat16: torch.bfloat16}


def fixed_float_cast(node: torch.fx.Node) -> torch.dtype | None:
    """The floating dtype a ``x.float()`` / ``x.half()`` / ``x.bfloat16()`` node casts to (else None)."""
    if node.op not in ("call_function", "call_method"):
        return None
    return FIXED_FLOAT_CASTS.get(target_of(node))


def enters_autocast(node: torch.fx.Node) -> bool:
    """Whether a node enters an autocast region (``_enter_autocast(device_type, dtype, enabled, cache_enabled)``,
    what a capture writes for ``with torch.autocast(...)``; its ``_exit_autocast`` takes this node)."""
    return node.op == "call_function" and node.target is torch.amp.autocast_mode._enter_autocast


def exits_autocast(node: torch.fx.Node) -> bool:
    """Whether a node leaves an autocast region (``_exit_autocast(enter_node)``)."""
    return node.op == "call_function" and node.target is torch.amp.autocast_mode._exit_autocast


_LOADED = False


def _ensure_loaded() -> None:
    # the entries are registered by the modules that define their rules; import them once
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import foldcompile.passes.op_comm  # noqa: F401
        import foldcompile.passes.op_creation  # noqa: F401
        import foldcompile.passes.op_gemm  # noqa: F401
        import foldcompile.passes.op_layout  # noqa: F401
        import foldcompile.passes.op_pointwise  # noqa: F401
        import foldcompile.passes.op_reduction  # noqa: F401
        import foldcompile.passes.placement  # noqa: F401  (the planned transitions of a sharded graph)


def all_targets() -> Iterable[Any]:
    """Every registered callable."""
    _ensure_loaded()
    return list(_REGISTRY)


# ----------------------------------------------------------------------------- in-place ops
# In-place spellings and, where the out-of-place op takes the same arguments, that op (``a += b`` is
# ``a + b`` written into a's memory). normalize respells them where nothing can tell; fuse never
# moves a read past one that stays.
_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, operator.ifloordiv: None, operator.imod: None,
                      operator.ipow: None, operator.iand: None, operator.ior: None, operator.ixor: None,
                      operator.setitem: None}
_RESPELLABLE_METHODS = frozenset("""
add_ sub_ mul_ div_ neg_ abs_ exp_ sqrt_ rsqrt_ pow_ sigmoid_ tanh_ relu_ clamp_ clamp_min_ clamp_max_
masked_fill_
""".split())


def writes_in_place(node: torch.fx.Node) -> bool:
    """Whether a node writes into one of its inputs (``x += y``, ``x.mul_(y)``, ``x[i] = y``, ``copy_``)."""
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") and getattr(torch.Tensor, name, None) is node.target


def functional_form(node: torch.fx.Node) -> tuple[Any, str] | None:
    """``(out-of-place target, in-place name)`` for an in-place node whose out-of-place op takes the
    same arguments (its registry spelling), else None."""
    if not writes_in_place(node):
        return None
    if node.target in _INPLACE_OPERATORS:
        target = _INPLACE_OPERATORS[node.target]
        return (target, node.target.__name__) if target is not None else None
    name = node.target.__name__
    if name not in _RESPELLABLE_METHODS:
        return None
    method = getattr(torch.Tensor, name[:-1])
    entry = lookup(method)
    return (entry.canonical if entry is not None and entry.canonical is not None else method), name


# ----------------------------------------------------------------------------- op traits
# Facts about ops that need no entry of their own (no shape rule, class or cost): what an executor or a
# pass must know about an op however the graph spells it (``x.item()``, ``torch.Tensor.tolist``,
# ``torch.ops.aten.nonzero.default``). Random ops are told by :func:`draws_random` (their entries). Keyed by callable like the entries; a name is resolved once,
# on first use, in the registry's namespaces and ``torch.ops.aten`` (an overload finds its packet's traits).
HOST_SYNC = "host_sync"  # may read a device value on the host (illegal while a CUDA stream is captured); whether
#                          a node does depends on its arguments for some ops: reads_device_on_host (below)
# picks, moves or repeats its first input's elements and computes nothing with them: a dtype cast before it
# equals the same cast after it (``x.float().chunk(2)[0]`` is ``x.chunk(2)[0].float()``)
CAST_COMMUTES = "cast_commutes"
_TRAIT_NAMES = {
    HOST_SYNC: """item tolist nonzero masked_select unique unique_consecutive bincount repeat_interleave cpu numpy
                  argwhere equal allclose is_nonzero""",
    CAST_COMMUTES: """view reshape permute transpose t unsqueeze squeeze flatten unflatten expand chunk split unbind
                      getitem select narrow contiguous movedim moveaxis swapaxes swapdims""",
}
_TRAITS: dict[Any, set[str]] = {}
_TRAITS_LOADED = False


def register_trait(trait: str, *ops: str | Any) -> None:
    """Give ``ops`` (names, resolved as by :func:`register_op`, or callables) the trait ``trait``."""
    for op in ops:
        targets = list(resolve_name(op)) if isinstance(op, str) else [op]
        if isinstance(op, str) and hasattr(torch.ops.aten, op):
            targets.append(getattr(torch.ops.aten, op))
        for t in targets:
            _TRAITS.setdefault(t, set()).add(trait)


def has_trait(target: Any, trait: str) -> bool:
    """Whether the callable ``target`` (a node's :func:`target_of`) has ``trait`` (:data:`HOST_SYNC`).

        >>> import torch
        >>> has_trait(torch.Tensor.item, HOST_SYNC), has_trait(torch.ops.aten.nonzero.default, HOST_SYNC)
        (True, True)
        >>> has_trait(torch.sigmoid, HOST_SYNC)
        False
    """
    global _TRAITS_LOADED
    if not _TRAITS_LOADED:
        _TRAITS_LOADED = True
        for name, ops in _TRAIT_NAMES.items():
            register_trait(name, *ops.split())
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    try:
        return trait in _TRAITS.get(target, ())
    except TypeError:  # an unhashable target
        return False


# ----------------------------------------------------------------------------- dtype casts
# A pure dtype cast: ``x.to(dtype)`` / ``x.to(dtype=...)`` (normalize spells it ``torch.Tensor.to``) and the
# dtype methods. A ``.to`` with a device, another tensor, ``copy=`` or a memory format is not one.
_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
# the floating dtypes each one's values all lie in (binary IEEE formats: more mantissa bits, wider exponent
# range, subnormals included): a cast there and back is the identity, value for value
_HOLDS = {torch.float16: (torch.float16, torch.float32, torch.float64),
          torch.bfloat16: (torch.bfloat16, torch.float32, torch.float64),
          torch.float32: (torch.float32, torch.float64), torch.float64: (torch.float64,)}


def cast_target(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype ``node`` converts its first argument to, when it is a pure dtype cast; else None.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: (x.float(), x.to(torch.bfloat16), x.to(dtype=torch.half),
        ...                                         x.to("cpu"), x.to(torch.float32, copy=True)))
        >>> [cast_target(n) for n in gm.graph.nodes if n.op == "call_method"]
        [torch.float32, torch.bfloat16, torch.float16, None, None]
    """
    target = target_of(node)
    name = getattr(target, "__name__", "")
    if target is None or getattr(torch.Tensor, name, None) is not target or not node.args:
        return None
    if name in _CAST_METHODS:
        return _CAST_METHODS[name] if len(node.args) == 1 and not node.kwargs else None
    if name != "to" or set(node.kwargs) - {"dtype", "non_blocking"}:
        return None
    pos = node.args[1:]  # (dtype[, non_blocking]); a third is copy=
    if "dtype" in node.kwargs:
        dt = node.kwargs["dtype"] if not pos else None
    else:
        dt = pos[0] if pos and (len(pos) == 1 or (len(pos) == 2 and isinstance(pos[1], bool))) else None
    return dt if isinstance(dt, torch.dtype) else None


def holds_every_value(wide: Any, narrow: Any) -> bool:
    """Whether every value of the floating dtype ``narrow`` is a value of ``wide`` (bf16 and fp16 in fp32, fp32
    in fp64; not fp16 in bf16, whose exponent range is wider but mantissa shorter): ``x.to(wide).to(narrow)``
    is ``x`` for every ``narrow`` x.

        >>> holds_every_value(torch.float32, torch.bfloat16), holds_every_value(torch.bfloat16, torch.float16)
        (True, False)
    """
    return wide in _HOLDS.get(narrow, ())


# ----------------------------------------------------------------------------- piecewise ops
# Ops made of smooth pieces joined at a kink (relu at 0, clamp at its bounds) or that choose a branch
# (``x > y`` deciding a ``where``): their derivative jumps where an input crosses the kink, so an output
# element one rounding away from it may be on the other piece in another precision, with a gradient that
# differs by the whole upstream gradient there. ``verify`` evaluates the float64 truth's backward on the
# pieces the checked run took. Which piece an element is on is read off the op's OUTPUT (the value a
# run keeps): ``piece(out, args, kwargs)``, and ``on_piece(args, kwargs, piece)`` is the op on those
# pieces, in the arguments' dtype. Keyed by op name (:func:`op_name`). ``abs``, ``maximum``, ``minimum``
# are not here: their output does not tell which piece (or which operand) it came from.
@dataclass(frozen=True)
class Piecewise:
    """How to read a piecewise op's pieces off its output, and evaluate it on given pieces."""

    piece: Callable[[torch.Tensor, tuple, dict], torch.Tensor]
    on_piece: Callable[[tuple, dict, torch.Tensor], torch.Tensor]


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _zero_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _bounds(name: str, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    if name == "clamp_min":
        return _arg(args, kwargs, 1, "min"), None
    if name == "clamp_max":
        return None, _arg(args, kwargs, 1, "max")
    if name == "hardtanh":
        return _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    return _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")


def _clamp_pieces(name: str) -> Piecewise:
    # piece 0: inside the bounds (the identity), 1: at the lower bound, 2: at the upper (a constant)
    def piece(out: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        lo, hi = _bounds(name, args, kwargs)
        p = torch.zeros(out.shape, dtype=torch.uint8, device=out.device)
        if isinstance(lo, (int, float)):
            p = torch.where(out <= torch.tensor(lo, dtype=out.dtype), 1, p).to(torch.uint8)
        if isinstance(hi, (int, float)):
            p = torch.where(out >= torch.tensor(hi, dtype=out.dtype), 2, p).to(torch.uint8)
        return p

    def on_piece(args: tuple, kwargs: dict, p: torch.Tensor) -> torch.Tensor:
        x = args[0]
        lo, hi = _bounds(name, args, kwargs)
        out = x
        if isinstance(lo, (int, float)):
            out = torch.where(p == 1, torch.tensor(lo, dtype=x.dtype, device=x.device), out)
        if isinstance(hi, (int, float)):
            out = torch.where(p == 2, torch.tensor(hi, dtype=x.dtype, device=x.device), out)
        return out

    return Piecewise(piece, on_piece)


def _scalar_bounds(name: str, args: tuple, kwargs: dict) -> bool:
    return all(b is None or isinstance(b, (int, float)) for b in _bounds(name, args, kwargs))


_PIECEWISE: dict[str, Piecewise] = {
    "relu": Piecewise(lambda out, a, k: out > 0,
                      lambda a, k, p: torch.where(p, a[0], _zero_like(a[0]))),
    "leaky_relu": Piecewise(lambda out, a, k: out > 0,
                            lambda a, k, p: torch.where(p, a[0], a[0] * _arg(a, k, 1, "negative_slope", 0.01))),
    **{name: _clamp_pieces(name) for name in ("clamp", "clamp_min", "clamp_max", "hardtanh")},
}
# a comparison IS its piece: the truth takes the run's booleans (a where/masked_fill then picks the same side)
_COMPARISONS = frozenset("lt le gt ge eq ne".split())


def piecewise(node: torch.fx.Node, args: tuple, kwargs: dict) -> Piecewise | None:
    """How ``node`` (called on ``args``, ``kwargs``: values, or the node's own arguments, whose literal
    bounds are what this reads) splits into pieces, or None where it is smooth or its pieces cannot be
    read off its output (see the section comment above).

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + (x > 0.5))
        >>> relu, gt = [n for n in gm.graph.nodes if n.op == "call_function"][:2]
        >>> x = torch.tensor([-1.0, 1e-4, 2.0], dtype=torch.float64)
        >>> p = piecewise(relu, (x,), {})
        >>> p.on_piece((x,), {}, p.piece(torch.tensor([0.0, 0.0, 2.0]), (x,), {}))  # the run rounded 1e-4 to 0
        tensor([0., 0., 2.], dtype=torch.float64)
        >>> piecewise(gt, (x, 0.5), {}).on_piece((x, 0.5), {}, torch.tensor([False, True, True]))
        tensor([False,  True,  True])
    """
    if node.op != "call_function":
        return None
    name = op_name(node)
    if name in _COMPARISONS:  # (of integers or booleans: the same in every precision, replayed harmlessly)
        return Piecewise(lambda out, a, k: out, lambda a, k, p: p)
    if name in ("clamp", "clamp_min", "clamp_max", "hardtanh") and not _scalar_bounds(name, args, kwargs):
        return None
    return _PIECEWISE.get(name)


# ----------------------------------------------------------------------------- host facts, sharding and chunk-loop traits
# (hostfacts, 2026-12-02) Facts the executors and passes used to keep in module-level lists of their own:
# which ops read the device on the host GIVEN THEIR ARGUMENTS, which build a tensor from Python data,
# which random ops a rank can draw on its shard, which creation ops depend on the element's index, which
# ops join pieces and which allocate a buffer to store pieces into.
#
# HOST_SYNC (above) names the ops that MAY read a device value on the host; :func:`reads_device_on_host`
# is the precise, per-node fact (an op listed in ``_HOST_SYNC_UNLESS`` reads only for some arguments).
# Checked one by one (a false positive only costs a CUDA graph; a false negative breaks a capture):
# - ``repeat_interleave`` reads the device (the repeats' sum sizes its output) only when ``repeats`` is
#   a tensor and no ``output_size`` is given; an int ``repeats`` is an expand and a copy
#   (``bias.repeat_interleave(multiplicity, 0)`` in Boltz). An argument counts as a tensor unless it is
#   a literal or the node's meta says it is not one (shape_prop's ``shape`` None, a tracer's int value).
# - ``item``, ``tolist``, ``_local_scalar_dense`` (what ``item`` becomes in ATen graphs), ``equal``,
#   ``allclose``, ``is_nonzero``: a Python value out of a tensor, always.
# - ``nonzero``, ``argwhere``, ``masked_select``, ``unique``, ``unique_consecutive``, ``bincount``: the
#   output's size is data-dependent (bincount sizes it by the input's maximum even with ``minlength``).
# - ``cpu``, ``numpy``: kept unconditional. In a graph the CUDA-graph executor takes every input is on
#   one CUDA device, so a ``.cpu()`` there copies device -> host, except of a tensor the graph made on
#   the host itself; and work on such a host tensor runs once, at the capture, and is never replayed,
#   while bringing it back to the device is a host -> device copy a capture cannot hold either. Which
#   device a node's value is on is not part of its meta here (shape, dtype), so there is nothing exact
#   to condition on: the executor runs such a graph eagerly.
INDEXED_CREATION = "indexed_creation"  # a creation op whose values depend on each element's index: a shard
#                                        of it is not the op at the shard's size (built whole, then sliced)
SHARDED_DRAW = "sharded_draw"          # a random op a rank can draw exactly as one process does on its shard:
#                                        the whole draw, sliced (foldcompile.distributed.sharded_random)
JOINS = "joins"                        # concatenates the tensors of its first argument along ``dim``
FRESH_BUFFER = "fresh_buffer"          # allocates a tensor of the sizes given, one fill value or uninitialised
#                                        (what chunked code stores its pieces into)
_TRAIT_NAMES[HOST_SYNC] += " _local_scalar_dense"
_TRAIT_NAMES.update({
    INDEXED_CREATION: "arange linspace logspace eye tensor range",
    SHARDED_DRAW: "dropout bernoulli rand randn rand_like randn_like",
    JOINS: "cat concat concatenate",
    FRESH_BUFFER: "new_zeros new_empty new_ones new_full zeros empty ones full",
})
# ops that build a tensor from Python data (a host -> device copy on CUDA), by their data argument's position
# (its keyword is ``data``); keyed by the callables themselves, exactly these spellings
_HOST_DATA_POSITION: dict[Any, int] = {torch.tensor: 0, torch.as_tensor: 0, torch.Tensor.new_tensor: 1}

__all__ += ["node_has_trait", "reads_device_on_host", "host_data_position", "INDEXED_CREATION", "SHARDED_DRAW",
            "JOINS", "FRESH_BUFFER"]


def node_has_trait(node: torch.fx.Node, trait: str) -> bool:
    """Whether ``node`` calls an op with ``trait``, however it is spelled (a method call, the torch
    function, an ATen overload); placeholders, outputs and ``get_attr`` nodes have none.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: torch.cat([x.new_zeros(2), torch.arange(x.shape[0]),
        ...                                                   torch.rand_like(x), x.uniform_()]))
        >>> for n in gm.graph.nodes:
        ...     print(n.name, [t for t in (JOINS, FRESH_BUFFER, INDEXED_CREATION, SHARDED_DRAW) if node_has_trait(n, t)])
        x []
        new_zeros ['fresh_buffer']
        getattr_1 []
        getitem []
        arange ['indexed_creation']
        rand_like ['sharded_draw']
        uniform_ []
        cat ['joins']
        output []
        >>> has_trait(torch.ops.aten.cat.default, JOINS), has_trait(torch.zeros_like, FRESH_BUFFER)
        (True, False)
    """
    return node.op in ("call_function", "call_method") and has_trait(target_of(node), trait)


def _may_be_tensor(a: Any) -> bool:
    """Whether an argument may be a tensor: a tensor, or a node not known to be something else."""
    if isinstance(a, torch.Tensor):
        return True
    if not isinstance(a, torch.fx.Node):
        return False  # a literal (int, SymInt, None)
    for key in ("val", "example_value"):  # a tracer's record of the value (Dynamo, make_fx)
        if key in a.meta:
            return isinstance(a.meta[key], torch.Tensor)
    if "shape" in a.meta:  # shape_prop: None for a value that is no tensor
        return a.meta["shape"] is not None
    return True  # nothing known: it may be


def _repeat_interleave_reads(node: torch.fx.Node) -> bool:
    # torch.repeat_interleave(input, repeats, dim, *, output_size), the method, aten's self_Tensor / self_int,
    # and the one-argument form torch.repeat_interleave(repeats, *, output_size) (aten's .Tensor)
    if node.kwargs.get("output_size") is not None:
        return False
    if "repeats" in node.kwargs:
        repeats = node.kwargs["repeats"]
    elif len(node.args) >= 2:
        repeats = node.args[1]
    else:
        repeats = node.args[0] if node.args else node.kwargs.get("input")
    return _may_be_tensor(repeats)


# HOST_SYNC ops that read the device only for some arguments: op name -> whether this node does
_HOST_SYNC_UNLESS: dict[str, Callable[[torch.fx.Node], bool]] = {"repeat_interleave": _repeat_interleave_reads}


def reads_device_on_host(node: torch.fx.Node) -> bool:
    """Whether running ``node`` reads a device value on the host (a synchronisation a CUDA graph cannot
    capture): an op with the :data:`HOST_SYNC` trait, with the arguments that make it read (see the
    section comment above: ``repeat_interleave`` reads only for a tensor ``repeats`` without ``output_size``).

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x, counts: (x.repeat_interleave(2, 0), x.repeat_interleave(counts),
        ...                              x.repeat_interleave(counts, output_size=7), x.sum().item()))
        >>> [n.name for n in gm.graph.nodes if reads_device_on_host(n)]
        ['repeat_interleave_1', 'item']
    """
    if not node_has_trait(node, HOST_SYNC):
        return False
    unless = _HOST_SYNC_UNLESS.get(op_name(node))
    return unless is None or unless(node)


def host_data_position(target: Any) -> int | None:
    """Where the Python data sit among the arguments of an op that builds a tensor from them (a host ->
    device copy on CUDA; the keyword is ``data``), or None for any other op. Exactly ``torch.tensor``,
    ``torch.as_tensor`` and ``Tensor.new_tensor``: a node's :func:`target_of` gives the method's callable.

        >>> import torch
        >>> host_data_position(torch.tensor), host_data_position(torch.Tensor.new_tensor), host_data_position(torch.ones)
        (0, 1, None)
    """
    return next((p for f, p in _HOST_DATA_POSITION.items() if f is target), None)
