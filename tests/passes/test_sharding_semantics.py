"""Every strategy of every rule computes what the op computes: simulated rank by rank.

For each node of a model's graph and each strategy its rule offers, each of P simulated ranks
gets its part of the node's global inputs (a Replicate input whole, a Shard its rows, a Partial a
random addend of a decomposition summing to the value), runs the op on them (literal sizes of a
split dim rewritten to the rank's length, as the lowering will), and the ranks' outputs are put
back together by the output's placement (Shard: concatenated, Partial: summed, Replicate: every
rank's equal). That must equal the op's global output. This checks the rules themselves, not
just that a plan is consistent with them.
"""
from functools import lru_cache

import pytest
import torch
import torch.fx as fx

import foldcompile
from foldcompile.distributed import split_offsets
from foldcompile.capture import flat_inputs
from foldcompile.models import zoo
from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
from foldcompile.passes.placement import Partial, Placed, Replicate
from foldcompile.passes.registry import op_name
from foldcompile.passes.sharding_rules import PARTIAL, reachable, strategies, tensor_inputs
from _one_thread import one_thread  # noqa: F401  (autouse fixture)

_RANDOM = {"dropout", "bernoulli", "rand_like", "randn_like", "rand", "randn"}


class _Values(fx.Interpreter):
    """Runs the graph once and keeps every node's value."""

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n] = out
        return out


@lru_cache(maxsize=None)
def graph_and_values(name):
    model, ex = zoo.get(name, dtype=torch.float64)
    gm = normalize_pass(foldcompile.trace(model, *ex)).graph_module
    flat = flat_inputs(gm, ex)
    shape_prop_pass(gm, flat)
    classify_pass(gm)
    interp = _Values(gm)
    interp.values = {}
    with torch.no_grad():
        interp.run(*flat)
    return gm, interp.values


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def _per_rank(value, spec, world, gen):
    """The value each rank holds under ``spec``: all of it, its rows, or one addend of a Partial
    (``value * W_r`` with random tensors ``W_r`` summing to ones: a zero stays zero, so a tiny
    denominator of a value that is 0 amplifies no rounding)."""
    if isinstance(spec, tuple):
        per = [_per_rank(v, s, world, gen) for v, s in zip(value, spec)]
        return [tuple(p[r] for p in per) for r in range(world)]
    if spec is None or spec == Placed(Replicate()):
        return [value] * world
    if isinstance(spec.placement, Partial):
        if not value.is_floating_point():
            parts = [torch.randint(-3, 4, value.shape, generator=gen).to(value.dtype) for _ in range(world - 1)]
            return parts + [value - sum(parts)]
        weights = [torch.rand(value.shape, dtype=value.dtype, generator=gen) for _ in range(world - 1)]
        weights.append(1 - sum(weights))
        return [value * w for w in weights]
    offs = split_offsets(spec.split_sizes)
    return [value.narrow(spec.dim, offs[r], spec.split_sizes[r]) for r in range(world)]


def _rewrite_sizes(node, args, kwargs, out_spec, in_spec, rank):
    """The literal sizes of a split dim, made local (what the lowering does)."""
    name = op_name(node)
    if not isinstance(out_spec, Placed) or out_spec.dim is None:
        return args, kwargs
    local = out_spec.split_sizes[rank]
    if name in ("view", "reshape", "expand", "broadcast_to"):
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            sizes = list(args[1])
            if sizes[out_spec.dim] != -1:
                sizes[out_spec.dim] = local
            return (args[0], type(args[1])(sizes)), kwargs
        sizes = list(args[1:])
        if sizes[out_spec.dim] != -1:
            sizes[out_spec.dim] = local
        return (args[0], *sizes), kwargs
    if name == "narrow" and isinstance(in_spec, Placed) and in_spec.dim == (args[1] % args[0].dim()):
        return (args[0], args[1], args[2], in_spec.split_sizes[rank]), kwargs
    return args, kwargs


def _combine(outs, spec, world):
    if isinstance(spec, tuple):
        return tuple(_combine([o[i] for o in outs], s, world) for i, s in enumerate(spec))
    if isinstance(spec.placement, Partial):
        return sum(outs)
    if spec.dim is None:
        for o in outs[1:]:
            assert torch.equal(o, outs[0]), "replicated output differs across ranks"
        return outs[0]
    for r, o in enumerate(outs):
        assert o.shape[spec.dim] == spec.split_sizes[r], (o.shape, spec)
    return torch.cat(outs, spec.dim)


def _arguments(node, by_path, values):
    """node's args and kwargs with the tensor at each path of ``by_path`` replaced, every other
    node by its global value."""
    def sub(a, path):
        if path in by_path:
            return by_path[path]
        if isinstance(a, fx.Node):
            return values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x, path + (j,)) for j, x in enumerate(a))
        return a
    return (tuple(sub(a, ("a", i)) for i, a in enumerate(node.args)),
            {k: sub(a, ("k", k)) for k, a in node.kwargs.items()})


def simulate(node, values, strategy, world, gen):
    ins = tensor_inputs(node)
    held = [_per_rank(values[u], strategy.inputs[k], world, gen) for k, (_, u) in enumerate(ins)]
    outs = []
    for rank in range(world):
        by_path = {path: (held[k][rank].clone() if isinstance(held[k][rank], torch.Tensor) else held[k][rank])
                   for k, (path, _) in enumerate(ins)}
        args, kwargs = _arguments(node, by_path, values)
        in_spec = strategy.inputs[0] if strategy.inputs else None
        args, kwargs = _rewrite_sizes(node, args, kwargs, strategy.out, in_spec, rank)
        target = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
        outs.append(target(*args, **kwargs))
    return _combine(outs, strategy.out, world)


def _close(a, b):
    """Equal up to float64 rounding of the Partial addends (relative to the output's largest entry:
    a mask bias of 1e9 times a random addend rounds at 1e-7)."""
    if isinstance(a, (tuple, list)):
        return all(_close(x, y) for x, y in zip(a, b))
    if a.dtype in (torch.int64, torch.bool):
        return torch.equal(a, b)
    scale = 1.0 + (float(b.abs().max()) if b.numel() else 0.0)
    return torch.allclose(a, b, rtol=1e-9, atol=1e-9 * scale)


def check_every_strategy(gm, values, world):
    gen = torch.Generator().manual_seed(0)
    offered = {}
    checked = 0
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        if n.meta.get("shape") is None and not n.meta.get("multi_output"):
            continue
        cands = [offered.get(u, reachable(u, world)) + ([PARTIAL] if op_name(u) != "getitem" else [])
                 if not u.meta.get("multi_output") else offered[u] for _, u in tensor_inputs(n)]
        found = strategies(n, world, cands)
        offered[n] = list(dict.fromkeys(s.out for s in found)) + [c for c in reachable(n, world)
                                                                 if c not in [s.out for s in found]]
        if op_name(n) in _RANDOM or n.target is torch.Tensor.mul_:
            continue
        for s in found:
            got = simulate(n, values, s, world, gen)
            assert _close(got, values[n]), f"{n.name} ({op_name(n)}): {s} computes something else"
            checked += 1
    return checked


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["evoformer_block", "pairformer_block"])
def test_every_strategy_computes_the_op(name, world):
    gm, values = graph_and_values(name)
    assert check_every_strategy(gm, values, world) > 500


@pytest.mark.full
@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("name", zoo.names())
def test_every_strategy_computes_the_op_in_every_zoo_model(name, world):
    gm, values = graph_and_values(name)
    assert check_every_strategy(gm, values, world) > 100
