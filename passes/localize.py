"""Lower a planned DAP graph to one rank's SPMD graph.

``localize_pass(planned, rank, world_size)`` takes a planned graph (``passes/placement.py``: a
single-process graph over global sizes where every tensor node has ``meta["shard"]`` and every
change of placement is a ``redistribute(x, src, dst)`` node) and returns the graph rank ``rank``
runs: the same computation on this rank's shards, with the collectives of
``foldcompile.distributed`` in their place. The plan itself is not changed (the pass lowers a
copy), so one plan lowers to every rank.

What it writes:

- **Collectives.** Each ``redistribute`` becomes the start/wait pair of
  :func:`~foldcompile.passes.placement.transition_kind` (``h = all_to_all_start(x, ...)``, ``y =
  wait(h)``; the slice Replicate -> Shard is ``shard(x, d, ...)``, no traffic), with the concrete
  per-rank split sizes of the plan (uneven where the dim does not divide). Both are placed where
  the redistribute was; ``passes/schedule_collectives.py`` moves them.
- **Gradient placements** (``passes/grad_placement.py``): the ``grad_placement`` of every
  all_gather / all_reduce / shard from its consumers (sharded consumer -> ``"partial"``, only
  replicated consumers -> ``"replicate"``); ``keep_grad_on_rank`` on the replicated consumers of
  a Replicate value that also has sharded ones (parameters too), so the Partial gradient counts
  the replicated contribution once; the parameters whose gradients are Partial
  (``record["partial_params"]``, for :class:`~foldcompile.distributed.PartialGradReducer`) and
  Replicate (``record["replicate_params"]``).
- **Local sizes.** Every literal size argument (``meta["sym_args"]`` of view / reshape / expand
  / zeros / full / ...) along a dim the plan shards becomes this rank's size; creation ops whose
  values depend on the index (``arange``, ``eye``, ...) are built whole and sliced; every node's
  ``shape`` and ``sym_shape`` become local (the sharded dim of ``N_res`` is
  ``floor((N_res + P - 1 - r) / P)`` on rank r: exact for uneven shards, at any size).
- **Size queries** (``x.shape``, ``x.size(d)``, ``x.numel()``) of a sharded value answer the
  global sizes, as in the planned graph (``record["global_size_queries"]``).
- **Random ops** on sharded values draw what one process draws
  (``foldcompile.distributed.sharded_random``): the whole tensor's draw, this rank's slice.
- **Graph ends.** ``inputs="full"``: the graph takes the whole inputs and slices the sharded ones
  (``shard(x, d, grad_placement="replicate")``, so ``x.grad`` is whole on every rank); a whole
  input with a Partial gradient gets ``sum_grad``. ``outputs="full"``: every output is gathered
  (all_gather / all_reduce, gradient Replicate: the replicated-loss contract). ``outputs=
  "sharded"``: sharded outputs stay shards, Replicate ones get ``sum_grad`` (the ranks' losses
  are summed), Partial ones are all-reduced first. ``inputs="sharded"``: the graph takes the shards of
  its Shard inputs (their gradients are the shards' gradients) and its Replicate inputs whole (with
  ``sum_grad`` where their gradient is Partial, as for ``inputs="full"``).

With ``world_size=1`` every ``redistribute`` is dropped: the graph is the unsharded one, with no
collective and no wrapper (zero overhead).

    >>> import torch, torch.fx
    >>> from foldcompile.passes.placement import Placed, Replicate, Shard, redistribute
    >>> g = torch.fx.Graph()                     # z [13, 13]: rows sharded, then columns
    >>> z = g.placeholder("z")
    >>> sin = g.call_function(torch.sin, (z,), name="sin")
    >>> cols = g.call_function(redistribute, (sin, Shard(0), Shard(1)), name="cols")
    >>> _ = g.output(g.call_function(torch.exp, (cols,), name="exp"))
    >>> plan = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> rows, cols = Placed(Shard(0), (5, 4, 4), 13), Placed(Shard(1), (5, 4, 4), 13)
    >>> for n, p in zip(plan.graph.nodes, [rows, rows, cols, cols, None]):
    ...     n.meta.update(shard=p, shape=(13, 13), sym_shape=(13, 13), dtype=torch.float32)
    >>> rank1 = localize_pass(plan, rank=1, world_size=3, inputs="sharded", outputs="sharded").graph_module
    >>> print(rank1.code.strip())            # doctest: +NORMALIZE_WHITESPACE
    def forward(self, z):
        sin = torch.sin(z);  z = None
        h_sin = foldcompile_distributed_collectives_all_to_all_start(sin, split_dim = 1, cat_dim = 0, cat_sizes = [5, 4, 4], split_sizes = [5, 4, 4], name = 'sin');  sin = None
        sin_s1 = foldcompile_distributed_collectives_wait(h_sin);  h_sin = None
        exp = torch.exp(sin_s1);  sin_s1 = None
        return exp
    >>> [n.meta["shape"] for n in rank1.graph.nodes if n.op == "call_function" and n.name != "h_sin"]
    [(4, 13), (13, 4), (13, 4)]
    >>> localize_pass(plan, rank=0, world_size=1).record["collectives"]     # one process: nothing
    []
"""
from __future__ import annotations

import logging
import math
import operator
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import sympy
import torch
import torch.fx
from torch.distributed.tensor import Partial, Replicate

from foldcompile.distributed.collectives import (all_gather_start, all_reduce_start, all_to_all_start,
                                                 reduce_scatter_start, shard, split_offsets, split_sizes, wait)
from foldcompile.distributed.grad_ops import keep_grad_on_rank, sum_grad
from foldcompile.distributed.sharded_random import draw_global, draw_global_like, sharded_dropout
from foldcompile.pass_manager import copy_graph_module
from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.grad_placement import GradPlacements, gradient_placements
from foldcompile.passes.meta import DTYPE, MULTI_OUTPUT, SHAPE, SHARD, SYM_ARGS, SYM_SHAPE
from foldcompile.passes.placement import Placed, redistribute, transition_kind
from foldcompile.passes.registry import INDEXED_CREATION, SHARDED_DRAW, draws_random, entry_of, node_has_trait, op_name
from foldcompile.passes.shape_prop import dim_symbol

_log = logging.getLogger(__name__)

__all__ = ["localize_pass", "local_size", "COLLECTIVE_STARTS", "RUNTIME_CALLS", "is_runtime_call",
           "collective_of", "annotate_collectives", "traffic"]

# what each transition becomes (docs/DAP.md, "The collectives and their backward rules")
COLLECTIVE_STARTS: dict[str, Callable[..., Any]] = {
    "all_to_all": all_to_all_start, "all_gather": all_gather_start,
    "reduce_scatter": reduce_scatter_start, "all_reduce": all_reduce_start,
}
# every runtime function a lowered graph calls: collectives (fusion barriers, class COMM)
RUNTIME_CALLS = frozenset({*COLLECTIVE_STARTS.values(), wait, shard, keep_grad_on_rank, sum_grad})

# random ops the handlers below draw whole and slice when their output is sharded: the registry's
# SHARDED_DRAW; any other random op on a shard is refused, since it would draw other values than one process
# integer arithmetic folded once its operands are constants (sizes answered by a size query)
_FOLDABLE = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod}
# creation ops whose values depend on the element's index (the registry's INDEXED_CREATION): built whole, then sliced


def is_runtime_call(node: torch.fx.Node) -> bool:
    """A node calling one of the DAP runtime functions a lowered graph holds."""
    return node.op == "call_function" and node.target in RUNTIME_CALLS


def collective_of(node: torch.fx.Node) -> Optional[str]:
    """``"all_to_all"`` / ``"all_gather"`` / ... for a start node, ``None`` otherwise."""
    if node.op != "call_function":
        return None
    for kind, fn in COLLECTIVE_STARTS.items():
        if node.target is fn:
            return kind
    return None


def traffic(kind: str, local_bytes: sympy.Expr, world: int) -> sympy.Expr:
    """Bytes one rank sends for a collective whose input on that rank has ``local_bytes`` (the
    usual algorithms: an all_to_all keeps 1/P of its input, a ring all_gather forwards P - 1
    shards, a ring reduce_scatter sends (P - 1)/P of its input, an all_reduce twice that).

        >>> import sympy
        >>> traffic("all_to_all", sympy.Symbol("B"), 4), traffic("all_reduce", sympy.Symbol("B"), 4)
        (3*B/4, 3*B/2)
    """
    P = sympy.Integer(world)
    factor = {"all_to_all": (P - 1) / P, "all_gather": P - 1, "reduce_scatter": (P - 1) / P,
              "all_reduce": 2 * (P - 1) / P}[kind]
    return factor * local_bytes


def annotate_collectives(gm: torch.fx.GraphModule) -> int:
    """Class COMM and a cost for the runtime nodes of a lowered graph (after ``classify_pass``,
    which knows only the registry's ops): a start's ``bytes`` are the bytes it sends
    (:func:`traffic`, in the local symbolic sizes), FLOPs 0. Returns how many nodes it marked."""
    world = int(gm.meta.get("dap", {}).get("world_size", 1))
    marked = 0
    for n in gm.graph.nodes:
        if not is_runtime_call(n):
            continue
        kind = collective_of(n)
        cost: dict[str, Any] = {"flops": sympy.Integer(0), "bytes": sympy.Integer(0)}
        x = n.args[0] if n.args else None
        if kind is not None and isinstance(x, torch.fx.Node) and x.meta.get(SYM_SHAPE) is not None:
            nbytes = sympy.Mul(*[sympy.sympify(d) for d in x.meta[SYM_SHAPE]]) * x.meta[DTYPE].itemsize
            cost["bytes"] = traffic(kind, nbytes, world)
        n.meta["op_class"] = "COMM"
        n.meta["cost"] = cost
        marked += 1
    return marked


# --------------------------------------------------------------------------- local sizes

def local_size(global_size: Any, sizes: Sequence[int], rank: int, world: int,
               subs: Mapping[sympy.Symbol, int]) -> sympy.Expr:
    """Rank ``rank``'s length of a dim of symbolic global length ``global_size`` split as ``sizes``.

    The usual split (:func:`~foldcompile.distributed.split_sizes`: the first ``n % P`` ranks one
    more) of a length ``n`` is ``floor((n + P - 1 - r) / P)``; a merged dim whose outer part is
    split (``N_res * N_res`` split by rows) is that share of one named dim times the rest. Other
    splits stay the integer at the example size.

        >>> import sympy
        >>> from foldcompile.passes.shape_prop import dim_symbol
        >>> N = dim_symbol("N_res")
        >>> local_size(N, [5, 4, 4], 0, 3, {N: 13}), local_size(N, [5, 4, 4], 2, 3, {N: 13})
        (floor(N_res/3 + 2/3), floor(N_res/3))
        >>> local_size(N**2, [65, 52, 52], 0, 3, {N: 13})
        N_res*floor(N_res/3 + 2/3)
    """
    g = sympy.sympify(global_size)
    s = [int(x) for x in sizes]
    if not g.free_symbols or world == 1:
        return sympy.Integer(s[rank])

    def share(x: sympy.Expr) -> sympy.Expr:
        return sympy.floor((x + world - 1 - rank) / sympy.Integer(world))

    if s == split_sizes(int(g.subs(subs)), world):
        return share(g)
    for x in sorted(g.free_symbols, key=str):
        rest = sympy.simplify(g / x)
        if x not in subs:
            continue
        if [q * int(rest.subs(subs)) for q in split_sizes(int(subs[x]), world)] == s:
            return share(x) * rest
    return sympy.Integer(s[rank])


def _placed(n: Any) -> Any:
    return n.meta.get(SHARD) if isinstance(n, torch.fx.Node) else None


def _local_one(shape: Any, sym: Any, placed: Any, rank: int, world: int, subs) -> tuple[Any, Any]:
    if not isinstance(placed, Placed) or placed.dim is None or shape is None:
        return shape, sym
    d = placed.dim
    shape = tuple(shape)
    local = list(shape)
    local[d] = int(placed.split_sizes[rank])
    lsym = sym
    if sym is not None:
        lsym = list(sym)
        lsym[d] = local_size(placed.global_size if placed.global_size is not None else sym[d],
                             placed.split_sizes, rank, world, subs)
        lsym = tuple(lsym)
    return tuple(local), lsym


def _write_local_meta(n: torch.fx.Node, rank: int, world: int, subs) -> None:
    placed = _placed(n)
    if placed is None:
        return
    shape, sym = n.meta.get(SHAPE), n.meta.get(SYM_SHAPE)
    if n.meta.get(MULTI_OUTPUT) and isinstance(placed, tuple):
        parts = [_local_one(s, y, p, rank, world, subs)
                 for s, y, p in zip(shape, sym if sym is not None else [None] * len(shape), placed)]
        n.meta[SHAPE] = tuple(p[0] for p in parts)
        n.meta[SYM_SHAPE] = tuple(p[1] for p in parts) if sym is not None else None
    else:
        n.meta[SHAPE], n.meta[SYM_SHAPE] = _local_one(shape, sym, placed, rank, world, subs)


# --------------------------------------------------------------------------- checks

def _check_plan(gm: torch.fx.GraphModule, world: int) -> None:
    for n in gm.graph.nodes:
        ps = _placed(n)
        for p in (ps if isinstance(ps, tuple) else (ps,)):
            if isinstance(p, Placed) and p.dim is not None and len(p.split_sizes) != world:
                raise PassError(f"{describe_node(n)} is planned as {p!r} for {len(p.split_sizes)} ranks, "
                                f"but the lowering is for world_size={world}")
        if n.op in ("placeholder", "get_attr", "call_function", "call_method") and ps is None \
                and isinstance(n.meta.get(SHAPE), tuple):
            raise PassError(f"{describe_node(n)} has no placement (meta['shard']): run the planning pass "
                            "(shard_pass) first")
        if n.op == "call_function" and n.target is redistribute:
            x, src, dst = n.args[0], n.args[1], n.args[2]
            have = _placed(x)
            if not isinstance(have, Placed) or have.placement != src:
                raise PassError(f"{describe_node(n)} moves {x.name} from {src}, but {x.name} is planned as {have!r}")
            if not isinstance(ps, Placed) or ps.placement != dst:
                raise PassError(f"{describe_node(n)} moves to {dst}, but its own placement is {ps!r}")
            transition_kind(src, dst)


def _source_args(n: torch.fx.Node) -> tuple:
    return tuple(n.args), dict(n.kwargs)


# --------------------------------------------------------------------------- the lowering

class _Lowering:
    def __init__(self, gm: torch.fx.GraphModule, rank: int, world: int, grads: GradPlacements, *,
                 group_node: Optional[torch.fx.Node], hook_node: Optional[torch.fx.Node], validate: bool,
                 record: dict[str, Any]):
        self.gm, self.graph, self.rank, self.world = gm, gm.graph, rank, world
        self.grads, self.group, self.hook, self.validate, self.record = grads, group_node, hook_node, validate, record
        self.subs = {dim_symbol(k): v for k, v in dict(gm.meta.get("dims", {})).items()}
        self.original_args: dict[torch.fx.Node, tuple] = {}
        self._prologue: Optional[torch.fx.Node] = None

    # -- helpers
    def _comm_kwargs(self, name: str) -> dict[str, Any]:
        kw: dict[str, Any] = {"name": name}
        if self.group is not None:
            kw["group"] = self.group
        if self.hook is not None:
            kw["hook"] = self.hook
        if self.validate:
            kw["validate"] = True
        return kw

    def _new(self, target: Callable, args: tuple, kwargs: dict, *, like: torch.fx.Node, name: str,
             placed: Any, shape: Any = "same") -> torch.fx.Node:
        node = self.graph.create_node("call_function", target, args, kwargs, name=name)
        for key in ("module_path", "stack_trace", "nn_module_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        node.meta["origin"] = [like.name]
        node.meta[SHARD] = placed
        if shape == "same":
            for key in (SHAPE, SYM_SHAPE, DTYPE):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        else:  # a start: its value is a handle, not a tensor
            node.meta[SHAPE] = node.meta[SYM_SHAPE] = node.meta[DTYPE] = None
        return node

    # -- graph ends and wrappers (on the planned graph, before lowering)
    def slice_inputs(self) -> None:
        """Whole inputs: a planned Shard(d) input becomes a Replicate input sliced right away."""
        for ph in [n for n in self.graph.nodes if n.op == "placeholder"]:
            p = _placed(ph)
            if isinstance(p, Placed) and isinstance(p.placement, Partial):
                raise PassError(f"{describe_node(ph)}: an input cannot be Partial")
            if not (isinstance(p, Placed) and p.dim is not None) or not ph.users:
                continue
            with self.graph.inserting_after(self._after(ph)):
                cut = self._new(redistribute, (ph, Replicate(), p.placement), {}, like=ph,
                                name=f"{ph.name}_shard", placed=p)
            self._made_for_input(ph, cut)
            ph.replace_all_uses_with(cut, delete_user_cb=lambda u: u is not cut)
            ph.meta[SHARD] = Placed(Replicate())

    def gather_outputs(self, outputs: str) -> None:
        out = next(n for n in self.graph.nodes if n.op == "output")
        made: dict[torch.fx.Node, torch.fx.Node] = {}

        def fix(a: Any) -> Any:
            if not isinstance(a, torch.fx.Node):
                return a
            p = _placed(a)
            if not isinstance(p, Placed) or isinstance(p.placement, Replicate):
                return a
            if outputs == "sharded" and p.dim is not None:
                return a
            if a not in made:
                with self.graph.inserting_before(out):
                    made[a] = self._new(redistribute, (a, p.placement, Replicate()), {}, like=a,
                                        name=f"{a.name}_out", placed=Placed(Replicate()))
            return made[a]

        out.args = (torch.fx.node.map_aggregate(out.args[0], fix),)

    def placements_of_outputs(self) -> list[Any]:
        out = next(n for n in self.graph.nodes if n.op == "output")
        flat: list[Any] = []
        torch.fx.node.map_aggregate(out.args[0], lambda a: flat.append(_placed(a)) if isinstance(a, torch.fx.Node)
                                    else flat.append(None))
        return flat

    def keep_replicated_contributions(self) -> None:
        by_name = {n.name: n for n in self.graph.nodes}
        users_of: dict[str, list[str]] = {}
        for v, u in self.grads.keep_edges:
            users_of.setdefault(v, []).append(u)
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for vname, unames in users_of.items():
            v = by_name[vname]
            # right before the first replicated consumer: in its grad-mode region (a parameter's get_attr
            # may sit in a no-grad region, the recycling iterations', where a keep would record nothing)
            first = min((by_name[u] for u in unames), key=order.__getitem__)
            with self.graph.inserting_before(first):
                keep = self._new(keep_grad_on_rank, (v,), self._group_kw(), like=v, name=f"{v.name}_kept",
                                 placed=_placed(v))
            for uname in unames:
                by_name[uname].replace_input_with(v, keep)
            self.record["kept_on_one_rank"].append({"value": v.name, "consumers": list(unames)})

    def _group_kw(self) -> dict[str, Any]:
        return {"group": self.group} if self.group is not None else {}

    def sum_partial_input_grads(self) -> None:
        for ph in [n for n in self.graph.nodes if n.op == "placeholder"]:
            if self.grads.of.get(ph.name) != "partial":
                continue
            with self.graph.inserting_after(self._after(ph)):
                total = self._new(sum_grad, (ph,), {"name": ph.name, **self._group_kw(),
                                                    **({"hook": self.hook} if self.hook is not None else {})},
                                  like=ph, name=f"{ph.name}_grad_summed", placed=_placed(ph))
            self._made_for_input(ph, total)
            ph.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
            self.record["summed_input_grads"].append(ph.name)

    def sum_replicated_output_grads(self) -> None:
        """``outputs="sharded"``: the ranks' losses are summed, so a Replicate output's gradient
        arrives Partial; ``sum_grad`` makes it the Replicate gradient the graph was lowered for."""
        out = next(n for n in self.graph.nodes if n.op == "output")
        made: dict[torch.fx.Node, torch.fx.Node] = {}

        def fix(a: Any) -> Any:
            if not isinstance(a, torch.fx.Node) or a.name not in self.grads.requires_grad:
                return a
            p = _placed(a)
            if not (isinstance(p, Placed) and isinstance(p.placement, Replicate)):
                return a
            if a not in made:
                with self.graph.inserting_before(out):
                    made[a] = self._new(sum_grad, (a,), {"name": a.name, **self._group_kw(),
                                                         **({"hook": self.hook} if self.hook is not None else {})},
                                        like=a, name=f"{a.name}_loss_summed", placed=p)
            return made[a]

        out.args = (torch.fx.node.map_aggregate(out.args[0], fix),)

    # -- lowering node by node
    def visit(self, n: torch.fx.Node) -> None:
        if n.op not in ("call_function", "call_method"):
            return
        if n.target is redistribute:
            self._collective(n)
            return
        placed = _placed(n)
        name = op_name(n)
        if self._size_query(n, name) or self._fold(n):
            return
        self.original_args[n] = _source_args(n)
        sharded = isinstance(placed, Placed) and placed.dim is not None
        drawn_whole = node_has_trait(n, SHARDED_DRAW)
        if draws_random(n) and not drawn_whole and (sharded or any(isinstance(_placed(a), Placed) and _placed(a).dim is not None
                                                       for a in n.all_input_nodes)):
            raise PassError(f"{describe_node(n)}: the random op {name} on a sharded tensor would draw other values "
                            "than one process; only dropout, bernoulli, rand(n)(_like) are drawn whole and sliced")
        if n.target is torch.utils.checkpoint.checkpoint and any(
                isinstance(_placed(a), Placed) and _placed(a).dim is not None for a in n.all_input_nodes):
            raise PassError(f"{describe_node(n)}: an activation-checkpointed region with sharded inputs is not "
                            "lowered yet (its body is a subgraph)")
        if not sharded:
            return
        if drawn_whole:
            self._random(n, name, placed)
        elif node_has_trait(n, INDEXED_CREATION):
            self._slice_after(n, placed, clone=False)
        elif name == "narrow":
            self._narrow(n, placed)
        else:
            self._literal_sizes(n, placed)

    def _size_query(self, n: torch.fx.Node, name: str) -> bool:
        """``x.shape``, ``x.size(d)``, ``x.numel()`` of a sharded ``x`` answer the planned graph's (global)
        sizes, as one process would: the query becomes that constant. (A view built from it then
        gets its local size like any literal; a mean divided by it stays a mean over all ranks.)"""
        if not n.args or not isinstance(n.args[0], torch.fx.Node):
            return False
        x = n.args[0]
        p = _placed(x)
        shape = x.meta.get(SHAPE)
        if not (isinstance(p, Placed) and p.dim is not None and isinstance(shape, tuple)):
            return False
        if name == "getattr" and len(n.args) > 1 and n.args[1] == "shape":
            value: Any = tuple(shape)
        elif name == "size":
            d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            value = tuple(shape) if d is None else int(shape[d])
        elif name == "numel":
            value = int(math.prod(shape))
        else:
            return False
        self._replace_by_constant(n, value)
        self.record["global_size_queries"].append({"node": n.name, "of": x.name, "value": value})
        return True

    def _fold(self, n: torch.fx.Node) -> bool:
        """Integer arithmetic on constants (what a size query became) is folded into its users, so
        that a size computed from a global size reaches a view as a literal (and gets localized)."""
        if n.target not in _FOLDABLE or n.all_input_nodes:
            return False
        try:
            value = n.target(*n.args, **n.kwargs)
        except Exception:   # not ours to fold: leave it to run
            return False
        if not isinstance(value, (int, tuple)) or isinstance(value, bool):
            return False
        self._replace_by_constant(n, value)
        return True

    def _replace_by_constant(self, n: torch.fx.Node, value: Any) -> None:
        for u in list(n.users):
            u.args = torch.fx.node.map_aggregate(u.args, lambda a: value if a is n else a)
            u.kwargs = torch.fx.node.map_aggregate(u.kwargs, lambda a: value if a is n else a)
        self.graph.erase_node(n)

    def _collective(self, n: torch.fx.Node) -> None:
        x, src, dst = n.args[0], n.args[1], n.args[2]
        kind = transition_kind(src, dst)
        if kind is None:
            n.replace_all_uses_with(x)
            self.graph.erase_node(n)
            return
        have, want = _placed(x), _placed(n)
        entry: dict[str, Any] = {"kind": kind, "tensor": x.name, "src": repr(have), "dst": repr(want),
                                 "module_path": n.meta.get("module_path", "")}
        gp = self.grads.slice_grad.get(n.name, "partial") if kind == "slice" else \
            self.grads.of.get(n.name, "replicate")
        if kind == "slice":
            with self.graph.inserting_after(self._after(x)):
                new = self._new(shard, (x, want.dim), {"grad_placement": gp, "sizes": list(want.split_sizes),
                                                       **self._comm_kwargs(x.name)},
                                like=n, name=f"{x.name}_s{want.dim}", placed=want)
            self._made_for_input(x, new)
            new.kwargs = {k: v for k, v in new.kwargs.items() if k not in ("hook", "validate")}
            entry.update(start=None, wait=new.name, grad_placement=gp)
        else:
            kw = self._comm_kwargs(x.name)
            if kind == "all_to_all":
                args = (x,)
                kw = {"split_dim": want.dim, "cat_dim": have.dim, "cat_sizes": list(have.split_sizes),
                      "split_sizes": list(want.split_sizes), **kw}
                tag = f"s{want.dim}"
            elif kind == "all_gather":
                args = (x, have.dim)
                kw = {"grad_placement": gp, "sizes": list(have.split_sizes), **kw}
                tag = "full"
            elif kind == "reduce_scatter":
                args = (x, want.dim)
                kw = {"sizes": list(want.split_sizes), **kw}
                tag = f"sum_s{want.dim}"
            else:  # all_reduce
                args = (x,)
                kw = {"grad_placement": gp, **kw}
                tag = "sum"
            # right after the producer, in its grad-mode region (the scheduler keeps the pair there): a
            # pair run under no_grad for a value that requires grad would cut its gradient
            with self.graph.inserting_after(self._after(x)):
                start = self._new(COLLECTIVE_STARTS[kind], args, kw, like=n, name=f"h_{x.name}", placed=None,
                                  shape=None)
            with self.graph.inserting_after(start):
                new = self._new(wait, (start,), {}, like=n, name=f"{x.name}_{tag}", placed=want)
            self._made_for_input(x, new)
            start.meta["collective"] = kind
            entry.update(start=start.name, wait=new.name)
            if kind in ("all_gather", "all_reduce"):
                entry["grad_placement"] = gp
        n.replace_all_uses_with(new)
        self.graph.erase_node(n)
        self.record["collectives"].append(entry)

    def _after(self, x: torch.fx.Node) -> torch.fx.Node:
        """Where a node computed from ``x`` goes: right after it; for an input, after the inputs and
        the nodes already made for earlier inputs (so they stay in the inputs' order)."""
        if x.op != "placeholder":
            return x
        if self._prologue is None or getattr(self._prologue, "_erased", False):
            self._prologue = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        return self._prologue

    def _made_for_input(self, x: torch.fx.Node, node: torch.fx.Node) -> None:
        if x.op == "placeholder":
            self._prologue = node

    def _literal_sizes(self, n: torch.fx.Node, placed: Placed) -> None:
        entry = entry_of(n)
        if entry is None or entry.size_arg is None:
            return
        i, d = entry.size_arg, placed.dim
        local = int(placed.split_sizes[self.rank])
        args = list(n.args)
        varargs = not (len(args) == i + 1 and isinstance(args[i], (list, tuple, torch.Size)))
        if len(args) <= i and "size" in n.kwargs:
            raw, where = list(n.kwargs["size"]), "kwargs"
        elif len(args) > i:
            raw, where = (list(args[i:]) if varargs else list(args[i])), ("varargs" if varargs else "arg")
        else:
            return
        if d >= len(raw):
            raise PassError(f"{describe_node(n)}: its size argument {raw} has no dim {d} (planned {placed!r})")
        if isinstance(raw[d], torch.fx.Node):
            raise PassError(f"{describe_node(n)}: the size of the sharded dim {d} is computed in the graph "
                            f"({raw[d].name}); only literal sizes are rewritten")
        if raw[d] == -1:
            return
        old = int(raw[d])
        raw[d] = local
        if where == "kwargs":
            n.kwargs = {**n.kwargs, "size": type(n.kwargs["size"])(raw)}
        elif where == "varargs":
            n.args = tuple(args[:i]) + tuple(raw)
        else:
            args[i] = type(args[i])(raw) if not isinstance(args[i], torch.Size) else tuple(raw)
            n.args = tuple(args)
        sym_args = n.meta.get(SYM_ARGS)
        if isinstance(sym_args, dict) and i in sym_args and d < len(sym_args[i]):
            sym = list(sym_args[i])
            if sym[d] != -1:
                sym[d] = local_size(placed.global_size if placed.global_size is not None else sym[d],
                                    placed.split_sizes, self.rank, self.world, self.subs)
            n.meta[SYM_ARGS] = {**sym_args, i: tuple(sym)}
        self.record["local_sizes"].append({"node": n.name, "op": op_name(n), "dim": d, "global": old, "local": local})

    def _narrow(self, n: torch.fx.Node, placed: Placed) -> None:
        """A narrow along the sharded dim that spans the whole dim (a chunk loop of one chunk) keeps
        the split: this rank's narrow spans its shard. Any other narrow there needs the dim whole."""
        x = n.args[0]
        rank = len(x.meta[SHAPE]) if isinstance(x.meta.get(SHAPE), tuple) else None
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if rank is None or not isinstance(dim, int) or dim % rank != placed.dim:
            return
        start = n.args[2] if len(n.args) > 2 else n.kwargs.get("start")
        length = n.args[3] if len(n.args) > 3 else n.kwargs.get("length")
        whole = int(x.meta[SHAPE][placed.dim])
        if start != 0 or length != whole:
            raise PassError(f"{describe_node(n)}: narrows [{start}, {start} + {length}) of the dim {placed.dim} the "
                            f"plan shards ({placed!r}); only a narrow spanning the whole dim is lowered")
        local = int(placed.split_sizes[self.rank])
        n.args = (x, dim, 0, local) + tuple(n.args[4:])
        n.kwargs = {k: v for k, v in n.kwargs.items() if k not in ("start", "length")}
        sym_args = n.meta.get(SYM_ARGS)
        if isinstance(sym_args, dict) and 3 in sym_args:  # the length's meaning: this rank's share now
            n.meta[SYM_ARGS] = {**sym_args, 3: local_size(placed.global_size if placed.global_size is not None
                                                          else sym_args[3], placed.split_sizes, self.rank,
                                                          self.world, self.subs)}
        self.record["local_sizes"].append({"node": n.name, "op": "narrow", "dim": placed.dim, "global": whole,
                                           "local": local})

    def _slice_after(self, n: torch.fx.Node, placed: Placed, *, clone: bool) -> torch.fx.Node:
        """``n`` is computed whole (Replicate); its users get this rank's slice of it."""
        d = placed.dim
        off, size = split_offsets(placed.split_sizes)[self.rank], int(placed.split_sizes[self.rank])
        users = list(n.users)
        with self.graph.inserting_after(n):
            cut = self._new(torch.narrow, (n, d, off, size), {}, like=n, name=f"{n.name}_mine", placed=placed)
        if clone:
            with self.graph.inserting_after(cut):
                copy = self._new(torch.clone, (cut,), {}, like=n, name=f"{n.name}_mine_copy", placed=placed)
            cut.meta[SHARD] = placed
            end = copy
        else:
            end = cut
        for u in users:
            u.replace_input_with(n, end)
        n.meta[SHARD] = Placed(Replicate())
        self.record["built_whole"].append({"node": n.name, "op": op_name(n), "dim": d})
        return end

    def _whole_creation(self, p: torch.fx.Node) -> Optional[torch.fx.Node]:
        """A whole (global-size) copy of a creation op with a literal size list, or None."""
        entry = entry_of(p)
        if entry is None or not entry.creation or entry.size_arg is None:
            return None
        args, kwargs = self.original_args.get(p, _source_args(p))
        with self.graph.inserting_after(p):
            whole = self._new(p.target, args, kwargs, like=p, name=f"{p.name}_whole", placed=Placed(Replicate()))
        return whole

    def _random(self, n: torch.fx.Node, name: str, placed: Placed) -> None:
        d, sizes = placed.dim, list(placed.split_sizes)
        where = {"dim": d, "sizes": sizes, "rank": self.rank}
        if name == "dropout":
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
            training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", n.kwargs.get("train", True))
            inplace = n.args[3] if len(n.args) > 3 else n.kwargs.get("inplace", False)
            if inplace:
                raise PassError(f"{describe_node(n)}: in-place dropout of a sharded tensor is not lowered")
            n.target, n.args, n.kwargs = sharded_dropout, (n.args[0], p, training), where
        elif name == "bernoulli":
            probs = n.args[0]
            if isinstance(_placed(probs), Placed) and _placed(probs).dim is not None:
                # the whole probabilities: what a slice (Replicate -> Shard) cut, or the fill rebuilt whole
                whole = probs.args[0] if probs.op == "call_function" and probs.target is shard \
                    else self._whole_creation(probs)
                if whole is None:
                    raise PassError(f"{describe_node(n)}: bernoulli of a sharded tensor that is neither a slice of a "
                                    f"replicated one nor a constant fill ({probs.name}) cannot draw one process's "
                                    "values")
            else:
                raise PassError(f"{describe_node(n)}: a sharded bernoulli of a replicated tensor is not planned "
                                "consistently (its output must be Replicate)")
            n.target, n.args, n.kwargs = draw_global, ("bernoulli", whole) + tuple(n.args[1:]), \
                {**n.kwargs, **where}
        elif name in ("rand_like", "randn_like"):
            n.target, n.args, n.kwargs = draw_global_like, (name,) + tuple(n.args), {**n.kwargs, **where}
        else:  # rand / randn with a literal size: drawn whole, sliced
            self._slice_after(n, placed, clone=True)
            return
        self.record["random"].append({"node": n.name, "op": name, "dim": d})


# --------------------------------------------------------------------------- the pass

@declare(requires=(SHARD, SHAPE, SYM_SHAPE, DTYPE), ensures=(SHAPE, SYM_SHAPE, SYM_ARGS))
def localize_pass(gm: torch.fx.GraphModule, rank: int, world_size: int, *, inputs: str = "full",
                  outputs: str = "full", group: Any = None, hook: Optional[Callable] = None,
                  validate: bool = False, inputs_requiring_grad: Optional[Mapping[str, bool]] = None,
                  grad_enabled: bool = True) -> PassResult:
    """Rank ``rank``'s graph of the planned graph ``gm`` (see the module docstring).

    ``group``: the process group of the DAP axis (default: the default group); ``hook``: passed to
    every collective (:class:`~foldcompile.distributed.CollectiveEvent` at each issue and wait);
    ``validate``: every collective checks its shapes and split sizes across ranks (one extra
    blocking exchange each); ``inputs_requiring_grad``: placeholder name -> requires_grad of the
    caller's input; ``grad_enabled``: False when the graph runs without autograd (no gradient
    wrappers). Both ``group`` and ``hook`` become attributes of the returned module.

    Record: ``collectives`` (kind, tensor, src, dst, start/wait node names, grad_placement),
    ``partial_params`` / ``replicate_params`` (parameter names by gradient placement),
    ``kept_on_one_rank``, ``summed_input_grads``, ``local_sizes`` (rewritten literals), ``built_whole``
    (creation ops built whole and sliced), ``random`` (random ops drawn whole), ``output_placements``.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise PassError(f"localize_pass needs a torch.fx.GraphModule, got {type(gm).__name__}")
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise PassError(f"localize_pass: rank {rank!r} must be in [0, world_size={world_size!r})")
    if inputs not in ("full", "sharded") or outputs not in ("full", "sharded"):
        raise PassError(f"localize_pass: inputs and outputs are 'full' or 'sharded', got {inputs!r}, {outputs!r}")
    gm = copy_graph_module(gm)   # the plan stays as it is: one plan lowers to every rank
    gm.meta["dap"] = {"rank": rank, "world_size": world_size, "inputs": inputs, "outputs": outputs}
    graph = gm.graph
    record: dict[str, Any] = {"rank": rank, "world_size": world_size, "collectives": [], "partial_params": [],
                              "replicate_params": [], "kept_on_one_rank": [], "summed_input_grads": [],
                              "local_sizes": [], "built_whole": [], "random": [], "output_placements": [],
                              "global_size_queries": []}
    if world_size == 1:
        for n in list(graph.nodes):
            if n.op == "call_function" and n.target is redistribute:
                n.replace_all_uses_with(n.args[0])
                graph.erase_node(n)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True, record)
    _check_plan(gm, world_size)
    group_node = hook_node = None
    first = next(iter(graph.nodes))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    for attr, value in (("dap_group", group), ("collective_hook", hook)):
        if value is None:
            continue
        setattr(gm, attr, value)
        ctx = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(first)
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # fx expects tensors or modules behind get_attr
            node = graph.get_attr(attr)
        anchor = node
        if attr == "dap_group":
            group_node = node
        else:
            hook_node = node
    lowering = _Lowering(gm, rank, world_size, GradPlacements(), group_node=group_node, hook_node=hook_node,
                         validate=validate, record=record)
    lowering._prologue = anchor          # the inputs' slices come after the group and hook they read
    if inputs == "full":
        lowering.slice_inputs()
    lowering.gather_outputs(outputs)
    lowering.grads = gradient_placements(gm, inputs_requiring_grad=inputs_requiring_grad, grad_enabled=grad_enabled)
    lowering.keep_replicated_contributions()
    lowering.sum_partial_input_grads()     # a whole input's gradient is whole, whichever way shards are passed
    if outputs == "sharded":
        lowering.sum_replicated_output_grads()
    for n in list(graph.nodes):
        lowering.visit(n)
    for n in graph.nodes:
        if n.op == "get_attr" and n.name in lowering.grads.of:
            group = record["partial_params"] if lowering.grads.of[n.name] == "partial" else record["replicate_params"]
            if str(n.target) not in group:
                group.append(str(n.target))
        _write_local_meta(n, rank, world_size, lowering.subs)
    record["output_placements"] = lowering.placements_of_outputs()
    graph.eliminate_dead_code(is_impure_node=_keeps)
    graph.lint()
    gm.recompile()
    _log.info("localize: rank %d of %d, %d collectives, %d partial parameters", rank, world_size,
              len(record["collectives"]), len(record["partial_params"]))
    return PassResult(gm, True, record)


def _keeps(n: torch.fx.Node) -> bool:
    """Dead-code elimination keeps every node except the creation ops left without users (the
    localized copy of a fill that is now drawn whole)."""
    if n.op != "call_function":
        return True
    entry = entry_of(n)
    return not (entry is not None and entry.creation and not n.users)
