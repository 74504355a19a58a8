"""DAP sharding rules: every legal way to run an op on sharded values, one function per op family.

A rule (the op registry's ``OpEntry.sharding`` slot) reads one node of an annotated graph and the
placements its tensor inputs can be given, and returns the op's **strategies**: for each, the
output's placement, the placement each tensor input must have, and whether the work is split
across the ranks. The planning pass (:mod:`foldcompile.passes.shard`) chooses one strategy per node;
:func:`~foldcompile.passes.shard.check_plan` checks a planned graph against the same rules.

Placements are :class:`~foldcompile.passes.placement.Placed` values: ``Shard(d)`` with its per-rank
split sizes, ``Replicate()``, ``Partial()``. Only dims whose symbolic size names a model dim
(``N_seq``, ``N_res``, ...) are ever split; channels stay whole. The families:

- **element-wise, by broadcasting**: a split output dim is split the same way in every input that
  has it; an input that broadcasts there (size 1, or no such dim) is Replicate. ``Partial``
  passes only through linear arithmetic: ``a + b`` and ``a - b`` of two Partials, ``-p``,
  ``p * r`` and ``p / r`` with ``r`` replicated (or a number);
- **reductions** (``sum``, ``mean``, ``amax``, softmax, layer norm, norms, ...) need the reduced dims
  whole; ``sum`` over a split dim gives ``Partial``; ``sum`` and ``mean`` of a Partial are Partial;
- **layout**: ``permute``/``transpose``/``movedim``/``(un)squeeze``/``expand`` move the split dim;
  ``view``/``reshape`` map it through dim groups (a merged group keeps a split of its outermost dim
  only, a split group puts it on its outermost new dim, when the split sizes allow); slicing,
  indexing, ``narrow``, ``select``, ``pad`` and ``cat``/``split`` *along* a split dim need it
  whole (a ``narrow`` spanning the whole dim keeps it); all views pass ``Partial``;
- **contractions** (``einsum``, ``matmul``, ``linear``, ``bmm``, ...: the letters of
  ``meta["einsum"]``): a letter of the output split in every operand that has it (an operand
  without it, or broadcast there, Replicate: a batch letter splits every operand, a free letter
  one); a contracted letter split in every operand that has it gives ``Partial``; one Partial
  operand with the others Replicate gives ``Partial`` (no bias);
- **attention** (SDPA, ``foldcompile.attention``): batch dims and the query dim split, the key dim whole;
- **outer product mean** (``foldcompile.outer_product_mean``): batch dims, or one residue dim (a and
  its mask split there, the other operand and mask whole), split; the sequences whole (the count
  divides their sum: not linear, so no ``Partial``);
- **creation ops** (``zeros``, ``arange``, ``tensor``, ...): Replicate.

Every rule also offers the replicated strategy (every input Replicate, every rank computes all of
it). An op without a rule runs only that way; the pass lists it.

    >>> import torch, torch.fx
    >>> from foldcompile.passes import normalize_pass, shape_prop_pass
    >>> gm = normalize_pass(torch.fx.symbolic_trace(lambda m: torch.softmax(m, -1))).graph_module
    >>> _ = shape_prop_pass(gm, (torch.randn(5, 11),), dims={"N_seq": 5, "N_res": 11})
    >>> sm = [n for n in gm.graph.nodes if n.op == "call_function"][0]
    >>> [str(s) for s in strategies(sm, world_size=2)]       # the softmax dim (N_res) stays whole
    ['Replicate() <- (Replicate(),)', 'Shard(0, sizes=[3, 2]) <- (Shard(0, sizes=[3, 2]),)']
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import Any, Callable, Iterable, Sequence, Union

import sympy
import torch
import torch.fx

from foldcompile.distributed.collectives import split_sizes
from foldcompile.passes.einsum import contractions_of
from foldcompile.passes.meta import MULTI_OUTPUT, SHAPE, SYM_SHAPE
from foldcompile.passes.placement import Partial, Placed, Replicate, Shard
from foldcompile.passes.registry import entry_of, lookup, op_name, register_sharding

__all__ = ["Strategy", "ShardingContext", "strategies", "tensor_inputs", "replace_input", "has_rule", "REPLICATE",
           "PARTIAL", "default_shard", "shardable_dims", "Spec"]

Spec = Union[Placed, tuple]            # a tensor's placement, or a tuple of them for a multi-output node
REPLICATE = Placed(Replicate())
PARTIAL = Placed(Partial())
Path = tuple                           # where a tensor input sits in a node's arguments: ("a", 1), ("k", "bias", 0)


@dataclass(frozen=True)
class Strategy:
    """One way to run a node: its output's placement (a tuple for a multi-output op), the placement
    each tensor input must arrive in (``None``: any, the value is not read), and whether the work
    is split across the ranks (False: every rank computes all of it)."""

    out: Spec
    inputs: tuple[Spec | None, ...]
    divided: bool = True

    def __str__(self) -> str:
        return f"{self.out!r} <- ({', '.join(repr(i) for i in self.inputs)}{',' if len(self.inputs) == 1 else ''})"


# ----------------------------------------------------------------------------------------------
# the node's tensor inputs


def _is_tensor(a: Any) -> bool:
    return isinstance(a, torch.fx.Node) and (a.meta.get(SHAPE) is not None or bool(a.meta.get(MULTI_OUTPUT)))


def tensor_inputs(node: torch.fx.Node) -> list[tuple[Path, torch.fx.Node]]:
    """The tensor-valued arguments of a node with where they sit, in argument order (a node read
    twice, ``einsum(mask, mask)``, is two inputs)."""
    out: list[tuple[Path, torch.fx.Node]] = []

    def visit(a: Any, path: Path) -> None:
        if _is_tensor(a):
            out.append((path, a))
        elif isinstance(a, (list, tuple)):
            for j, x in enumerate(a):
                visit(x, path + (j,))

    for i, a in enumerate(node.args):
        visit(a, ("a", i))
    for k, a in node.kwargs.items():
        visit(a, ("k", k))
    return out


def replace_input(node: torch.fx.Node, path: Path, new: torch.fx.Node) -> None:
    """Make the argument at ``path`` (from :func:`tensor_inputs`) read ``new``."""
    def rebuild(container: Any, rest: Path) -> Any:
        if not rest:
            return new
        items = list(container)
        items[rest[0]] = rebuild(items[rest[0]], rest[1:])
        return type(container)(items) if isinstance(container, tuple) else items

    if path[0] == "a":
        args = list(node.args)
        args[path[1]] = rebuild(args[path[1]], path[2:])
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[path[1]] = rebuild(kwargs[path[1]], path[2:])
        node.kwargs = kwargs


# ----------------------------------------------------------------------------------------------
# placements of one tensor


@lru_cache(maxsize=None)
def _even(n: int, world: int) -> tuple[int, ...]:
    """``split_sizes(n, world)`` as a tuple (asked thousands of times per graph)."""
    return tuple(split_sizes(int(n), world))


@lru_cache(maxsize=None)
def _names_a_dim(size: Any) -> bool:
    """Whether a symbolic size involves a model dim (``N_res``, ``N_seq * N_res``; not ``8``)."""
    return isinstance(size, sympy.Expr) and bool(size.free_symbols)


def shardable_dims(node: torch.fx.Node) -> list[int]:
    """The dims of a tensor node that may be split: those whose symbolic size names a model dim."""
    sym = node.meta.get(SYM_SHAPE)
    if not isinstance(sym, tuple) or node.meta.get(MULTI_OUTPUT):
        return []
    return [d for d, s in enumerate(sym) if _names_a_dim(s)]


def default_shard(node: torch.fx.Node, d: int, world_size: int) -> Placed:
    """``Shard(d)`` of a node's output with the even-as-possible split of its example size."""
    return Placed(Shard(d), _even(int(node.meta[SHAPE][d]), world_size), node.meta[SYM_SHAPE][d])


class ShardingContext:
    """What a rule sees: the node, the world size, its tensor inputs (in :func:`tensor_inputs` order)
    and, per input, the placements it can be given (its producer's own and any a collective reaches)."""

    def __init__(self, node: torch.fx.Node, world_size: int, candidates: Sequence[Iterable[Spec]] | None = None):
        self.node, self.world = node, world_size
        found = tensor_inputs(node)
        self.paths = [p for p, _ in found]
        self.inputs = [n for _, n in found]
        if candidates is None:
            candidates = [reachable(n, world_size) for n in self.inputs]
        self.candidates = [list(dict.fromkeys(c)) for c in candidates]

    # -- shapes
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.node.meta[SHAPE])

    @property
    def sym(self) -> tuple[sympy.Expr, ...]:
        return tuple(self.node.meta[SYM_SHAPE])

    def in_shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.inputs[i].meta[SHAPE])

    def in_sym(self, i: int) -> tuple[sympy.Expr, ...]:
        return tuple(self.inputs[i].meta[SYM_SHAPE])

    def index_of(self, path: Path) -> int | None:
        """The input index of the tensor argument at ``path``."""
        return self.paths.index(path) if path in self.paths else None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """The node's argument at position ``i``, else keyword ``name``, else ``default``."""
        if i < len(self.node.args):
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def size_list(self, start: int, name: str) -> list[Any]:
        """Size arguments given as varargs (``x.view(a, b)``) or one sequence (``reshape(x, (a, b))``)."""
        args = self.node.args
        if len(args) == start + 1 and isinstance(args[start], (list, tuple, torch.Size)):
            return list(args[start])
        if len(args) > start:
            return list(args[start:])
        v = self.node.kwargs.get(name)
        return list(v) if isinstance(v, (list, tuple, torch.Size)) else [v]

    # -- placements
    def shardable(self, d: int) -> bool:
        return _names_a_dim(self.sym[d])

    def out_shard(self, d: int, splits: Sequence[int] | None = None) -> Placed:
        """``Shard(d)`` of the output, with the given split sizes or the default ones."""
        if splits is None:
            splits = _even(self.shape[d], self.world)
        return Placed(Shard(d), tuple(splits), self.sym[d])

    def in_shard(self, i: int, d: int, splits: Sequence[int]) -> Placed:
        return Placed(Shard(d), tuple(splits), self.in_sym(i)[d])

    def splits_at(self, i: int, d: int) -> list[tuple[int, ...]]:
        """The split sizes input ``i`` can have along its dim ``d``: the even split, and any other
        its candidates carry (a dim merged by a view keeps its outer dim's blocks)."""
        found = [_even(self.in_shape(i)[d], self.world)]
        for c in self.candidates[i]:
            if isinstance(c, Placed) and c.dim == d and c.split_sizes not in found:
                found.append(c.split_sizes)
        return found

    def replicated(self, reads: Sequence[int] | None = None) -> Strategy:
        """Every input Replicate (only those in ``reads`` where given; the rest: any), output
        Replicate: every rank computes all of it."""
        reads = range(len(self.inputs)) if reads is None else reads
        ins = tuple(self._replicate_of(i) if i in reads else None for i in range(len(self.inputs)))
        out = tuple(REPLICATE for _ in self.node.meta[SHAPE]) if self.node.meta.get(MULTI_OUTPUT) else REPLICATE
        return Strategy(out, ins, divided=False)

    def _replicate_of(self, i: int) -> Spec:
        n = self.inputs[i]
        return tuple(REPLICATE for _ in n.meta[SHAPE]) if n.meta.get(MULTI_OUTPUT) else REPLICATE

    def has_partial(self, i: int) -> bool:
        return PARTIAL in self.candidates[i]


def reachable(node: torch.fx.Node, world_size: int) -> list[Spec]:
    """The placements any tensor can be given by a collective: Replicate and the even split of each
    shardable dim (a multi-output node: none, its outputs are placed where they are made)."""
    if node.meta.get(MULTI_OUTPUT):
        return []
    return [REPLICATE] + [default_shard(node, d, world_size) for d in shardable_dims(node)]


# ----------------------------------------------------------------------------------------------
# registration and dispatch

Rule = Callable[[ShardingContext], list[Strategy]]


def has_rule(node: torch.fx.Node) -> bool:
    """Whether the node's op has a sharding rule (else it runs replicated)."""
    entry = entry_of(node)
    return entry is not None and entry.sharding is not None


def strategies(node: torch.fx.Node, world_size: int, candidates: Sequence[Iterable[Spec]] | None = None
               ) -> list[Strategy]:
    """The strategies of a tensor-producing node, the replicated one first (deduplicated); an op
    without a rule has only the replicated one."""
    ctx = ShardingContext(node, world_size, candidates)
    entry = entry_of(node)
    found = entry.sharding(ctx) if entry is not None and entry.sharding is not None else []
    replicated = [s for s in found if not s.divided]
    if not replicated:
        found = [ctx.replicated()] + found
    elif found[0] is not replicated[0]:
        found = replicated[:1] + [s for s in found if s is not replicated[0]]
    return list(dict.fromkeys(found))


def _register(*names: str) -> Callable[[Rule], Rule]:
    return register_sharding(*names)


def _norm(d: int, n: int) -> int:
    return d + n if d < 0 else d


# ----------------------------------------------------------------------------------------------
# one input mapped dim by dim (layout ops, reductions, unary element-wise)


def _mapped(ctx: ShardingContext, out_to_in: Sequence[int | None], whole: Iterable[int] = (), *,
            partial: bool = False, new_dims_from_replicate: bool = False, source: int = 0,
            others: str = "any") -> list[Strategy]:
    """Strategies of an op whose output dim ``d`` is input ``source``'s dim ``out_to_in[d]`` (None: a
    dim the input does not have, or has at size 1). ``whole``: input dims that must not be split.
    ``partial``: the op is linear (Partial in, Partial out). ``new_dims_from_replicate``: an output
    dim the input lacks may be split with the input Replicate (``expand``). ``others``: what the
    other tensor inputs need: ``"any"`` (read for their dtype or shape only) or ``"replicate"``."""
    whole = set(whole)
    rest = REPLICATE if others == "replicate" else None
    n_in = len(ctx.inputs)

    def ins(spec: Spec) -> tuple:
        return tuple(spec if i == source else rest for i in range(n_in))

    out = [Strategy(REPLICATE, ins(REPLICATE), divided=False)]
    for d_out, d_in in enumerate(out_to_in):
        if not ctx.shardable(d_out):
            continue
        if d_in is None:
            if new_dims_from_replicate:
                out.append(Strategy(ctx.out_shard(d_out), ins(REPLICATE)))
            continue
        if d_in in whole or ctx.in_shape(source)[d_in] != ctx.shape[d_out]:
            continue
        for splits in ctx.splits_at(source, d_in):
            out.append(Strategy(ctx.out_shard(d_out, splits), ins(ctx.in_shard(source, d_in, splits))))
    if partial and ctx.has_partial(source):
        out.append(Strategy(PARTIAL, ins(PARTIAL)))
    return out


def _identity_map(ctx: ShardingContext, source: int = 0) -> list[int | None]:
    return list(range(len(ctx.in_shape(source))))


# ----------------------------------------------------------------------------------------------
# element-wise, by broadcasting

_SUMS = {"add", "sub", "iadd", "isub", "add_", "sub_"}
_PRODUCTS = {"mul", "imul", "mul_"}
_QUOTIENTS = {"div", "truediv", "true_divide", "itruediv", "div_"}


def _numeric(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _pointwise_partials(ctx: ShardingContext) -> list[Strategy]:
    """The linear element-wise ops on Partial values (see the module docstring)."""
    name = op_name(ctx.node)
    n = len(ctx.inputs)
    a0, a1 = ctx.arg(0, "input"), ctx.arg(1, "other")
    if name in _SUMS:
        if n == 2 and all(isinstance(a, torch.fx.Node) for a in (a0, a1)) and all(ctx.has_partial(i) for i in range(2)):
            return [Strategy(PARTIAL, (PARTIAL, PARTIAL))]
    elif name == "neg":
        if n == 1 and ctx.has_partial(0):
            return [Strategy(PARTIAL, (PARTIAL,))]
    elif name in _PRODUCTS:
        if n == 1 and (_numeric(a0) or _numeric(a1)) and ctx.has_partial(0):
            return [Strategy(PARTIAL, (PARTIAL,))]
        if n == 2:
            return [Strategy(PARTIAL, tuple(PARTIAL if j == i else REPLICATE for j in range(2)))
                    for i in range(2) if ctx.has_partial(i)]
    elif name in _QUOTIENTS and ctx.node.kwargs.get("rounding_mode") is None:
        if ctx.paths and ctx.paths[0] == ("a", 0) and ctx.has_partial(0) and (n == 1 and _numeric(a1) or n == 2):
            return [Strategy(PARTIAL, (PARTIAL,) + (REPLICATE,) * (n - 1))]
    return []


@_register(*"""add sub mul div neg abs exp log sqrt rsqrt sigmoid tanh relu masked_fill lt le gt ge logical_and
    logical_or logical_not pow erf sin cos reciprocal square clamp clamp_min clamp_max eq ne sign nan_to_num exp2
    truediv true_divide gelu silu where and_ or_ invert floordiv mod rsub log1p relu_ elu leaky_relu softplus
    maximum minimum floor ceil round trunc sub_ add_ mul_ div_ iadd imul isub itruediv bitwise_and bitwise_or
    bitwise_not logsigmoid masked_fill_ lerp addcmul addcdiv hardtanh threshold isnan isinf copy_ fill_""".split())
def _rule_pointwise(ctx: ShardingContext) -> list[Strategy]:
    """Element-wise by broadcasting: a split output dim is split in every input that has it whole;
    an input broadcast there (size 1 or absent) is Replicate."""
    rank = len(ctx.shape)
    out: list[Strategy] = []
    for d in range(rank):
        if not ctx.shardable(d):
            continue
        options: list[tuple[int, ...]] = [_even(ctx.shape[d], ctx.world)]
        for i in range(len(ctx.inputs)):
            di = d - (rank - len(ctx.in_shape(i)))
            if di >= 0 and ctx.in_shape(i)[di] == ctx.shape[d]:
                options += [s for s in ctx.splits_at(i, di) if s not in options]
        for splits in options:
            ins = []
            for i in range(len(ctx.inputs)):
                di = d - (rank - len(ctx.in_shape(i)))
                ins.append(ctx.in_shard(i, di, splits) if di >= 0 and ctx.in_shape(i)[di] == ctx.shape[d]
                           else REPLICATE)
            out.append(Strategy(ctx.out_shard(d, splits), tuple(ins)))
    return out + _pointwise_partials(ctx)


@_register(*"""to float half bfloat16 bool double int long type type_as cpu requires_grad_ dropout dropout_
    alpha_dropout feature_alpha_dropout bernoulli rand_like randn_like zero_""".split())
def _rule_unary(ctx: ShardingContext) -> list[Strategy]:
    """Element-wise on the first input (other tensor arguments are read for their dtype only)."""
    return _mapped(ctx, _identity_map(ctx))


@_register("zeros_like", "ones_like", "empty_like", "full_like")
def _rule_like(ctx: ShardingContext) -> list[Strategy]:
    """Values independent of the input's: placed like it (a Partial input gives zeros, a Partial too)."""
    return _mapped(ctx, _identity_map(ctx), partial=op_name(ctx.node) == "zeros_like")


@_register("contiguous", "clone", "detach")
def _rule_copy(ctx: ShardingContext) -> list[Strategy]:
    """A copy: any placement, Partial included."""
    return _mapped(ctx, _identity_map(ctx), partial=True)


@_register("one_hot")
def _rule_one_hot(ctx: ShardingContext) -> list[Strategy]:
    """The input's dims, then the classes (whole)."""
    return _mapped(ctx, _identity_map(ctx) + [None])


# ----------------------------------------------------------------------------------------------
# creation


@_register(*"""zeros ones empty full rand randn new_zeros new_ones new_empty new_full arange eye linspace
    tensor""".split())
def _rule_creation(ctx: ShardingContext) -> list[Strategy]:
    """Made whole on every rank (slicing it later is free); a tensor argument is read for its dtype."""
    return [ctx.replicated(reads=())]


# ----------------------------------------------------------------------------------------------
# reductions


def _dims_arg(ctx: ShardingContext, pos: int, name: str = "dim") -> list[int] | None:
    d = ctx.arg(pos, name)
    rank = len(ctx.in_shape(0))
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return [_norm(int(x), rank) for x in d] if d else None
    if isinstance(d, int) and not isinstance(d, bool):
        return [_norm(d, rank)]
    raise TypeError(f"dim {d!r}")


def _reduce_map(ctx: ShardingContext, dims: list[int]) -> list[int | None]:
    rank = len(ctx.in_shape(0))
    out_rank = len(ctx.shape if not ctx.node.meta.get(MULTI_OUTPUT) else ctx.node.meta[SHAPE][0])
    if out_rank == rank:  # keepdim
        return [None if d in dims else d for d in range(rank)]
    return [d for d in range(rank) if d not in dims]


@_register(*"sum mean amax amin prod all any argmax argmin nansum var std logsumexp max min".split())
def _rule_reduce(ctx: ShardingContext) -> list[Strategy]:
    """The reduced dims whole; ``sum`` over a split dim is Partial; ``sum``/``mean`` keep a Partial."""
    name = op_name(ctx.node)
    if name in ("max", "min") and len(ctx.inputs) == 2:
        return _rule_pointwise(ctx)  # torch.max(a, b): element-wise
    rank = len(ctx.in_shape(0))
    dims = _dims_arg(ctx, 1)
    dims = list(range(rank)) if dims is None else dims
    if ctx.node.meta.get(MULTI_OUTPUT):
        return _multi(ctx, _reduce_map(ctx, dims), whole=dims)
    out = _mapped(ctx, _reduce_map(ctx, dims), whole=dims, partial=name in ("sum", "mean"))
    if name == "sum":
        for d in dims:
            if d in shardable_dims(ctx.inputs[0]):
                out += [Strategy(PARTIAL, (ctx.in_shard(0, d, s),)) for s in ctx.splits_at(0, d)]
    return out


@_register("linalg_vector_norm", "norm")
def _rule_vector_norm(ctx: ShardingContext) -> list[Strategy]:
    """A norm over its dims (argument 2): those whole."""
    rank = len(ctx.in_shape(0))
    dims = _dims_arg(ctx, 2)
    dims = list(range(rank)) if dims is None else dims
    return _mapped(ctx, _reduce_map(ctx, dims), whole=dims)


def _whole(ctx: ShardingContext, dims: Iterable[int], others: str = "replicate") -> list[Strategy]:
    return _mapped(ctx, _identity_map(ctx), whole=dims, others=others)


@_register("softmax", "log_softmax", "_softmax", "cumsum", "cumprod", "normalize")
def _rule_along_dim(ctx: ShardingContext) -> list[Strategy]:
    """Normalised or scanned along one dim: that dim whole."""
    rank = len(ctx.in_shape(0))
    pos = 2 if op_name(ctx.node) == "normalize" else 1
    d = ctx.arg(pos, "dim", 1 if op_name(ctx.node) == "normalize" else None)
    if d is None:  # softmax without dim (legacy): every dim whole
        return []
    return _whole(ctx, [_norm(int(d), rank)])


@_register("layer_norm", "rms_norm")
def _rule_layer_norm(ctx: ShardingContext) -> list[Strategy]:
    """The normalised trailing dims whole; weight and bias Replicate."""
    rank = len(ctx.in_shape(0))
    shape = ctx.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    return _whole(ctx, range(rank - k, rank))


@_register("group_norm")
def _rule_group_norm(ctx: ShardingContext) -> list[Strategy]:
    """Only the batch dim (0) may be split."""
    return _whole(ctx, range(1, len(ctx.in_shape(0))))


# ----------------------------------------------------------------------------------------------
# layout


@_register("permute")
def _rule_permute(ctx: ShardingContext) -> list[Strategy]:
    rank = len(ctx.in_shape(0))
    return _mapped(ctx, [_norm(int(p), rank) for p in ctx.size_list(1, "dims")], partial=True)


@_register("transpose", "t", "swapaxes", "swapdims")
def _rule_transpose(ctx: ShardingContext) -> list[Strategy]:
    rank = len(ctx.in_shape(0))
    order = list(range(rank))
    if rank >= 2:
        a, b = _norm(int(ctx.arg(1, "dim0", 0)), rank), _norm(int(ctx.arg(2, "dim1", 1)), rank)
        order[a], order[b] = order[b], order[a]
    return _mapped(ctx, order, partial=True)


@_register("movedim", "moveaxis")
def _rule_movedim(ctx: ShardingContext) -> list[Strategy]:
    n = len(ctx.in_shape(0))
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [_norm(x, n) for x in ([src] if isinstance(src, int) else src)]
    dst = [_norm(x, n) for x in ([dst] if isinstance(dst, int) else dst)]
    order: list[int | None] = [None] * n
    for a, b in zip(src, dst):
        order[b] = a
    rest = iter(i for i in range(n) if i not in src)
    return _mapped(ctx, [o if o is not None else next(rest) for o in order], partial=True)


@_register("unsqueeze")
def _rule_unsqueeze(ctx: ShardingContext) -> list[Strategy]:
    rank = len(ctx.in_shape(0))
    d = _norm(int(ctx.arg(1, "dim")), rank + 1)
    return _mapped(ctx, list(range(d)) + [None] + list(range(d, rank)), partial=True)


@_register("squeeze")
def _rule_squeeze(ctx: ShardingContext) -> list[Strategy]:
    shape = ctx.in_shape(0)
    kept = [i for i in range(len(shape)) if not (shape[i] == 1 and _squeezed(ctx, i))]
    return _mapped(ctx, kept, partial=True)


def _squeezed(ctx: ShardingContext, i: int) -> bool:
    d = ctx.arg(1, "dim")
    rank = len(ctx.in_shape(0))
    if d is None:
        return True
    ds = [d] if isinstance(d, int) else list(d)
    return i in {_norm(x, rank) for x in ds}


@_register("expand", "broadcast_to", "expand_as")
def _rule_expand(ctx: ShardingContext) -> list[Strategy]:
    """A dim expanded from size 1 may be split with the input Replicate (each rank expands to its part)."""
    in_shape, rank = ctx.in_shape(0), len(ctx.shape)
    off = rank - len(in_shape)
    order = [d - off if d >= off and in_shape[d - off] == ctx.shape[d] else None for d in range(rank)]
    return _mapped(ctx, order, partial=True, new_dims_from_replicate=True)


def _view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes of equal numel into groups of consecutive dims with equal products."""
    if 0 in a or 0 in b or prod(a) != prod(b):
        return None
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(a):
            gi.append(i); pi *= a[i]; i += 1
        if j < len(b):
            gj.append(j); pj *= b[j]; j += 1
        while pi != pj:
            if pi < pj and i < len(a):
                gi.append(i); pi *= a[i]; i += 1
            elif pj < pi and j < len(b):
                gj.append(j); pj *= b[j]; j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


@_register("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten")
def _rule_view(ctx: ShardingContext) -> list[Strategy]:
    """Through dim groups: the outermost (non-1) dim of a group carries the split, in blocks of the
    group's inner sizes; a split that does not fall on those blocks needs the group whole. A view
    whose sizes hold ``-1`` takes no split with an empty shard (torch cannot infer ``-1`` there)."""
    a, b = ctx.in_shape(0), ctx.shape
    groups = _view_groups(a, b)
    out: list[Strategy] = [Strategy(REPLICATE, (REPLICATE,) + (None,) * (len(ctx.inputs) - 1), False)]
    if groups is not None:
        infer = op_name(ctx.node) in ("view", "reshape") and -1 in [s for s in ctx.size_list(1, "shape")
                                                                     if isinstance(s, int)]
        for gi, gj in groups:
            ii = [k for k in gi if a[k] != 1]
            jj = [k for k in gj if b[k] != 1]
            if not ii or not jj:
                continue
            i0, j0 = ii[0], jj[0]
            q_in = prod(a[k] for k in gi if k > i0)
            q_out = prod(b[k] for k in gj if k > j0)
            if not ctx.shardable(j0):
                continue
            options = set(ctx.splits_at(0, i0)) if i0 in shardable_dims(ctx.inputs[0]) else set()
            # the output's even split, seen from the input
            even = _even(b[j0], ctx.world)
            if all((s * q_out) % q_in == 0 for s in even):
                options.add(tuple(s * q_out // q_in for s in even))
            for s_in in sorted(options):
                if any((s * q_in) % q_out for s in s_in):
                    continue
                s_out = tuple(s * q_in // q_out for s in s_in)
                if infer and 0 in s_out:
                    continue
                out.append(Strategy(ctx.out_shard(j0, s_out), (ctx.in_shard(0, i0, s_in),) +
                                    (None,) * (len(ctx.inputs) - 1)))
    if ctx.has_partial(0):
        out.append(Strategy(PARTIAL, (PARTIAL,) + (None,) * (len(ctx.inputs) - 1)))
    return out


def _is_full_slice(s: slice, size: int) -> bool:
    return s.step in (None, 1) and s.start in (None, 0) and s.stop is None


@_register("getitem")
def _rule_getitem(ctx: ShardingContext) -> list[Strategy]:
    """Basic indexing: a dim taken whole by ``:`` keeps its split; a dim indexed, sliced with bounds
    or by a tensor needs it whole (advanced indexing: replicated). One output of a multi-output op:
    placed as that op placed it."""
    base = ctx.inputs[0] if ctx.inputs and ctx.paths[0] == ("a", 0) else None
    if base is None:
        return []
    if base.meta.get(MULTI_OUTPUT):
        i = ctx.node.args[1]
        return [Strategy(c[i], (c,) + (None,) * (len(ctx.inputs) - 1), c[i] != REPLICATE)
                for c in ctx.candidates[0] if isinstance(c, tuple)]
    idx = ctx.node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(x, (torch.fx.Node, list, bool, torch.Tensor)) for x in items):
        return []
    shape = ctx.in_shape(0)
    consumed = sum(1 for x in items if x is not None and x is not Ellipsis)
    out_to_in: list[int | None] = []
    whole: set[int] = set()
    d = 0
    for x in items:
        if x is None:
            out_to_in.append(None)
        elif x is Ellipsis:
            for _ in range(len(shape) - consumed):
                out_to_in.append(d)
                d += 1
        elif isinstance(x, int):
            whole.add(d)
            d += 1
        elif isinstance(x, slice):
            if not _is_full_slice(x, shape[d]):
                whole.add(d)
            out_to_in.append(d)
            d += 1
        else:
            return []
    out_to_in += list(range(d, len(shape)))
    return _mapped(ctx, out_to_in, whole=whole, partial=True)


@_register("narrow")
def _rule_narrow(ctx: ShardingContext) -> list[Strategy]:
    """The narrowed dim whole, unless the narrow spans all of it (start 0, full length: the
    lowering gives it the local length)."""
    rank = len(ctx.in_shape(0))
    d = _norm(int(ctx.arg(1, "dim")), rank)
    start, length = ctx.arg(2, "start"), ctx.arg(3, "length")
    spans = start == 0 and length == ctx.in_shape(0)[d]
    return _mapped(ctx, list(range(rank)), whole=() if spans else (d,), partial=True)


@_register("select")
def _rule_select(ctx: ShardingContext) -> list[Strategy]:
    rank = len(ctx.in_shape(0))
    d = _norm(int(ctx.arg(1, "dim")), rank)
    return _mapped(ctx, [k for k in range(rank) if k != d], whole=(d,), partial=True)


@_register("flip", "roll", "triu", "tril", "pad", "repeat", "tile", "index_select")
def _rule_dims_whole(ctx: ShardingContext) -> list[Strategy]:
    """Ops that move elements along some dims (flip, roll, triu/tril, pad, repeat, index_select):
    those dims whole."""
    name, shape = op_name(ctx.node), ctx.in_shape(0)
    rank = len(shape)
    if name == "flip":
        return _whole(ctx, [_norm(int(x), rank) for x in ctx.size_list(1, "dims")])
    if name == "roll":
        dims = ctx.arg(2, "dims")
        dims = range(rank) if dims in (None, (), []) else [dims] if isinstance(dims, int) else dims
        return _whole(ctx, [_norm(int(x), rank) for x in dims])
    if name in ("triu", "tril"):
        return _whole(ctx, [rank - 2, rank - 1])
    if name == "pad":
        pad = list(ctx.arg(1, "pad"))
        return _whole(ctx, [rank - 1 - k for k in range(len(pad) // 2)])
    if name == "index_select":
        return _whole(ctx, [_norm(int(ctx.arg(1, "dim")), rank)])
    reps = [int(r) for r in ctx.size_list(1, "repeats" if name == "repeat" else "dims")]
    out_rank = len(ctx.shape)
    off = out_rank - rank
    if off < 0:  # tile with fewer reps than dims: leading reps of 1
        reps, off = [1] * -off + reps, 0
    order = [d - off if d >= off and reps[d - (out_rank - len(reps))] == 1 else None for d in range(out_rank)]
    return _mapped(ctx, order, others="replicate")


@_register("cat", "concat", "concatenate", "stack")
def _rule_cat(ctx: ShardingContext) -> list[Strategy]:
    """The joined dim whole; every other dim split alike in every input; Partials join into a Partial."""
    tensors = ctx.arg(0, "tensors")
    parts = [ctx.index_of(("a", 0, j)) if ctx.node.args else ctx.index_of(("k", "tensors", j))
             for j in range(len(tensors))]
    stack = op_name(ctx.node) == "stack"
    rank = len(ctx.shape)
    d_cat = _norm(int(ctx.arg(1, "dim", 0)), rank)
    # legacy empty 1-D tensors take no part in a cat
    live = [i for i in parts if i is not None and not (not stack and len(ctx.in_shape(i)) == 1
                                                       and ctx.in_shape(i)[0] == 0 and rank > 1)]
    if not live:
        return []
    out: list[Strategy] = []
    for d in range(rank):
        if d == d_cat or not ctx.shardable(d):
            continue
        di = d - 1 if stack and d > d_cat else d
        options = []
        for i in live:
            options += [s for s in ctx.splits_at(i, di) if s not in options]
        for splits in options:
            ins = [ctx.in_shard(i, di, splits) if i in live else None for i in range(len(ctx.inputs))]
            out.append(Strategy(ctx.out_shard(d, splits), tuple(ins)))
    if all(ctx.has_partial(i) for i in live):
        out.append(Strategy(PARTIAL, tuple(PARTIAL if i in live else None for i in range(len(ctx.inputs)))))
    return out


def _multi(ctx: ShardingContext, out_to_in: Sequence[int | None], whole: Iterable[int] = (),
           partial: bool = False) -> list[Strategy]:
    """Like :func:`_mapped` for an op with several outputs of the same rank (split, unbind, max(dim))."""
    whole = set(whole)
    shapes, syms = ctx.node.meta[SHAPE], ctx.node.meta[SYM_SHAPE]
    out: list[Strategy] = []
    for d_out, d_in in enumerate(out_to_in):
        if d_in is None or d_in in whole or d_in not in shardable_dims(ctx.inputs[0]):
            continue
        if any(s[d_out] != ctx.in_shape(0)[d_in] for s in shapes):
            continue
        for splits in ctx.splits_at(0, d_in):
            spec = tuple(Placed(Shard(d_out), splits, sym[d_out]) for sym in syms)
            out.append(Strategy(spec, (ctx.in_shard(0, d_in, splits),) + (None,) * (len(ctx.inputs) - 1)))
    if partial and ctx.has_partial(0):
        out.append(Strategy(tuple(PARTIAL for _ in shapes), (PARTIAL,) + (None,) * (len(ctx.inputs) - 1)))
    return out


@_register("split", "chunk", "unbind")
def _rule_split(ctx: ShardingContext) -> list[Strategy]:
    """The split dim whole, every other dim split alike in each piece."""
    rank = len(ctx.in_shape(0))
    if op_name(ctx.node) == "unbind":
        d = _norm(int(ctx.arg(1, "dim", 0)), rank)
        return _multi(ctx, [k for k in range(rank) if k != d], whole=(d,), partial=True)
    d = _norm(int(ctx.arg(2, "dim", 0)), rank)
    return _multi(ctx, list(range(rank)), whole=(d,), partial=True)


# ----------------------------------------------------------------------------------------------
# contractions


def _gemm_paths(node: torch.fx.Node, name: str) -> tuple[list[Path], list[Path]]:
    """(operand paths in the order of meta["einsum"]'s terms, bias paths)."""
    kw = node.kwargs

    def at(i: int, key: str) -> Path:
        return ("a", i) if len(node.args) > i else ("k", key)

    if name == "linear":
        return [at(0, "input"), at(1, "weight")], [at(2, "bias")]
    if name == "matmul":
        return [at(0, "input"), at(1, "other")], []
    if name in ("mm", "bmm"):
        return [at(0, "input"), at(1, "mat2")], []
    if name == "addmm":
        return [at(1, "mat1"), at(2, "mat2")], [at(0, "input")]
    if name == "baddbmm":
        return [at(1, "batch1"), at(2, "batch2")], [at(0, "input")]
    if name == "einsum":
        if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
            return [("a", 1, j) for j in range(len(node.args[1]))], []
        return [("a", j) for j in range(1, len(node.args))], []
    raise KeyError(name)


@_register("einsum", "matmul", "mm", "bmm", "linear", "addmm", "baddbmm")
def _rule_contraction(ctx: ShardingContext) -> list[Strategy]:
    """By the letters of ``meta["einsum"]``: an output letter split in every operand having it
    (batch: all; free: one), a contracted letter split in every operand having it (Partial), or
    one Partial operand with the rest Replicate (no bias)."""
    name = op_name(ctx.node)
    cons, sizes = contractions_of(ctx.node)
    c = cons[0]
    if any(len(set(t)) != len(t) for t in c.inputs) or len(set(c.output)) != len(c.output):
        return []  # a diagonal ('ii->i'): not covered
    op_paths, bias_paths = _gemm_paths(ctx.node, name)
    ops = [ctx.index_of(p) for p in op_paths]
    if any(i is None for i in ops):
        return []
    biases = [i for i in (ctx.index_of(p) for p in bias_paths) if i is not None]
    n_in = len(ctx.inputs)
    out: list[Strategy] = []

    def operand_spec(k: int, letter: str, splits: tuple[int, ...]) -> Spec:
        i, term = ops[k], c.inputs[k]
        if letter not in term or ctx.in_shape(i)[term.index(letter)] == 1:
            return REPLICATE
        return ctx.in_shard(i, term.index(letter), splits)

    for letter in dict.fromkeys("".join(c.inputs)):
        if not _names_a_dim(sizes.get(letter)):
            continue
        options: list[tuple[int, ...]] = []
        for k, term in enumerate(c.inputs):
            if letter in term and ctx.in_shape(ops[k])[term.index(letter)] != 1:
                pos = term.index(letter)
                if not options:
                    options.append(_even(ctx.in_shape(ops[k])[pos], ctx.world))
                options += [s for s in ctx.splits_at(ops[k], pos) if s not in options]
        for splits in options:
            ins: list[Spec | None] = [None] * n_in
            for k in range(len(ops)):
                ins[ops[k]] = operand_spec(k, letter, splits)
            if letter in c.output:
                d = c.output.index(letter)
                if len(c.output) != len(ctx.shape) or ctx.shape[d] == 1:
                    continue
                rank = len(ctx.shape)
                for i in biases:
                    di = d - (rank - len(ctx.in_shape(i)))
                    ins[i] = ctx.in_shard(i, di, splits) if di >= 0 and ctx.in_shape(i)[di] != 1 else REPLICATE
                out.append(Strategy(ctx.out_shard(d, splits), tuple(ins)))
            elif not biases:
                out.append(Strategy(PARTIAL, tuple(ins)))
    if not biases:
        for k in range(len(ops)):
            if ctx.has_partial(ops[k]):
                ins = [None] * n_in
                for j in range(len(ops)):
                    ins[ops[j]] = PARTIAL if j == k else REPLICATE
                out.append(Strategy(PARTIAL, tuple(ins)))
    return out


def _attention(ctx: ShardingContext, q: int, k: int, v: int, extras: dict[str, int | None],
               gate: int | None, query_split: bool) -> list[Strategy]:
    """Batch dims split alike in q, k, v (an operand broadcast there Replicate); the query dim split
    in q (k and v Replicate); the key dim whole. Biases and masks broadcast against the logits
    ``[..., Q, K]``, the gate against the output."""
    rank = len(ctx.in_shape(q))
    logits = tuple(ctx.in_shape(q)[:-1]) + (ctx.in_shape(k)[-2],)
    out: list[Strategy] = []
    dims = list(range(rank - 2)) + ([rank - 2] if query_split else [])
    for d in dims:
        if not ctx.shardable(d):
            continue
        for splits in ctx.splits_at(q, d):
            ins: list[Spec | None] = [None] * len(ctx.inputs)
            ins[q] = ctx.in_shard(q, d, splits)
            for i in (k, v):
                ins[i] = (ctx.in_shard(i, d - (rank - len(ctx.in_shape(i))), splits)
                          if d < rank - 2 and d - (rank - len(ctx.in_shape(i))) >= 0
                          and ctx.in_shape(i)[d - (rank - len(ctx.in_shape(i)))] != 1 else REPLICATE)
            for i in list(extras.values()) + [gate]:
                if i is None:
                    continue
                shape = ctx.in_shape(i)
                di = d - (rank - len(shape))
                ins[i] = ctx.in_shard(i, di, splits) if di >= 0 and shape[di] == logits[d] else REPLICATE
            out.append(Strategy(ctx.out_shard(d, splits), tuple(ins)))
    return out


@_register("scaled_dot_product_attention")
def _rule_sdpa(ctx: ShardingContext) -> list[Strategy]:
    """SDPA: batch and (unless causal) query dims split."""
    idx = [ctx.index_of(("a", i) if len(ctx.node.args) > i else ("k", key))
           for i, key in enumerate(("query", "key", "value"))]
    if any(i is None for i in idx):
        return []
    mask = ctx.index_of(("a", 3)) if len(ctx.node.args) > 3 else ctx.index_of(("k", "attn_mask"))
    causal = bool(ctx.arg(5, "is_causal", False))
    dropout = ctx.arg(4, "dropout_p", 0.0)
    if dropout not in (0, 0.0):
        return []
    return _attention(ctx, *idx, {"mask": mask}, None, query_split=not causal)


def _rule_kernel_attention(ctx: ShardingContext) -> list[Strategy]:
    """``foldcompile.attention(q, k, v, bias, mask, gate, scale, key_bias)``: batch and query dims split."""
    names = ("q", "k", "v", "bias", "mask", "gate", "scale", "key_bias")
    idx = {n: ctx.index_of(("a", i) if len(ctx.node.args) > i else ("k", n)) for i, n in enumerate(names)}
    if any(idx[n] is None for n in ("q", "k", "v")):
        return []
    return _attention(ctx, idx["q"], idx["k"], idx["v"], {n: idx[n] for n in ("bias", "mask", "key_bias")},
                      idx["gate"], query_split=True)


def _rule_kernel_layer_norm(ctx: ShardingContext) -> list[Strategy]:
    """``foldcompile.layer_norm(x, weight, bias, eps)``: the last dim whole."""
    return _whole(ctx, [len(ctx.in_shape(0)) - 1])


def _rule_kernel_softmax(ctx: ShardingContext) -> list[Strategy]:
    """``foldcompile.softmax(x, dim, scale, bias, mask)``: ``dim`` whole; bias and mask broadcast against x."""
    rank = len(ctx.in_shape(0))
    d_soft = _norm(int(ctx.arg(1, "dim", -1)), rank)
    out = []
    for s in _rule_pointwise(ctx):
        if isinstance(s.out, Placed) and s.out.dim is not None and s.out.dim != d_soft:
            out.append(s)
    return out


def _rule_kernel_outer_product_mean(ctx: ShardingContext) -> list[Strategy]:
    """``foldcompile.outer_product_mean(a, b, weight, bias, mask_a, mask_b, eps, bias_divided)``: a
    ``[*, S, I, C]``, b ``[*, S, J, E]``, out ``[*, I, J, Z]``. A batch dim splits a, b and the masks
    (a mask broadcast there, Replicate); the residue dim I splits a and mask_a (b, mask_b whole), J
    likewise; the weight and bias are Replicate."""
    names = ("a", "b", "weight", "bias", "mask_a", "mask_b")
    idx = {n: ctx.index_of(("a", i) if len(ctx.node.args) > i else ("k", n)) for i, n in enumerate(names)}
    if any(idx[n] is None for n in ("a", "b", "weight")):
        return []
    rank = len(ctx.in_shape(idx["a"]))  # = the output's rank
    lead = rank - 3

    def along(i: int | None, d: int, full_rank: int, splits) -> Spec | None:
        """Input i split along its dim matching dim d of a [..., S, N] / [..., S, N, c] layout of rank
        ``full_rank`` (right-aligned), Replicate where it broadcasts there."""
        if i is None:
            return None
        shape = ctx.in_shape(i)
        di = d - (full_rank - len(shape))
        return ctx.in_shard(i, di, splits) if di >= 0 and shape[di] != 1 else REPLICATE

    out = []
    for d_out in range(rank - 1):  # the channel dim Z stays whole
        if not ctx.shardable(d_out):
            continue
        if d_out < lead:  # a batch dim: every operand alike
            src, d_src = idx["a"], d_out
            plan = {"a": d_out, "b": d_out, "mask_a": d_out, "mask_b": d_out}
        else:  # a residue dim: its operand and mask only
            side = "a" if d_out == lead else "b"
            src, d_src = idx[side], rank - 2
            plan = {side: rank - 2, f"mask_{side}": rank - 2}
        for splits in ctx.splits_at(src, d_src):
            ins: list[Spec | None] = [None] * len(ctx.inputs)
            for n in names:
                if idx[n] is None:
                    continue
                if n in plan:
                    ins[idx[n]] = along(idx[n], plan[n], rank if n in ("a", "b") else rank - 1, splits)
                else:
                    ins[idx[n]] = REPLICATE
            out.append(Strategy(ctx.out_shard(d_out, splits), tuple(ins)))
    return out


def ensure_kernel_rules() -> None:
    """Register the rules of foldcompile's own kernel ops (their registry entries load with them)."""
    import foldcompile.passes.op_kernels  # noqa: F401  (the kernels' entries)
    for target, rule in ((torch.ops.foldcompile.attention.default, _rule_kernel_attention),
                         (torch.ops.foldcompile.layer_norm.default, _rule_kernel_layer_norm),
                         (torch.ops.foldcompile.softmax.default, _rule_kernel_softmax),
                         (torch.ops.foldcompile.outer_product_mean.default, _rule_kernel_outer_product_mean)):
        entry = lookup(target)
        if entry is not None and entry.sharding is None:
            entry.sharding = rule

