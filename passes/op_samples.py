"""Sample calls for the op registry's entries: ``family(name) -> [(args, kwargs), ...]``.

Every entry registered with :func:`foldcompile.passes.registry.register_op` names one of these
(or its own) as ``samples``; the registry's tests run each entry's op on them, on real and on
fake tensors, and compare the op's result with the entry's shape rule, class and FLOPs. Sizes
are small and pairwise distinct (5, 7; 3 for a channel) so a wrong axis shows.

    >>> [tuple(a.shape) for a in layout("permute")[0][0][:1]]
    [(5, 7, 3)]
"""
from __future__ import annotations


import torch

__all__ = ["pointwise", "same_as_first", "shape_query", "layout", "reduce", "creation", "random", "gemm", "Call"]

Call = tuple[tuple, dict]
A, B, C = 5, 7, 3  # the sample sizes: two "dims" and a channel


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (A, B, C)), generator=torch.Generator().manual_seed(sum(shape) + len(shape)))


def _pos() -> torch.Tensor:
    return _x().abs() + 0.5


_BINARY = {"add", "sub", "mul", "div", "pow", "lt", "le", "gt", "ge", "eq", "ne", "truediv", "rsub",
           "true_divide", "maximum", "minimum", "sub_", "add_", "mul_", "div_", "iadd", "imul", "isub", "itruediv"}
_LOGICAL = {"logical_and", "logical_or", "and_", "or_", "bitwise_and", "bitwise_or"}
_POSITIVE = {"log", "sqrt", "rsqrt", "log1p", "reciprocal"}


def pointwise(name: str) -> list[Call]:
    """Element-wise calls: broadcasting binary forms included (``[A, B, C]`` with ``[B, 1]``)."""
    x, y = _x(), _x(B, 1)
    if name in _BINARY:
        calls = [((x, y), {}), ((x, 2.0), {})]
        return calls if name not in ("floordiv", "mod") else [((x, y), {})]
    if name in ("floordiv", "mod"):
        return [((x, y), {}), ((7, 2), {})]
    if name in _LOGICAL:
        return [((x > 0, y > 0), {})]
    if name in ("invert", "logical_not", "bitwise_not"):
        return [((x > 0,), {})]
    if name in _POSITIVE:
        return [((_pos(),), {})]
    if name == "neg":
        return [((x,), {}), ((7,), {})]
    if name in ("clamp", "clamp_min"):
        return [((x, -0.5), {})]
    if name == "clamp_max":
        return [((x, 0.5), {})]
    if name in ("masked_fill", "masked_fill_"):
        return [((x, y > 0, -1e9), {})]
    if name == "where":
        return [((x > 0, x, y), {}), ((x, x > 0, y), {})]  # torch.where(cond, a, b); a.where(cond, b)
    if name in ("dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout"):
        return [((x, 0.25, False), {}), ((x.clone(), 0.25, True), {})]
    if name in ("lerp",):
        return [((x, y, 0.3), {})]
    if name in ("addcmul", "addcdiv"):
        return [((x, y, _pos()), {})]
    if name in ("threshold",):
        return [((x, 0.1, 0.0), {})]
    if name == "leaky_relu":
        return [((x, 0.1), {})]
    if name == "copy_":
        return [((x.clone(), y.expand(A, B, C)), {})]
    if name == "fill_":
        return [((x.clone(), 1.5), {})]
    return [((x.clone() if name.endswith("_") else x,), {})]


def same_as_first(name: str) -> list[Call]:
    """Ops whose output has their first input's shape (norms and softmax over the last dim)."""
    x = _x()
    if name in ("softmax", "log_softmax", "cumsum", "cumprod"):
        return [((x, -1), {}), ((x, 0), {})]
    if name == "_softmax":
        return [((x, -1, False), {})]
    if name == "layer_norm":
        return [((x, (C,)), {}), ((x, (B, C), torch.randn(B, C), torch.randn(B, C)), {})]
    if name == "rms_norm":
        return [((x, (C,)), {})]
    if name == "group_norm":
        return [((_x(A, 6, B), 2), {})]
    if name in ("to", "type"):
        return [((x, torch.float64), {})]
    if name == "type_as":
        return [((x, x.double()), {})]
    if name == "full_like":
        return [((x, 2.0), {})]
    if name == "bernoulli":
        return [((x.sigmoid(),), {})]
    if name in ("triu", "tril"):
        return [((x, 1), {})]
    if name == "flip":
        return [((x, (0, 2)), {})]
    if name == "roll":
        return [((x, 2, 1), {})]
    if name == "requires_grad_":
        return [((x.clone(), False), {})]
    return [((x,), {})]


def shape_query(name: str) -> list[Call]:
    """Ops that return sizes, not tensors."""
    x = _x()
    if name == "size":
        return [((x, 1), {}), ((x,), {})]
    if name == "getattr":
        return [((x, "shape"), {})]
    return [((x,), {})]


def layout(name: str) -> list[Call]:
    """Layout ops on ``[A, B, C]``."""
    x = _x()
    table: dict[str, list[Call]] = {
        "getitem": [((x, (slice(None), 1)), {}), ((x, (Ellipsis, None, slice(1, 4))), {})],
        "view": [((x, (A * B, C)), {}), ((x, (A, B, C, 1)), {})],
        "reshape": [((x, (A, B * C)), {}), ((x, (-1,)), {})],
        "view_as": [((x, _x(A * B, C)), {})], "reshape_as": [((x, _x(A * B, C)), {})],
        "expand_as": [((_x(B, 1), x), {})],
        "flatten": [((x, 0, 1), {})], "unflatten": [((_x(A * B, C), 0, (A, B)), {})],
        "permute": [((x, (2, 0, 1)), {})],
        "transpose": [((x, 0, 2), {})], "swapaxes": [((x, 0, 2), {})], "swapdims": [((x, 1, 2), {})],
        "t": [((_x(A, B),), {})],
        "movedim": [((x, 0, 2), {})], "moveaxis": [((x, (0, 1), (2, 0)), {})],
        "unsqueeze": [((x, 1), {})], "squeeze": [((_x(A, 1, B), 1), {}), ((_x(A, 1, B),), {})],
        "expand": [((_x(B, 1), (A, B, C)), {})], "broadcast_to": [((_x(B, 1), (A, B, C)), {})], "repeat": [((x, (2, 1, 1)), {})],
        "cat": [(([x, _x(A, B, 2)], 2), {})], "concat": [(([x, x], 0), {})], "concatenate": [(([x, x], 1), {})],
        "stack": [(([x, x], 1), {})],
        "split": [((x, 2, 1), {}), ((x, [3, 4], 1), {})], "chunk": [((x, 2, 1), {})],
        "unbind": [((x, 2), {})], "select": [((x, 1, 3), {})], "narrow": [((x, 1, 2, 4), {})],
        "pad": [((x, (1, 2)), {})],
        "index_select": [((x, 1, torch.tensor([0, 2, 2, 6])), {})],
        "gather": [((x, 1, torch.zeros(A, 4, C, dtype=torch.long)), {})],
        "tile": [((x, (2, 1)), {})],
        "diagonal": [((_x(A, B, A), 0, 0, 2), {})],
    }
    return table[name]


def reduce(name: str) -> list[Call]:
    """Reductions over a dim, with and without keepdim."""
    x = _x()
    if name in ("all", "any"):
        return [((x > 0, 1), {})]
    if name in ("var", "std"):
        return [((x, 1), {}), ((x, 1, True, True), {})]
    if name in ("logsumexp",):
        return [((x, 1), {}), ((x, (0, 2), True), {})]
    if name in ("linalg_vector_norm", "norm"):
        return [((x, 2, -1), {}), ((x, 2, (0, 1), True), {})]
    if name in ("max", "min"):
        return [((x, 1), {}), ((x, _x(B, 1)), {})]
    return [((x, 1), {}), ((x, 2, True), {}), ((x,), {})]


def creation(name: str) -> list[Call]:
    """Tensor creation: sizes as literal ints, or like an input."""
    x = _x()
    table: dict[str, list[Call]] = {
        "zeros": [(((A, B),), {})], "ones": [((A, B), {})], "empty": [(((A, B),), {})],
        "full": [(((A, B), 2.0), {})], "rand": [((A, B), {})], "randn": [(((A, B),), {})],
        "new_zeros": [((x, (B, A)), {})], "new_ones": [((x, (B,)), {})], "new_empty": [((x, (A, 2)), {})],
        "new_full": [((x, (A,), 3.0), {})],
        "arange": [((B,), {}), ((2, B), {})], "eye": [((A,), {}), ((A, B), {})], "linspace": [((0.0, 1.0, B), {})],
        "tensor": [(([1.0, 2.0, 3.0],), {})], "one_hot": [((torch.tensor([0, 2, 1, 3]), 4), {})],
    }
    return table[name]


def random(name: str) -> list[Call]:
    """Random draws: in-place fills, per-element draws, draws of given sizes (their values are not
    compared, only their shapes, classes and FLOPs)."""
    x = _x()
    table: dict[str, list[Call]] = {
        "bernoulli_": [((x.clone(), 0.3), {})], "poisson": [((_pos(),), {})],
        "rrelu": [((x, 0.1, 0.3, True), {})], "rrelu_": [((x.clone(), 0.1, 0.3, True), {})],
        "feature_dropout": [((x, 0.25, True), {})], "alpha_dropout_": [((x.clone(), 0.25, True), {})],
        "feature_alpha_dropout_": [((x.clone(), 0.25, True), {})],
        "dropout1d": [((x, 0.25, True), {})], "dropout2d": [((_x(2, A, B, C), 0.25, True), {})],
        "dropout3d": [((_x(2, A, B, C, 2), 0.25, True), {})],
        "randint_like": [((x, 9), {}), ((x, 2, 9), {})],
        "binomial": [((torch.full((A, B), 4.0), torch.full((B,), 0.5)), {})],
        "normal": [((x, _pos()), {}), ((x, 2.0), {}), ((0.0, 1.0, (A, B)), {})],
        "randint": [((9, (A, B)), {}), ((2, 9, (B,)), {})],
        "randperm": [((B,), {})],
        "multinomial": [((_pos()[..., 0], 2), {}), ((_pos()[0, 0], B, True), {})],
        "geometric_": [((x.clone(), 0.4), {})],
    }
    return table.get(name, [((x.clone(),), {})])  # uniform_, normal_, exponential_, ...: x.fill_(draws)


def gemm(name: str) -> list[Call]:
    """Matrix products, batch broadcasting and 1-D operands included."""
    table: dict[str, list[Call]] = {
        "linear": [((_x(A, B, C), _x(4, C)), {}), ((_x(A, C), _x(4, C), _x(4)), {})],
        "matmul": [((_x(A, B), _x(B, C)), {}), ((_x(2, 1, A, B), _x(4, B, C)), {}), ((_x(A, B), _x(B)), {})],
        "mm": [((_x(A, B), _x(B, C)), {})], "bmm": [((_x(2, A, B), _x(2, B, C)), {})],
        "addmm": [((_x(A, C), _x(A, B), _x(B, C)), {})],
        "baddbmm": [((_x(2, A, C), _x(2, A, B), _x(2, B, C)), {})],
        "einsum": [(("sic,sjc->ij", _x(A, B, C), _x(A, B, C)), {}), (("...ik,...jk", _x(2, A, C), _x(2, B, C)), {}),
                   (("ij,jk,kl->il", _x(A, B), _x(B, C), _x(C, 2)), {})],
        "scaled_dot_product_attention": [((_x(2, A, C), _x(2, B, C), _x(2, B, 4)), {})],
    }
    return table[name]

