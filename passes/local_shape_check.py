"""Run a lowered rank graph on fake tensors at its local sizes and check every shape the lowering wrote.

``localize_pass`` writes each node's local ``shape`` from the plan (the global shape, its sharded
dim at this rank's split size) and rewrites the graph's literal sizes. This pass runs the rank's
graph once on fake tensors (no data, no communication: each collective's result is made from its
split sizes, as the runtime would return it) and compares every node's result with the shape the
plan promised, so a literal the lowering missed or a plan whose placements do not fit the ops
fails here, naming the node, instead of inside a collective on some rank. It also writes
``aliases_input`` for the nodes the lowering created.

    >>> import torch, torch.fx
    >>> from foldcompile.passes.placement import Placed, Replicate, Shard
    >>> g = torch.fx.Graph()
    >>> z = g.placeholder("z")                                   # rows of z sharded, [5, 4, 4]
    >>> view = g.call_method("view", (z, 13, 13, 2, 2))
    >>> _ = g.output(view)
    >>> gm = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> gm.meta["dap"] = {"rank": 0, "world_size": 3}
    >>> z.meta.update(shape=(5, 13, 4), dtype=torch.float32, shard=Placed(Shard(0), (5, 4, 4), 13))
    >>> view.meta.update(shape=(5, 13, 2, 2), dtype=torch.float32, shard=Placed(Shard(0), (5, 4, 4), 13))
    >>> local_shape_check_pass(gm)
    Traceback (most recent call last):
      ...
    foldcompile.passes.base.PassError: node 'view' (call_method view): fails on rank 0 of 3's local shapes [(5, 13, 4)]: shape '[13, 13, 2, 2]' is invalid for input of size 260...
    >>> view.args = (z, 5, 13, 2, 2); _ = gm.recompile()
    >>> local_shape_check_pass(gm).record
    {'checked': 2, 'rank': 0}
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from foldcompile.distributed.collectives import shard, split_offsets, split_sizes, wait
from foldcompile.distributed.grad_ops import keep_grad_on_rank, sum_grad
from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.localize import collective_of
from foldcompile.passes.meta import ALIASES_INPUT, DTYPE, MULTI_OUTPUT, SHAPE, SHARD

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["local_shape_check_pass"]


class _Issued:
    """What a fake start returns: the result the collective will have."""

    def __init__(self, result: torch.Tensor):
        self.result = result


def _storage(t: Any) -> Optional[int]:
    try:
        return t.untyped_storage()._cdata if isinstance(t, torch.Tensor) else None
    except Exception:
        return None


class _LocalRun(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, rank: int, world: int):
        super().__init__(gm)
        self.rank, self.world = rank, world

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        kind = collective_of(self.current_node)
        if kind is not None:
            return _Issued(self._result_of(kind, args, kwargs))
        if target is wait:
            return args[0].result
        if target is shard:
            x, d = args[0], args[1]
            sizes = kwargs.get("sizes") or split_sizes(int(x.shape[d]), self.world)
            return x.narrow(d, split_offsets(sizes)[self.rank], sizes[self.rank]).clone()
        if target in (keep_grad_on_rank, sum_grad):
            return args[0].view_as(args[0])
        return super().call_function(target, args, kwargs)

    def _result_of(self, kind: str, args: tuple, kw: dict) -> torch.Tensor:
        x = args[0]
        shape = list(x.shape)
        if kind == "all_to_all":
            shape[kw["cat_dim"]] = sum(kw["cat_sizes"])
            shape[kw["split_dim"]] = kw["split_sizes"][self.rank]
        elif kind == "all_gather":
            shape[args[1]] = sum(kw["sizes"])
        elif kind == "reduce_scatter":
            shape[args[1]] = kw["sizes"][self.rank]
        return x.new_empty(shape)

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current_node = n
        try:
            out = super().run_node(n)
        except PassError:
            raise
        except Exception as e:  # the op itself refuses the local shapes (a literal size left global)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            ins = [tuple(a.shape) for a in self.fetch_args_kwargs_from_env(n)[0] if isinstance(a, torch.Tensor)]
            raise PassError(f"{describe_node(n)}: fails on rank {self.rank} of {self.world}'s local shapes "
                            f"{ins}: {first}") from e
        if n.op in ("output",):
            return out
        expected = n.meta.get(SHAPE)
        got: Any = None
        if isinstance(out, torch.Tensor):
            got = tuple(out.shape)
        elif isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
            got = tuple(tuple(t.shape) for t in out)
        if got is not None and expected is not None and tuple(expected) != got:
            raise PassError(f"{describe_node(n)}: rank {self.rank} of {self.world} computes {got}, but the lowering "
                            f"expected {tuple(expected)} from its placement {n.meta.get(SHARD)!r}")
        if isinstance(out, torch.Tensor) and n.op == "call_function":
            if n.meta.get(DTYPE) is not None and not n.meta.get(MULTI_OUTPUT) and n.meta[DTYPE] != out.dtype:
                raise PassError(f"{describe_node(n)}: rank {self.rank} computes {out.dtype}, the graph says "
                                f"{n.meta[DTYPE]}")
            ins = {_storage(a) for a in self.fetch_args_kwargs_from_env(n)[0] if isinstance(a, torch.Tensor)}
            n.meta[ALIASES_INPUT] = _storage(out) in (ins - {None})
        self.checked += got is not None
        return out


@declare(requires=(SHAPE, DTYPE, SHARD), ensures=(ALIASES_INPUT,))
def local_shape_check_pass(gm: torch.fx.GraphModule, example_inputs: Optional[Sequence[Any]] = None) -> PassResult:
    """Check the local shapes of a lowered graph on fake tensors (see the module docstring).

    ``example_inputs``: one value per placeholder as the rank's graph takes them (the whole inputs
    for ``inputs="full"``); by default fakes of the placeholders' ``shape`` and ``dtype`` meta.
    ``gm.meta["dap"]`` (written by ``localize_pass``) gives the rank and world size.
    """
    dap = gm.meta.get("dap")
    if not isinstance(dap, dict) or "rank" not in dap:
        raise PassError("local_shape_check_pass: the graph has no gm.meta['dap'] (run localize_pass first)")
    rank, world = int(dap["rank"]), int(dap["world_size"])
    mode = next((x.fake_mode for x in (example_inputs or ()) if isinstance(x, FakeTensor)), None) \
        or FakeTensorMode(allow_non_fake_inputs=True)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with mode:
        if example_inputs is None:
            values = [torch.empty(n.meta[SHAPE], dtype=n.meta[DTYPE]) if isinstance(n.meta.get(SHAPE), tuple)
                      else None for n in phs]
        else:
            values = list(example_inputs)
    values = [mode.from_tensor(v) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v
              for v in values]
    run = _LocalRun(gm, rank, world)
    run.checked = 0
    with torch.no_grad(), mode:
        run.run(*values)
    _log.info("local_shape_check: rank %s, %d nodes checked on fake tensors", rank, run.checked)
    return PassResult(gm, False, {"checked": run.checked, "rank": rank})
