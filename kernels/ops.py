"""The kernels as ``torch.library`` ops: ``torch.ops.foldcompile.attention``, ``.layer_norm``, ``.softmax``,
``.outer_product_mean``, ``.triangle_multiplication``, ``.layer_norm_linear``.

A graph that holds one of these ops can be shape-propagated on fake tensors (each has a fake
implementation: sizes and dtype, no data), differentiated (each has an autograd formula) and
later handed to Inductor. Each op calls the kernel's plain Python entry point
(:func:`foldcompile.kernels.attention`, ...), so dispatch is the kernels' own: Triton on CUDA,
the reference on CPU, Triton's interpreter under ``TRITON_INTERPRET=1``. The ops are
``custom_op`` rather than ``triton_op``: ``triton_op`` does not work under the interpreter.

The backward recomputes the forward with autograd on and runs the kernel's own backward
through it (the kernels' autograd Functions keep their saved statistics private): one extra
forward per backward, paid only in training. That backward is itself an op
(``torch.ops.foldcompile.attention_backward``, ...), with a fake implementation, so a graph
holding these ops is differentiated by AOTAutograd (``torch.compile``, Inductor) without
tracing into the kernels: the backward op is opaque there, as the forward op is. Its
implementation turns autograd back on (a custom op's implementation runs below the dispatcher's
autograd keys) for the recomputation. Every op returns a contiguous tensor (a no-op for the
kernels' own outputs), so the fake implementations' strides are exact.

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

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from foldcompile.kernels.attention import attention as _attention
from foldcompile.kernels.layer_norm import layer_norm as _layer_norm
from foldcompile.kernels.ln_linear import layer_norm_linear as _layer_norm_linear
from foldcompile.kernels.outer_product_mean import outer_product_mean as _outer_product_mean
from foldcompile.kernels.softmax import softmax as _softmax
from foldcompile.kernels.triangle_multiplication import TriangleMultiplicationParams as _TrimulParams
from foldcompile.kernels.triangle_multiplication import triangle_multiplication as _triangle_multiplication

__all__ = ["attention", "layer_norm", "softmax", "outer_product_mean", "triangle_multiplication", "layer_norm_linear",
           "attention_backward", "layer_norm_backward", "softmax_backward", "outer_product_mean_backward",
           "triangle_multiplication_backward", "layer_norm_linear_backward", "TRIANGLE_MULTIPLICATION_PARAMS"]


@torch.library.custom_op("foldcompile::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
              gate: Optional[Tensor] = None, scale: Optional[float] = None,
              key_bias: Optional[Tensor] = None, empty_rows: str = "zero") -> Tensor:
    """``sigmoid(gate) * softmax(scale·q kᵀ + bias + key_bias, masked) v`` (:func:`foldcompile.kernels.attention`;
    ``key_bias`` broadcasts to ``[..., H, 1, K]``; ``empty_rows`` as there)."""
    return _attention(q, k, v, bias=bias, mask=mask, gate=gate, scale=scale, key_bias=key_bias,
                      empty_rows=empty_rows).contiguous()


@attention.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                    gate: Optional[Tensor] = None, scale: Optional[float] = None,
                    key_bias: Optional[Tensor] = None, empty_rows: str = "zero") -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("foldcompile::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Layer norm over the last dim (:func:`foldcompile.kernels.layer_norm`)."""
    return _layer_norm(x, weight, bias, eps).contiguous()


@layer_norm.register_fake
def _layer_norm_fake(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     eps: float = 1e-5) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("foldcompile::softmax", mutates_args=())
def softmax(x: Tensor, dim: int = -1, scale: Optional[float] = None, bias: Optional[Tensor] = None,
            mask: Optional[Tensor] = None) -> Tensor:
    """``softmax(scale·x + bias)`` over ``dim``, ``mask`` False left out (:func:`foldcompile.kernels.softmax`)."""
    return _softmax(x, dim, scale=scale, bias=bias, mask=mask).contiguous()


@softmax.register_fake
def _softmax_fake(x: Tensor, dim: int = -1, scale: Optional[float] = None, bias: Optional[Tensor] = None,
                  mask: Optional[Tensor] = None) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("foldcompile::outer_product_mean", mutates_args=())
def outer_product_mean(a: Tensor, b: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       mask_a: Optional[Tensor] = None, mask_b: Optional[Tensor] = None, eps: float = 0.0,
                       bias_divided: bool = True) -> Tensor:
    """``(flatten(sum_s a_s ⊗ b_s) @ weight^T + bias) / (eps + sum_s mask_a mask_b)``
    (:func:`foldcompile.kernels.outer_product_mean.outer_product_mean`)."""
    return _outer_product_mean(a, b, weight, bias, mask_a=mask_a, mask_b=mask_b, eps=eps,
                               bias_divided=bias_divided).contiguous()


@outer_product_mean.register_fake
def _outer_product_mean_fake(a: Tensor, b: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                             mask_a: Optional[Tensor] = None, mask_b: Optional[Tensor] = None, eps: float = 0.0,
                             bias_divided: bool = True) -> Tensor:
    return a.new_empty((*a.shape[:-3], a.shape[-2], b.shape[-2], weight.shape[0]))


# The triangle multiplicative update's parameters in the op's argument order: the six weights, then the
# optional biases and layer-norm affines (TriangleMultiplicationParams' field names).
TRIANGLE_MULTIPLICATION_PARAMS = ("a_proj_weight", "a_gate_weight", "b_proj_weight", "b_gate_weight", "gate_weight",
                                  "out_weight", "a_proj_bias", "a_gate_bias", "b_proj_bias", "b_gate_bias",
                                  "gate_bias", "out_bias", "ln_in_weight", "ln_in_bias", "ln_out_weight",
                                  "ln_out_bias")


def _trimul(z: Tensor, mask: Optional[Tensor], params: Sequence[Optional[Tensor]], eps_in: float, eps_out: float,
            outgoing: bool) -> Tensor:
    p = _TrimulParams(**dict(zip(TRIANGLE_MULTIPLICATION_PARAMS, params)), eps_in=eps_in, eps_out=eps_out)
    return _triangle_multiplication(z, mask, p, outgoing)


@torch.library.custom_op("foldcompile::triangle_multiplication", mutates_args=())
def triangle_multiplication(z: Tensor, mask: Optional[Tensor], a_proj_weight: Tensor, a_gate_weight: Tensor,
                            b_proj_weight: Tensor, b_gate_weight: Tensor, gate_weight: Tensor, out_weight: Tensor,
                            a_proj_bias: Optional[Tensor], a_gate_bias: Optional[Tensor],
                            b_proj_bias: Optional[Tensor], b_gate_bias: Optional[Tensor], gate_bias: Optional[Tensor],
                            out_bias: Optional[Tensor], ln_in_weight: Optional[Tensor], ln_in_bias: Optional[Tensor],
                            ln_out_weight: Optional[Tensor], ln_out_bias: Optional[Tensor], eps_in: float,
                            eps_out: float, outgoing: bool) -> Tensor:
    """The triangle multiplicative update of ``z`` (:func:`foldcompile.kernels.triangle_multiplication.
    triangle_multiplication`; the parameters are :class:`TriangleMultiplicationParams`' fields, in order).
    No argument has a default: the backward's ``needs`` covers every slot."""
    params = (a_proj_weight, a_gate_weight, b_proj_weight, b_gate_weight, gate_weight, out_weight, a_proj_bias,
              a_gate_bias, b_proj_bias, b_gate_bias, gate_bias, out_bias, ln_in_weight, ln_in_bias, ln_out_weight,
              ln_out_bias)
    return _trimul(z, mask, params, eps_in, eps_out, outgoing).contiguous()


@triangle_multiplication.register_fake
def _triangle_multiplication_fake(z, mask, *rest) -> Tensor:
    return z.new_empty(z.shape)


# ----------------------------------------------------------------------------- backward ops

_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    """Autograd recording inside a custom op's implementation: the dispatcher runs an implementation
    with the autograd keys excluded (as torch's own higher-order ops do when they need a graph,
    the thread's dispatch key sets are forced to the same sets without them)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _recomputed_grads(fn: Callable[..., Tensor], grad: Tensor, tensors: Sequence[Optional[Tensor]],
                      needs: Sequence[bool]) -> list[Tensor]:
    """Gradients of ``fn(*tensors)`` (the kernel's entry point, whose autograd Function holds the kernel's
    backward) against ``grad``: one tensor per slot of ``tensors``, contiguous, and an empty one where
    no gradient is needed (a custom op returns no None in a list)."""
    wanted = [i for i, (t, n) in enumerate(zip(tensors, needs)) if n and t is not None and t.is_floating_point()]
    result = [grad.new_empty(0) for _ in tensors]
    if not wanted:
        return result
    with _autograd_on():
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(tensors)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad, allow_unused=True)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(tensors[i]).contiguous() if g is None else g.contiguous()
    return result


def _fake_grads(grad: Tensor, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> list[Tensor]:
    return [t.new_empty(t.shape) if n and t is not None and t.is_floating_point() else grad.new_empty(0)
            for t, n in zip(tensors, needs)]


@torch.library.custom_op("foldcompile::attention_backward", mutates_args=())
def attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                       mask: Optional[Tensor], gate: Optional[Tensor], scale: Optional[float],
                       key_bias: Optional[Tensor], needs: Sequence[bool], empty_rows: str = "zero") -> list[Tensor]:
    """Gradients of :func:`attention` for ``q, k, v, bias, mask, gate, key_bias`` (``needs`` per slot)."""
    return _recomputed_grads(lambda q, k, v, bias, mask, gate, key_bias: _attention(
        q, k, v, bias=bias, mask=mask, gate=gate, scale=scale, key_bias=key_bias, empty_rows=empty_rows),
        grad, (q, k, v, bias, mask, gate, key_bias), needs)


@attention_backward.register_fake
def _attention_backward_fake(grad, q, k, v, bias, mask, gate, scale, key_bias, needs, empty_rows="zero"):
    return _fake_grads(grad, (q, k, v, bias, mask, gate, key_bias), needs)


@torch.library.custom_op("foldcompile::layer_norm_backward", mutates_args=())
def layer_norm_backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                        needs: Sequence[bool]) -> list[Tensor]:
    """Gradients of :func:`layer_norm` for ``x, weight, bias`` (``needs`` per slot)."""
    return _recomputed_grads(lambda x, w, b: _layer_norm(x, w, b, eps), grad, (x, weight, bias), needs)


@layer_norm_backward.register_fake
def _layer_norm_backward_fake(grad, x, weight, bias, eps, needs):
    return _fake_grads(grad, (x, weight, bias), needs)


@torch.library.custom_op("foldcompile::softmax_backward", mutates_args=())
def softmax_backward(grad: Tensor, x: Tensor, dim: int, scale: Optional[float], bias: Optional[Tensor],
                     mask: Optional[Tensor], needs: Sequence[bool]) -> list[Tensor]:
    """Gradients of :func:`softmax` for ``x, bias, mask`` (``needs`` per slot)."""
    return _recomputed_grads(lambda x, b, m: _softmax(x, dim, scale=scale, bias=b, mask=m), grad, (x, bias, mask),
                             needs)


@softmax_backward.register_fake
def _softmax_backward_fake(grad, x, dim, scale, bias, mask, needs):
    return _fake_grads(grad, (x, bias, mask), needs)


@torch.library.custom_op("foldcompile::outer_product_mean_backward", mutates_args=())
def outer_product_mean_backward(grad: Tensor, a: Tensor, b: Tensor, weight: Tensor, bias: Optional[Tensor],
                                mask_a: Optional[Tensor], mask_b: Optional[Tensor], eps: float, bias_divided: bool,
                                needs: Sequence[bool]) -> list[Tensor]:
    """Gradients of :func:`outer_product_mean` for ``a, b, weight, bias`` (``needs`` per slot)."""
    return _recomputed_grads(lambda a, b, w, bias: _outer_product_mean(
        a, b, w, bias, mask_a=mask_a, mask_b=mask_b, eps=eps, bias_divided=bias_divided),
        grad, (a, b, weight, bias), needs)


@outer_product_mean_backward.register_fake
def _outer_product_mean_backward_fake(grad, a, b, weight, bias, mask_a, mask_b, eps, bias_divided, needs):
    return _fake_grads(grad, (a, b, weight, bias), needs)


@torch.library.custom_op("foldcompile::triangle_multiplication_backward", mutates_args=())
def triangle_multiplication_backward(grad: Tensor, z: Tensor, mask: Optional[Tensor], a_proj_weight: Tensor,
                                     a_gate_weight: Tensor, b_proj_weight: Tensor, b_gate_weight: Tensor,
                                     gate_weight: Tensor, out_weight: Tensor, a_proj_bias: Optional[Tensor],
                                     a_gate_bias: Optional[Tensor], b_proj_bias: Optional[Tensor],
                                     b_gate_bias: Optional[Tensor], gate_bias: Optional[Tensor],
                                     out_bias: Optional[Tensor], ln_in_weight: Optional[Tensor],
                                     ln_in_bias: Optional[Tensor], ln_out_weight: Optional[Tensor],
                                     ln_out_bias: Optional[Tensor], eps_in: float, eps_out: float, outgoing: bool,
                                     needs: Sequence[bool]) -> list[Tensor]:
    """Gradients of :func:`triangle_multiplication` for ``z`` and the 16 parameters (``needs`` per slot; the
    mask takes none)."""
    tensors = (z, a_proj_weight, a_gate_weight, b_proj_weight, b_gate_weight, gate_weight, out_weight, a_proj_bias,
               a_gate_bias, b_proj_bias, b_gate_bias, gate_bias, out_bias, ln_in_weight, ln_in_bias, ln_out_weight,
               ln_out_bias)
    grads = _recomputed_grads(lambda z, *ps: _trimul(z, mask, ps, eps_in, eps_out, outgoing), grad, tensors, needs)
    # the kernel's parameter gradients are row slices of one GEMM result or partial-sum buffer (views);
    # a custom op's outputs may not alias each other and must match the fake ones (offset 0): copy views
    return [g.clone() if g._base is not None or g.storage_offset() else g for g in grads]


@triangle_multiplication_backward.register_fake
def _triangle_multiplication_backward_fake(grad, z, mask, *rest):
    *params, _eps_in, _eps_out, _outgoing, needs = rest
    return _fake_grads(grad, (z, *params), needs)


def _register_backward(op: Any, backward_op: Any, tensor_slots: tuple[int, ...], trailing: int = 0) -> None:
    """Autograd for ``op``: its backward is ``backward_op(grad, *inputs, needs)``, whose results are
    the gradients of the inputs at ``tensor_slots`` (an empty tensor where none is needed). The op's
    last ``trailing`` inputs (options added later, with defaults) go after ``needs``."""

    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.is_tensor = [isinstance(x, Tensor) for x in inputs]
        ctx.constants = [x for x in inputs if not isinstance(x, Tensor)]
        ctx.save_for_backward(*[x for x in inputs if isinstance(x, Tensor)])

    def backward(ctx: Any, grad: Tensor) -> tuple:
        saved, constants = iter(ctx.saved_tensors), iter(ctx.constants)
        inputs = [next(saved) if t else next(constants) for t in ctx.is_tensor]
        # the dispatcher drops trailing arguments equal to their defaults from needs_input_grad
        needs = [i < len(ctx.needs_input_grad) and bool(ctx.needs_input_grad[i]) for i in tensor_slots]
        result: list[Tensor | None] = [None] * len(inputs)
        if not any(needs):
            return tuple(result)
        lead = len(inputs) - trailing
        grads = backward_op(grad, *inputs[:lead], needs, *inputs[lead:])
        for i, need, g in zip(tensor_slots, needs, grads):
            if need and isinstance(inputs[i], Tensor) and inputs[i].is_floating_point():
                result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


_register_backward(attention, attention_backward, (0, 1, 2, 3, 4, 5, 7), trailing=1)  # q k v bias mask gate key_bias
_register_backward(layer_norm, layer_norm_backward, (0, 1, 2))  # x weight bias
_register_backward(softmax, softmax_backward, (0, 3, 4))  # x bias mask
# a b weight bias (the masks get no gradient: the kernel refuses a mask that requires one)
_register_backward(outer_product_mean, outer_product_mean_backward, (0, 1, 2, 3))
# z and the 16 parameters (the mask, slot 1, takes no gradient: the kernel refuses one that requires it)
_register_backward(triangle_multiplication, triangle_multiplication_backward, (0, *range(2, 18)))


# ----------------------------------------------------------------------------- layer norm -> projections
# Several outputs, and lists of weights and biases: its own registration (``_register_backward`` is for one
# output and fixed tensor slots). No argument has a default (the dispatcher would drop trailing ones equal
# to it from the inputs whose structure the backward's result must have). A custom op's schema has no list of optional tensors whose entries autograd
# tracks one by one, so the biases come as the list of those present, and ``has_bias`` says which
# projections they belong to.


def _projections_of(weights: Sequence[Tensor], biases: Sequence[Tensor],
                    has_bias: Sequence[bool]) -> list[Optional[Tensor]]:
    if len(has_bias) != len(weights) or sum(map(bool, has_bias)) != len(biases):
        raise ValueError(f"foldcompile::layer_norm_linear: has_bias {list(has_bias)} does not match {len(weights)} "
                         f"weights and {len(biases)} biases")
    present = iter(biases)
    return [next(present) if h else None for h in has_bias]


@torch.library.custom_op("foldcompile::layer_norm_linear", mutates_args=())
def layer_norm_linear(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], weights: list[Tensor],
                      biases: list[Tensor], has_bias: list[bool], eps: float, return_normalized: bool,
                      product_dtype: torch.dtype) -> list[Tensor]:
    """``[linear(layer_norm(x), W_p, b_p) for p] (+ [layer_norm(x)])``, the products in ``product_dtype``
    (:func:`foldcompile.kernels.ln_linear.layer_norm_linear`); ``biases`` are the present ones, in order,
    ``has_bias[p]`` whether projection p has one."""
    outs = _layer_norm_linear(x, ln_weight, ln_bias, weights, _projections_of(weights, biases, has_bias), eps=eps,
                              return_normalized=return_normalized, product_dtype=product_dtype)
    return [o.contiguous() for o in outs]


@layer_norm_linear.register_fake
def _layer_norm_linear_fake(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], weights: list[Tensor],
                            biases: list[Tensor], has_bias: list[bool], eps: float,
                            return_normalized: bool, product_dtype: torch.dtype) -> list[Tensor]:
    _projections_of(weights, biases, has_bias)
    outs = [x.new_empty((*x.shape[:-1], w.shape[0]), dtype=product_dtype) for w in weights]
    return outs + [x.new_empty(x.shape)] if return_normalized else outs


@torch.library.custom_op("foldcompile::layer_norm_linear_backward", mutates_args=())
def layer_norm_linear_backward(grads: list[Tensor], x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                               weights: list[Tensor], biases: list[Tensor], has_bias: list[bool], eps: float,
                               return_normalized: bool, product_dtype: torch.dtype,
                               needs: Sequence[bool]) -> list[Tensor]:
    """Gradients of :func:`layer_norm_linear` for ``x, ln_weight, ln_bias, *weights, *biases`` (``needs`` per
    slot; an empty tensor where none is needed), against ``grads`` (one per output)."""
    n = len(weights)

    def fn(x, lnw, lnb, *params):
        return _layer_norm_linear(x, lnw, lnb, list(params[:n]), _projections_of(params[:n], params[n:], has_bias),
                                  eps=eps, return_normalized=return_normalized, product_dtype=product_dtype)

    tensors = (x, ln_weight, ln_bias, *weights, *biases)
    wanted = [i for i, (t, need) in enumerate(zip(tensors, needs)) if need and t is not None and t.is_floating_point()]
    result = [grads[0].new_empty(0) for _ in tensors]
    if not wanted:
        return result
    with _autograd_on():
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(tensors)]
        outs = fn(*leaves)
        got = torch.autograd.grad(outs, [leaves[i] for i in wanted], grads, allow_unused=True)
    for i, g in zip(wanted, got):
        result[i] = torch.zeros_like(tensors[i]).contiguous() if g is None else g.contiguous()
    return result


@layer_norm_linear_backward.register_fake
def _layer_norm_linear_backward_fake(grads, x, ln_weight, ln_bias, weights, biases, has_bias, eps, return_normalized,
                                     product_dtype, needs):
    return _fake_grads(grads[0], (x, ln_weight, ln_bias, *weights, *biases), needs)


def _layer_norm_linear_setup(ctx: Any, inputs: tuple, output: list) -> None:
    x, ln_weight, ln_bias, weights, biases, has_bias, eps, return_normalized, product_dtype = inputs
    ctx.n, ctx.n_bias, ctx.n_inputs = len(weights), len(biases), len(inputs)
    ctx.options = (list(has_bias), float(eps), bool(return_normalized), product_dtype)
    ctx.has_ln = (ln_weight is not None, ln_bias is not None)
    ctx.out_shapes = [tuple(o.shape) for o in output]
    ctx.save_for_backward(x, *[t for t in (ln_weight, ln_bias) if t is not None], *weights, *biases)


def _per_entry(flag: Any, n: int) -> list[bool]:
    """``needs_input_grad`` of a list input: a list of flags (or one flag for all of it)."""
    return [bool(f) for f in flag] if isinstance(flag, (list, tuple)) else [bool(flag)] * n


def _layer_norm_linear_grad(ctx: Any, grads: list) -> tuple:
    saved = iter(ctx.saved_tensors)
    x = next(saved)
    ln_weight = next(saved) if ctx.has_ln[0] else None
    ln_bias = next(saved) if ctx.has_ln[1] else None
    weights = [next(saved) for _ in range(ctx.n)]
    biases = [next(saved) for _ in range(ctx.n_bias)]
    has_bias, eps, return_normalized, product_dtype = ctx.options
    flags = ctx.needs_input_grad  # no argument has a default: the dispatcher drops none of them
    needs = [bool(flags[0]) and x.is_floating_point(), bool(flags[1]) and ln_weight is not None,
             bool(flags[2]) and ln_bias is not None, *_per_entry(flags[3], ctx.n), *_per_entry(flags[4], ctx.n_bias)]
    # the result has the inputs' structure: one entry per input, a list for each list input
    structure: list[Any] = [None] * ctx.n_inputs
    structure[3], structure[4] = [None] * ctx.n, [None] * ctx.n_bias
    if not any(needs):
        return tuple(structure)
    grads = [g if g is not None else x.new_zeros(shape) for g, shape in zip(grads, ctx.out_shapes)]
    got = layer_norm_linear_backward(grads, x, ln_weight, ln_bias, weights, biases, has_bias, eps, return_normalized,
                                     product_dtype, needs)
    out = [g if need else None for g, need in zip(got, needs)]
    structure[:3] = out[:3]
    structure[3] = out[3:3 + ctx.n]
    structure[4] = out[3 + ctx.n:]
    return tuple(structure)


layer_norm_linear.register_autograd(_layer_norm_linear_grad, setup_context=_layer_norm_linear_setup)
