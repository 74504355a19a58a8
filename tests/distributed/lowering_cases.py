"""Rank functions for the lowering tests (module level, so the pool can pickle them) and the
single-process references they are compared with.

Each rank builds the hand-planned MiniDAP graph (hand_plans.py), lowers it for itself
(localize -> local shape check -> [classify, fuse] -> schedule), runs it on the whole inputs
and takes the gradient of a loss: ``"replicated"`` (outputs gathered, every rank computes the
same loss: a P-times gradient shows) or ``"sharded"`` (outputs kept as shards, each rank's loss
is its part, the Replicate outputs' terms split between the ranks: a 1/P or dropped
contribution shows).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from foldcompile.distributed import PartialGradReducer, split_offsets, split_sizes
from foldcompile.distributed.sharded_random import check_generators_agree
from foldcompile.passes.classify import classify_pass
from foldcompile.passes.fuse import fuse_pass
from foldcompile.passes.local_shape_check import local_shape_check_pass
from foldcompile.passes.localize import annotate_collectives, localize_pass
from foldcompile.passes.placement import Placed
from foldcompile.passes.schedule_collectives import schedule_collectives_pass

import hand_plans as H

SEED = 1234


def weights(outs: Any, dtype: torch.dtype) -> list[torch.Tensor]:
    out = []
    for k, o in enumerate(outs):
        g = torch.Generator().manual_seed(500 + k)
        out.append(torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype))
    return out


def wsin(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (w * torch.sin(y)).sum()


def piece(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    s = split_sizes(x.shape[dim], world)
    return x.narrow(dim, split_offsets(s)[rank], s[rank])


def _leaves(inputs):
    m, z, mask = inputs
    return m.clone().requires_grad_(), z.clone().requires_grad_(), mask.clone()


def mini_reference(dtype: torch.dtype = torch.float64, training: bool = True):
    """One process: outputs, input gradients, parameter gradients."""
    model, inputs, _ = H.mini_plan(1, training, dtype)
    m, z, mask = _leaves(inputs)
    torch.manual_seed(SEED)
    outs = model(m, z, mask)
    sum(wsin(w, o) for w, o in zip(weights(outs, dtype), outs, strict=True)).backward()
    return ([o.detach() for o in outs], (m.grad, z.grad),
            {k: p.grad for k, p in model.named_parameters()})


def lower_mini(rank: int, world: int, *, outputs: str, dtype=torch.float64, training=True, fuse=False,
               hook=None):
    model, inputs, plan = H.mini_plan(world, training, dtype)
    res = localize_pass(plan, rank, world, outputs=outputs, hook=hook,
                        inputs_requiring_grad={"m": True, "z": True, "msa_mask": False})
    gm = res.graph_module
    local_shape_check_pass(gm, inputs)
    fused = 0
    if fuse:
        classify_pass(gm)
        annotate_collectives(gm)
        fused = len(fuse_pass(gm).record["matches"])
    sched = schedule_collectives_pass(gm).record
    return model, inputs, gm, res.record, sched, fused


def mini_case(rank: int, loss: str, dtype=torch.float64, training=True, fuse=False):
    world = dist.get_world_size()
    outputs = "full" if loss == "replicated" else "sharded"
    model, inputs, gm, record, sched, fused = lower_mini(rank, world, outputs=outputs, dtype=dtype,
                                                         training=training, fuse=fuse)
    params = dict(model.named_parameters())
    reducer = PartialGradReducer([params[n] for n in record["partial_params"]], bucket_cap_mb=1e-4)
    m, z, mask = _leaves(inputs)
    torch.manual_seed(SEED)
    check_generators_agree()
    outs = gm(m, z, mask)
    ws = weights(_global_shapes(outs, record["output_placements"], world), dtype)
    total = 0
    share = (rank + 1) / sum(range(1, world + 1))      # the ranks' split of a replicated term
    for w, o, p in zip(ws, outs, record["output_placements"], strict=True):
        if loss == "sharded" and isinstance(p, Placed) and p.dim is not None:
            total = total + wsin(piece(w, p.dim, rank, world), o)
        elif loss == "sharded":
            total = total + share * wsin(w, o)
        else:
            total = total + wsin(w, o)
    total.backward()
    reducer.wait()
    reducer.remove()
    return ([o.detach() for o in outs], (m.grad, z.grad), {k: p.grad for k, p in params.items()},
            record["output_placements"], fused)


def _global_shapes(outs, placements, world):
    """Stand-ins of the outputs' global shapes (for the loss weights)."""
    out = []
    for o, p in zip(outs, placements, strict=True):
        shape = list(o.shape)
        if isinstance(p, Placed) and p.dim is not None:
            shape[p.dim] = sum(p.split_sizes)
        out.append(torch.empty(shape))
    return out


def recorder(log: list):
    def hook(e):
        log.append((e.phase, e.action, f"{e.collective}:{e.name}"))
    return hook


def mini_events_case(rank: int):
    """The lowered graph's collective events in forward and backward (replicated loss)."""
    world = dist.get_world_size()
    log: list = []
    model, inputs, gm, record, sched, _ = lower_mini(rank, world, outputs="full", hook=recorder(log))
    m, z, mask = _leaves(inputs)
    torch.manual_seed(SEED)
    outs = gm(m, z, mask)
    log.append(("forward", "end", ""))
    sum(wsin(w, o) for w, o in zip(weights(outs, torch.float64), outs, strict=True)).backward()
    return log, sched["collectives"], record["collectives"], gm.code


# --------------------------------------------------------------------------- through optimize()

def optimize_mini(world: int, *, outputs: str = "full", dtype=torch.float64, training=True, fuse=False):
    from foldcompile.distributed.sharded import optimize_sharded

    model = H.MiniDAP(H.MINI_DIMS["N_seq"], H.MINI_DIMS["N_res"], dtype).train(training)
    inputs = H.mini_inputs(dtype)
    fast = optimize_sharded(model, *_leaves(inputs), world_size=world, outputs=outputs,
                            planner=H.hand_planner(H.MINI_SEEDS), rules=None if fuse else [])
    return model, inputs, fast


def optimize_mini_case(rank: int, loss: str, dtype=torch.float64, training=True, fuse=False):
    """``optimize(world_size=P)`` on MiniDAP (the hand planner as its planning pass): one call,
    one backward, no explicit reduction (the module waits for it at the end of backward).
    Returns the outputs, gradients, output placements, fused count, ``.code`` and ``explain(module)``."""
    import foldcompile

    world = dist.get_world_size()
    model, inputs, fast = optimize_mini(world, outputs="full" if loss == "replicated" else "sharded",
                                        dtype=dtype, training=training, fuse=fuse)
    m, z, mask = _leaves(inputs)
    torch.manual_seed(SEED)
    outs = fast(m, z, mask)
    places = fast.output_placements
    ws = weights(_global_shapes(outs, places, world), dtype)
    share = (rank + 1) / sum(range(1, world + 1))
    total = 0
    for w, o, p in zip(ws, outs, places, strict=True):
        if p.dim is not None:
            total = total + wsin(piece(w, p.dim, rank, world), o)
        else:
            total = total + (share if loss == "sharded" else 1) * wsin(w, o)
    total.backward()
    return ([o.detach() for o in outs], (m.grad, z.grad), {k: p.grad for k, p in model.named_parameters()},
            places, len(fast.report.matches), fast.code, str(foldcompile.explain(fast)))


def train_steps_case(rank: int, steps: int):
    """``loss.backward(); opt.step()`` unchanged, ``steps`` times (train mode: new masks each step)."""
    world = dist.get_world_size()
    model, inputs, fast = optimize_mini(world)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    m, z, mask = inputs
    torch.manual_seed(SEED)
    for _ in range(steps):
        opt.zero_grad()
        outs = fast(m, z, mask)
        sum(wsin(w, o) for w, o in zip(weights(outs, torch.float64), outs, strict=True)).backward()
        opt.step()
    return {k: p.detach() for k, p in model.named_parameters()}


def train_steps_reference(steps: int):
    model, inputs, _ = H.mini_plan(1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    torch.manual_seed(SEED)
    for _ in range(steps):
        opt.zero_grad()
        outs = model(*inputs)
        sum(wsin(w, o) for w, o in zip(weights(outs, torch.float64), outs, strict=True)).backward()
        opt.step()
    return {k: p.detach() for k, p in model.named_parameters()}


def wrong_world_case(rank: int):
    model, inputs = H.MiniDAP(5, 7), H.mini_inputs()
    from foldcompile.distributed.sharded import optimize_sharded
    try:
        optimize_sharded(model, *inputs, world_size=dist.get_world_size() + 1, planner=H.hand_planner(H.MINI_SEEDS))
    except ValueError as e:
        return str(e)
    return None


def different_parameters_case(rank: int):
    model, inputs = H.MiniDAP(5, 7), H.mini_inputs()
    if rank == 1:
        with torch.no_grad():
            model.w_o[0, 0] += 1e-3
    from foldcompile.distributed.sharded import optimize_sharded
    try:
        optimize_sharded(model, *inputs, world_size=dist.get_world_size(), planner=H.hand_planner(H.MINI_SEEDS))
    except RuntimeError as e:
        return str(e)
    return None


def generators_differ_case(rank: int):
    from foldcompile.distributed.sharded_random import GeneratorMismatchError

    model, inputs, fast = optimize_mini(dist.get_world_size())
    torch.manual_seed(SEED)
    if rank == 1:
        torch.rand(1)           # rank 1 drew one number more: its dropout masks would differ
    try:
        fast(*inputs)
    except GeneratorMismatchError as e:
        return str(e)
    return None


def rank_dies_case(rank: int):
    import os

    model, inputs, fast = optimize_mini(dist.get_world_size())
    if rank == 1:
        os._exit(3)             # dies after the build, while rank 0 runs the graph's collectives
    fast(*inputs)
    return "finished"


def rank_skips_case(rank: int):
    model, inputs, fast = optimize_mini(dist.get_world_size())
    if rank == 1:
        return "skipped"        # never calls the module: rank 0 waits in its first collective
    fast(*inputs)
    return "finished"


# --------------------------------------------------------------------------- DP x DAP on a 2 x 2 mesh

def dp_dap_case(rank: int):
    """Ranks {0, 1} and {2, 3} are two DAP groups (each shards MiniDAP over 2); {0, 2} and {1, 3}
    the data-parallel groups. Replica d trains on its own batch (inputs drawn from seed 11 + d);
    after backward (DAP reduction within the group) the user averages over the DP group."""
    from foldcompile.distributed.sharded import optimize_sharded

    dap = [dist.new_group([0, 1]), dist.new_group([2, 3])]     # every rank creates every group
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    replica, dap_rank = divmod(rank, 2)
    model = H.MiniDAP(H.MINI_DIMS["N_seq"], H.MINI_DIMS["N_res"]).train()
    inputs = H.mini_inputs(seed=11 + replica)
    fast = optimize_sharded(model, *inputs, world_size=2, group=dap[replica], planner=H.hand_planner(H.MINI_SEEDS),
                            rules=[])
    torch.manual_seed(SEED + replica)
    outs = fast(*inputs)
    sum(wsin(w, o) for w, o in zip(weights(outs, torch.float64), outs, strict=True)).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=dp[dap_rank])
        p.grad /= 2
    return {k: p.grad for k, p in model.named_parameters()}, fast.report.record["dap"]["rank"]


def dp_dap_reference():
    grads = {}
    for replica in (0, 1):
        model = H.MiniDAP(H.MINI_DIMS["N_seq"], H.MINI_DIMS["N_res"]).train()
        torch.manual_seed(SEED + replica)
        outs = model(*H.mini_inputs(seed=11 + replica))
        sum(wsin(w, o) for w, o in zip(weights(outs, torch.float64), outs, strict=True)).backward()
        for k, p in model.named_parameters():
            grads[k] = grads.get(k, 0) + p.grad / 2
    return grads


def shard_sizes_case(rank: int):
    """``shard`` with explicit (not split_sizes) shard sizes, and its two gradient placements."""
    from foldcompile.distributed import shard

    x = torch.arange(8.0, dtype=torch.float64).view(4, 2).requires_grad_()
    y = torch.arange(8.0, dtype=torch.float64).view(4, 2).requires_grad_()
    a = shard(x, 0, grad_placement="partial", sizes=[1, 3])
    b = shard(y, 0, grad_placement="replicate", sizes=[1, 3])
    ((rank + 1) * (a.sum() + b.sum())).backward()
    return a.detach(), x.grad, y.grad


def dp_dap_mesh_case(rank: int, dp_reduce: str = "mean"):
    """The same 2 x 2 DP x DAP training as :func:`dp_dap_case` through a ``DeviceMesh(("dp", "dap"))``:
    the module averages the gradients over the replicas itself; two backward passes accumulate."""
    from torch.distributed.device_mesh import init_device_mesh

    from foldcompile.distributed.sharded import optimize_sharded

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "dap"))
    replica = mesh.get_local_rank("dp")
    model = H.MiniDAP(H.MINI_DIMS["N_seq"], H.MINI_DIMS["N_res"]).train()
    inputs = H.mini_inputs(seed=11 + replica)
    fast = optimize_sharded(model, *inputs, world_size=2, mesh=mesh, planner=H.hand_planner(H.MINI_SEEDS), rules=[])
    grads = []
    for step in range(2):
        torch.manual_seed(SEED + replica + 100 * step)
        outs = fast(*inputs)
        sum(wsin(w, o) for w, o in zip(weights(outs, torch.float64), outs, strict=True)).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    return grads, fast.report.record["dap"]["rank"], replica


def dp_dap_accumulated_reference():
    """The one-process average over the two replicas, after one and after two backward passes."""
    out = [{}, {}]
    for replica in (0, 1):
        model = H.MiniDAP(H.MINI_DIMS["N_seq"], H.MINI_DIMS["N_res"]).train()
        for step in range(2):
            torch.manual_seed(SEED + replica + 100 * step)
            outs = model(*H.mini_inputs(seed=11 + replica))
            sum(wsin(w, o) for w, o in zip(weights(outs, torch.float64), outs, strict=True)).backward()
            for k, p in model.named_parameters():
                out[step][k] = out[step].get(k, 0) + p.grad / 2
    return out
