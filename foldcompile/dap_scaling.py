"""Where DAP stops scaling, on paper: the plan at each world size, its communication per block next to
the compute per rank, and the memory per rank.

``dap_scaling(report, world_size=P, link_GBps=...)`` (``explain(model, *inputs, world_size=P,
link_GBps=...)`` calls it) plans the explained graph with the DAP planning pass (``passes/shard.py``)
at every world size of ``world_sizes`` (default 2, 4, ..., 512, and ``P``) and evaluates the plan at
the sizes ``at`` (default the training crop) on the planner's machine model (``ShardCosts``, the
link bandwidth ``link_GBps``):

- **per collective**: the bytes each rank sends (the planner's symbolic volume) and its time,
  ``latency + bytes / link``;
- **per block** (a model's repeated blocks are the module paths ``<family>.<index>``, the family with
  the most blocks counts; a model without them is one block): the collectives' bytes and time, and
  the compute per rank, each op's roofline time times the share one rank does (its largest shard,
  ``ceil(n/P)/n``; all of it when replicated): beyond ``P = n`` a rank still does ``1/n`` of a split
  op, and the replicated ops do not shrink at all;
- **memory per rank**: the bytes of every value the block computes, each times the share a rank
  holds: what a training step without activation checkpointing keeps for backward. Sharded values
  shrink as ``1/P``; replicated ones do not; a **gathered** value (an all_gather's result: the pair
  bias of the row attention, the gathered projection of the outer product mean and of the triangle
  multiplication) is held whole on every rank at any P. FastFold gathers one projection of each
  triangle multiplication, a full ``N_res^2 * c`` operand per rank (1 GiB at N_res = 2048, c = 128,
  bf16; this plan gathers the outgoing one and reduce-scatters the incoming one's product instead).
  The **ring alternative**: pass the operand's blocks around the ranks instead of gathering it (P - 1
  steps; at step k each rank multiplies its rows by the block it holds and sends that block on while
  receiving the next), so a rank holds two blocks, ``2 N_res^2 c / P``, for the same bytes on the link,
  each step's transfer overlapped with one block's product. The column ``gathered, ring`` is the
  gathered bytes with every gathered operand of a product held that way.

    >>> import foldcompile
    >>> from foldcompile.models import zoo
    >>> block, ex = zoo.get("evoformer_block")                    # tiny: N_seq=5, N_res=11
    >>> report = foldcompile.explain(block, *ex, world_size=4, world_sizes=(2, 512), link_GBps=100)
    >>> scaling = report.dap
    >>> [p.world_size for p in scaling.points]
    [2, 4, 512]
    >>> [c["kind"] for c in scaling.point(4).collectives]
    ['all_gather', 'all_to_all', 'all_gather', 'all_gather']
    >>> scaling.stops_scaling_at()          # the first P whose communication outlasts the compute
    512
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.fx

from foldcompile.pass_manager import copy_graph_module
from foldcompile.tables import format_table

__all__ = ["dap_scaling", "DapScaling", "ScalingPoint", "DEFAULT_WORLD_SIZES"]

DEFAULT_WORLD_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512)


def block_of(path: str) -> tuple[str, str]:
    """``(family, block)`` of a module path: its first numeric component is the block's index
    (``("evoformer.blocks", "evoformer.blocks.3")`` for ``"evoformer.blocks.3.mha"``); ``("", "")``
    outside any repeated block."""
    parts = (path or "").split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), ".".join(parts[:i + 1])
    return "", ""


@dataclass
class ScalingPoint:
    """The plan at one world size, evaluated at the stated sizes."""

    world_size: int
    collectives: list[dict[str, Any]]     # kind, tensor, module, block, bytes (per rank), seconds
    per_block: dict[str, Any]             # collectives, bytes, comm_s, compute_s, memory (bytes by kind)
    total: dict[str, Any]                 # the same over the whole model
    record: dict[str, Any] = field(repr=False, default_factory=dict)   # the planning pass's record


@dataclass
class DapScaling:
    """:func:`dap_scaling`'s result; ``str()`` prints the tables."""

    model_name: str
    at: dict[str, int]
    costs: Any
    family: str
    blocks: int
    points: list[ScalingPoint]
    world_size: Optional[int] = None

    def point(self, world_size: int) -> ScalingPoint:
        for p in self.points:
            if p.world_size == world_size:
                return p
        raise KeyError(f"no plan at world_size={world_size}; planned at {[p.world_size for p in self.points]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: the machine, the sizes, and per world size the per-block and total
        numbers and the collectives."""
        c = self.costs
        return {"model": self.model_name, "at": dict(self.at), "family": self.family, "blocks": self.blocks,
                "link_bytes_per_s": c.link_bytes_per_s, "latency_s": c.latency_s, "flops_per_s": c.flops_per_s,
                "hbm_bytes_per_s": c.hbm_bytes_per_s, "stops_scaling_at": self.stops_scaling_at(),
                "points": [{"world_size": p.world_size, "per_block": p.per_block, "total": p.total,
                            "collectives": [{k: v for k, v in x.items()} for x in p.collectives]}
                           for p in self.points]}

    def stops_scaling_at(self) -> Optional[int]:
        """The first world size at which a block's communication takes longer than its compute."""
        for p in self.points:
            if p.per_block["comm_s"] > p.per_block["compute_s"]:
                return p.world_size
        return None

    def __str__(self) -> str:
        c = self.costs
        at = ", ".join(f"{k}={v}" for k, v in self.at.items())
        unit = f"{self.blocks} blocks {self.family}.N" if self.family else "the model as one block"
        lines = [f"DAP scaling of {self.model_name} ({unit}), at {at}: link {c.link_bytes_per_s / 1e9:g} GB/s and "
                 f"{c.latency_s * 1e6:g} us per collective, {c.flops_per_s / 1e12:g} TFLOP/s dense, "
                 f"HBM {c.hbm_bytes_per_s / 1e12:g} TB/s per rank. Per block, per rank:"]
        rows = []
        for p in self.points:
            b = p.per_block
            mem = b["memory"]
            rows.append([p.world_size, b["collectives"], b["bytes"] / 1e6, b["comm_s"] * 1e3, b["compute_s"] * 1e3,
                         b["comm_s"] / b["compute_s"] if b["compute_s"] else 0.0, mem["sharded"] / 1e6,
                         mem["replicated"] / 1e6, mem["gathered"] / 1e6, mem["gathered_ring"] / 1e6])
        lines += format_table(["P", "collectives", "sent MB", "comm ms", "compute ms", "comm/compute",
                               "sharded MB", "replicated MB", "gathered MB", "gathered, ring MB"], rows)
        stop = self.stops_scaling_at()
        lines.append("communication takes longer than compute from P = " + str(stop) if stop else
                     "communication stays below compute at every P shown (the model assumes no overlap)")
        lines.append("(memory: every value the block computes, each at the share a rank holds: what a training "
                     "step keeps for backward without checkpointing; gathered values are whole on every rank at any "
                     "P; 'ring' holds each gathered operand of a product as two blocks of 1/P instead)")
        lines.append("")
        lines += self._per_collective()
        if self.world_size is not None:
            from foldcompile.passes.shard import plan_table

            lines += ["", plan_table(self.point(self.world_size).record, max_rows=60)]
        return "\n".join(lines)

    def _per_collective(self) -> list[str]:
        """One block's collectives (the first block of the family), time in µs at each P."""
        keys: list[tuple] = []
        times: dict[tuple, dict[int, float]] = {}
        for p in self.points:
            first = min((c["block"] for c in p.collectives if c["family"] == self.family),
                        key=_block_index, default=None)
            for c in p.collectives:
                if c["block"] != first:
                    continue
                key = (c["kind"], _relative(c["tensor"], first), _relative_path(c["module"], first))
                if key not in times:
                    keys.append(key)
                    times[key] = {}
                times[key][p.world_size] = times[key].get(p.world_size, 0.0) + c["seconds"]
        rows = [[k, t, m or "(root)"] + [round(times[(k, t, m)][p.world_size] * 1e6, 2)
                                          if p.world_size in times[(k, t, m)] else "-" for p in self.points]
                for k, t, m in keys]
        head = "per collective of one block" + (f" ({self.family}.N, shown for the first)" if self.family else "")
        return [head + ", time in us (latency + bytes per rank / link):"] + format_table(
            ["kind", "tensor", "module"] + [f"P={p.world_size}" for p in self.points], rows)


def _block_index(block: str) -> int:
    tail = block.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _relative(name: str, block: Optional[str]) -> str:
    prefix = (block or "").replace(".", "_") + "_"
    return name[len(prefix):] if block and name.startswith(prefix) else name


def _relative_path(path: str, block: Optional[str]) -> str:
    if block and path.startswith(block + "."):
        return path[len(block) + 1:]
    return "" if block and path == block else path


def _placement(n: torch.fx.Node) -> Any:
    from foldcompile.passes.placement import Placed

    p = n.meta.get("shard")
    if isinstance(p, tuple):
        p = next((q for q in p if isinstance(q, Placed) and q.dim is not None), p[0] if p else None)
    return p if isinstance(p, Placed) else None


def _share(n: torch.fx.Node, world: int, value) -> float:
    """The part of ``n``'s work (and of its value, for a Shard) one rank holds: its largest shard."""
    from foldcompile.passes.placement import Partial

    p = _placement(n)
    if p is None:
        return 1.0
    if p.dim is None and isinstance(p.placement, Partial):
        split = [_placement(u) for u in n.all_input_nodes]
        p = next((q for q in split if q is not None and q.dim is not None), None)
        if p is None:
            return 1.0
    if p.dim is None or p.global_size is None:
        return 1.0
    size = value(p.global_size)
    return math.ceil(size / world) / size if size >= 1 else 1.0


def _evaluate(planned: torch.fx.GraphModule, record: Mapping[str, Any], world: int, model, family: str,
              blocks: int) -> ScalingPoint:
    from foldcompile.passes.placement import Partial, Replicate, Shard, redistribute
    from foldcompile.passes.registry import GEMM

    c = model.costs
    collectives = []
    for t in record["transitions"]:
        if t["kind"] in ("slice", None):
            continue
        fam, blk = block_of(t["module"])
        collectives.append({"kind": t["kind"], "tensor": t["tensor"], "module": t["module"], "family": fam,
                            "block": blk, "bytes": t["volume_at"],
                            "seconds": c.latency_s + t["volume_at"] / c.link_bytes_per_s})
    compute = {"all": 0.0, "family": 0.0}
    memory = {k: {"sharded": 0.0, "replicated": 0.0, "gathered": 0.0, "gathered_ring": 0.0} for k in ("all", "family")}
    for n in planned.graph.nodes:
        if n.op != "call_function":
            continue
        fam, _ = block_of(str(n.meta.get("module_path") or ""))
        where = ("all", "family") if fam == family else ("all",)
        share = _share(n, world, model.value)
        if n.target is not redistribute:
            t = model.seconds(n) * share
            for k in where:
                compute[k] += t
        nbytes = model.bytes_of(n)
        if not nbytes:
            continue
        p = _placement(n)
        gathered = n.target is redistribute and isinstance(n.args[1], Shard) and isinstance(n.args[2], Replicate)
        if gathered:
            feeds_product = any(u.meta.get("op_class") == GEMM for u in n.users)
            kinds = {"gathered": nbytes, "gathered_ring": 2 * nbytes / world if feeds_product else nbytes}
        elif p is not None and p.dim is not None:
            kinds = {"sharded": nbytes * share}
        else:
            kinds = {"replicated": nbytes}
        for k in where:
            for kind, b in kinds.items():
                memory[k][kind] += b
    in_family = [x for x in collectives if x["family"] == family]
    scale = 1.0 / max(blocks, 1)

    def summary(items, comp, mem, factor):
        return {"collectives": round(len(items) * factor, 2) if factor != 1 else len(items),
                "bytes": sum(x["bytes"] for x in items) * factor, "comm_s": sum(x["seconds"] for x in items) * factor,
                "compute_s": comp * factor, "memory": {k: v * factor for k, v in mem.items()}}

    per_block = summary(in_family, compute["family"], memory["family"], scale)
    if blocks and per_block["collectives"] == int(per_block["collectives"]):
        per_block["collectives"] = int(per_block["collectives"])
    return ScalingPoint(world, collectives, per_block, summary(collectives, compute["all"], memory["all"], 1.0),
                        dict(record))


def dap_scaling(report: Any, *, world_size: Optional[int] = None, link_GBps: Optional[float] = None,
                world_sizes: Optional[Sequence[int]] = None, at: Optional[Mapping[str, int]] = None,
                costs: Any = None, dap_axes: Optional[Mapping[str, Any]] = None) -> DapScaling:
    """Plan the graph of an ``explain`` :class:`~foldcompile.explain.Report` at each world size and
    evaluate it (see the module docstring). ``costs``: a ``ShardCosts`` (``link_GBps`` overrides its
    link bandwidth)."""
    from dataclasses import replace

    from foldcompile.passes.fuse import DEFAULT_AT
    from foldcompile.passes.schedule_model import ScheduleModel
    from foldcompile.passes.shard import ShardCosts, shard_pass

    costs = costs if costs is not None else ShardCosts()
    if link_GBps is not None:
        if not isinstance(link_GBps, (int, float)) or link_GBps <= 0:
            raise ValueError(f"link_GBps must be a positive number, got {link_GBps!r}")
        costs = replace(costs, link_bytes_per_s=float(link_GBps) * 1e9)
    sizes = sorted(set(world_sizes or DEFAULT_WORLD_SIZES) | ({world_size} if world_size else set()))
    if any(not isinstance(p, int) or isinstance(p, bool) or p < 2 for p in sizes):
        raise ValueError(f"world sizes must be ints >= 2, got {sizes}")
    gm = report.graph_module
    dims = dict(gm.meta.get("dims", {}))
    stated = {**DEFAULT_AT, **dict(at or {})}
    unknown = set(at or {}) - set(dims)
    if unknown:
        raise ValueError(f"dap_scaling: unknown dims {sorted(unknown)} in at=; the graph's dims are {sorted(dims)}")
    used_at = {k: v for k, v in stated.items() if k in dims}
    paths = [str(n.meta.get("module_path") or "") for n in gm.graph.nodes if n.op == "call_function"]
    counts: dict[str, set] = {}
    for path in paths:
        fam, blk = block_of(path)
        if blk:
            counts.setdefault(fam, set()).add(blk)
    family = max(counts, key=lambda f: (len(counts[f]), f), default="")
    blocks = len(counts.get(family, ())) if family else 1
    points = []
    for p in sizes:
        result = shard_pass(copy_graph_module(gm), p, dap_axes=dap_axes, at=at, costs=costs)
        planned = result.graph_module
        model = ScheduleModel(planned, costs, at)
        points.append(_evaluate(planned, result.record, p, model, family, blocks))
    return DapScaling(report.model_name, used_at, costs, family, blocks, points, world_size)
