"""An element-wise chain summed over its trailing dims, in one kernel: ``f(x, y, ...).sum(dims)``.

AlphaFold's invariant point attention sums squared point distances, ``((q - k) ** 2).sum((-1, -2))``
over ``[N, N, H, P, 3]``; norms sum squares over the last dim. Eagerly, and with the element-wise
kernel alone, the ``[.., P, 3]`` values are written and read back for the sum. Here the generated
kernel computes the chain (the same generator, rules and eager dtype promotion as
:func:`foldcompile.kernels.fuse_elementwise`) on 2-D tiles — rows = the kept dims, columns = the
summed ones, every column of a row in one tile — and sums each row in registers (float32), writing
one value per row::

    >>> fused = fuse_elementwise_sum(lambda q, k: (q - k) * (q - k), n_summed=2)
    >>> q, k = torch.randn(7, 5, 1, 2, 3), torch.randn(1, 5, 2, 2, 3)
    >>> out = fused(q, k)
    >>> out.shape, torch.allclose(out, ((q - k) * (q - k)).sum((-1, -2)), atol=1e-5)
    (torch.Size([7, 5, 2]), True)

Reads: each input once through its own strides (broadcasts are stride 0, never expanded); writes:
the kept elements once. Backward recomputes the chain through its own element-wise kernel on the
upstream gradient broadcast over the summed dims (stride 0): only the inputs are saved. The summed
extent must fit one tile (at most :data:`MAX_SUMMED` elements a row); chains with dropout are not
taken (the kernel draws no random numbers). float64, and CPU tensors without ``TRITON_INTERPRET=1``,
run the plain PyTorch reference.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.fx
import triton

from foldcompile.kernels import _dispatch
from foldcompile.kernels.elementwise import FusedElementwise, fuse_elementwise
from foldcompile.kernels.elementwise_codegen import (_HEADER, _aligned_strides, _collapse, _compile, _gen_kernel,
                                                     _layout, _Operand)

__all__ = ["FusedElementwiseSum", "fuse_elementwise_sum", "MAX_SUMMED"]

MAX_SUMMED = 1024  # summed elements per row: one tile of columns holds them all
_TILE = 2048  # elements a tile (rows x columns)


class FusedElementwiseSum:
    """``chain(*inputs).sum(last n_summed dims, keepdim)`` in one generated kernel (see the module docstring)."""

    def __init__(self, chain: FusedElementwise, n_summed: int, keepdim: bool = False,
                 name: str = "fused_elementwise_sum"):
        if n_summed < 1:
            raise ValueError(f"n_summed must be >= 1, got {n_summed}")
        if chain._frag.multi_output:
            raise ValueError(f"{name}: the summed chain must have one output")
        if chain.has_dropout:
            raise ValueError(f"{name}: a summed chain with dropout is not supported (the kernel draws no random "
                             "numbers)")
        self.chain, self.n_summed, self.keepdim, self.name = chain, n_summed, keepdim, name
        self._plans: dict[tuple, Any] = {}

    def __repr__(self) -> str:
        return f"FusedElementwiseSum({self.chain!r}, summed over the last {self.n_summed} dims)"

    def __deepcopy__(self, memo: dict) -> "FusedElementwiseSum":
        return self  # immutable once built (the plans are a cache), as FusedElementwise

    def _shapes(self, full: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(kept dims, the output's shape) for the chain's output shape ``full``."""
        if self.n_summed > len(full):
            raise ValueError(f"{self.name}: cannot sum the last {self.n_summed} dims of a value of shape {list(full)}")
        kept = tuple(full[:len(full) - self.n_summed])
        return kept, kept + (1,) * self.n_summed if self.keepdim else kept

    def output_dtypes(self, *inputs: Any) -> list[torch.dtype]:
        """The output's dtype (the chain's: a sum keeps it); raises like :meth:`FusedElementwise.output_dtypes`,
        and when a row holds more than :data:`MAX_SUMMED` summed elements."""
        lay = _layout(self.chain._frag, inputs)
        self._shapes(lay.out_shape)
        summed = math.prod(lay.out_shape[len(lay.out_shape) - self.n_summed:])
        if summed > MAX_SUMMED:
            raise ValueError(f"{self.name}: {summed} summed elements a row, more than one tile holds ({MAX_SUMMED})")
        return self.chain.output_dtypes(*inputs)

    def reference(self, *inputs: Any) -> torch.Tensor:
        """The same in plain PyTorch (eager dtypes), differentiable."""
        y = self.chain.reference(*inputs)
        return y.sum(dim=tuple(range(y.dim() - self.n_summed, y.dim())), keepdim=self.keepdim)

    def __call__(self, *inputs: Any) -> torch.Tensor:
        inputs = self.chain._one_device(inputs)
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        if not _dispatch.use_triton(*tensors) or any(t.dtype == torch.float64 for t in tensors):
            return self.reference(*inputs)
        return _SumFunction.apply(self, *inputs)

    # -- the forward kernel ------------------------------------------------------------------

    def _forward(self, inputs: Sequence[Any]) -> torch.Tensor:
        chain = self.chain
        prep = chain._prepare(inputs)
        lay, vals = prep.lay, chain._frag.vals
        full = tuple(lay.out_shape)
        kept, out_shape = self._shapes(full)
        (o,) = chain._frag.outputs
        device = inputs[vals[prep.tensor_inputs[0]].index].device
        out = torch.empty(out_shape, dtype=lay.dtypes[o], device=device)
        rows, cols = math.prod(kept), math.prod(full[len(kept):])
        if rows == 0:
            return out
        if cols == 0:
            return out.zero_()
        if cols > MAX_SUMMED:
            raise ValueError(f"{self.name}: {cols} summed elements a row, more than one tile holds ({MAX_SUMMED})")
        operand_strides = [_aligned_strides(inputs[vals[i].index], full) for i in prep.tensor_inputs]
        sizes, ops, int64, split = _split_geometry(full, operand_strides, len(kept))
        key = (tuple(lay.kinds), tuple(map(str, lay.dtypes)), tuple((op.pattern, op.dense) for op in ops), len(sizes),
               int64, split)
        kernel = self._plans.get(key)
        if kernel is None:
            fn = f"{self.name}_fwd"
            body = _gen_kernel(chain._frag, lay, sizes, prep.tensor_inputs, ops, int64, False, [], fn, split=split,
                               row_sum=True)
            kernel = self._plans[key] = _compile(_HEADER.format(code=chain._frag.code.strip()) + body + "\n", fn)
        strides = [s for op in ops if not op.dense for s, used in zip(op.strides, op.pattern) if used]
        scalars = [float(inputs[vals[i].index]) if vals[i].kind == "input" else vals[i].value for i in prep.scalars]
        block_c = triton.next_power_of_2(cols)
        block_r = max(1, _TILE // block_c)
        _dispatch.note_launch(self.name)
        kernel[(triton.cdiv(rows, block_r), 1)](out, *[inputs[vals[i].index] for i in prep.tensor_inputs], *scalars,
                                                 rows, cols, *sizes[1:], *strides, BLOCK_R=block_r, BLOCK_C=block_c,
                                                 num_warps=4)
        return out


def _split_geometry(full: tuple[int, ...], operand_strides: list[tuple[int, ...]], n_kept: int
                    ) -> tuple[list[int], list[_Operand], bool, int]:
    """The iteration space as the kernel indexes it: the kept dims and the summed dims each merged where
    every operand walks them contiguously (never across the boundary); ``(sizes, operands, int64,
    number of kept collapsed dims)``."""
    k_sizes, k_strides = _collapse(full[:n_kept], [st[:n_kept] for st in operand_strides])
    s_sizes, s_strides = _collapse(full[n_kept:], [st[n_kept:] for st in operand_strides])
    sizes = k_sizes + s_sizes
    strides = [a + b for a, b in zip(k_strides, s_strides)]
    dense = [0] * len(sizes)
    acc = 1
    for d in range(len(sizes) - 1, -1, -1):
        dense[d] = acc
        acc *= sizes[d]
    reach = math.prod(sizes)
    ops = []
    for st in strides:
        ops.append(_Operand(tuple(st), tuple(s != 0 for s in st), list(st) == dense))
        reach = max(reach, sum((n - 1) * s for n, s in zip(sizes, st)) + 1)
    return sizes, ops, reach >= 2**31 - 1, len(k_sizes)


class _SumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fused: FusedElementwiseSum, *inputs: Any) -> torch.Tensor:
        ctx.fused = fused
        ctx.positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.numbers = [x if not isinstance(x, torch.Tensor) else None for x in inputs]
        ctx.save_for_backward(*[inputs[i] for i in ctx.positions])
        return fused._forward(inputs)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        fused = ctx.fused
        inputs = list(ctx.numbers)
        for i, t in zip(ctx.positions, ctx.saved_tensors):
            inputs[i] = t
        needs = ctx.needs_input_grad[1:]
        leaves = {i: inputs[i].detach().requires_grad_() for i in ctx.positions
                  if i < len(needs) and needs[i] and inputs[i].is_floating_point()}
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        if leaves:
            with torch.enable_grad():
                y = fused.chain(*[leaves.get(i, x) for i, x in enumerate(inputs)])
                if not fused.keepdim:
                    g = g.reshape(g.shape + (1,) * fused.n_summed)
                found = torch.autograd.grad(y, list(leaves.values()), g.expand(y.shape), allow_unused=True)
            for i, gi in zip(leaves, found):
                grads[i] = gi if gi is not None else torch.zeros_like(inputs[i])
        return (None, *grads)


def fuse_elementwise_sum(fn: Callable | torch.fx.GraphModule | torch.fx.Graph, n_summed: int, keepdim: bool = False,
                         name: str = "fused_elementwise_sum") -> FusedElementwiseSum:
    """``fn``'s element-wise fragment (as :func:`fuse_elementwise` takes it) summed over its last
    ``n_summed`` dims, as one kernel (see the module docstring)."""
    return FusedElementwiseSum(fuse_elementwise(fn, name=name), n_summed, keepdim, name)
