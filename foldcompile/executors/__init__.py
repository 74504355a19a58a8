"""Executors: what runs an optimized variant's graph (eager, CUDA graphs, Inductor) and the rule that picks one.

One executor per variant (:mod:`foldcompile.variants`), chosen by :func:`select_executor`
(the rule is in :mod:`foldcompile.executors.select`); ``OptimizedModule.report`` says which
one runs and why. The CUDA-graph and Inductor executors are imported when chosen (they pull in
the kernels and Inductor).

    >>> import torch
    >>> from foldcompile.executors import select_executor
    >>> gm = torch.fx.symbolic_trace(lambda x: x + 1)
    >>> select_executor(gm, "eager", [torch.zeros(2)])((torch.zeros(2),), {})
    tensor([1., 1.])
"""
from foldcompile.executors.base import EXECUTOR_NAMES, Executor, graph_tensors
from foldcompile.executors.eager import EagerExecutor
from foldcompile.executors.select import select_executor

__all__ = ["Executor", "EagerExecutor", "EXECUTOR_NAMES", "select_executor", "graph_tensors"]
