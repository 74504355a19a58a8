"""The training scenarios the executor tests run twice, once through ``executor="eager"`` and once
through the executor under test, on CPU with a simulated capture (test_cuda_graph_bookkeeping.py)
and on the GPU (test_executors_gpu.py). Each returns what the comparison needs; the caller
compares with its own tolerance."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

Loss = Callable[[Any], torch.Tensor]


def tensors_of(out: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in pytree order."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def projection_loss(out: Any, *, device: str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fixed random projection of every floating output (the same weights for the same shape), in
    ``dtype`` (default: each output's own)."""
    total: Any = 0.0
    for o in tensors_of(out):
        if o.is_floating_point():
            g = torch.Generator(device=device).manual_seed(o.numel())
            weights = torch.randn(o.shape, generator=g, device=device, dtype=dtype)
            total = total + ((o if dtype is None else o.to(dtype)) * weights).sum()
    return total


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter's gradient (zeros where none), copied."""
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def accumulate(fast: Callable, model: torch.nn.Module, batches: Sequence[tuple], loss: Loss):
    """Gradient accumulation over micro-batches, keeping every call's outputs (a later replay must not
    overwrite them): ``(outputs of every call, accumulated gradients)``."""
    model.zero_grad(set_to_none=True)
    kept = []
    for b in batches:
        out = fast(*b)
        loss(out).backward()
        kept.append(out)  # the returned tensors themselves
    return [t.detach().clone() for o in kept for t in tensors_of(o)], grads_of(model)


TWO_FORWARD_ORDERS = ("one loss", "second first", "first first")


def two_forwards_one_backward(fast: Callable, model: torch.nn.Module, b1: tuple, b2: tuple, order: str, loss: Loss):
    """Two forwards, then their backwards (one loss, or one each in ``order``): ``(outputs, gradients)``."""
    model.zero_grad(set_to_none=True)
    o1 = fast(*b1)
    o2 = fast(*b2)  # while o1's backward is pending
    if order == "one loss":
        (loss(o1) + loss(o2)).backward()
    elif order == "second first":
        loss(o2).backward()
        loss(o1).backward()
    elif order == "first first":
        loss(o1).backward()
        loss(o2).backward()
    else:
        raise ValueError(f"order {order!r}: one of {TWO_FORWARD_ORDERS}")
    return [t.detach() for t in tensors_of(o1) + tensors_of(o2)], grads_of(model)


def recycle(fast: Callable, model: torch.nn.Module, inputs: tuple, grad_through: bool, loss: Loss,
            iterations: int = 2):
    """AlphaFold-style recycling: the two outputs fed back in as the first two inputs ``iterations``
    times (under no_grad unless ``grad_through``), then once more with grad: ``(outputs, gradients)``."""
    model.zero_grad(set_to_none=True)
    state, rest = tuple(inputs[:2]), tuple(inputs[2:])
    for _ in range(iterations):
        with torch.enable_grad() if grad_through else torch.no_grad():
            state = tuple(fast(*state, *rest))
    state = tuple(fast(*state, *rest))
    loss(state).backward()
    return [t.detach() for t in state], grads_of(model)


def step_grads(fast: Callable, model: torch.nn.Module, batch: tuple, loss: Loss) -> list[torch.Tensor]:
    """The parameters' gradients of one forward and backward of ``batch`` from zero."""
    model.zero_grad(set_to_none=True)
    loss(fast(*batch)).backward()
    return grads_of(model)
