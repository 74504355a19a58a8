"""Specialisation of an element-wise fragment to one call: value kinds, dtypes (eager's
promotion), shapes, the live set, dropout masks, and the collapsed broadcast geometry the
kernels index. Part of the generator behind ``foldcompile.kernels.elementwise`` (see
``elementwise_codegen`` for the map).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from foldcompile.kernels.elementwise_lowering import _Fragment, _Val
from foldcompile.kernels.elementwise_rules import _RULES, _Rule
from foldcompile.kernels.philox import _mask_shape



@dataclass
class _Operand:
    """A tensor the kernel indexes: its strides over the output's (collapsed) dims."""

    strides: tuple[int, ...]
    pattern: tuple[bool, ...] = ()  # per collapsed dim: indexed (stride != 0)
    dense: bool = False  # walks the output's flat index exactly


@dataclass
class _Layout:
    """Per-call facts: value kinds/dtypes/shapes and the broadcast geometry."""

    kinds: list[str]  # per value: "f", "b" (tensor) or "s" (Python scalar)
    dtypes: list[torch.dtype | None]
    shapes: list[tuple[int, ...] | None]
    live: list[int]  # values needed by the outputs, in order
    out_shape: tuple[int, ...]
    dropouts: list[int]  # value ids of the live dropout ops, in order
    mask_shapes: dict[int, tuple[int, ...]]  # dropout value id -> mask shape (out rank)
    mask_base: dict[int, int]  # dropout value id -> first counter


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _eager_result_dtype(frag: _Fragment, v: _Val, rule: _Rule, inputs: Sequence[Any],
                        dtypes: list[torch.dtype | None], shapes: list[tuple[int, ...] | None]) -> torch.dtype:
    """dtype eager PyTorch gives op ``v``: its torch function run on meta tensors of the
    operands' real ranks and dtypes (Python-number operands passed as numbers of their type);
    bool operands of arithmetic stay bool, as eager sees them (a float condition of ``where``
    is read as ``!= 0``, as the kernels read it)."""
    args: list[Any] = []
    for a, need in zip(v.args, rule.arg_kinds):
        if shapes[a] is None:
            av = frag.vals[a]
            if av.kind == "input":
                args.append(inputs[av.index])
            elif av.kind == "const":
                args.append(av.value)
            else:  # computed from Python numbers only: the reference computes it in float64 (a 0-dim tensor)
                args.append(torch.empty((), dtype=torch.float64, device="meta"))
            continue
        dt = dtypes[a]
        if need == "b" and dt != torch.bool:  # a float condition is read as != 0
            dt = torch.bool
        args.append(torch.empty(shapes[a], dtype=dt, device="meta"))
    try:
        return rule.torch(*args).dtype
    except RuntimeError as exc:  # e.g. negating a bool tensor
        raise ValueError(f"node '{v.name}' ({v.op}): eager PyTorch refuses these operands: {exc}") from None


def _layout(frag: _Fragment, inputs: Sequence[Any]) -> _Layout:
    if len(inputs) != frag.n_inputs:
        raise TypeError(f"fused fragment takes {frag.n_inputs} inputs ({', '.join(frag.input_names)}), "
                        f"got {len(inputs)}")
    n = len(frag.vals)
    kinds: list[str] = [""] * n
    dtypes: list[torch.dtype | None] = [None] * n
    shapes: list[tuple[int, ...] | None] = [None] * n
    for i, v in enumerate(frag.vals):
        if v.kind == "input":
            x = inputs[v.index]
            if isinstance(x, torch.Tensor):
                if not (x.dtype.is_floating_point or x.dtype == torch.bool):
                    raise TypeError(f"input '{v.name}' has dtype {x.dtype}; fused element-wise kernels take "
                                    "float16/bfloat16/float32/float64 or bool tensors")
                kinds[i], dtypes[i], shapes[i] = ("b" if x.dtype == torch.bool else "f"), x.dtype, tuple(x.shape)
            elif isinstance(x, (bool, int, float)):
                kinds[i] = "s"
            else:
                raise TypeError(f"input '{v.name}' is a {type(x).__name__}; expected a tensor or a Python number")
        elif v.kind == "const":
            kinds[i] = "s"
        else:
            rule = _RULES[v.op]
            arg_shapes = [shapes[a] for a in v.args if shapes[a] is not None]
            try:
                shapes[i] = torch.broadcast_shapes(*arg_shapes) if arg_shapes else None
            except RuntimeError:
                names = ", ".join(f"{frag.vals[a].name} {list(shapes[a])}" for a in v.args if shapes[a] is not None)
                raise ValueError(f"node '{v.name}' ({v.op}): operand shapes do not broadcast: {names}") from None
            if shapes[i] is None:
                kinds[i] = "s"
                continue
            kinds[i] = rule.result_kind
            tensor_dtypes = [dtypes[a] for a in v.args if dtypes[a] is not None]
            if rule.result_kind == "b":
                dtypes[i] = torch.bool
            elif v.op == "cast":
                dtypes[i] = v.dtype
            elif v.op in ("masked_fill", "dropout"):
                dtypes[i] = dtypes[v.args[0]] if dtypes[v.args[0]] not in (None, torch.bool) else torch.float32
            else:
                ranks = [len(shapes[a]) for a in v.args if shapes[a] is not None]
                bool_operand = any(k == "f" and dtypes[a] == torch.bool for a, k in zip(v.args, rule.arg_kinds))
                float_args = [d for k, d in zip(rule.arg_kinds, [dtypes[a] for a in v.args]) if k == "f" and d]
                if (0 in ranks and any(r > 0 for r in ranks)) or bool_operand or not float_args:
                    # A 0-dim tensor next to dimensioned ones, a bool tensor in arithmetic, or only
                    # Python numbers where floats go (``where(m > 0, 0., -inf)``: the default float
                    # dtype): eager's result_type rule decides (a 0-dim fp32 tensor does not promote
                    # an fp16 [4, 8] tensor; bool [4] * fp16 0-dim is fp16, not fp32), so ask it.
                    d = _eager_result_dtype(frag, v, rule, inputs, dtypes, shapes)
                else:
                    d = _promote(float_args)
                if not d.is_floating_point:  # e.g. bool * bool is bool in eager
                    names = ", ".join(f"{frag.vals[a].name} {dtypes[a]}" for a in v.args if dtypes[a] is not None)
                    raise ValueError(f"node '{v.name}' ({v.op}): eager PyTorch computes it in {d} on {names}; "
                                     "the fused kernels compute floats, so it is not fused")
                dtypes[i] = d
    # Live values: those the outputs depend on.
    needed = set(frag.outputs)
    for i in range(n - 1, -1, -1):
        if i in needed:
            needed.update(frag.vals[i].args)
    live = sorted(needed)
    out_shapes = [shapes[o] for o in frag.outputs]
    for o, s in zip(frag.outputs, out_shapes):
        if s is None:
            raise ValueError(f"output '{frag.vals[o].name}' does not depend on any tensor input")
    out_shape = out_shapes[0]
    if any(s != out_shape for s in out_shapes):
        desc = ", ".join(f"{frag.vals[o].name} {list(s)}" for o, s in zip(frag.outputs, out_shapes))
        raise ValueError(f"a fused fragment's outputs must share one shape, got {desc}")
    rank = len(out_shape)
    dropouts, mask_shapes, mask_base, counter = [], {}, {}, 0
    for i in live:
        v = frag.vals[i]
        if v.op == "dropout":
            if shapes[v.args[0]] is None:
                raise ValueError(f"node '{v.name}': dropout of a Python scalar")
            own = _mask_shape(shapes[i], v.shared_dims, f"dropout '{v.name}' input")
            mask_shapes[i] = (1,) * (rank - len(own)) + own
            dropouts.append(i)
            mask_base[i] = counter
            counter += math.prod(mask_shapes[i])
    return _Layout(kinds, dtypes, shapes, live, out_shape, dropouts, mask_shapes, mask_base)


def _aligned_strides(x: torch.Tensor, out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """x's strides over out_shape's dims: 0 where x is broadcast (missing or size 1)."""
    pad = len(out_shape) - x.dim()
    strides = [0] * pad
    for d in range(x.dim()):
        strides.append(0 if x.shape[d] == 1 else x.stride(d))
    return tuple(strides)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc if s != 1 else 0)
        acc *= s
    return tuple(reversed(strides))


def _collapse(shape: tuple[int, ...], operands: list[tuple[int, ...]]) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims every operand walks contiguously (outer stride == inner stride * inner size)."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    if not dims:
        return [1], [[0] for _ in operands]
    sizes = [shape[dims[0]]]
    strides = [[op[dims[0]]] for op in operands]
    for d in dims[1:]:
        if all(st[-1] == op[d] * shape[d] for st, op in zip(strides, operands)):
            sizes[-1] *= shape[d]
            for st, op in zip(strides, operands):
                st[-1] = op[d]
        else:
            sizes.append(shape[d])
            for st, op in zip(strides, operands):
                st.append(op[d])
    return sizes, strides


def _geometry(out_shape: tuple[int, ...], operand_strides: list[tuple[int, ...]]):
    sizes, strides = _collapse(out_shape, operand_strides)
    dense_strides = [0] * len(sizes)
    acc = 1
    for d in range(len(sizes) - 1, -1, -1):
        dense_strides[d] = acc
        acc *= sizes[d]
    ops = []
    reach = math.prod(sizes)
    for st in strides:
        ops.append(_Operand(tuple(st), tuple(s != 0 for s in st), list(st) == dense_strides))
        reach = max(reach, sum((n - 1) * s for n, s in zip(sizes, st)) + 1)
    return sizes, ops, reach >= 2**31 - 1
