"""Which executor runs a variant: the selection rule.

``optimize(model, ..., executor=...)`` and ``torch.compile(model, backend="foldcompile",
options={"executor": ...})`` take one of :data:`~foldcompile.executors.base.EXECUTOR_NAMES`:

- ``"eager"``: the rewritten graph run by PyTorch (:class:`EagerExecutor`).
- ``"cuda_graph"``: forward and backward replayed as CUDA graphs (:class:`CudaGraphExecutor`);
  needs every tensor on one CUDA device and a graph :func:`cuda_graph_unsafe_reason` accepts,
  else the eager executor runs, with that reason (logged as a warning: it was asked for).
- ``"inductor"``: the graph with our kernels as ``torch.library`` ops compiled by Inductor
  (:class:`InductorExecutor`), ``mode="reduce-overhead"`` on CUDA, the default mode on CPU
  (Inductor's CUDA graphs need CUDA).
- ``"auto"`` (the default), the documented rule:

  1. tensors not all on one CUDA device (CPU, Triton's interpreter): **eager** — there is no
     launch overhead to remove, and neither CUDA graphs nor Inductor's reduce-overhead exist there;
  2. on CUDA, a graph that cannot be replayed safely (a host-drawn dropout seed, a host
     synchronisation, checkpointing around random ops, autocast with its cache on): **eager**,
     with that reason;
  3. otherwise **cuda_graph**: every variant has static shapes (a new shape is a new variant),
     the first call runs eagerly and is watched, the second captures, later calls replay.

  Inductor is never chosen by ``auto``: compiling a 4-block trunk takes a minute or more, a cost
  the caller should choose. :func:`foldcompile.verify` runs the graphs node by node itself, so it
  is eager whatever is chosen.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(lambda x: x * 2)
    >>> run = select_executor(gm, "auto", [torch.ones(3)])
    >>> run.describe()["executor"], run.describe()["reason"]
    ('eager', 'auto: tensors on cpu: eager (CUDA graphs and Inductor reduce-overhead need one CUDA device)')
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.fx

from foldcompile.executors.base import EXECUTOR_NAMES, Executor, graph_tensors
from foldcompile.executors.eager import EagerExecutor

__all__ = ["select_executor"]

log = logging.getLogger("foldcompile.executors")


def _devices(graph: torch.fx.GraphModule, leaves: Sequence[Any]) -> set[torch.device]:
    found = {x.device for x in leaves if isinstance(x, torch.Tensor)}
    found |= {t.device for _, t in graph_tensors(graph)}
    return found


def select_executor(graph: torch.fx.GraphModule, requested: str, leaves: Sequence[Any]) -> Executor:
    """The executor for ``graph`` (one variant) by the module's rule; ``leaves`` are one call's inputs
    (flattened: tensors and other values), which fix the device."""
    if requested not in EXECUTOR_NAMES:
        raise ValueError(f"executor={requested!r}: expected one of {', '.join(map(repr, EXECUTOR_NAMES))}")
    devices = _devices(graph, leaves)
    on_cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
    where = ", ".join(sorted({d.type if d.type != "cuda" else str(d) for d in devices})) or "no device"
    if requested == "eager":
        return EagerExecutor(graph, requested=requested, reason="requested")
    if requested == "inductor":
        from foldcompile.executors.inductor import InductorExecutor
        training = torch.is_grad_enabled()
        if on_cuda and training:
            # refused, not trusted: on an H200 (2026-12-02) the Inductor executor's parameter gradients were
            # 1.32 (relative) away from eager's in tests/executors/test_executors_gpu.py, in both Inductor
            # modes, while bench/diag_inductor_grads.py did not reproduce it alone (cause not found yet)
            return _eager_instead(graph, requested, f"{requested}: not used under grad on CUDA: its parameter "
                                  "gradients failed the GPU test on an H200 (cause not yet found); eager instead")
        mode = "reduce-overhead" if on_cuda else None
        return InductorExecutor(graph, requested=requested, mode=mode,
                                reason=f"requested (mode={mode or 'default'}: tensors on {where})")
    if not on_cuda:
        reason = (f"{requested}: tensors on {where}: eager (CUDA graphs and Inductor reduce-overhead need one CUDA "
                  "device)")
        return _eager_instead(graph, requested, reason)
    from foldcompile.executors.cuda_graph import CudaGraphExecutor, cuda_graph_unsafe_reason
    why = cuda_graph_unsafe_reason(graph)
    if why:
        return _eager_instead(graph, requested, f"{requested}: not replayable as a CUDA graph: {why}")
    return CudaGraphExecutor(graph, requested=requested,
                             reason=(f"{requested}: static shapes on {where}: forward{' and backward' if torch.is_grad_enabled() else ''} "
                                     "replayed as CUDA graphs from the second call"))


def _eager_instead(graph: torch.fx.GraphModule, requested: str, reason: str) -> Executor:
    (log.warning if requested != "auto" else log.info)("foldcompile: %s", reason)
    return EagerExecutor(graph, requested=requested, reason=reason)
