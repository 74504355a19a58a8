"""Dropout inside the generated element-wise kernels: which random nodes a kernel may draw itself.

A generated kernel draws a dropout mask as ``tl.rand(seed, base + counter)``, element ``i`` of the
mask a pure function of the seed and its index (:mod:`foldcompile.kernels.philox`, whose PyTorch
Philox regenerates it bit for bit). Three spellings become such a draw:

- ``F.dropout(x, p, training)`` / ``torch.dropout`` (``nn.Dropout`` is captured as ``F.dropout``), of
  the chain's own shape;
- AlphaFold's shared (row- or column-wise) dropout: ``y * F.dropout(ones(S), p, True)`` where ``S`` is
  ``y``'s shape with size 1 along the shared dims (``ones_like``, ``ones``, ``new_ones``, ``full*`` with
  1): the kernel's ``dropout(y, p, shared_dims)``;
- ``y * torch.bernoulli(full(S, q))`` (our reference models' spelling, rescaled later by a division):
  ``dropout(y, 1 - q, shared_dims, rescale=False)``, a multiply by the 0/1 keep mask.

Seeds: one device state per graph (:func:`foldcompile.kernels.philox.draw_dropout_seed`, a node at the
top of the graph, drawn once per forward; in an activation-checkpoint body the recomputation restores
the generator and draws it again identically). Each mask-drawing node of a graph gets a fixed counter
base (:func:`counter_bases`: the masks' sizes summed in graph order), whichever kernel takes it, so a
mask does not depend on how the chains were grouped (``verify(bisect=True)`` regroups them).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from foldcompile.kernels.philox import draw_dropout_seed
from foldcompile.kernels.philox import dropout as kernel_dropout
from foldcompile.passes.registry import draws_random
from foldcompile.passes.rules import _meta as M

__all__ = ["DROPOUTS", "SharedMask", "shared_mask", "dropout_args", "counter_bases", "seed_node"]

# the model-level dropout spellings a kernel takes (``nn.Dropout`` is captured as ``F.dropout``); a call of
# our own ``kernels.dropout`` in a model stays as written (it draws its own device state)
DROPOUTS = (F.dropout, torch.dropout)
_ONES = {torch.ones_like: None, torch.ones: None, torch.Tensor.new_ones: None,
         torch.full: 1, torch.full_like: 1, torch.Tensor.new_full: 2}  # creation -> position of its fill value
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class SharedMask:
    """``y * mask`` with ``mask`` a dropout / Bernoulli draw on a broadcastable shape: the kernel's
    ``dropout(y, p, shared_dims, rescale)``; ``mask`` and ``creation`` (the filled tensor it is drawn
    on) are absorbed into the kernel."""

    mul: torch.fx.Node
    y: torch.fx.Node
    mask: torch.fx.Node
    creation: torch.fx.Node
    p: float
    rescale: bool
    shared_dims: tuple[int, ...]


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fill(n: torch.fx.Node) -> float | None:
    """The constant a creation node fills with (1 for the ``ones`` family), or None."""
    if n.op != "call_function" or n.target not in _ONES:
        return None
    pos = _ONES[n.target]
    if pos is None:
        return 1.0
    value = n.args[pos] if len(n.args) > pos else n.kwargs.get("fill_value")
    return _number(value)


def dropout_args(n: torch.fx.Node) -> tuple[torch.fx.Node, float, bool] | None:
    """(input, p, training) of ``F.dropout`` / ``torch.dropout`` with constant arguments, not in place."""
    if n.target is F.dropout:
        bound = dict(zip(("input", "p", "training", "inplace"), n.args)) | dict(n.kwargs)
        training = bound.get("training", True)
    elif n.target is torch.dropout:
        bound = dict(zip(("input", "p", "train"), n.args)) | dict(n.kwargs)
        training = bound.get("train")
    else:
        return None
    p = _number(bound.get("p", 0.5))
    if bound.get("inplace", False) is not False or not isinstance(training, bool) or p is None or not 0 <= p <= 1:
        return None
    x = bound.get("input")
    return (x, p, training) if isinstance(x, torch.fx.Node) else None


def _mask_draw(m: torch.fx.Node) -> tuple[torch.fx.Node, float, bool] | None:
    """(creation, p, rescale) when ``m`` draws a keep mask on a constant-filled tensor: ``dropout(ones)``
    in training, or ``bernoulli(full(q))`` (keep probability q, so p = 1 - q, no rescale)."""
    if m.op != "call_function" or not draws_random(m):
        return None
    if m.target in (torch.bernoulli, torch.Tensor.bernoulli):
        if len(m.args) != 1 or m.kwargs or not isinstance(m.args[0], torch.fx.Node):
            return None  # bernoulli(x, p) or with a generator: another draw
        q = _fill(m.args[0])
        return (m.args[0], 1.0 - q, False) if q is not None and 0 <= q <= 1 else None
    found = dropout_args(m)
    if found is None or not found[2] or _fill(found[0]) != 1.0:
        return None
    return found[0], found[1], True


def shared_mask(mul: torch.fx.Node) -> SharedMask | None:
    """``mul`` as ``y * mask`` (either order) with a keep mask the kernel can draw itself, or None.

    The mask must be read by ``mul`` only, its filled tensor by the mask only, both of ``y``'s dtype
    and of a shape that broadcasts to ``y``'s (its size-1 dims are the shared ones), and the product
    of ``y``'s own shape.
    """
    if mul.op != "call_function" or mul.target not in (operator.mul, torch.mul, torch.Tensor.mul) or mul.kwargs:
        return None
    if len(mul.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in mul.args):
        return None
    for mask, y in (mul.args, mul.args[::-1]):
        draw = _mask_draw(mask)
        if draw is None or mask is y:
            continue
        creation, p, rescale = draw
        if set(mask.users) != {mul} or set(creation.users) != {mask}:
            continue
        s, ys = M.shape(mask), M.shape(y)
        if s is None or ys is None or M.shape(mul) != ys or len(s) > len(ys):
            continue
        if M.dtype(mask) != M.dtype(y) or M.dtype(y) not in _FLOATS:
            continue
        aligned = (1,) * (len(ys) - len(s)) + tuple(s)
        if any(a not in (1, b) for a, b in zip(aligned, ys)):
            continue
        shared = tuple(d for d, (a, b) in enumerate(zip(aligned, ys)) if a == 1 and b != 1)
        return SharedMask(mul, y, mask, creation, p, rescale, shared)
    return None


def _draws_a_mask(n: torch.fx.Node) -> bool:
    if n.op != "call_function" or not draws_random(n) or M.shape(n) is None:
        return False
    return n.target in DROPOUTS or n.target in (torch.bernoulli, torch.Tensor.bernoulli)


def counter_bases(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """Each mask-drawing node of ``graph`` -> its first Philox counter: the sizes of the masks before it,
    summed in graph order. Fixed by the traced graph alone, so a mask is the same whichever kernel
    (or grouping) draws it."""
    bases, total = {}, 0
    for n in graph.nodes:
        if _draws_a_mask(n):
            bases[n] = total
            total += math.prod(M.shape(n))
    return bases


def seed_node(gm: torch.fx.GraphModule, create: bool = True) -> torch.fx.Node | bool | None:
    """The graph's dropout state node (``draw_dropout_seed``), made after the placeholders on first use,
    drawn on the device of the first floating-point input (or parameter), or None when the graph reads
    no floating-point tensor to take a device from. ``create=False`` only asks: the node if it exists,
    True if it can be made, else None."""
    graph = gm.graph
    for n in graph.nodes:
        if n.op == "call_function" and n.target is draw_dropout_seed:
            return n
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    like = next((n for n in placeholders if M.dtype(n) in _FLOATS), None)
    where = placeholders[-1] if placeholders else None
    param = None
    if like is None:
        param = next((name for name, t in list(gm.named_parameters()) + list(gm.named_buffers())
                      if t.dtype in _FLOATS), None)
        if param is None:
            return None
    if not create:
        return True
    if like is None:
        with _after(graph, where):
            like = graph.get_attr(param)
        where = like
    with _after(graph, where):
        seed = graph.create_node("call_function", draw_dropout_seed, (like,), {}, name="dropout_seed")
    seed.meta.update({"shape": (2,), "dtype": torch.int64, "fused_by": "elementwise",
                      "origin": [], "module_path": ""})
    return seed


def _after(graph: torch.fx.Graph, node: torch.fx.Node | None):
    if node is None:
        return graph.inserting_before(next(iter(graph.nodes)))
    return graph.inserting_after(node)
