"""One dispatch rule for every kernel in this package (see docs/DESIGN.md, Kernels).

CUDA tensors run the Triton kernels. CPU tensors run the plain-PyTorch reference,
unless ``TRITON_INTERPRET=1`` is set, in which case they run the Triton kernels
through Triton's interpreter: that is how CI checks the real kernels with no GPU.

Tests prove a Triton kernel ran (rather than the reference) with
``record_launches()``::

    with record_launches() as launched:
        layer_norm(x, w, b)
    assert "layer_norm_fwd" in launched
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_recorders: list[list[str]] = []


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
