"""Rank functions for ``optimize(..., inputs="sharded")`` (module level, so the pool can pickle them).

Each rank builds the module from the whole example inputs (the same on every rank), cuts its own
shards with ``module.shard_inputs`` and calls the module with them; the gradients of the shards are
compared with the matching shard of the one-process gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

import hand_plans as H
import lowering_cases as L
import zoo_cases as Z


def _mini(world: int, outputs: str, validate: bool = False, training: bool = True):
    from foldcompile.distributed.sharded import optimize_sharded

    model = H.MiniDAP(H.MINI_DIMS["N_seq"], H.MINI_DIMS["N_res"]).train(training)
    inputs = H.mini_inputs()
    fast = optimize_sharded(model, *L._leaves(inputs), world_size=world, outputs=outputs, inputs="sharded",
                            validate=validate, planner=H.hand_planner(H.MINI_SEEDS), rules=[])
    return model, inputs, fast


def _loss(outs, places, rank: int, world: int, outputs: str) -> torch.Tensor:
    """The lowering tests' loss: on whole outputs, or on each rank's shards (a Replicate term split)."""
    ws = L.weights(L._global_shapes(outs, places, world), torch.float64)
    share = (rank + 1) / sum(range(1, world + 1))
    total = 0
    for w, o, p in zip(ws, outs, places, strict=True):
        if p.dim is not None:
            total = total + L.wsin(L.piece(w, p.dim, rank, world), o)
        else:
            total = total + (share if outputs == "sharded" else 1) * L.wsin(w, o)
    return total


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as e:   # returned to the parent, which checks the type and the text
        return f"{type(e).__name__}: {e}"
    return None


def mini_case(rank: int, outputs: str, validate: bool = False):
    """One call with this rank's shards and one backward; then the whole inputs passed instead of the
    shards (every rank refuses them); with ``validate``, rank 1 alone passes a wrong shard (a row
    short) and every rank raises the same error naming rank 1."""
    world = dist.get_world_size()
    model, inputs, fast = _mini(world, outputs, validate)
    (m, z, mask), kw = fast.shard_inputs(*L._leaves(inputs))
    assert kw == {}
    torch.manual_seed(L.SEED)
    outs = fast(m, z, mask)
    places = fast.output_placements
    _loss(outs, places, rank, world, outputs).backward()
    result = {"outputs": [o.detach() for o in outs], "input_grads": [m.grad, z.grad, None],
              "grads": {k: p.grad for k, p in model.named_parameters()}, "places": places,
              "input_placements": fast.input_placements, "report": str(fast.report),
              "whole_inputs_error": _error(lambda: fast(*inputs))}
    if validate:
        wrong = m.detach()[:-1] if rank == 1 else m.detach()      # one row short on rank 1
        result["wrong_shard_error"] = _error(lambda: fast(wrong, z.detach(), mask))
    return result


def mini_rebuild_case(rank: int):
    """Calls that need a new variant after the first, with the same shards: a guard that fails (an
    attribute added to the model: the variant is built again) and model.eval() (another graph); each
    rank builds it from the whole inputs the ranks all-gather from their shards."""
    world = dist.get_world_size()
    model, inputs, fast = _mini(world, "full")
    (m, z, mask), _ = fast.shard_inputs(*L._leaves(inputs))
    torch.manual_seed(L.SEED)
    first = [o.detach() for o in fast(m, z, mask)]
    model.note = "changed"                       # a module attribute the capture guarded (its set of names)
    torch.manual_seed(L.SEED)
    again = [o.detach() for o in fast(m, z, mask)]
    model.eval()
    torch.manual_seed(L.SEED)
    evaluated = [o.detach() for o in fast(m, z, mask)]
    return first, again, evaluated, list(fast.variants.misses)


def zoo_case(rank: int, name: str, plan, dap_axes):
    """A zoo model (the planning pass's plan, made in the parent with ``dap_axes``) called with shards;
    loss on the whole outputs."""
    from foldcompile.distributed.sharded import optimize_sharded

    world = dist.get_world_size()
    model, inputs = Z.setup(name)
    fast = optimize_sharded(model, *inputs, world_size=world, inputs="sharded", rules=[], plan=plan,
                            dap_axes=dap_axes)
    shards, kw = fast.shard_inputs(*inputs)
    torch.manual_seed(Z.SEED)
    leaves = pytree.tree_leaves(fast(*shards, **kw))
    Z.loss_of(leaves).backward()
    return ([o.detach() for o in leaves], [x.grad for x in shards if isinstance(x, torch.Tensor)],
            {k: p.grad for k, p in model.named_parameters()}, fast.input_placements,
            fast.report.record["dap"]["summed_input_grads"])


def foreign_plan_case(rank: int, plans: dict):
    """``optimize(..., plan=...)`` with plans made for another world size and for other inputs: every
    rank refuses them (the same error), naming what differs."""
    from foldcompile.distributed.sharded import optimize_sharded

    world = dist.get_world_size()
    model = H.MiniDAP(H.MINI_DIMS["N_seq"], H.MINI_DIMS["N_res"])
    return {what: _error(lambda: optimize_sharded(model, *H.mini_inputs(), world_size=world, plan=plan, rules=[]))
            for what, plan in plans.items()}
