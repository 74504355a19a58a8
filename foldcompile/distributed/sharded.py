"""``optimize(model, *inputs, world_size=P)``: the model sharded by DAP over a process group of P ranks.

Every rank calls ``optimize`` with the same model parameters and the same whole example inputs
(under ``torchrun`` or :func:`foldcompile.distributed.spawn`). Each rank builds its own variant:

    trace -> normalize -> shape_prop -> classify            (the unsharded graph, as for one process)
    -> shard_pass (the plan, passes/shard.py)               (placements and redistributes, global sizes)
    -> localize_pass (this rank's graph)                    (collectives, local sizes, gradient placements)
    -> local_shape_check_pass (fake tensors, local sizes)   (every shape the lowering promised)
    -> classify, annotate_collectives -> fuse               (kernels on the local graph; collectives are barriers)
    -> overlap_compute_pass                                 (independent compute moved between starts and waits)
    -> schedule_collectives_pass                            (starts early, waits late, need order, bytes bound)

and the returned :class:`ShardedModule` is called like the model: it takes the whole inputs
(each rank slices its shard inside the graph) and returns the whole outputs on every rank
(gathered inside, with the gradient placement of a replicated loss), or, with
``outputs="sharded"``, each output in its planned placement (``module.output_placements``):
then every rank's loss is its part, and the loss trained is the sum over the ranks. With
``inputs="sharded"`` every call takes this rank's shards of the inputs the plan shards
(``module.input_placements``; ``module.shard_inputs(*whole_inputs)`` cuts them) and the other inputs
whole; each shard is checked against the plan's local size on this rank
(:mod:`foldcompile.distributed.sharded_inputs`), and its gradient is its shard of the whole one.

Gradients: the parameters whose gradient is a partial sum (used on shards) are all-reduced by a
:class:`~foldcompile.distributed.PartialGradReducer` during backward (bucketed, asynchronous) and
waited **at the end of every backward** through the outputs (an autograd engine callback queued by
a hook on the outputs), so ``loss.backward(); opt.step()`` works unchanged on every rank and the
gradients are whole and equal on every rank. Parameters used only replicated already hold the
whole gradient; one used both ways has its replicated contribution kept on one rank first.

Checked: the process group's size equals ``world_size`` (and a group exists); at each build every
rank has the same parameters and example inputs and planned the same collectives; before every
call of a graph with random ops, every rank's generator is in the same state (dropout then draws
exactly one process's masks). A hung or dead rank ends in the process group's timeout (under
:func:`~foldcompile.distributed.spawn`: :class:`~foldcompile.distributed.RankTimeoutError`).

    >>> from foldcompile.distributed.demo import main    # an Evoformer block trained on 2 local ranks
    >>> main(["--spawn", "2", "--steps", "1"])
    rank 0: parameters after 1 steps vs one process: largest relative difference ...
    rank 1: parameters after 1 steps vs one process: largest relative difference ...
    OK: every rank trained what one process trains
    0
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.fx
from torch.utils import _pytree as pytree

from foldcompile.capture import flat_inputs, trace
from foldcompile.distributed.grad_sync import PartialGradReducer, ReplicaGradReducer
from foldcompile.distributed.sharded_inputs import (InputPlacement, ShardShapeError, check_shards,
                                                     contiguous_call, gather_call, input_layout, local_guards,
                                                     shard_call)
from foldcompile.distributed.sharded_random import (check_generators_agree, draw_global, draw_global_like,
                                                     sharded_dropout)
from foldcompile.guards import install_guards
from foldcompile.optimize import (CannotAnnotate, OptimizedModule, OptimizeReport, Variant,
                                  _annotate, _name_inputs_after_the_model, fuse_annotated)
from foldcompile.pass_manager import copy_graph_module
from foldcompile.passes.classify import classify_pass
from foldcompile.passes.local_shape_check import local_shape_check_pass
from foldcompile.passes.localize import annotate_collectives, localize_pass
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.placement import Placed, Replicate
from foldcompile.passes.plan_io import PlanExport, export_plan, import_plan
from foldcompile.passes.overlap_compute import overlap_compute_pass
from foldcompile.passes.registry import draws_random, entry_of, lookup, op_name
from foldcompile.passes.schedule_collectives import DEFAULT_MAX_BYTES_IN_FLIGHT, schedule_collectives_pass
from foldcompile.passes.schedule_model import carry_fused_costs
from foldcompile.tables import format_table
from foldcompile.variants import EAGER, call_key

__all__ = ["ShardedModule", "ShardedReport", "optimize_sharded", "build_sharded_variant", "make_plan", "Planner"]

Planner = Callable[..., Any]   # (gm, world_size, dap_axes=..., at=...) -> PassResult, like shard_pass

# the lowering's own draws (passes/localize.py): random ops drawn at global size on every rank, then sliced
_RUNTIME_DRAWS = (sharded_dropout, draw_global, draw_global_like)


def _draws(n: torch.fx.Node) -> bool:
    """A node that draws random numbers when it runs (the registry's ``random`` ops and the lowering's
    draws; a dropout with ``training=False`` or ``p=0`` does not)."""
    if n.op != "call_function" or not (draws_random(n) or n.target in _RUNTIME_DRAWS):
        return False
    if n.target is sharded_dropout or entry_of(n) is lookup(torch.nn.functional.dropout):
        p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", n.kwargs.get("train", True))
        return training is not False and p != 0
    return True


_EAGER_ONLY = ("world_size > 1: the rank's graph runs eagerly (the CUDA-graph and Inductor executors do not take "
               "the collectives' start/wait pairs yet)")


def default_planner() -> Planner:
    """The DAP planning pass (``foldcompile.passes.shard.shard_pass``)."""
    try:
        from foldcompile.passes.shard import shard_pass
    except ImportError as e:  # the planning pass is built in parallel; say so rather than guess
        raise NotImplementedError("optimize(world_size>1) needs the DAP planning pass "
                                  f"foldcompile.passes.shard.shard_pass, which is not installed here ({e})") from None
    return shard_pass


def _world_and_rank(world_size: int, group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"optimize: world_size must be an int >= 1, got {world_size!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"optimize(world_size={world_size}) needs an initialized process group of {world_size} "
                           "ranks, and none is initialized: start the ranks with torchrun (and call "
                           "torch.distributed.init_process_group) or with foldcompile.distributed.spawn")
    actual = dist.get_world_size(group)
    if actual != world_size:
        raise ValueError(f"optimize(world_size={world_size}): the process group has {actual} ranks; world_size "
                         "must equal the size of the group the model is sharded over")
    return actual, dist.get_rank(group)


def groups_of_mesh(mesh: Any, group: Optional[dist.ProcessGroup]) -> tuple[Optional[dist.ProcessGroup],
                                                                         Optional[dist.ProcessGroup]]:
    """``(DAP group, data-parallel group)`` of ``mesh=`` (a ``DeviceMesh`` with a dim ``"dap"`` and
    optionally ``"dp"``), or ``(group, None)`` without a mesh."""
    if mesh is None:
        return group, None
    if group is not None:
        raise ValueError("optimize: give mesh= (its 'dap' dim is the DAP group) or group=, not both")
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if "dap" not in names or any(n not in ("dap", "dp") for n in names):
        raise ValueError(f"optimize(mesh=...): the mesh's dims must be named 'dap' (the DAP axis) and optionally "
                         f"'dp' (data-parallel replicas); this mesh's dims are {names or 'unnamed'}")
    return mesh.get_group("dap"), mesh.get_group("dp") if "dp" in names else None


def _digest(items: Sequence[Any]) -> str:
    return hashlib.blake2b(repr(list(items)).encode(), digest_size=12).hexdigest()


def _same_on_every_rank(what: str, mine: Any, group: Optional[dist.ProcessGroup], detail: Callable[[Any, Any], str],
                        same: Callable[[Any, Any], bool] = lambda a, b: a == b):
    """Raise on every rank (the same error) unless every rank's ``mine`` is ``same`` as rank 0's."""
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    for q, theirs in enumerate(every):
        if not same(theirs, every[0]):
            raise RuntimeError(f"optimize: rank {q}'s {what} differ from rank 0's ({detail(theirs, every[0])}); every "
                               "rank must call optimize with the same parameters and the same whole inputs")


def _fingerprint(t: torch.Tensor) -> tuple:
    """Shape, dtype and two sums: equal tensors give equal fingerprints up to the sums' rounding
    (a reduction's order may differ between ranks with other thread counts)."""
    x = t.detach()
    if x.is_floating_point() or x.is_complex():
        x = x.double() if x.is_floating_point() else x.abs().double()
        return (tuple(t.shape), str(t.dtype), float(x.sum()), float((x * x).sum()))
    return (tuple(t.shape), str(t.dtype), int(x.long().sum()) if x.numel() else 0)


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    if a[:2] != b[:2] or len(a) != len(b):
        return False
    scale = max(abs(b[-1]), 1.0) if len(b) == 4 else 0.0
    return all(abs(x - y) <= 1e-9 * max(scale, abs(y), 1.0) for x, y in zip(a[2:], b[2:]))


def _same_fingerprints(a: list, b: list) -> bool:
    return len(a) == len(b) and all(na == nb and _same_fingerprint(fa, fb) for (na, fa), (nb, fb) in zip(a, b))


def _first_difference(a: list, b: list) -> str:
    for (name, fa), (_, fb) in zip(a, b):
        if not _same_fingerprint(fa, fb):
            return f"first at {name}"
    return "a different number of them"


class ShardedReport(OptimizeReport):
    """The fusion report plus the DAP lowering: every collective with its placements, its symbolic
    per-rank volume and its position, and the parameters by gradient placement."""

    @property
    def collectives(self) -> list[dict[str, Any]]:
        return list(self.record["dap"]["collectives"])

    @property
    def partial_params(self) -> list[str]:
        return list(self.record["dap"]["partial_params"])

    def __str__(self) -> str:
        d = self.record["dap"]
        rows = []
        for c in d["collectives"]:
            if c.get("start"):
                where = f"after {c['issued_after']} .. before {c['waited_before']}"
                overlap = f"{c['between']}/{c['independent']}, {c['covered']:.0%}"
            else:
                where, overlap = f"at {c['wait']}", "-"
            rows.append([c["kind"], c["tensor"], f"{c['src']} -> {c['dst']}", c.get("grad_placement") or "-",
                         str(c.get("bytes_sent", "-")), where, overlap])
        lines = [super().__str__(), "",
                 f"DAP: rank {d['rank']} of {d['world_size']}, {len(d['collectives'])} collectives (bytes each rank "
                 "sends, in the local symbolic sizes; where it is issued and waited in this rank's graph; overlap: "
                 "compute nodes between them / independent of it in the graph, and the share of its time "
                 "they hide of what the graph could hide, at " + ", ".join(f"{k}={v}" for k, v in
                                                                         d["overlap"]["at"].items()) + ")"]
        lines += ["  " + line for line in format_table(
            ["kind", "tensor", "placement", "grad", "bytes sent", "issued .. waited", "overlap"], rows)]
        lines += [f"parameters with Partial gradients (all-reduced at the end of backward): {len(d['partial_params'])}; "
                  f"with Replicate gradients: {len(d['replicate_params'])}; replicated contributions kept on one "
                  f"rank: {[k['value'] for k in d['kept_on_one_rank']] or 'none'}"]
        taken = "this rank's shards of the Shard inputs" if d.get("inputs") == "sharded" else "the whole inputs"
        lines.append(f"inputs: the module takes {taken}; the plan places " + ", ".join(
            f"{p.name} {p.placed!r}" for p in d.get("input_layout", ()) if p.shape is not None))
        if d.get("plan_notes"):
            lines.append(f"plan: {d['plan_notes']}")
        return "\n".join(lines)


def _annotated(model: torch.nn.Module, gm: torch.fx.GraphModule, values: list, dims) -> None:
    """shape_prop and classify on copies of the inputs, the model's buffers put back afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        _annotate(gm, values, dims)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _copies(flat: list) -> list:
    return [v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v for v in flat]


def make_plan(model: torch.nn.Module, *example_inputs: Any, world_size: int,
              dap_axes: Optional[Mapping[str, Any]] = None, planner: Optional[Planner] = None,
              at: Optional[Mapping[str, int]] = None, dims: Optional[Mapping[str, int]] = None,
              **example_kwargs: Any) -> PlanExport:
    """Capture, annotate and plan ``model`` for ``world_size`` ranks in this process (no process group
    needed) and return the plan as data (:class:`~foldcompile.passes.plan_io.PlanExport`), for
    ``optimize(..., world_size=P, plan=...)`` on every rank: planned once, e.g. in a launcher."""
    with torch.random.fork_rng():   # shape propagation runs the model's random ops: the caller's draws stay
        gm = normalize_pass(trace(model, *example_inputs, **example_kwargs)).graph_module
        flat = flat_inputs(gm, example_inputs, example_kwargs)
        _annotated(model, gm, _copies(flat), dims)
        return _plan(model, gm, flat, world_size, dap_axes, planner, at)


def _plan(model, gm, flat, world_size, dap_axes, planner, at) -> PlanExport:
    """The plan of the annotated capture ``gm`` as data, with the world size and the inputs (``flat``)
    it is made for, so that applying it elsewhere is checked (``import_plan``)."""
    plan_fn = planner if planner is not None else default_planner()
    with torch.random.fork_rng():
        result = plan_fn(copy_graph_module(gm), world_size, dap_axes=dap_axes, at=at)
    return export_plan(result.graph_module, result.record, world_size=world_size, example_inputs=flat)


def build_sharded_variant(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any], *, rank: int,
                          world_size: int, group: Optional[dist.ProcessGroup] = None, outputs: str = "full",
                          inputs: str = "full", dap_axes: Optional[Mapping[str, Any]] = None,
                          planner: Optional[Planner] = None,
                          plan: Optional[PlanExport] = None, plan_on: str = "rank0",
                          at: Optional[Mapping[str, int]] = None, dims: Optional[Mapping[str, int]] = None,
                          rules: Optional[list] = None, disabled: Sequence[str] = (),
                          max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT, validate: bool = False,
                          check_ranks: bool = True, reorder_for_overlap: bool = True) -> Variant:
    """Capture ``model`` on the whole inputs, plan it over ``world_size`` ranks and lower it for
    ``rank`` (the pipeline of the module docstring).

    Where the plan comes from: ``plan`` (made before, by :func:`make_plan`), else ``plan_on="rank0"``:
    rank 0 annotates and plans, and broadcasts the plan (every rank lowers the same plan; the others
    skip shape propagation and the search), or ``plan_on="every_rank"``: each rank plans for itself
    (the ranks then compare their collectives). ``check_ranks``: compare parameters and inputs across
    the ranks of ``group`` (one object all_gather each). ``reorder_for_overlap``: move independent
    compute between each collective's start and wait (``passes/overlap_compute.py``); off, the
    compute keeps the model's order. ``args``/``kwargs`` are the whole inputs even for
    ``inputs="sharded"`` (the rank's graph then takes its shards, :mod:`~foldcompile.distributed.sharded_inputs`)."""
    if plan_on not in ("rank0", "every_rank"):
        raise ValueError(f"optimize: plan_on must be 'rank0' or 'every_rank', got {plan_on!r}")
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def lap(what: str) -> None:
        times[what] = round(time.perf_counter() - t0 - sum(times.values()), 3)

    gm = trace(model, *args, **kwargs)
    gm = normalize_pass(gm).graph_module
    lap("capture")
    flat = flat_inputs(gm, args, kwargs)
    values = _copies(flat)
    if check_ranks:
        params = [(n, _fingerprint(p)) for n, p in list(model.named_parameters()) + list(model.named_buffers())]
        _same_on_every_rank("parameters and buffers", params, group, _first_difference, _same_fingerprints)
        ins = [(i, _fingerprint(v)) for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        _same_on_every_rank("example inputs", ins, group, _first_difference, _same_fingerprints)
    given = plan is not None     # the same on every rank: the caller passes the same arguments
    if not given and (plan_on == "every_rank" or rank == 0):
        _annotated(model, gm, values, dims)
        lap("annotate")
        plan = _plan(model, gm, flat, world_size, dap_axes, planner, at)
        lap("plan")
    if not given and plan_on == "rank0":
        box = [plan]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        plan = box[0]
        lap("plan sent" if rank == 0 else "plan received")
    # a plan made elsewhere (plan=, or rank 0's) must be for this model, these inputs and this world size
    planned = import_plan(copy_graph_module(gm), plan, world_size=world_size, example_inputs=flat)
    lap("plan replayed")
    traced = copy_graph_module(planned)     # one process, the plan's redistributes the identity
    # the rank's graph names its inputs, and the collectives of their slices, after forward's arguments
    _name_inputs_after_the_model(planned, model)
    plan_record = plan.record
    placeholders = [n for n in planned.graph.nodes if n.op == "placeholder"]
    requires = {ph.name: bool(isinstance(v, torch.Tensor) and v.requires_grad) for ph, v in zip(placeholders, flat)}
    layout = input_layout(planned, flat)
    lowered = localize_pass(planned, rank, world_size, inputs=inputs, outputs=outputs, group=group,
                            validate=validate, inputs_requiring_grad=requires, grad_enabled=torch.is_grad_enabled())
    local = lowered.graph_module
    if inputs == "sharded":   # the rank's graph takes its shards: guarded and checked at the local shapes
        if getattr(local, "guards", None) is not None:
            install_guards(local, local_guards(local.guards, args, kwargs, planned, layout, rank))
        values = [p.cut(v, rank) if isinstance(v, torch.Tensor) else v for p, v in zip(layout, values)]
    local_shape_check_pass(local, values)
    lap("lower")
    classify_pass(local)
    annotate_collectives(local)
    unfused_costs = {n.name: n.meta.get("cost") for n in local.graph.nodes}
    # optimize's fusion pipeline (chunk-loop merges, then the rules), on the rank's graph
    local, fuse_record = fuse_annotated(local, _not_annotated_again, at=at, disabled=disabled, rules=rules)
    overlap = None
    if reorder_for_overlap:
        carry_fused_costs(local, unfused_costs)
        overlap = overlap_compute_pass(local, at=at, max_bytes_in_flight=max_bytes_in_flight).record
    schedule = schedule_collectives_pass(local, max_bytes_in_flight=max_bytes_in_flight, at=at,
                                         keep_order=bool(overlap and overlap["reordered"]))
    lap("fuse and schedule")
    dap = dict(lowered.record)
    by_start = {c["start"]: c for c in schedule.record["collectives"]}
    nodes = {n.name: n for n in local.graph.nodes}
    collectives = []
    for c in dap["collectives"]:
        c = dict(c)
        if c.get("start") in by_start:
            c.update({k: v for k, v in by_start[c["start"]].items() if k not in ("kind", "start", "wait")})
            c["bytes_sent"] = nodes[c["start"]].meta.get("cost", {}).get("bytes")
        collectives.append(c)
    dap["collectives"] = collectives
    dap["max_bytes_in_flight"] = max_bytes_in_flight
    dap["overlap"] = {"reordered": bool(overlap and overlap["reordered"]), "moved": overlap["moved"] if overlap else [],
                      "fill": overlap["fill"] if overlap else "off (reorder_for_overlap=False)",
                      "peak_live_bytes": overlap["peak_live_bytes"] if overlap else None,
                      "at": schedule.record.get("at", {}), "hidden_s": schedule.record.get("hidden_s"),
                      "hideable_s": schedule.record.get("hideable_s")}
    dap["build_seconds"] = times
    dap["plan_notes"] = _plan_notes(plan_record)
    dap["has_random"] = any(_draws(n) for n in local.graph.nodes)
    dap["inputs"] = inputs
    dap["input_layout"] = layout
    if check_ranks and plan_on == "every_rank":
        sig = [(c["kind"], c["tensor"], c["src"], c["dst"], c.get("grad_placement")) for c in collectives]
        _same_on_every_rank("planned collectives", _digest(sig + dap["partial_params"]), group,
                            lambda a, b: "the planning pass is not deterministic here")
    _name_inputs_after_the_model(traced, model)
    local.recompile()
    record = dict(fuse_record)
    record["dap"] = dap
    return Variant(traced, local, record, time.perf_counter() - t0, tuple(disabled))


def _layout_text(layout: Sequence[InputPlacement]) -> str:
    return ", ".join(f"{p.name}: {p.placed!r} of {p.shape}" for p in layout)


def _not_annotated_again(local: torch.fx.GraphModule) -> None:
    """A rank's lowered graph takes its sizes from the plan (localize), not from running it: shape_prop
    cannot annotate a merged chunk loop there, so the loop stays (``fuse_annotated`` lists it with this
    reason) and each chunk is fused on its own."""
    raise CannotAnnotate("a rank's lowered graph takes its sizes from the DAP plan and is not annotated again "
                         "after a merge; each chunk is fused on its own")


def _plan_notes(record: Mapping[str, Any]) -> str:
    parts = []
    for key in ("replicated", "no_rule"):
        items = record.get(key) or []
        if items:
            parts.append(f"{len(items)} op(s) {key.replace('_', ' ')}")
    return "; ".join(parts)


class ShardedModule(OptimizedModule):
    """The user's model, sharded by DAP over ``world_size`` ranks (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, *, world_size: int, group: Optional[dist.ProcessGroup] = None,
                 outputs: str = "full", inputs: str = "full", dap_axes: Optional[Mapping[str, Any]] = None,
                 planner: Optional[Planner] = None, plan: Optional[PlanExport] = None, plan_on: str = "rank0",
                 max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT, bucket_cap_mb: float = 25.0,
                 validate: bool = False, reorder_for_overlap: bool = True, mesh: Any = None,
                 dp_reduce: Optional[str] = "mean", **options: Any):
        if outputs not in ("full", "sharded"):
            raise ValueError(f"optimize: outputs must be 'full' or 'sharded', got {outputs!r}")
        if inputs not in ("full", "sharded"):
            raise ValueError(f"optimize: inputs must be 'full' or 'sharded', got {inputs!r}")
        if dp_reduce not in ("mean", "sum", None):
            raise ValueError(f"optimize: dp_reduce must be 'mean', 'sum' or None, got {dp_reduce!r}")
        group, dp_group = groups_of_mesh(mesh, group)
        world, rank = _world_and_rank(world_size, group)
        super().__init__(model, **options)
        self.world_size, self.rank, self.group, self.outputs, self.inputs = world, rank, group, outputs, inputs
        # inputs="sharded": the plan's input layout and a graph that flattens a call like the capture
        # (set by the first build, from the whole example inputs; every later call is checked against it)
        self._layout: Optional[list[InputPlacement]] = None
        self._input_gm: Optional[torch.fx.GraphModule] = None
        self.dap_axes, self.planner, self.validate, self.plan_on = dap_axes, planner, validate, plan_on
        self._given_plan = plan      # for the first build (the example call's shapes)
        self.max_bytes_in_flight, self.bucket_cap_mb = max_bytes_in_flight, bucket_cap_mb
        self.reorder_for_overlap = reorder_for_overlap
        self._reducer: Optional[PartialGradReducer] = None
        self._reducer_names: tuple[str, ...] = ()
        self._reduce_queued = False
        # DP x DAP (mesh= with a "dp" dim): every gradient averaged over the replicas after each backward
        self.mesh, self.dp_group = mesh, dp_group
        self._replicas = ReplicaGradReducer(model.parameters(), group=dp_group, op=dp_reduce) \
            if dp_group is not None and dp_reduce is not None else None

    def _build(self, args: tuple, kwargs: dict) -> Variant:
        """A variant for a call the cache has not seen; with ``inputs="sharded"`` the call holds shards:
        the ranks put the whole inputs back together first (every rank misses on the same call)."""
        if self.inputs == "sharded" and self._layout is not None:
            args, kwargs = gather_call(self._input_gm, self._layout, args, kwargs, self.group)
            variant = self._build_whole(args, kwargs)
            layout = variant.record["dap"]["input_layout"]
            if layout != self._layout:
                raise ShardShapeError(
                    "optimize(inputs='sharded'): the plan for this call places the inputs otherwise than the first "
                    f"one ({_layout_text(layout)} instead of {_layout_text(self._layout)}); the shards were cut for "
                    "the first; call optimize again for this kind of call")
            return variant
        return self._build_whole(args, kwargs)

    def _build_whole(self, args: tuple, kwargs: dict) -> Variant:
        devices = sorted({t.device.index or 0 for t in pytree.tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
        plan, self._given_plan = self._given_plan, None
        with torch.random.fork_rng(devices=devices):
            return build_sharded_variant(
                self.model, args, kwargs, rank=self.rank, world_size=self.world_size, group=self.group,
                outputs=self.outputs, inputs=self.inputs, dap_axes=self.dap_axes, planner=self.planner, plan=plan,
                plan_on=self.plan_on, at=self.at, dims=self.dims, rules=self.rules,
                max_bytes_in_flight=self.max_bytes_in_flight, validate=self.validate,
                reorder_for_overlap=self.reorder_for_overlap)

    def _first_variant(self, args: tuple, kwargs: dict) -> Any:
        """The variant of the example call (whole inputs), cached under the call this rank will make:
        with ``inputs="sharded"``, its shards."""
        if self.inputs == "full":
            return self.variant_for(*args, **kwargs)
        variant = self._build_whole(args, kwargs)
        self._layout, self._input_gm = variant.record["dap"]["input_layout"], variant.traced
        shards, shard_kwargs = shard_call(variant.traced, self._layout, self.rank, args, kwargs)
        key = call_key(self._bind(shards, shard_kwargs), self.model.training)
        return self._cache.get(key, lambda: variant)

    # -- inputs="sharded"
    def shard_inputs(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        """This rank's call for the whole inputs ``(args, kwargs)``: ``(shard_args, shard_kwargs)``, every
        input the plan shards (:attr:`input_placements`) cut to this rank's rows (uneven splits as the
        plan's, a contiguous leaf copy that requires grad as the whole input does), the replicated ones
        passed on as they are. With ``inputs="full"`` the call is returned unchanged."""
        if self.inputs == "full":
            return tuple(args), dict(kwargs)
        return shard_call(self._input_gm, self._layout, self.rank, args, kwargs)

    def _accept_shards(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A call's shards, checked against the plan's local sizes on this rank (and, with ``validate``,
        on every rank: each raises the same error) and made contiguous."""
        if self._layout is None:
            raise RuntimeError("a ShardedModule with inputs='sharded' learns its input layout from the whole example "
                               "inputs: make it with optimize(model, *whole_inputs, world_size=P, inputs='sharded')")
        why = check_shards(self._input_gm, self._layout, self.rank, self.world_size, args, kwargs)
        if self.validate:
            every: list = [None] * self.world_size
            dist.all_gather_object(every, why, group=self.group)
            why = next((w for w in every if w), None)
        if why:
            raise ShardShapeError(f"optimize(inputs='sharded'): {why}; each rank passes its own shard of every "
                                  "sharded input (module.input_placements; module.shard_inputs(*whole_inputs) "
                                  "cuts them) and every replicated input whole")
        return contiguous_call(args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.inputs == "sharded":
            args, kwargs = self._accept_shards(args, kwargs)
        return super().forward(*args, **kwargs)

    # -- gradients
    def _use_reducer(self, variant: Any) -> None:
        if variant is EAGER:
            names: tuple[str, ...] = ()
        elif not torch.is_grad_enabled():
            return   # no backward will run: keep whatever reducer a training call installed
        else:
            names = tuple(variant.record["dap"]["partial_params"])
        if names == self._reducer_names:
            return
        if self._reduce_queued:
            raise RuntimeError("optimize(world_size>1): a call with another set of Partial parameters while a "
                               "backward through the previous call's outputs has not finished")
        if self._reducer is not None:
            self._reducer.remove()
        params = [self.model.get_parameter(n) for n in names]
        self._reducer = PartialGradReducer(params, group=self.group, bucket_cap_mb=self.bucket_cap_mb) \
            if params else None
        self._reducer_names = names

    def _on_output_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if not self._reduce_queued and (self._reducer is not None or self._replicas is not None):
            self._reduce_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        return grad

    def _end_of_backward(self) -> None:
        self._reduce_queued = False
        if self._reducer is not None:
            self._reducer.wait()            # the DAP group's Partial gradients summed first
        if self._replicas is not None:
            self._replicas.reduce()         # then every gradient averaged over the replicas

    def _hook_outputs(self, out: Any) -> Any:
        if torch.is_grad_enabled() and (self._reducer is not None or self._replicas is not None):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._on_output_grad)
        return out

    # -- the steps of OptimizedModule.forward (the guard-failure rebuild is the base class's)
    def _select(self, key: Any, args: tuple, kwargs: dict) -> Any:
        variant = super()._select(key, args, kwargs)
        self._use_reducer(variant)
        return variant

    def _run_eager(self, args: tuple, kwargs: dict) -> Any:
        if self.inputs == "sharded":
            raise RuntimeError(f"optimize(inputs='sharded'): {self._cache.builds} variants built, the limit "
                               f"(max_builds={self._cache.max_builds}); the model itself cannot take shards, so "
                               "this call is refused rather than run eagerly: raise max_builds")
        # every rank runs the whole model: gradients are whole, nothing to reduce
        return self._hook_outputs(self.model(*args, **kwargs))

    def _before_run(self, variant: Variant, args: tuple, kwargs: dict) -> None:
        if variant.record["dap"]["has_random"]:
            devices = sorted({t.device for t in pytree.tree_leaves((args, kwargs))
                              if isinstance(t, torch.Tensor) and t.device.type == "cuda"}, key=str)
            check_generators_agree(devices, group=self.group)

    def _finish(self, out: Any) -> Any:
        return self._hook_outputs(out)

    @property
    def output_placements(self) -> list[Any]:
        """The placement of each (flattened) output of the most recent call: ``Placed(Shard(d), sizes)``
        for a shard (``outputs="sharded"``), ``Placed(Replicate())`` for a whole tensor."""
        return list(self._current().record["dap"]["output_placements"])

    @property
    def input_placements(self) -> dict[str, Any]:
        """How each (flattened) tensor input is passed, by name: ``Placed(Shard(d), sizes)`` for an input passed
        as this rank's shard of dim d (``inputs="sharded"``; ``sizes``: every rank's length of dim d),
        ``Placed(Replicate())`` for a whole one (every input with ``inputs="full"``)."""
        layout = [p for p in self._current().record["dap"]["input_layout"] if p.shape is not None]
        if self.inputs == "full":
            return {p.name: Placed(Replicate()) for p in layout}
        return {p.name: p.placed for p in layout}

    @property
    def report(self) -> ShardedReport:
        """What the fusion and the DAP lowering did on the most recent call's variant."""
        v = self._current()
        return ShardedReport(v.record, type(self.model).__name__, dict(v.traced.meta.get("dims", {})),
                             {"executor": "eager", "reason": _EAGER_ONLY})


def optimize_sharded(model: torch.nn.Module, *example_inputs: Any, world_size: int,
                     group: Optional[dist.ProcessGroup] = None, outputs: str = "full", inputs: str = "full",
                     dap_axes: Optional[Mapping[str, Any]] = None, planner: Optional[Planner] = None,
                     plan: Optional[PlanExport] = None, plan_on: str = "rank0",
                     at: Optional[Mapping[str, int]] = None, strict: bool = False, max_variants: int = 8,
                     max_builds: int = 32, dims: Optional[Mapping[str, int]] = None, rules: Optional[list] = None,
                     max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT, validate: bool = False,
                     executor: str = "auto", reorder_for_overlap: bool = True, mesh: Any = None,
                     dp_reduce: Optional[str] = "mean", **example_kwargs: Any) -> ShardedModule:
    """``optimize(model, *example_inputs, world_size=P, ...)`` for P ranks (see the module docstring).

    ``planner``: the planning pass (default ``shard_pass``; a test passes a hand plan); ``plan``: a plan
    made before (:func:`make_plan`, e.g. once in a launcher) for the example call; ``plan_on``:
    ``"rank0"`` (rank 0 plans and sends the plan to every rank) or ``"every_rank"``;
    ``validate``: every collective checks shapes and split sizes across ranks (slower);
    ``reorder_for_overlap``: move independent compute between each collective's start and wait;
    ``mesh``: a ``DeviceMesh`` with dims ``("dp", "dap")`` (or just ``"dap"``) instead of ``group=``:
    the model is sharded over the rank's ``"dap"`` group, and after each backward every gradient is
    averaged (``dp_reduce="mean"``; ``"sum"``; ``None``: left to the caller) over its ``"dp"`` group.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    if executor not in ("auto", "eager"):
        raise ValueError(f"optimize(world_size={world_size}, executor={executor!r}): {_EAGER_ONLY}; use "
                         "executor='auto' or 'eager'")
    fast = ShardedModule(model, world_size=world_size, group=group, outputs=outputs, inputs=inputs, dap_axes=dap_axes,
                         planner=planner, plan=plan, plan_on=plan_on, max_bytes_in_flight=max_bytes_in_flight,
                         validate=validate, reorder_for_overlap=reorder_for_overlap, mesh=mesh, dp_reduce=dp_reduce,
                         at=at,
                         strict=strict, max_variants=max_variants, max_builds=max_builds, dims=dims, rules=rules)
    variant = fast._first_variant(example_inputs, example_kwargs)
    if variant is not EAGER:
        fast._last = variant
    return fast
