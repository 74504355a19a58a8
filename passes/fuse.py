"""The fusion pass: run the rule families of ``passes/rules`` over a classified graph.

``fuse_pass(gm, at=None, disabled=(), rules=None)`` needs the meta of normalize,
shape_prop and classify. Rules run highest priority first (attention before softmax,
so an attention's softmax is never taken alone); each anchor a rule recognises is either
matched and rewritten, or rejected with its reason, and both are counted in the record::

    >>> import torch
    >>> from foldcompile.passes import normalize_pass, shape_prop_pass, classify_pass
    >>> def attend(q, k, v, key_mask):                     # plain PyTorch, head dim 8
    ...     logits = q @ k.transpose(-1, -2) / 8 ** 0.5 + (key_mask - 1.0) * 1e9
    ...     return torch.softmax(logits, dim=-1) @ v
    >>> ex = (torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8), torch.ones(3, 1, 1, 5))
    >>> gm = normalize_pass(torch.fx.symbolic_trace(attend)).graph_module
    >>> _ = shape_prop_pass(gm, ex, dims={}); _ = classify_pass(gm)
    >>> result = fuse_pass(gm)
    >>> result.record["counts"]["attention"]
    {'matched': 1, 'rejected': 0}
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['fused_elementwise_sub_mul', 'fused_attention']
    >>> torch.allclose(gm(*ex), attend(*ex), atol=1e-6)
    True

The record (for ``explain`` and the tests):

- ``matches``: one entry per rewrite — ``id`` (``attention#0``; ``disabled`` takes these
  ids, which is how ``verify(bisect=True)`` switches matches off), rule, site (module
  path), the replaced nodes (``origin``), notes;
- ``rejections``: rule, site, node, reason;
- ``counts``: per rule ``{"matched": n, "rejected": m}``;
- ``unfused``: every REDUCTION / ELEMENTWISE node left, with a reason from
  :data:`UNFUSED_REASONS`, and ``coverage``: the share of those classes' bytes at the
  stated size that went into kernels;
- ``at``: the stated size profitability was judged at (default the training crop,
  :data:`DEFAULT_AT`; dims it does not name are taken at their example values and listed
  in ``at_from_example``).

Every node a rule inserts carries ``meta["origin"]`` (the names of the traced nodes it
replaced), ``meta["fused_by"]`` and the anchor's ``module_path`` and ``stack_trace``.
Collectives and autocast regions that cast are barriers: no match may contain one or straddle
the edge of a region (a match wholly inside an ``autocast(enabled=False)`` region is fine).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable, Mapping

import torch
import torch.fx

from foldcompile.passes.base import PassError, PassResult, declare
from foldcompile.passes.rules import Context, Reject, Rule, all_rules
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.registry import draws_random, entry_of, writes_in_place
from foldcompile.passes.meta import COST, DTYPE, EINSUM, OP_CLASS, ORIGIN, SHAPE, SYM_SHAPE, memory_of
from foldcompile.passes.shape_prop import dim_symbol
from foldcompile.passes.simplify_casts import simplify_casts_pass

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["fuse_pass", "DEFAULT_AT", "UNFUSED_REASONS"]

# The training crop (AlphaFold 2: N_seq=128, N_res=256, 1024 extra sequences, 4 templates):
# profitability is judged here, never at the tiny example size.
DEFAULT_AT: dict[str, int] = {"N_seq": 128, "N_res": 256, "N_extra": 1024, "N_templ": 4}

UNFUSED_REASONS = {
    "no_kernel": "no kernel for this op",
    "no_pattern": "no rule's pattern covers it",
    "rejected": "its pattern was rejected (see rejections)",
    "not_profitable": "not profitable at the stated size",
    "multiple_users": "multiple users of an interior value",
    "dtype": "unsupported dtype",
    "random": "random op, kept on torch's generator so its masks stay the model's",
    "barrier": "inside a collective/autocast barrier",
}

def _subgraph_modules(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    return [gm] + [m for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]


def _autocast_regions(graph: torch.fx.Graph) -> dict[torch.fx.Node, tuple[int, bool]]:
    """Each node inside an autocast region -> (the innermost region's id, whether it casts).

    A region entered with ``enabled=False`` (Boltz switches autocast off around its attention
    so the logits stay fp32) casts nothing: its ops run in their inputs' dtypes, as our kernels
    do, so a match that lies wholly inside one such region computes the same. A region that
    casts (``enabled`` True or not constant) changes the precision of every op in it: a barrier."""
    inside: dict[torch.fx.Node, tuple[int, bool]] = {}
    stack: list[tuple[int, bool]] = []
    next_id = 0
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch.amp.autocast_mode._enter_autocast:
            enabled = n.args[2] if len(n.args) > 2 else n.kwargs.get("enabled", True)
            stack.append((next_id, enabled is not False))
            next_id += 1
        elif n.op == "call_function" and n.target is torch.amp.autocast_mode._exit_autocast:
            if stack:
                stack.pop()
        elif stack:
            # a cast region anywhere on the stack casts the ops in an inner no-cast one too
            inside[n] = (stack[-1][0], any(casts for _, casts in stack))
    return inside


def _grad_modes(graph: torch.fx.Graph) -> dict[torch.fx.Node, Any]:
    """Each node -> the grad mode it runs in: ``None`` before the graph sets one (the caller's), else the
    constant the last ``torch._C._set_grad_enabled`` call set (``torch.no_grad()`` inside a forward), or
    that node itself where the value is not a constant. A match whose nodes run in different modes would
    compute them all in one: the values made without grad would get a gradient, or lose one."""
    modes: dict[torch.fx.Node, Any] = {}
    mode: Any = None
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch._C._set_grad_enabled:
            arg = n.args[0] if n.args else n.kwargs.get("mode")
            mode = arg if isinstance(arg, bool) else n
        modes[n] = mode
    return modes


def _write_inside(region: Iterable[torch.fx.Node], output: torch.fx.Node, order: Mapping[torch.fx.Node, int],
                  writes: list[torch.fx.Node]) -> torch.fx.Node | None:
    """The first in-place write that lies between a match's first node and its output (where the
    fused kernel is inserted) and is not part of the match: fusing would move the match's reads
    past that write (the read would see the new value)."""
    members = set(region)
    if output not in order or any(r not in order for r in members):
        # a node an earlier match of this pass created: number the graph again
        order.clear()
        order.update({n: i for i, n in enumerate(output.graph.nodes)})
        writes[:] = [n for n in output.graph.nodes if writes_in_place(n)]
    lo = min(order[r] for r in members)
    hi = order[output]
    for w in writes:
        if not lo < order[w] < hi or w in members:
            continue
        # harmful only if a member that ran before the write reads memory the write changes
        # (views share it); a read after the write is not moved across it. Unknown memory: harmful.
        written = memory_of(w.args[0]) if w.args else None
        for r in members:
            if order[r] < order[w] and any(written is None or memory_of(a) in (None, written)
                                           for a in r.all_input_nodes):
                return w
    return None


def _crosses_autocast(region: Iterable[torch.fx.Node], regions: Mapping[torch.fx.Node, tuple[int, bool]]) -> bool:
    """True when a match's nodes are not all in the same place: all outside every autocast region,
    or all inside one region that casts nothing."""
    places = {regions.get(r) for r in region}
    if len(places) != 1:
        return True
    place = places.pop()
    return place is not None and place[1]


def _erase_dead(graph: torch.fx.Graph, nodes: Iterable[torch.fx.Node], erased: set[torch.fx.Node],
                drawn: frozenset[str] = frozenset()) -> None:
    """Erase ``nodes`` that lost every user, then ancestors that did (pure ops only, and the random
    nodes named in ``drawn``: the replacement kernel makes their draws itself, or they draw nothing)."""
    work = list(nodes)
    while work:
        n = work.pop()
        if n in erased or n.users or n.op != "call_function" or (draws_random(n) and n.name not in drawn):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        work.extend(inputs)


@declare(requires=(SHAPE, SYM_SHAPE, DTYPE, EINSUM, OP_CLASS, COST), ensures=(ORIGIN,))
def fuse_pass(gm: torch.fx.GraphModule, *, at: Mapping[str, int] | None = None, disabled: Iterable[str] = (),
              rules: list[Rule] | None = None) -> PassResult:
    """Rewrite every pattern the rules match into its kernel (see the module docstring)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise PassError(f"fuse_pass needs a torch.fx.GraphModule, got {type(gm).__name__}")
    rules = sorted(rules if rules is not None else all_rules(), key=lambda r: -r.priority)
    disabled = set(disabled)
    dims = dict(gm.meta.get("dims", {}))
    stated = {k: v for k, v in {**DEFAULT_AT, **dict(at or {})}.items()}
    from_example = {k: v for k, v in dims.items() if k not in stated}
    values = {**from_example, **{k: v for k, v in stated.items()}}
    subs = {dim_symbol(k): v for k, v in values.items()}
    record: dict[str, Any] = {"matches": [], "rejections": [], "counts": {r.name: {"matched": 0, "rejected": 0}
                                                                            for r in rules},
                              "disabled": [], "unfused": [], "at": {k: stated[k] for k in stated if k in dims},
                              "at_from_example": from_example}
    record["simplify_casts"] = simplify_casts_pass(gm).record  # casts that change no value hide patterns
    fused_bytes = total_bytes = 0
    rejected_at: dict[torch.fx.Node, str] = {}
    changed = False
    n_match = Counter()
    for owner in _subgraph_modules(gm):
        graph = owner.graph
        ctx = Context(owner, subs, values, kernel_random="dap" not in gm.meta)
        autocast_regions = _autocast_regions(graph)
        grad_modes = _grad_modes(graph)
        barrier = {n for n, (_, casts) in autocast_regions.items() if casts}
        for n in graph.nodes:
            if M.op_class(n) in ("REDUCTION", "ELEMENTWISE"):
                total_bytes += M.cost_bytes_at(n, subs)
        erased: set[torch.fx.Node] = set()
        for rule in rules:
            # positions of this pass over the graph (earlier rules' replacements moved nodes)
            order = {n: i for i, n in enumerate(graph.nodes)}
            writes = [n for n in graph.nodes if writes_in_place(n)]
            for node in (list(graph.nodes)[::-1] if rule.reverse else list(graph.nodes)):
                if node in erased or node.meta.get("fused_by") or node.meta.get("fuse_disabled"):
                    continue
                found = rule.recognise(node, ctx)
                if found is None:
                    continue
                reason = None
                if isinstance(found, Reject):
                    reason = found.reason
                else:
                    write = _write_inside(found.region, found.output, order, writes)
                    if any(M.is_barrier(r) for r in found.region) or _crosses_autocast(found.region,
                                                                                       autocast_regions):
                        reason = "crosses a collective or autocast boundary"
                    elif len({grad_modes.get(r) for r in found.region}) > 1:
                        reason = "crosses a grad-mode boundary (part of it runs under torch.no_grad())"
                    elif write is not None:
                        reason = (f"an in-place write ({write.name}) lies between its ops: fusing would move "
                                  "their reads past it")
                    else:
                        reason = rule.check(found, ctx) or rule.profitable(found, ctx)
                if reason is not None:
                    record["rejections"].append({"rule": rule.name, "site": M.site(node), "node": node.name,
                                                 "reason": reason, "source": M.source_line(node)})
                    record["counts"][rule.name]["rejected"] += 1
                    rejected_at.setdefault(node, f"{rule.name}: {reason}")
                    continue
                mid = f"{rule.name}#{n_match[rule.name]}"
                n_match[rule.name] += 1
                if mid in disabled:
                    # claimed, so no lower-priority rule takes part of it: the other matches keep their ids
                    for r in found.region:
                        r.meta["fuse_disabled"] = mid
                    record["disabled"].append({"id": mid, "rule": rule.name, "site": found.site})
                    continue
                new = rule.replace(found, ctx)
                new.meta["match_id"] = mid
                new.meta["replaces"] = found.output.name  # the traced node whose value it computes
                found.output.replace_all_uses_with(new)
                drawn = frozenset(new.meta.get("random_taken", ()))
                _erase_dead(graph, reversed(found.region), erased, drawn)
                # the bytes of the element-wise and reduction work the kernel took over
                fused_bytes += sum(M.cost_bytes_at(r, subs) for r in found.region
                                   if r in erased and M.op_class(r) in ("REDUCTION", "ELEMENTWISE"))
                record["matches"].append({"id": mid, "rule": rule.name, "site": found.site,
                                          "origin": [r.name for r in found.region], "notes": list(found.notes),
                                          "source": M.source_line(found.anchor),
                                          "graph": "" if owner is gm else owner.__class__.__name__})
                record["counts"][rule.name]["matched"] += 1
                changed = True
        graph.lint()
        owner.recompile()
        for n in graph.nodes:
            if n.op == "call_function" and not n.meta.get("fused_by") and M.op_class(n) in ("REDUCTION", "ELEMENTWISE"):
                record["unfused"].append({"node": n.name, "op": M.op_name(n), "site": M.site(n),
                                          "reason": _unfused_reason(n, rejected_at, barrier),
                                          "bytes": M.cost_bytes_at(n, subs)})
    record["coverage"] = {"fused_bytes": fused_bytes, "total_bytes": total_bytes,
                          "fraction": fused_bytes / total_bytes if total_bytes else 1.0}
    _log.info("fuse: %d matches, %d rejections, %d element-wise/reduction nodes left unfused, %.0f%% of their "
              "bytes fused", len(record["matches"]), len(record["rejections"]), len(record["unfused"]),
              100 * record["coverage"]["fraction"])
    return PassResult(gm, changed, record)


def _unfused_reason(n: torch.fx.Node, rejected: Mapping[torch.fx.Node, str], barrier: set) -> str:
    if n in barrier:
        return UNFUSED_REASONS["barrier"]
    if draws_random(n):
        return UNFUSED_REASONS["random"]
    if n in rejected:
        why = rejected[n]
        for key, words in (("multiple_users", "multiple users"), ("not_profitable", "not profitable"),
                           ("dtype", "unsupported dtype")):
            if words in why:
                return f"{UNFUSED_REASONS[key]} ({why})"
        return f"{UNFUSED_REASONS['rejected']} ({why})"
    entry = entry_of(n)
    if entry is not None and entry.fusible == "kernel":  # one of our kernels computes it: no rule's pattern did
        return UNFUSED_REASONS["no_pattern"]
    if M.dtype(n) is not None and M.dtype(n) not in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                     torch.bool):
        return UNFUSED_REASONS["dtype"]
    return UNFUSED_REASONS["no_kernel"]

