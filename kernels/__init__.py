"""Triton kernels, each with a torch.autograd.Function and a plain-PyTorch reference.

Dispatch (one rule for all, see ``_dispatch``): CUDA tensors run Triton; CPU tensors
run the reference, unless ``TRITON_INTERPRET=1``, where they run the Triton kernels
through Triton's interpreter.

    >>> import torch
    >>> from foldcompile.kernels import layer_norm, softmax, attention
    >>> x = torch.randn(37, 61)
    >>> y = layer_norm(x, torch.ones(61), torch.zeros(61))
    >>> y.shape, round(y.mean(-1).abs().max().item(), 4)
    (torch.Size([37, 61]), 0.0)
    >>> softmax(x, dim=-1).sum(-1).allclose(torch.ones(37))
    True
    >>> q = k = v = torch.randn(2, 5, 8)              # [H, Q, D]
    >>> attention(q, k, v).shape
    torch.Size([2, 5, 8])
"""
from foldcompile.kernels._dispatch import record_launches, use_triton
from foldcompile.kernels.attention import attention, attention_reference
from foldcompile.kernels.elementwise import (FusedElementwise, UnsupportedElementwiseOp, dropout_mask_reference,
                                             fuse_elementwise, fused_elementwise_reference, unsupported_reason)
from foldcompile.kernels.elementwise import dropout as shared_dropout
from foldcompile.kernels.layer_norm import layer_norm, layer_norm_reference
from foldcompile.kernels.softmax import softmax, softmax_reference
from foldcompile.kernels.triangle_multiplication import (params_from_module, triangle_multiplication,
                                                         triangle_multiplication_module,
                                                         triangle_multiplication_reference)

__all__ = ["attention", "attention_reference", "layer_norm", "layer_norm_reference", "softmax", "softmax_reference",
           "fuse_elementwise", "FusedElementwise", "fused_elementwise_reference", "UnsupportedElementwiseOp",
           "unsupported_reason", "shared_dropout", "dropout_mask_reference", "record_launches", "use_triton",
           "triangle_multiplication", "triangle_multiplication_module", "triangle_multiplication_reference",
           "params_from_module"]
