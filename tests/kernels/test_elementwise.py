"""Generated element-wise fusion kernels: forward and backward against a float64 reference.

Runs the real Triton kernels through the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU). Shapes are small and not multiples of
the block size (37, 61).
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from foldcompile.kernels import _dispatch
from foldcompile.kernels.elementwise import (
    FusedElementwise,
    UnsupportedElementwiseOp,
    dropout,
    dropout_mask_reference,
    fuse_elementwise,
    unsupported_reason,
)
from foldcompile.kernels.philox import uniform_like_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or _dispatch.interpreting()),
                                  reason="needs a GPU or TRITON_INTERPRET=1")
# Masked-off tail lanes compute log(0) and the like in the interpreter (never stored): numpy warns.
pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _bar(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


# Each case: (name, fn, input builder(dtype) -> list, kwargs for the call)
def _t(*shape, dtype, grad=True, positive=False):
    x = torch.randn(*shape, device=DEVICE, dtype=torch.float32)
    if positive:
        x = x.abs() + 0.5
    return x.to(dtype).requires_grad_(grad)


def _mask(*shape):
    return torch.rand(*shape, device=DEVICE) > 0.3


CASES = {
    # AlphaFold's bias + row-wise dropout + residual: mask shared over the rows (dim -3).
    "bias_dropout_residual": (
        lambda x, b, r: r + dropout(x + b, 0.25, shared_dims=(-3,)),
        lambda dt: [_t(5, 37, 16, dtype=dt), _t(16, dtype=dt), _t(5, 37, 16, dtype=dt)],
    ),
    "sigmoid_gating": (
        lambda g, x: torch.sigmoid(g) * x,
        lambda dt: [_t(37, 61, dtype=dt), _t(37, 61, dtype=dt)],
    ),
    "swiglu": (
        lambda a, b: F.silu(a) * b,
        lambda dt: [_t(3, 37, 20, dtype=dt), _t(3, 37, 20, dtype=dt)],
    ),
    "masking": (
        lambda x, keep, w: x.masked_fill(~keep, -1e4) + w * torch.where(keep, x, 0.0),
        lambda dt: [_t(4, 37, 61, dtype=dt), _mask(4, 1, 61), _t(37, 1, dtype=dt)],
    ),
    "mask_multiply": (
        lambda x, m: x * m,
        lambda dt: [_t(6, 37, 8, dtype=dt), (torch.rand(6, 1, 8, device=DEVICE) > 0.5).to(dt)],
    ),
    "scalars": (
        lambda x, s, t: (x * s + 2.0) / t - 0.5 * x,
        lambda dt: [_t(37, 61, dtype=dt), 1.7, 3],
    ),
    "chain": (  # 9 ops, broadcasting, reuse of x
        lambda x, y, b: torch.tanh(torch.relu((x - b) * 0.5) + torch.exp(-x) / (1.0 + torch.sigmoid(y)))
        * F.gelu(y) + F.gelu(x, approximate="tanh"),
        lambda dt: [_t(2, 37, 24, dtype=dt), _t(37, 24, dtype=dt), _t(24, dtype=dt)],
    ),
    "log_sqrt_rsqrt": (
        lambda x, y: torch.log(x) * torch.sqrt(y) + torch.rsqrt(x + y),
        lambda dt: [_t(37, 13, dtype=dt, positive=True), _t(37, 13, dtype=dt, positive=True)],
    ),
}


def _run_case(name: str, dtype: torch.dtype, seed: int = 11):
    fn, build = CASES[name]
    torch.manual_seed(seed)
    inputs = build(dtype)
    fused = fuse_elementwise(fn)
    with _dispatch.record_launches() as launched:
        out = fused(*inputs, seed=1234, offset=7)
        grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
        tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        grads = torch.autograd.grad(out, tensors, grad_out)
    assert launched == ["fused_elementwise_fwd", "fused_elementwise_bwd"]
    assert out.dtype == dtype
    ref_inputs = [x.detach().double().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and
                  x.dtype.is_floating_point else x for x in inputs]
    # The reference is the user's own PyTorch function in float64 — not the fused fragment's
    # replay, which shares the lowering table with the kernel and would share its bugs. Only
    # dropout needs the replay: its mask comes from the kernel's (seed, offset).
    uses_dropout = name == "bias_dropout_residual"

    def plain(*args):
        return fused.reference(*args, seed=1234, offset=7) if uses_dropout else fn(*args)

    ref = plain(*ref_inputs)
    ref_tensors = [x for x in ref_inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_tensors, grad_out.double())
    # Plain PyTorch in the same dtype, to scale the bar for half precision.
    eager = plain(*[x.detach() if isinstance(x, torch.Tensor) else x for x in inputs])
    bar = max(_bar(dtype), 3 * _rel(eager, ref)) if dtype != torch.float32 else _bar(dtype)
    assert _rel(out, ref) < bar, (name, _rel(out, ref))
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.shape == rg.shape and g.dtype == dtype
        assert _rel(g, rg) < bar * 10 if dtype != torch.float32 else _rel(g, rg) < 1e-5, (name, i, _rel(g, rg))
    return fused, inputs, out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fragment_forward_backward(name, dtype):
    _run_case(name, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; GPU only")
@pytest.mark.parametrize("name", ["bias_dropout_residual", "sigmoid_gating", "swiglu", "chain"])
def test_fragment_bf16_cuda(name):
    _run_case(name, torch.bfloat16)


def test_philox_reference_is_bit_exact_with_tl_rand():
    @triton.jit
    def rand_kernel(out, seed, offset, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, tl.rand(seed, offs.to(tl.int64) + offset), mask=offs < N)

    for seed, offset in [(0, 0), (1234, 7), (2**40 + 3, 2**33 + 5)]:
        n = 1000
        out = torch.full((n,), float("nan"), device=DEVICE)
        rand_kernel[(triton.cdiv(n, 256),)](out, seed, offset, n, BLOCK=256)
        ref = uniform_like_triton(seed, torch.arange(n, device=DEVICE) + offset)
        assert torch.equal(out, ref), (seed, offset)


def test_dropout_exact_and_shared_along_rows():
    torch.manual_seed(0)
    p = 0.25
    x = torch.randn(6, 37, 61, device=DEVICE).abs() + 0.1  # never 0, so zeros mark dropped elements
    b = torch.randn(61, device=DEVICE)
    r = torch.randn(6, 37, 61, device=DEVICE)
    fused = fuse_elementwise(lambda x, b, r: r + dropout(x + b.abs(), p, shared_dims=(0,)))
    out = fused(x, b, r, seed=99, offset=5)
    ref = fused.reference(x, b, r, seed=99, offset=5)
    assert torch.equal(out, ref)  # same mask and same float32 arithmetic: bit-identical
    dropped = (out - r) == 0
    keep = dropout_mask_reference(99, 5, (1, 37, 61), p)
    assert torch.equal(~dropped, keep.expand(6, 37, 61))
    assert (dropped == dropped[:1]).all()  # one mask for every row
    assert abs(keep.float().mean().item() - (1 - p)) < 0.04
    assert fused.random_numel(x, b, r) == 37 * 61
    # A different offset or seed gives a different mask.
    assert not torch.equal(fused(x, b, r, seed=99, offset=5 + 37 * 61), out)
    assert not torch.equal(fused(x, b, r, seed=100, offset=5), out)


def test_dropout_column_shared_and_two_dropouts():
    torch.manual_seed(1)
    x = torch.randn(8, 37, 12, device=DEVICE).abs() + 0.1
    y = torch.randn(8, 37, 12, device=DEVICE).abs() + 0.1
    fused = fuse_elementwise(lambda x, y: dropout(x, 0.5, shared_dims=(-2,)) + 10.0 * F.dropout(y, 0.1))
    out = fused(x, y, seed=5, offset=0)
    assert torch.equal(out, fused.reference(x, y, seed=5, offset=0))
    keep_x = dropout_mask_reference(5, 0, (8, 1, 12), 0.5)
    keep_y = dropout_mask_reference(5, 8 * 12, (8, 37, 12), 0.1)  # the second mask follows the first
    expect = torch.where(keep_x, x * 2.0, 0.0) + 10.0 * torch.where(keep_y, y / 0.9, 0.0)
    assert _rel(out, expect) < 1e-6
    assert fused.random_numel(x, y) == 8 * 12 + 8 * 37 * 12


def test_eager_dropout_matches_fused_and_eval_is_identity():
    x = torch.randn(4, 37, 8, device=DEVICE)
    eager = dropout(x, 0.3, shared_dims=(1,), seed=7, offset=3)
    fused = fuse_elementwise(lambda x: dropout(x, 0.3, shared_dims=(1,)))
    assert torch.equal(fused(x, seed=7, offset=3), eager)
    assert dropout(x, 0.3, training=False) is x
    ident = fuse_elementwise(lambda x: F.dropout(x, 0.3, training=False) * 2.0)
    assert torch.equal(ident(x), x * 2.0)


def test_graph_module_with_modules_and_multiple_outputs():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.2)
            self.act = torch.nn.SiLU()

        def forward(self, x, b):
            h = self.act(x + b)
            return self.drop(h), h * 2.0

    torch.manual_seed(2)
    gm = torch.fx.symbolic_trace(Block())
    fused = fuse_elementwise(gm)
    x = torch.randn(37, 20, device=DEVICE, requires_grad=True)
    b = torch.randn(20, device=DEVICE, requires_grad=True)
    o1, o2 = fused(x, b, seed=3)
    r1, r2 = fused.reference(x, b, seed=3)
    assert _rel(o1, r1) < 1e-6 and _rel(o2, r2) < 1e-6
    (o1.sum() + (o2 * o2).sum()).backward()  # .sum() gives a stride-0 upstream gradient
    gx, gb = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    (r1.sum() + (r2 * r2).sum()).backward()
    assert _rel(gx, x.grad) < 1e-5 and _rel(gb, b.grad) < 1e-5
    gm.eval()
    assert _rel(fuse_elementwise(gm)(x, b)[0], F.silu(x + b)) < 1e-6  # eval: dropout is the identity


def test_non_contiguous_inputs_and_unused_grad():
    torch.manual_seed(3)
    base = torch.randn(61, 37, device=DEVICE)
    x = base.t().requires_grad_()  # [37, 61], strides (1, 37): leaf, non-contiguous
    g = torch.randn(37, 61, device=DEVICE)[:, ::1]
    col = torch.randn(37, 1, device=DEVICE, requires_grad=True)
    fused = fuse_elementwise(lambda x, g, c: torch.sigmoid(g) * x + c)
    with _dispatch.record_launches() as launched:
        out = fused(x, g, col)
        out.backward(torch.ones_like(out))
    assert launched == ["fused_elementwise_fwd", "fused_elementwise_bwd"]
    assert _rel(out, torch.sigmoid(g) * base.t() + col) < 1e-6
    assert _rel(x.grad, torch.sigmoid(g)) < 1e-6
    assert _rel(col.grad, torch.full((37, 1), 61.0)) < 1e-6


def test_broadcast_collapses_dims_and_cache_reuses_kernels():
    fused = fuse_elementwise(lambda x, b: x + b)
    x = torch.randn(3, 5, 16, device=DEVICE)
    src = fused.source_for(x, torch.randn(16, device=DEVICE))
    assert "collapsed to [15, 16]" in src  # [3, 5] merged: both walk them contiguously
    assert "//" in src and "in1_s1" in src  # the bias is indexed, never expanded
    fused(x, torch.randn(16, device=DEVICE))
    n_plans = len(fused._plans)
    fused(torch.randn(7, 9, 16, device=DEVICE), torch.randn(16, device=DEVICE))  # same pattern, new sizes
    assert len(fused._plans) == n_plans
    src_same = fused.source_for(x, torch.randn(3, 5, 16, device=DEVICE), grad=False)
    assert "collapsed to [240]" in src_same and "//" not in src_same  # same shapes: one flat loop


def test_unsupported_op_names_node_and_op():
    with pytest.raises(UnsupportedElementwiseOp, match=r"matmul.*not a supported element-wise op"):
        fuse_elementwise(lambda x: torch.sigmoid(torch.matmul(x, x)))
    with pytest.raises(UnsupportedElementwiseOp, match="softmax"):
        fuse_elementwise(lambda x: x.softmax(-1) * 2)
    with pytest.raises(UnsupportedElementwiseOp, match="rounding_mode"):
        fuse_elementwise(lambda x: torch.div(x, 2, rounding_mode="floor"))
    gm = torch.fx.symbolic_trace(lambda x, y: torch.sigmoid(x) @ y)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert unsupported_reason(nodes["sigmoid"]) is None
    reason = unsupported_reason(nodes["matmul"])
    assert reason is not None and "'matmul'" in reason


def test_bad_inputs_name_the_problem():
    fused = fuse_elementwise(lambda x, b: x + b)
    with pytest.raises(ValueError, match=r"do not broadcast.*x \[4, 5\].*b \[3\]"):
        fused(torch.randn(4, 5, device=DEVICE), torch.randn(3, device=DEVICE))
    with pytest.raises(TypeError, match="input 'b' has dtype torch.int64"):
        fused(torch.randn(4, 5, device=DEVICE), torch.ones(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="takes 2 inputs"):
        fused(torch.randn(4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="seed"):
        fused(torch.randn(4, 5, device=DEVICE), 1.0, seed=-1)


def test_float64_runs_reference_and_gradchecks():
    fused = fuse_elementwise(lambda x, b, m: torch.sigmoid(x + b) * F.silu(x) * m)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, 1, dtype=torch.float64) > 0.3
    with _dispatch.record_launches() as launched:
        assert torch.autograd.gradcheck(lambda x, b: fused(x, b, m), (x, b))
    assert launched == []


def test_fused_elementwise_is_public_type():
    fused = fuse_elementwise(lambda x: x * 2.0, example_inputs=[torch.randn(37, device=DEVICE)])
    assert isinstance(fused, FusedElementwise)
    assert "def fused_elementwise_fwd" in fused.source and "def fused_elementwise_bwd" in fused.source
    assert fused.input_names == ["x"]


def test_gradient_only_through_comparison_is_zero_and_bool_outputs():
    x = torch.randn(37, 5, device=DEVICE, requires_grad=True)
    y = torch.randn(37, 5, device=DEVICE, requires_grad=True)
    fused = fuse_elementwise(lambda x, y: (x * (y > 0), (x > 0.5) & (y < 0)))
    out, flags = fused(x, y)
    assert flags.dtype == torch.bool and torch.equal(flags, (x > 0.5) & (y < 0))
    assert not flags.requires_grad
    gx, gy = torch.autograd.grad(out, (x, y), torch.ones_like(out))
    assert torch.equal(gx, (y > 0).float()) and torch.equal(gy, torch.zeros_like(y))


def test_dtype_promotion_and_empty_and_cast():
    x16 = torch.randn(37, 8, device=DEVICE, dtype=torch.float16, requires_grad=True)
    b32 = torch.randn(8, device=DEVICE, requires_grad=True)
    fused = fuse_elementwise(lambda x, b: torch.relu(x + b))
    out = fused(x16, b32)
    assert out.dtype == torch.float32  # PyTorch's promotion: fp16 + fp32 -> fp32
    assert _rel(out, torch.relu(x16.double() + b32.double())) < 1e-6
    gx, gb = torch.autograd.grad(out, (x16, b32), torch.ones_like(out))
    assert gx.dtype == torch.float16 and gb.dtype == torch.float32
    assert _rel(gb, (x16.double() + b32.double() > 0).double().sum(0)) < 1e-6
    cast = fuse_elementwise(lambda x: (x * 3.0).half())
    assert cast(torch.randn(5, 7, device=DEVICE)).dtype == torch.float16
    empty = fused(torch.randn(0, 8, device=DEVICE), torch.randn(8, device=DEVICE))
    assert empty.shape == (0, 8)


def test_huge_index_space_generates_int64_indexing():
    fused = fuse_elementwise(lambda x, b: x * b)
    x = torch.randn(1, device=DEVICE).expand(1 << 31)  # no memory: stride 0; source only, never launched
    src = fused.source_for(x, torch.randn(1, device=DEVICE), grad=False)
    assert "pid.to(tl.int64)" in src
    assert "pid.to(tl.int64)" not in fused.source_for(torch.randn(37, device=DEVICE), 2.0, grad=False)


def test_broadcast_gradients_tile_reduction_and_fallback():
    torch.manual_seed(4)
    x = torch.randn(5, 37, 61, device=DEVICE, requires_grad=True)
    bias = torch.randn(61, device=DEVICE, requires_grad=True)  # broadcast over rows: summed in-kernel
    mid = torch.randn(5, 1, 61, device=DEVICE, requires_grad=True)  # broadcast in the middle: full buffer
    fused = fuse_elementwise(lambda x, b: torch.sigmoid(x + b))
    out = fused(x, bias)
    gx, gb = torch.autograd.grad(out, (x, bias), torch.ones_like(out))
    assert "tiles: rows = dims [0]" in fused.source and "tl.sum(" in fused.source
    s = torch.sigmoid(x.double() + bias.double())
    assert _rel(gb, (s * (1 - s)).sum((0, 1))) < 1e-6 and _rel(gx, s * (1 - s)) < 1e-6
    fused2 = fuse_elementwise(lambda x, c: x * c)
    out2 = fused2(x, mid)
    gx2, gm2 = torch.autograd.grad(out2, (x, mid), torch.ones_like(out2))
    assert "tiles" not in fused2.source
    assert _rel(gm2, x.detach().double().sum(1, keepdim=True)) < 1e-6 and _rel(gx2, mid.expand_as(x)) < 1e-6


def test_alpha_inplace_and_module_errors():
    x = torch.randn(37, 6, device=DEVICE, requires_grad=True)
    y = torch.randn(37, 6, device=DEVICE, requires_grad=True)
    fused = fuse_elementwise(lambda x, y: torch.sub(x, y, alpha=0.5) + F.relu(x, inplace=False))
    out = fused(x, y)
    assert _rel(out, x - 0.5 * y + torch.relu(x)) < 1e-6
    gy, = torch.autograd.grad(out.sum(), (y,))
    assert torch.equal(gy, torch.full_like(y, -0.5))
    with pytest.raises(UnsupportedElementwiseOp, match="inplace=True"):
        fuse_elementwise(lambda x: F.relu(x, inplace=True))
    with pytest.raises(UnsupportedElementwiseOp, match=r"call_module lin"):
        fuse_elementwise(torch.fx.symbolic_trace(torch.nn.Sequential(OrderedDict(lin=torch.nn.Linear(4, 4)))))
