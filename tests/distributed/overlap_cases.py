"""Rank functions for the overlap tests: a rank's graph lowered, its compute reordered for overlap
(``overlap_compute_pass``) and its collectives scheduled (``schedule_collectives_pass``), then run by
an ``fx.Interpreter`` that logs every compute node in forward and, through a pre-hook on the
autograd node it created, in backward; the collectives log their issue and wait through the
lowering's hook. The log shows what ran while each collective was in flight, in both directions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch.utils import _pytree as pytree

from foldcompile.passes.classify import classify_pass
from foldcompile.passes.dependence import Dependence
from foldcompile.passes.local_shape_check import local_shape_check_pass
from foldcompile.passes.localize import annotate_collectives, collective_of, localize_pass
from foldcompile.passes.overlap_compute import overlap_compute_pass
from foldcompile.passes.schedule_collectives import schedule_collectives_pass

import lowering_cases as L


class Logged(torch.fx.Interpreter):
    """Runs a graph, logging ``("forward", "compute", name)`` per compute node and registering a
    pre-hook that logs ``("backward", "compute", name)`` on each autograd node the node created
    (not one it passed through: an op that returns its input)."""

    def __init__(self, gm: torch.fx.GraphModule, log: list, compute: set):
        super().__init__(gm)
        self.log, self.compute, self.with_backward = log, compute, set()

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.compute:
            self.log.append(("forward", "compute", n.name))
            seen = {id(t.grad_fn) for t in pytree.tree_leaves((self.fetch_args_kwargs_from_env(n)))
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None}
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None and id(t.grad_fn) not in seen:
                    seen.add(id(t.grad_fn))
                    self.with_backward.add(n.name)
                    t.grad_fn.register_prehook(lambda g, name=n.name: self.log.append(("backward", "compute", name)))
        return out


def lower_and_schedule(planned: torch.fx.GraphModule, inputs: list, rank: int, world: int, hook, requires: dict,
                       reorder: bool = True):
    res = localize_pass(planned, rank, world, outputs="full", hook=hook, inputs_requiring_grad=requires)
    gm = res.graph_module
    local_shape_check_pass(gm, inputs)
    classify_pass(gm)
    annotate_collectives(gm)
    overlap = overlap_compute_pass(gm).record if reorder else None
    sched = schedule_collectives_pass(gm, keep_order=reorder).record
    return gm, res.record, overlap, sched


def windows(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """Per collective (its tensor's name): the compute nodes between its start and its wait."""
    dep = Dependence(gm)
    nodes = list(gm.graph.nodes)
    out = {}
    for i, s in enumerate(nodes):
        if collective_of(s) is not None:
            w = next(iter(s.users))
            j = nodes.index(w)
            out[s.kwargs.get("name", s.name)] = [n.name for n in nodes[i + 1:j] if dep.is_compute(n)]
    return out


def run_logged(gm: torch.fx.GraphModule, args: list, log: list):
    dep = Dependence(gm)
    runner = Logged(gm, log, {n for n in gm.graph.nodes if dep.is_compute(n)})
    outs = runner.run(*args)
    log.append(("forward", "end", ""))
    return outs, runner.with_backward


def mini_overlap_case(rank: int):
    """MiniDAP (hand-planned) lowered with the compute reordered; a replicated loss."""
    world = dist.get_world_size()
    log: list = []
    model, inputs, plan = L.H.mini_plan(world, True, torch.float64)
    gm, record, overlap, sched = lower_and_schedule(plan, list(inputs), rank, world, L.recorder(log),
                                                    {"m": True, "z": True, "msa_mask": False})
    m, z, mask = L._leaves(inputs)
    torch.manual_seed(L.SEED)
    outs, with_backward = run_logged(gm, [m, z, mask], log)
    sum(L.wsin(w, o) for w, o in zip(L.weights(outs, torch.float64), outs, strict=True)).backward()
    return log, windows(gm), with_backward, sched, overlap, overlap_shares(gm, with_backward)


def zoo_overlap_case(rank: int, name: str, size: str, plan: Any, reorder: bool = True):
    """A zoo model (``size``: "tiny" or "af2" channels at N_seq=7, N_res=11), the plan made in the
    parent; a replicated loss on the whole outputs."""
    from foldcompile.capture import trace
    from foldcompile.capture import flat_inputs
    from foldcompile.models import zoo
    from foldcompile.passes.normalize import normalize_pass
    from foldcompile.passes.plan_io import import_plan

    world = dist.get_world_size()
    model, inputs = zoo_setup(name, size)
    gm = normalize_pass(trace(model, *inputs)).graph_module
    flat = flat_inputs(gm, inputs, {})
    planned = import_plan(gm, plan)
    placeholders = [n for n in planned.graph.nodes if n.op == "placeholder"]
    requires = {ph.name: bool(isinstance(v, torch.Tensor) and v.requires_grad)
                for ph, v in zip(placeholders, flat, strict=True)}
    log: list = []
    values = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in flat]
    gm, record, overlap, sched = lower_and_schedule(planned, values, rank, world, L.recorder(log), requires, reorder)
    torch.manual_seed(L.SEED)
    outs, with_backward = run_logged(gm, flat, log)
    leaves = [o for o in pytree.tree_leaves(outs) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    sum(L.wsin(w, o) for w, o in zip(L.weights(leaves, torch.float64), leaves, strict=True)).backward()
    return log, windows(gm), with_backward, sched, overlap, overlap_shares(gm, with_backward)


def zoo_setup(name: str, size: str):
    from foldcompile.models import zoo

    torch.manual_seed(0)
    kw = {"n_seq": 7, "n_res": 11} if size == "af2" else {}
    model, inputs = zoo.get(name, size=size, **kw)
    model = model.to(torch.float64).train()
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.to(torch.float64)
            if x.dim() >= 3:            # m and z (the masks are 2-D)
                x = x.clone().requires_grad_()
        out.append(x)
    return model, tuple(out)


def zoo_plan(name: str, size: str, world: int):
    from foldcompile.distributed.sharded import make_plan

    model, inputs = zoo_setup(name, size)
    return make_plan(model, *inputs, world_size=world)


def overlap_shares(gm: torch.fx.GraphModule, with_backward: set, backward_factor: float = 2.0) -> dict[str, dict]:
    """Per collective (its tensor's name), the share of its time hidden of what the graph allows after
    the windows of the collectives issued before it (``schedule_collectives``' ``covered_of_left``),
    in forward and in backward. Backward: the window is the backward of the forward window's nodes
    that have one (autograd runs them in reverse), each costed ``backward_factor`` times its forward
    time; the collective is its transpose (the same bytes)."""
    from foldcompile.passes.schedule_model import ScheduleModel

    dep, model = Dependence(gm), ScheduleModel(gm)
    nodes = list(gm.graph.nodes)
    where = {n: i for i, n in enumerate(nodes)}
    taken: set = set()
    out = {}
    for s in nodes:
        if collective_of(s) is None:
            continue
        w = next(iter(s.users))
        free = dep.independent(s, w)
        inside = {n for n in free if where[s] < where[n] < where[w]}
        left = [n for n in free if n in inside or n not in taken]
        taken |= inside
        comm = model.comm_seconds(s)

        def share(window, allowed, factor=1.0, keep=lambda n: True):
            a = sum(model.seconds(n) * factor for n in allowed if keep(n))
            b = sum(model.seconds(n) * factor for n in window if keep(n))
            return min(b, comm) / min(a, comm) if min(a, comm) > 0 else 1.0

        def has_backward(n):
            return n.name in with_backward

        out[s.kwargs.get("name", s.name)] = {
            "forward": share(inside, left), "backward": share(inside, left, backward_factor, has_backward),
            "comm_s": comm}
    return out
