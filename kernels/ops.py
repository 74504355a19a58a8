"""The kernels as ``torch.library`` ops: ``torch.ops.foldcompile.attention``, ``.layer_norm``, ``.softmax``,
``.outer_product_mean``.

A graph that holds one of these ops can be shape-propagated on fake tensors (each has a fake
implementation: sizes and dtype, no data), differentiated (each has an autograd formula) and
later handed to Inductor. Each op calls the kernel's plain Python entry point
(:func:`foldcompile.kernels.attention`, ...), so dispatch is the kernels' own: Triton on CUDA,
the reference on CPU, Triton's interpreter under ``TRITON_INTERPRET=1``. The ops are
``custom_op`` rather than ``triton_op``: ``triton_op`` does not work under the interpreter.

The backward recomputes the forward with autograd on and runs the kernel's own backward
through it (the kernels' autograd Functions keep their saved statistics private): one extra
forward per backward, paid only in training.

    >>> import torch
    >>> import foldcompile.kernels.ops  # registers the ops
    >>> x = torch.randn(4, 7, requires_grad=True)
    >>> y = torch.ops.foldcompile.softmax(x, -1)
    >>> torch.allclose(y, x.softmax(-1), atol=1e-6)
    True
    >>> y.sum().backward(); x.grad.abs().max().item() < 1e-5     # rows of a softmax sum to one
    True
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from foldcompile.kernels.attention import attention as _attention
from foldcompile.kernels.layer_norm import layer_norm as _layer_norm
from foldcompile.kernels.outer_product_mean import outer_product_mean as _outer_product_mean
from foldcompile.kernels.softmax import softmax as _softmax

__all__ = ["attention", "layer_norm", "softmax", "outer_product_mean"]


@torch.library.custom_op("foldcompile::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
              gate: Optional[Tensor] = None, scale: Optional[float] = None,
              key_bias: Optional[Tensor] = None, empty_rows: str = "zero") -> Tensor:
    """``sigmoid(gate) * softmax(scale·q kᵀ + bias + key_bias, masked) v`` (:func:`foldcompile.kernels.attention`;
    ``key_bias`` broadcasts to ``[..., H, 1, K]``; ``empty_rows`` as there)."""
    return _attention(q, k, v, bias=bias, mask=mask, gate=gate, scale=scale, key_bias=key_bias,
                      empty_rows=empty_rows)


@attention.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                    gate: Optional[Tensor] = None, scale: Optional[float] = None,
                    key_bias: Optional[Tensor] = None, empty_rows: str = "zero") -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("foldcompile::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Layer norm over the last dim (:func:`foldcompile.kernels.layer_norm`)."""
    return _layer_norm(x, weight, bias, eps)


@layer_norm.register_fake
def _layer_norm_fake(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     eps: float = 1e-5) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("foldcompile::softmax", mutates_args=())
def softmax(x: Tensor, dim: int = -1, scale: Optional[float] = None, bias: Optional[Tensor] = None,
            mask: Optional[Tensor] = None) -> Tensor:
    """``softmax(scale·x + bias)`` over ``dim``, ``mask`` False left out (:func:`foldcompile.kernels.softmax`)."""
    return _softmax(x, dim, scale=scale, bias=bias, mask=mask)


@softmax.register_fake
def _softmax_fake(x: Tensor, dim: int = -1, scale: Optional[float] = None, bias: Optional[Tensor] = None,
                  mask: Optional[Tensor] = None) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("foldcompile::outer_product_mean", mutates_args=())
def outer_product_mean(a: Tensor, b: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       mask_a: Optional[Tensor] = None, mask_b: Optional[Tensor] = None, eps: float = 0.0,
                       bias_divided: bool = True) -> Tensor:
    """``(flatten(sum_s a_s ⊗ b_s) @ weight^T + bias) / (eps + sum_s mask_a mask_b)``
    (:func:`foldcompile.kernels.outer_product_mean.outer_product_mean`)."""
    return _outer_product_mean(a, b, weight, bias, mask_a=mask_a, mask_b=mask_b, eps=eps,
                               bias_divided=bias_divided)


@outer_product_mean.register_fake
def _outer_product_mean_fake(a: Tensor, b: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                             mask_a: Optional[Tensor] = None, mask_b: Optional[Tensor] = None, eps: float = 0.0,
                             bias_divided: bool = True) -> Tensor:
    return a.new_empty((*a.shape[:-3], a.shape[-2], b.shape[-2], weight.shape[0]))


def _register_recomputing_backward(op: Any, fn: Callable[..., Tensor]) -> None:
    """Autograd for ``op``: its backward reruns ``fn`` (the kernel's entry point, whose autograd
    Function holds the kernel's backward) with grad on, and differentiates that."""

    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.is_tensor = [isinstance(x, Tensor) for x in inputs]
        ctx.constants = [x for x in inputs if not isinstance(x, Tensor)]
        ctx.save_for_backward(*[x for x in inputs if isinstance(x, Tensor)])

    def backward(ctx: Any, grad: Tensor) -> tuple:
        saved, constants = iter(ctx.saved_tensors), iter(ctx.constants)
        inputs = [next(saved) if t else next(constants) for t in ctx.is_tensor]
        leaves = [x.detach().requires_grad_(bool(ctx.needs_input_grad[i]))
                  if isinstance(x, Tensor) and x.is_floating_point() else x for i, x in enumerate(inputs)]
        wanted = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.requires_grad]
        if not wanted:
            return tuple(None for _ in inputs)
        with torch.enable_grad():
            out = fn(*leaves)
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad, allow_unused=True)
        result: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


_register_recomputing_backward(
    attention, lambda q, k, v, bias, mask, gate, scale, key_bias, empty_rows="zero": _attention(
        q, k, v, bias=bias, mask=mask, gate=gate, scale=scale, key_bias=key_bias, empty_rows=empty_rows))
_register_recomputing_backward(layer_norm, lambda x, weight, bias, eps: _layer_norm(x, weight, bias, eps))
_register_recomputing_backward(
    outer_product_mean, lambda a, b, weight, bias=None, mask_a=None, mask_b=None, eps=0.0, bias_divided=True:
    _outer_product_mean(a, b, weight, bias, mask_a=mask_a, mask_b=mask_b, eps=eps, bias_divided=bias_divided))
_register_recomputing_backward(softmax, lambda x, dim, scale, bias, mask: _softmax(x, dim, scale=scale, bias=bias,
                                                                                   mask=mask))
