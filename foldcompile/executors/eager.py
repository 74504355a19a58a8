"""The eager executor: the rewritten graph run by PyTorch, op by op, our kernels inside it.

The executor for CPU tensors, Triton's interpreter and :func:`foldcompile.verify` (which runs
graphs node by node), and the one every other executor falls back to. The graph's guards are
checked by its own pre-hook on every call.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(lambda x: x + 1)
    >>> EagerExecutor(gm, requested="auto", reason="auto: CPU tensors")((torch.zeros(1),), {})
    tensor([1.])
"""
from __future__ import annotations

from typing import Any

from foldcompile.executors.base import Executor

__all__ = ["EagerExecutor"]


class EagerExecutor(Executor):
    """Runs ``graph(*args, **kwargs)``."""

    kind = "eager"

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        return self._eager(args, kwargs)
