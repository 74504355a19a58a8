"""One dispatch rule for every kernel in this package (see docs/DESIGN.md, Kernels).

CUDA tensors run the Triton kernels. CPU tensors run the plain-PyTorch reference,
unless ``TRITON_INTERPRET=1`` was set when this module was imported, in which case
they run the Triton kernels through Triton's interpreter: that is how CI checks the
real kernels with no GPU. The variable is read once, at import, like ``triton.jit``.

Tests prove a Triton kernel ran (rather than the reference) with
``record_launches()``::

    with record_launches() as launched:
        layer_norm(x, w, b)
    assert "layer_norm_fwd" in launched
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator

import torch

_recorders: list[list[str]] = []

# Read once, at import: ``triton.jit`` decides interpreter vs compiled at decoration time
# (and attention picks its constexpr annotations at import), so the dispatch must not see
# a later change of the variable either, or one call could mix the two modes. Set
# TRITON_INTERPRET before importing foldcompile.kernels (tests/conftest.py does).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether these tensors take the Triton path (all on CUDA, or all on CPU under the interpreter)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    if all(t.is_cuda for t in present):
        return True
    if interpreting() and all(t.device.type == "cpu" for t in present):
        return True
    return False


def note_launch(kernel_name: str) -> None:
    """Called by every wrapper right before it launches a Triton kernel."""
    for record in _recorders:
        record.append(kernel_name)


@contextlib.contextmanager
def record_launches() -> Iterator[list[str]]:
    """Collect the names of Triton kernels launched inside the block."""
    record: list[str] = []
    _recorders.append(record)
    try:
        yield record
    finally:
        _recorders.remove(record)


def once_differentiable(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a custom ``backward`` as not differentiable, so a double backward raises.

    Like ``torch.autograd.function.once_differentiable``, the backward runs under
    ``no_grad``; when a graph is being built (``create_graph=True``) every gradient it
    returns gets a node that raises once differentiated. Unlike it, that node is also
    connected to the tensors the backward saved (the forward's inputs), not only to
    the incoming gradients: the kernels' gradients depend on those too, so a loss such
    as ``(gx ** 2).sum() + f(x).sum()`` with an incoming gradient that needs no grad
    raises instead of silently dropping its second-order term.
    """
    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        anchors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not anchors:
            return outputs
        outs = list(outputs) if isinstance(outputs, tuple) else [outputs]
        idx = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor)]
        err = torch._C._functions.DelayedError(
            b"trying to differentiate twice a foldcompile kernel's backward (marked once_differentiable): "
            b"second-order gradients are not implemented; use the *_reference function", len(idx) + len(anchors))
        wrapped = err(*[outs[i] for i in idx], *anchors)
        for j, i in enumerate(idx):
            outs[i] = wrapped[j]
        return tuple(outs) if isinstance(outputs, tuple) else outs[0]

    return wrapper


_INT32_REACH = 2**31


def check_offsets32(op: str, name: str, t: torch.Tensor | None, dims: tuple[int, ...]) -> None:
    """Raise ValueError when an inner offset term (index × stride along one of ``dims``)
    of ``t`` could overflow the kernels' 32-bit arithmetic.

    The kernels compute row / batch offsets in int64 but the inner terms (``offs_q * sqm``,
    ``cols * sxn``) in int32; only a view into a storage of more than 2**31 elements with
    a huge inner stride reaches that, and a contiguous copy of it does not.
    """
    if t is None:
        return
    for d in dims:
        if t.shape[d] * abs(t.stride(d)) >= _INT32_REACH:
            raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} has strides {tuple(t.stride())}: strides too "
                             f"large for 32-bit offsets (dim {d}): make the input contiguous")
