"""The element-wise family: chains of element-wise ops -> one generated kernel (:func:`kernels.fuse_elementwise`).

Runs last (after attention, softmax, layer norm took theirs). A group grows from a sink
node (walking the graph backwards) over element-wise producers that

- the kernel generator can take (:func:`foldcompile.kernels.unsupported_reason` is None),
- produce the sink's shape (one iteration space per generated kernel; a smaller operand,
  a bias or a mask, stays an input and is read through broadcast strides),
- have no user outside the group (an interior value used elsewhere would have to be
  written anyway: "multiple users of an interior value"),
- keep the group convex: no path leaves the group and comes back into it through an unfused
  node (checked on the graph as a networkx DAG), or the merged node would need its own output.

Dropout joins the chain (``F.dropout`` / ``nn.Dropout`` with a constant p, and AlphaFold's shared
row/column dropout ``y * dropout(ones(S))`` or ``y * bernoulli(full(S, q))``, see
:mod:`passes.rules._dropout`): the kernel draws the mask itself from the graph's device seed state and
a fixed counter base, regenerates it in backward, and the kernel node records each mask it draws in
``meta["dropout_masks"]`` so ``verify`` replays the same masks in the traced graph. Other random ops
stay on torch's generator. A group of one op saves no memory traffic (the kernel reads and writes
what eager does) and is left alone as "not profitable at the stated size"; a lone dropout, or a
shared mask and its product, is not alone: it saves writing and reading the mask.

``elementwise_sum`` (runs first): a ``sum`` over the trailing dims of such a group (the
invariant point attention's ``((q - k) ** 2).sum((-1, -2))``, squared norms) is one kernel
(:mod:`foldcompile.kernels.elementwise_sum`) that never writes the summed values; even one
element-wise op pays there. Every group is checked against the generated kernel on the graph's
shapes and dtypes before it is fused, so a call never fails or changes dtype at run time.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.fx

from foldcompile.kernels import fuse_elementwise, unsupported_reason
from foldcompile.kernels.elementwise_sum import MAX_SUMMED, FusedElementwiseSum
from foldcompile.passes.base import PassError
from foldcompile.passes.registry import draws_random
from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.registry import draws_random
from foldcompile.passes.rules import _dropout as D
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.rules.attention import _Builder

__all__ = ["RULES", "kernel_function"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable(n: Any, ctx: Context, random_ok: bool = True) -> str | None:
    """Why ``n`` cannot join an element-wise group, or None. A dropout may (its mask drawn in the kernel)
    unless ``random_ok`` is False."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function":
        return "not an op"
    if M.op_class(n) != "ELEMENTWISE":
        return "not element-wise"
    if draws_random(n) and not (random_ok and ctx.kernel_random and n.target in D.DROPOUTS):
        return "random op"
    if M.is_barrier(n):
        return "barrier"
    if M.shape(n) is None or M.dtype(n) not in _DTYPES:
        return f"unsupported dtype {M.dtype(n)}"
    why = unsupported_reason(n, ctx.gm)
    return f"no kernel for this op ({why.split(' is not')[0]})" if why else None


def _draws_in_kernel(n: torch.fx.Node) -> bool:
    """A dropout that draws (training, p != 0): fused alone it still saves the mask's write and read."""
    found = D.dropout_args(n) if n.target in D.DROPOUTS else None
    return found is not None and found[2] and found[1] != 0


class _Flow:
    """The data flow of a graph being rewritten, for the convexity test: successors are the live users,
    and the nodes are numbered in graph order once. Replacements only insert nodes (before the output
    they replace), erase nodes and move users onto the inserted node, so the numbers stay a topological
    order of the nodes they number; a node without a number (one a replacement made) numbers the graph
    again. (A fresh networkx graph after every match made the pass quadratic in the graph's size: a
    48-block trunk has ~11,000 nodes and ~430 element-wise matches.)"""

    def __init__(self, graph: torch.fx.Graph):
        self.fx_graph = graph
        self.pos: dict[torch.fx.Node, int] = {}
        self.renumber()

    def renumber(self) -> None:
        self.pos = {n: i for i, n in enumerate(self.fx_graph.nodes)}

    def position(self, n: torch.fx.Node) -> int:
        if n not in self.pos:
            self.renumber()
        return self.pos[n]

    def successors(self, n: torch.fx.Node) -> Iterable[torch.fx.Node]:
        return n.users


def _dag(graph: torch.fx.Graph) -> _Flow:
    """The graph's data flow (see :class:`_Flow`)."""
    return _Flow(graph)


def _convex(flow: _Flow, group: set[torch.fx.Node]) -> bool:
    """No path leaves ``group`` and comes back into it (through a node outside it).

    A path into a member passes only nodes numbered below it (the numbers are topological), so the
    search from the group's outside successors stops at the highest-numbered member: it visits the
    nodes between the group's first and last member, not everything downstream of them."""
    last = max(flow.position(n) for n in group)
    seen: set[torch.fx.Node] = set()
    work = [s for n in group for s in flow.successors(n) if s not in group and flow.position(s) < last]
    while work:
        x = work.pop()
        if x in seen:
            continue
        seen.add(x)
        for y in flow.successors(x):
            if y in group:
                return False
            if y not in seen and flow.position(y) < last:
                work.append(y)
    return True


def _cache(ctx: Context) -> dict:
    if not hasattr(ctx, "cache"):
        ctx.cache = {"flow": None, "refused": {}}
    return ctx.cache


def _recognise(n: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    """Anchors are visited last to first (``Rule.reverse``): each node not yet in a group starts one."""
    if _fusable(n, ctx) is not None:
        return None
    order, refused = _grow(n, ctx)
    if len(order) == 1 and not (ctx.kernel_random and _draws_in_kernel(n)):
        if n in refused:
            return Reject(f"{refused[n]} (its users' group could not take it) and nothing to fuse with")
        return Reject("not profitable at the stated size: a single element-wise op (nothing to fuse with)")
    return Candidate("elementwise", n, order, n)


def _grow(n: torch.fx.Node, ctx: Context, random_ok: bool = True) -> tuple[list[torch.fx.Node], dict]:
    """The convex group of fusable element-wise producers of ``n``'s shape grown back from ``n`` (graph
    order), and why producers were left out. With ``random_ok``, a product with a shared dropout mask
    takes the mask's draw and its filled tensor in too (the kernel draws the mask)."""
    cache = _cache(ctx)
    flow = cache["flow"]
    if flow is None or flow.fx_graph is not ctx.gm.graph:
        flow = cache["flow"] = _Flow(ctx.gm.graph)
    group, frontier, refused = {n}, [n], cache["refused"]
    while frontier:
        cur = frontier.pop()
        shared = D.shared_mask(cur) if random_ok and ctx.kernel_random else None
        if shared is not None and shared.mask not in group:
            if _convex(flow, group | {shared.mask, shared.creation}):
                group |= {shared.mask, shared.creation}
            else:
                refused.setdefault(shared.mask, "merging it would make a cycle through unfused nodes")
        for a in cur.all_input_nodes:
            if shared is not None and a is shared.mask:
                continue
            if a in group or _fusable(a, ctx, random_ok) is not None or M.shape(a) != M.shape(n):
                continue
            if any(u not in group for u in a.users):
                refused.setdefault(a, "multiple users of an interior value")
                continue
            if not _convex(flow, group | {a}):
                refused.setdefault(a, "merging it would make a cycle through unfused nodes")
                continue
            group.add(a)
            frontier.append(a)
    return sorted(group, key=flow.position), refused  # graph order


def _example(n: torch.fx.Node) -> Any:
    """A stand-in for one value a fragment reads, with the shape and dtype shape propagation found
    (a meta tensor), or a Python number of its kind."""
    if M.shape(n) is not None and isinstance(M.dtype(n), torch.dtype):
        return torch.empty(M.shape(n), dtype=M.dtype(n), device="meta")
    return 1 if n.meta.get("sym_value") is not None else 1.0


def _check(c: Candidate, ctx: Context) -> str | None:
    """Every node passed ``_fusable`` (op, dtype) while the group grew; here the generated kernel is
    asked what it would compute on the graph's shapes and dtypes, so a call can never fail or
    give another dtype than eager (``x + where(m > 0, 0., -inf).to(x.dtype)``) at run time."""
    fused, name, inputs = _fragment(c, ctx)
    try:
        got = fused.output_dtypes(*(_example(a) for a in inputs))
    except (TypeError, ValueError) as exc:
        return f"the generated kernel cannot take these operands: {exc}"
    if got != [M.dtype(c.output)]:
        return (f"unsupported dtype: the generated kernel would compute {got[0]} where eager gives "
                f"{M.dtype(c.output)}")
    if c.parts["draws"]:
        cache = _cache(ctx)
        if "bases" not in cache:  # fixed by the traced graph before any rewrite of it
            cache["bases"] = D.counter_bases(ctx.gm.graph)
        missing = [d.name for d, _ in c.parts["draws"] if d not in cache["bases"]]
        if missing:
            return f"no kernel for this op: no counter base for the dropout {missing[0]}"
        if not D.seed_node(ctx.gm, create=False):
            return "no kernel for this op: the graph reads no floating-point tensor to draw the dropout seed on"
    c.parts["fragment"] = (fused, name, inputs)  # what _replace puts in the graph
    return None


def _profitable(c: Candidate, ctx: Context) -> str | None:
    # each interior value is neither written nor read back: the saving is positive for >= 2 ops
    return None


def kernel_function(fused: Any, name: str):
    """The callable a rewritten graph calls: a named function around one generated kernel (with its
    dropouts' device state ``seed`` and counter bases ``offset`` when it draws masks)."""
    def run(*inputs: torch.Tensor, **dropout_state: Any) -> torch.Tensor:
        return fused(*inputs, **dropout_state)  # seed=, offset= only where the kernel draws masks
    run.__name__ = run.__qualname__ = name
    run.__module__ = __name__
    run.kernel = fused  # the FusedElementwise (its .source is the generated Triton)
    return run


def _fragment(c: Candidate, ctx: Context) -> tuple[Any, str, list[torch.fx.Node]]:
    """The group as one generated kernel: ``(kernel, its name, the graph values it reads)``. The masks it
    draws (``(traced node, p)`` in the fragment's dropout order) go to ``c.parts["draws"]``."""
    group = set(c.region)
    shared = {m: sm for m in c.region if (sm := D.shared_mask(m)) is not None and sm.mask in group}
    absorbed = {x for sm in shared.values() for x in (sm.mask, sm.creation)}
    frag = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs: list[torch.fx.Node] = []
    draws: list[tuple[torch.fx.Node, float]] = []
    for n in c.region:
        if n in absorbed:
            continue
        sm = shared.get(n)
        for a in ([sm.y] if sm is not None else n.all_input_nodes):
            if a not in group and a not in env:
                env[a] = frag.placeholder(f"in{len(inputs)}")
                inputs.append(a)
        if sm is not None:
            env[n] = frag.call_function(D.kernel_dropout, (env[sm.y], sm.p),
                                        {"shared_dims": sm.shared_dims, "rescale": sm.rescale})
            if sm.p != 0:
                draws.append((sm.mask, sm.p))
            continue
        env[n] = frag.node_copy(n, lambda a: env[a])
        if draws_random(n):
            x, p, training = D.dropout_args(n) or (None, 0.0, False)
            if training and p != 0:
                draws.append((n, p))
    frag.output(env[c.output])
    c.parts["draws"] = draws
    ops = []
    for n in c.region:
        op = M.op_name(n)
        if op not in ops and op != "to":
            ops.append(op)
    if shared:
        ops = ["dropout"] + [op for op in ops if op not in ("dropout", "bernoulli", "ones_like", "ones", "full",
                                                           "full_like", "new_ones", "new_full")]
    name = "fused_elementwise_" + "_".join(ops[:4] or ["cast"])
    fused = fuse_elementwise(torch.fx.GraphModule(ctx.gm, frag), name=name)
    if fused.n_dropouts != len(draws):  # the lowering and this count must agree on which dropouts draw
        raise PassError(f"elementwise at {c.site}: the kernel draws {fused.n_dropouts} masks, the group "
                        f"{len(draws)}")
    return fused, name, inputs


def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    fused, name, inputs = c.parts.get("fragment") or _fragment(c, ctx)
    kwargs: dict[str, Any] = {}
    masks = []
    if c.parts["draws"]:
        seed, bases = D.seed_node(ctx.gm), _cache(ctx)["bases"]
        kwargs = {"seed": seed, "offset": tuple(bases[d] for d, _ in c.parts["draws"])}
        # what verify needs to draw the same masks in the traced graph (its nodes by name)
        masks = [{"node": d.name, "seed": seed.name, "offset": bases[d], "p": p, "shape": tuple(M.shape(d))}
                 for d, p in c.parts["draws"]]
    out = _Builder(ctx.gm.graph, c.output, c)(kernel_function(fused, name), *inputs, **kwargs)
    out.meta["shape"], out.meta["dtype"] = M.shape(c.output), M.dtype(c.output)
    if masks:
        out.meta["dropout_masks"] = masks
    # the random nodes the kernel stands for (their masks drawn here, or identity dropouts): fuse erases them
    out.meta["random_taken"] = [n.name for n in c.region if draws_random(n)]
    return out


# ------------------------------------------------------------------ a chain summed over trailing dims


def _summed_dims(n: torch.fx.Node) -> tuple[torch.fx.Node, int, bool] | None:
    """``(x, k, keepdim)`` for ``x.sum(dims)`` over the last ``k`` dims of a float ``x`` (no ``dtype``)."""
    if n.op != "call_function" or M.op_name(n) != "sum" or not n.args or not isinstance(n.args[0], torch.fx.Node):
        return None
    x = n.args[0]
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if set(n.kwargs) - {"dim", "keepdim"} or len(n.args) > 3 or not isinstance(keepdim, bool) or M.shape(x) is None:
        return None
    rank = len(M.shape(x))
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
    if not dims or rank == 0 or not all(isinstance(d, int) for d in dims):
        return None
    norm = sorted({d % rank for d in dims})
    if len(norm) != len(dims) or norm != list(range(rank - len(norm), rank)):
        return None  # not the trailing dims
    return x, len(norm), keepdim


def _recognise_sum(n: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    found = _summed_dims(n)
    if found is None:
        return None
    x, k, keepdim = found
    if _fusable(x, ctx, random_ok=False) is not None:
        return None  # a sum of something else than an element-wise chain
    if len(x.users) != 1:
        return Reject("multiple users of an interior value (the summed values are read elsewhere too)")
    summed = math.prod(M.shape(x)[len(M.shape(x)) - k:])
    if summed > MAX_SUMMED:
        return Reject(f"no kernel for this op: {summed} summed elements a row, more than one tile holds "
                      f"({MAX_SUMMED})")
    order, _ = _grow(x, ctx, random_ok=False)
    return Candidate("elementwise_sum", n, order + [n], n, {"chain": x, "n_summed": k, "keepdim": keepdim})


def _check_sum(c: Candidate, ctx: Context) -> str | None:
    chain = Candidate("elementwise", c.parts["chain"], c.region[:-1], c.parts["chain"])
    kernel, name, inputs = _fragment(chain, ctx)
    name = name + "_sum"
    try:
        fused = FusedElementwiseSum(kernel, c.parts["n_summed"], c.parts["keepdim"], name=name)
        got = fused.output_dtypes(*(_example(a) for a in inputs))
    except (TypeError, ValueError) as exc:
        return f"the generated kernel cannot take these operands: {exc}"
    if got != [M.dtype(c.output)]:
        return (f"unsupported dtype: the generated kernel would compute {got[0]} where eager gives "
                f"{M.dtype(c.output)}")
    c.parts["fragment"] = (fused, name, inputs)
    return None


def _replace_sum(c: Candidate, ctx: Context) -> torch.fx.Node:
    if "fragment" not in c.parts:
        why = _check_sum(c, ctx)
        if why is not None:
            raise PassError(f"elementwise_sum at {c.site}: {why}")
    fused, name, inputs = c.parts["fragment"]
    out = _Builder(ctx.gm.graph, c.output, c)(kernel_function(fused, name), *inputs)
    out.meta["shape"], out.meta["dtype"] = M.shape(c.output), M.dtype(c.output)
    return out


RULES = [Rule("elementwise_sum", "elementwise", 11, _recognise_sum, _check_sum, _profitable, _replace_sum,
              "an element-wise chain summed over its trailing dims -> fused_elementwise_<ops>_sum (the summed "
              "values are never written)"),
         Rule("elementwise", "elementwise", 10, _recognise, _check, _profitable, _replace,
              "convex chains of element-wise ops of one shape -> fused_elementwise_<ops>", reverse=True)]
