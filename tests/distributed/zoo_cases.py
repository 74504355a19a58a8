"""Rank functions and single-process references for the zoo models sharded by optimize().

Every model is the zoo's tiny one (N_seq=5, N_res=11: not divisible by 2, 3 or 8), float64, in train
mode (dropout on), its floating inputs that are not masks requiring grad. The loss is
``sum_k sum(w_k * sin(out_k))`` over every floating output with fixed random weights:
``"replicated"`` on the whole outputs (every rank the same loss), ``"sharded"`` on each rank's
shards (a replicated output's term split between the ranks).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from foldcompile.distributed import split_offsets
from foldcompile.models import zoo

SEED = 99


def setup(name: str, training: bool = True, dtype=torch.float64):
    torch.manual_seed(0)
    model, inputs = zoo.get(name, size="tiny")
    model = model.to(dtype).train(training)
    names = list(inspect.signature(model.forward).parameters)
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.to(dtype)
            if "mask" not in (names[i] if i < len(names) else ""):
                x = x.clone().requires_grad_()
        out.append(x)
    return model, tuple(out)


def loss_of(leaves: list, places: list | None = None, rank: int = 0, world: int = 1) -> torch.Tensor:
    total = 0
    for k, o in enumerate(leaves):
        if not isinstance(o, torch.Tensor) or not o.is_floating_point():
            continue
        p = places[k] if places is not None else None
        shape = list(o.shape)
        if p is not None and p.dim is not None:
            shape[p.dim] = sum(p.split_sizes)
        w = torch.randn(shape, generator=torch.Generator().manual_seed(700 + k), dtype=torch.float64).to(o.dtype)
        if p is not None and p.dim is not None:
            w = w.narrow(p.dim, split_offsets(p.split_sizes)[rank], p.split_sizes[rank])
            total = total + (w * torch.sin(o)).sum()
        elif p is not None:
            total = total + (rank + 1) / sum(range(1, world + 1)) * (w * torch.sin(o)).sum()
        else:
            total = total + (w * torch.sin(o)).sum()
    return total


def reference(name: str, training: bool = True, dtype=torch.float64):
    model, inputs = setup(name, training, dtype)
    torch.manual_seed(SEED)
    leaves = pytree.tree_leaves(model(*inputs))
    loss_of(leaves).backward()
    return ([o.detach() for o in leaves], [x.grad for x in inputs if isinstance(x, torch.Tensor)],
            {k: p.grad for k, p in model.named_parameters()})


def plan_for(name: str, world: int, training: bool = True, dtype=torch.float64):
    """The plan, made once in the parent (capture, shape propagation, the placement search)."""
    from foldcompile.distributed.sharded import make_plan

    model, inputs = setup(name, training, dtype)
    return make_plan(model, *inputs, world_size=world)


def zoo_case(rank: int, name: str, plan: Any, loss: str, training: bool = True, dtype=torch.float64,
             fuse: bool = False):
    """``plan`` made in the parent, or None: ``foldcompile.optimize`` itself (rank 0 plans and sends it)."""
    import foldcompile
    from foldcompile.distributed.sharded import optimize_sharded

    world = dist.get_world_size()
    model, inputs = setup(name, training, dtype)
    outputs = "full" if loss == "replicated" else "sharded"
    if plan is None:
        fast = foldcompile.optimize(model, *inputs, world_size=world, outputs=outputs, rules=None if fuse else [])
    else:
        fast = optimize_sharded(model, *inputs, world_size=world, outputs=outputs, rules=None if fuse else [],
                                plan=plan)
    torch.manual_seed(SEED)
    leaves = pytree.tree_leaves(fast(*inputs))
    places = fast.output_placements if loss == "sharded" else None
    loss_of(leaves, places, rank, world).backward()
    return ([o.detach() for o in leaves], [x.grad for x in inputs if isinstance(x, torch.Tensor)],
            {k: p.grad for k, p in model.named_parameters()}, places, len(fast.report.matches),
            len(fast.report.collectives), fast.report.record["dap"]["build_seconds"])
