"""Regression tests for issue 7 (kernel half) and issue 8's ``Tensor.to`` refusal: each failed
on the code before its fix.

CPU tensors run the Triton kernels through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU); dtypes fp32 / fp16 only (bf16 is wrong in the interpreter).
The property tests in test_properties_*.py sweep the same classes of inputs; these pin the
cases that were broken.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from foldcompile.kernels import _dispatch
from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.attention import attention, attention_reference
from foldcompile.kernels.elementwise import (UnsupportedElementwiseOp, dropout, dropout_mask_reference, fuse_elementwise,
                                             unsupported_reason)
from foldcompile.kernels.layer_norm import layer_norm
from foldcompile.kernels.softmax import softmax

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = float("nan"), float("inf")
pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() or _dispatch.interpreting()),
                                 reason="needs a GPU or TRITON_INTERPRET=1"),
              # masked-off tail lanes compute exp(inf) and the like in the interpreter (never stored)
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _same_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b))


# --------------------------------------------------------------------------- 3. softmax hides NaN


@pytest.mark.parametrize("where", ["x", "bias", "posinf"])
def test_softmax_nan_or_inf_gives_nan_row_like_torch(where):
    torch.manual_seed(0)
    x = torch.randn(4, 37, device=DEV)
    bias = torch.randn(37, device=DEV)
    if where == "x":
        x[1, 5] = NAN
    elif where == "bias":
        bias[7] = NAN  # every row carries it
    else:
        x[2, 3] = INF  # inf - inf = NaN in torch.softmax: the whole row is NaN
    xg = x.clone().requires_grad_()
    with record_launches() as launched:
        y = softmax(xg, bias=bias)
        y.backward(torch.ones_like(y))
    assert launched == ["softmax_fwd", "softmax_bwd"]
    xe = x.double().requires_grad_()
    ye = torch.softmax(xe + bias.double(), -1)
    ye.backward(torch.ones_like(ye))
    assert _same_nan(y, ye) and torch.isnan(y).any()
    assert _same_nan(xg.grad, xe.grad)
    ok = ~torch.isnan(ye)
    torch.testing.assert_close(y[ok].double(), ye[ok], rtol=1e-5, atol=1e-7)


def test_softmax_masked_nan_is_left_out_and_fully_masked_row_is_zero():
    torch.manual_seed(1)
    x = torch.randn(3, 37, device=DEV)
    mask = torch.rand(3, 37, device=DEV) > 0.3
    mask[0, 4] = False
    x[0, 4] = NAN  # masked out: does not reach the row
    mask[2] = False  # nothing kept: 0, not NaN
    x[2, 0] = NAN
    xg = x.clone().requires_grad_()
    y = softmax(xg, mask=mask)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(xg.grad).all()
    assert torch.equal(y[2], torch.zeros_like(y[2])) and torch.equal(xg.grad[2], torch.zeros_like(xg.grad[2]))
    expect = torch.softmax(x[:2].double().masked_fill(~mask[:2], -INF), -1)
    torch.testing.assert_close(y[:2].double(), expect, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- 8. 0-d bias backward


def test_softmax_zero_dim_bias_and_mask_backward():
    torch.manual_seed(2)
    x = torch.randn(3, 5, device=DEV, requires_grad=True)
    bias = torch.tensor(0.5, device=DEV, requires_grad=True)
    g = torch.randn(3, 5, device=DEV)
    with record_launches() as launched:
        y = softmax(x, bias=bias, mask=torch.tensor(True, device=DEV))
        y.backward(g)
    assert launched == ["softmax_fwd", "softmax_bwd"]
    xe = x.detach().double().requires_grad_()
    be = bias.detach().double().requires_grad_()
    ye = torch.softmax(xe + be, -1)
    ye.backward(g.double())
    assert bias.grad.shape == () and abs(bias.grad.item()) < 1e-6  # a constant shift: gradient 0
    torch.testing.assert_close(y.double(), ye, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), xe.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- 9. clear argument errors


def test_softmax_dim_of_wrong_type_is_a_type_error():
    x = torch.randn(3, 4, device=DEV)
    with pytest.raises(TypeError, match="softmax: dim must be a Python int, got Tensor"):
        softmax(x, torch.tensor(1))
    with pytest.raises(TypeError, match="dim must be a Python int, got bool"):
        softmax(x, True)


@pytest.mark.parametrize("arg", ["bias", "mask", "gate"])
@pytest.mark.parametrize("value", [[1.0], 0.5, "x"])
def test_attention_non_tensor_operands_name_the_argument(arg, value):
    q = torch.randn(2, 5, 8, device=DEV)
    with pytest.raises(TypeError, match=f"attention: {arg} must be a tensor or None, got {type(value).__name__}"):
        attention(q, q, q, **{arg: value})


@pytest.mark.parametrize("fn", [attention, attention_reference])
@pytest.mark.parametrize("scale", ["0.5", [0.5], True, torch.tensor(0.5)])
def test_attention_bad_scale_names_scale(fn, scale):
    q = torch.randn(2, 5, 8, device=DEV)
    with pytest.raises(TypeError, match="attention: scale must be a Python number or None"):
        fn(q, q, q, scale=scale)


@pytest.mark.parametrize("eps", [None, "1e-5", True])
def test_layer_norm_bad_eps_names_eps(eps):
    with pytest.raises(TypeError, match="layer_norm: eps must be a Python number"):
        layer_norm(torch.randn(3, 8, device=DEV), None, None, eps)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        layer_norm(torch.randn(3, 8, device=DEV), None, None, float("nan"))


def test_fused_inputs_on_two_devices_name_the_inputs():
    fused = fuse_elementwise(lambda a, b: a * b + 1.0)
    with pytest.raises(ValueError, match=r"share one device.*'a' on cpu, 'b' on meta"):
        fused(torch.randn(4, 3), torch.randn(4, 3, device="meta"))
    # A 0-dim CPU tensor may join another device, as in eager PyTorch (it is moved there).
    out = fused(torch.randn(4, 3, device="meta"), torch.tensor(2.0))
    assert out.device.type == "meta" and out.shape == (4, 3)


# --------------------------------------------------------------------------- 4. element-wise special values


@pytest.mark.parametrize("spelling", ["torch.relu", "F.relu", "nn.ReLU"])
def test_fused_relu_keeps_nan_and_its_gradient(spelling):
    if spelling == "nn.ReLU":
        fused = fuse_elementwise(torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU())))
    else:
        fn = {"torch.relu": lambda a: torch.relu(a), "F.relu": lambda a: F.relu(a)}[spelling]
        fused = fuse_elementwise(fn)
    x = torch.tensor([NAN, -1.0, 0.0, 2.0, -INF, INF], device=DEV, requires_grad=True)
    with record_launches() as launched:
        y = fused(x)
        y.backward(torch.ones_like(y))
    assert launched == ["fused_elementwise_fwd", "fused_elementwise_bwd"]
    xe = x.detach().clone().requires_grad_()
    ye = torch.relu(xe)
    ye.backward(torch.ones_like(ye))
    assert _same_nan(y, ye) and torch.isnan(y[0])
    assert torch.equal(y[1:], ye[1:])
    assert torch.equal(x.grad, xe.grad) and x.grad[0] == 1.0  # eager: g where the result is not <= 0


def test_fused_abs_gradient_propagates_nan_upstream_gradient():
    # eager: d|x| = g * sign(x), a product: a NaN g at x = 0 stays NaN (it was a select giving 0)
    fused = fuse_elementwise(lambda a: torch.abs(a))
    x = torch.tensor([0.0, 1.0, -2.0, NAN], device=DEV, requires_grad=True)
    g = torch.tensor([NAN, 1.0, INF, 1.0], device=DEV)
    fused(x).backward(g)
    xe = x.detach().clone().requires_grad_()
    torch.abs(xe).backward(g)
    assert _same_nan(x.grad, xe.grad) and torch.isnan(x.grad[0])
    ok = ~torch.isnan(xe.grad)
    assert torch.equal(x.grad[ok], xe.grad[ok])


def test_fused_div_gradient_does_not_overflow_where_eager_is_finite():
    # eager: d(a/b)/db = -g * ((a / b) / b); -(g * y) / b overflowed fp32 first.
    fused = fuse_elementwise(lambda a, b: a / b)
    a = torch.tensor([1e30, 3.0], device=DEV, requires_grad=True)
    b = torch.tensor([1e20, 2.0], device=DEV, requires_grad=True)
    g = torch.tensor([1e30, 1.0], device=DEV)
    fused(a, b).backward(g)
    be = b.detach().clone().requires_grad_()
    (a.detach() / be).backward(g)
    assert torch.isfinite(be.grad).all()
    torch.testing.assert_close(b.grad, be.grad, rtol=1e-6, atol=0)


def test_fused_tanh_relative_error_near_zero_and_far():
    fused = fuse_elementwise(lambda a: torch.tanh(a))
    tiny = torch.tensor([1e-8, -1e-8, 1e-20, -1e-20, 1e-30, 3e-4, -0.01, 0.3, -0.54, 0.56], device=DEV)
    x = torch.cat([tiny, torch.logspace(-38, 0.5, 300, device=DEV), -torch.logspace(-38, 0.5, 300, device=DEV)])
    y = fused(x)
    want = torch.tanh(x.double())
    rel = ((y.double() - want).abs() / want.abs()).max().item()
    assert rel < 4 * 2**-24, rel  # a few fp32 ulps (2 sigmoid(2x) - 1 gave tanh(1e-8) = 0: rel 1)
    big = torch.tensor([0.55, 1.0, -3.0, 9.0, 20.0, -1e4, INF, -INF, NAN], device=DEV)
    yb = fused(big)
    wb = torch.tanh(big.double())
    assert _same_nan(yb, wb)
    ok = ~torch.isnan(wb)
    assert ((yb.double()[ok] - wb[ok]).abs() / wb[ok].abs()).max() < 4 * 2**-24


def test_fused_gelu_tanh_accurate_for_negative_inputs():
    # 0.5 x (1 + tanh(z)) cancels where tanh(z) ~ -1 (eager's own float64 gelu gives exactly 0
    # at x = -9): the truth is the same function as x sigmoid(2z), evaluated in float64.
    fused = fuse_elementwise(lambda a: F.gelu(a, approximate="tanh"))
    x = torch.linspace(-9.0, -3.0, 61, device=DEV, requires_grad=True)
    y = fused(x)
    y.backward(torch.ones_like(y))
    xe = x.detach().double().requires_grad_()
    ye = xe * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xe + 0.044715 * xe ** 3))
    ye.backward(torch.ones_like(ye))
    assert (F.gelu(xe.detach(), approximate="tanh") == 0).any()  # what the cancellation does
    assert ((y.double() - ye).abs() / ye.abs()).max() < 1e-5
    assert ((x.grad.double() - xe.grad).abs() / xe.grad.abs()).max() < 1e-5


# --------------------------------------------------------------------------- 7. dropout at dropped NaN / inf


def test_fused_dropout_matches_eager_and_torch_on_nan_and_inf():
    x = torch.tensor([NAN, INF, -INF, 1.0, -2.0] * 8, device=DEV, requires_grad=True)
    fused_own = fuse_elementwise(lambda a: dropout(a, 0.5))
    fused_f = fuse_elementwise(lambda a: F.dropout(a, 0.5))
    y = fused_own(x, seed=3, offset=0)
    eager = dropout(x.detach(), 0.5, seed=3, offset=0)
    keep = dropout_mask_reference(3, 0, (40,), 0.5)
    finite = x.detach().isfinite()
    assert (~keep & ~finite).any() and (keep & ~finite).any()
    # a dropped NaN / ±inf is NaN (0 * inf), as in torch; a dropped finite value is 0
    assert torch.isnan(y[~keep & ~finite]).all() and torch.equal(y[~keep & finite], torch.zeros_like(y[~keep & finite]))
    assert _same_nan(y, eager)
    assert torch.equal(torch.nan_to_num(y, nan=7.0), torch.nan_to_num(eager, nan=7.0))
    assert _same_nan(fused_f(x, seed=3), fused_f.reference(x, seed=3))
    # torch's own dropout is x * mask / (1 - p): a non-finite input is never dropped to 0
    tf = F.dropout(x.detach(), 0.5)
    assert not (tf[~finite] == 0).any() and torch.isnan(tf[~finite]).any()
    # gradient: g * mask * scale, so a NaN upstream gradient at a dropped element stays NaN
    g = torch.full_like(y, NAN)
    y.backward(g)
    assert torch.isnan(x.grad).all()


# --------------------------------------------------------------------------- numerics: fp16 attention dS


def test_attention_fp16_backward_large_dout_stays_finite():
    """|dS| past fp16's 65504 (large |dout| * |v|, as under loss scaling): the fp32 reference's
    gradients are finite, and so must the kernel's be (dS rounded to fp16 gave inf, then NaN)."""
    torch.manual_seed(3)
    B, H, L, D = 2, 2, 37, 32
    q = (torch.randn(B, H, L, D) * 0.05).to(DEV, torch.float16).requires_grad_()
    k = (torch.randn(B, H, L, D) * 0.05).to(DEV, torch.float16).requires_grad_()
    v = (torch.randn(B, H, L, D) * 30).to(DEV, torch.float16).requires_grad_()
    bias = torch.zeros(1, H, L, L, device=DEV)
    bias[..., :2] = 8.0  # two keys share most of every row: dS = 0.25 (dP_1 - dP_2) is large
    dout = (torch.randn(B, H, L, D) * 4096).to(DEV, torch.float16)
    with record_launches() as launched:
        out = attention(q, k, v, bias=bias)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert "attention_bwd_dq" in launched and "attention_bwd_dkdv" in launched
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, bias=bias)
    ref_grads = torch.autograd.grad(ref, leaves, dout.float())
    # The test reaches the overflow: |dS| exceeds fp16's range somewhere.
    with torch.no_grad():
        s = (leaves[0] @ leaves[1].transpose(-1, -2)) / math.sqrt(D) + bias
        p = torch.softmax(s, -1)
        dp = dout.float() @ leaves[2].transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    assert ds.abs().max() > 65504
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(rg).all() and torch.isfinite(rg.half()).all(), name
        assert torch.isfinite(g).all(), name
        rel = ((g.double() - rg.double()).norm() / rg.double().norm()).item()
        assert rel < 4e-3, (name, rel)


# --------------------------------------------------------------------------- issue 8: Tensor.to casts


def _evoformer_elementwise():
    from foldcompile.capture import trace
    from foldcompile.explain import explain_graph
    from foldcompile.models import zoo

    block, ex = zoo.get("evoformer_block")
    gm = explain_graph(trace(block, *ex), ex).graph_module
    return gm, [n for n in gm.graph.nodes if n.meta.get("op_class") == "ELEMENTWISE"]


def test_normalized_evoformer_elementwise_nodes_all_accepted():
    gm, nodes = _evoformer_elementwise()
    casts = [n for n in nodes if n.target is torch.Tensor.to]
    assert len(nodes) == 67 and len(casts) == 9  # the counts issue 8 names
    refused = {n.name: unsupported_reason(n, gm) for n in nodes if unsupported_reason(n, gm) is not None}
    assert refused == {}


def test_tensor_to_as_normalize_spells_it_is_fused():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    m = g.placeholder("m")
    h = g.call_function(torch.Tensor.to, (x,), {"dtype": torch.float16})
    mf = g.call_function(torch.Tensor.to, (m, torch.float32), {"non_blocking": True, "copy": True})
    g.output(g.call_function(torch.mul, (h, mf)))
    fused = fuse_elementwise(torch.fx.GraphModule(torch.nn.Module(), g))
    xs = torch.randn(5, 37, device=DEV) * 1.001
    ms = torch.rand(5, 1, device=DEV) > 0.5
    with record_launches() as launched:
        out = fused(xs, ms)
    assert launched == ["fused_elementwise_fwd"]
    want = xs.to(dtype=torch.float16) * ms.to(torch.float32, non_blocking=True, copy=True)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("args,kwargs,match", [
    (("cpu",), {}, "moves data to a device"),
    ((), {"device": "cpu", "dtype": torch.float16}, "moves data between devices"),
    ((torch.device("cpu"), torch.float16), {}, "moves data to a device"),
    ((), {"dtype": torch.float16, "memory_format": torch.channels_last}, "memory_format"),
    ((), {"copy": True}, "without a dtype"),
    ((torch.int32,), {}, "not a float or bool dtype"),
    ((torch.float16,), {"non_blocking": "yes"}, "non_blocking must be a bool"),
])
def test_tensor_to_that_is_not_a_dtype_cast_is_refused(args, kwargs, match):
    g = torch.fx.Graph()
    x = g.placeholder("x")
    node = g.call_function(torch.Tensor.to, (x, *args), kwargs)
    g.output(node)
    reason = unsupported_reason(node)
    assert reason is not None and match in reason, reason
    with pytest.raises(UnsupportedElementwiseOp, match=match):
        fuse_elementwise(torch.fx.GraphModule(torch.nn.Module(), g))


def test_tensor_to_other_tensor_is_refused():
    gm = torch.fx.symbolic_trace(lambda x, y: x.to(y) * 2.0)
    node = next(n for n in gm.graph.nodes if n.target == "to")
    assert "to(other)" in unsupported_reason(node, gm)


def test_softmax_nan_row_gradient_is_zero_at_masked_entries():
    """masked_fill(~mask, -inf) leaves masked entries out of the gradient even in a NaN row:
    torch gives NaN at every entry of the row in forward but exactly 0 gradient where masked."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 37, device=DEV)
    bias = torch.randn(3, 37, device=DEV)
    bias[1, 9] = NAN  # row 1 of every batch is NaN
    mask = torch.rand(2, 1, 37, device=DEV) > 0.3
    mask[:, :, 9] = True
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    g = torch.randn(2, 3, 37, device=DEV)
    y = softmax(xg, bias=bg, mask=mask)
    y.backward(g)
    xe, be = x.double().requires_grad_(), bias.double().requires_grad_()
    ye = torch.softmax((xe + be).masked_fill(~mask, -INF), -1)
    ye.backward(g.double())
    assert _same_nan(y, ye) and torch.isnan(y[:, 1]).all()
    assert _same_nan(xg.grad, xe.grad) and _same_nan(bg.grad, be.grad)
    masked = (~mask).expand(2, 3, 37)
    assert torch.equal(xg.grad[masked], torch.zeros_like(xg.grad[masked])) and masked[:, 1].any()


def test_attention_nan_row_leaves_masked_keys_out_of_dk_and_dbias():
    """A NaN bias entry makes its query row NaN; a key masked out of that row gets no gradient
    from it (masked_fill's backward is 0 there), so its dk stays finite, as in eager."""
    torch.manual_seed(5)
    B, H, L, D = 1, 1, 19, 8
    q, k, v = (torch.randn(B, H, L, D, device=DEV) for _ in range(3))
    bias = torch.randn(1, H, L, L, device=DEV)
    bias[0, 0, 3, 4] = NAN  # query row 3 is NaN
    mask = torch.ones(B, 1, L, L, dtype=torch.bool, device=DEV)
    mask[0, 0, 3, 11] = False  # key 11 is masked out of that row only
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = attention(*leaves[:3], bias=leaves[3], mask=mask)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    e = [t.double().requires_grad_() for t in (q, k, v, bias)]
    s = (e[0] @ e[1].transpose(-1, -2)) * D ** -0.5 + e[3]
    oe = torch.softmax(s.masked_fill(~mask, -INF), -1) @ e[2]
    egrads = torch.autograd.grad(oe, e, g.double())
    assert _same_nan(out, oe) and torch.isnan(out[0, 0, 3]).all()
    for name, got, want in zip(("q", "k", "v", "bias"), grads, egrads):
        assert _same_nan(got, want), name
    assert torch.isfinite(grads[1][0, 0, 11]).all() and grads[3][0, 0, 3, 11] == 0


# --------------------------------------------------------------------------- found by the property tests


def test_fused_bool_times_zero_dim_half_promotes_like_eager():
    # eager: bool [3] * fp16 0-dim is fp16; the generator made the bool fp32 first and gave fp32
    fused = fuse_elementwise(lambda a, b: a.to(torch.bool) * b)
    a = torch.tensor([0.0, 2.0, -1.0], device=DEV, dtype=torch.float16)
    b = torch.tensor(-0.5869, device=DEV, dtype=torch.float16)
    out = fused(a, b)
    want = a.to(torch.bool) * b
    assert out.dtype == want.dtype == torch.float16 and torch.equal(out, want)
    with pytest.raises(ValueError, match="eager PyTorch computes it in torch.bool"):  # bool * bool is bool
        fuse_elementwise(lambda m, n: m * n)(a > 0, a < 1)


def test_fused_half_cast_rounds_its_gradient_like_eager():
    # eager holds the gradient of a.half() in fp16 (the cast's backward rounds it)
    fused = fuse_elementwise(lambda a, b: a.half().float() * b)
    a = torch.randn(37, device=DEV, requires_grad=True)
    b = torch.randn(37, device=DEV) * 1.001
    fused(a, b).backward(torch.ones(37, device=DEV))
    ae = a.detach().clone().requires_grad_()
    (ae.half().float() * b).backward(torch.ones(37, device=DEV))
    assert not torch.equal(ae.grad, b)  # the rounding is visible
    torch.testing.assert_close(a.grad, ae.grad, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's tl.max skips NaN; CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_nan_in_a_long_row_cuda(dtype):
    # The H200 report: a NaN in a row of 4096 gave finite values summing to 157.
    x = torch.randn(8, 4096, device="cuda", dtype=dtype)
    x[3, 100] = NAN
    y = softmax(x)
    assert torch.isnan(y[3]).all()
    others = torch.cat([y[:3], y[4:]]).float()
    assert torch.isfinite(others).all() and torch.allclose(others.sum(-1), torch.ones(7, device="cuda"), atol=1e-2)


def test_attention_row_dead_by_minus_inf_bias_passes_no_gradient_from_nan_v():
    """A row whose logits are all -inf (by the bias, no boolean mask) is fully masked: output
    0 @ v and no gradient, even when v holds NaN (found by the slow property sweep)."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 1, 3, 8, device=DEV) for _ in range(3))
    v[0, 0, 1, 2] = NAN
    bias = torch.zeros(1, 1, 3, 3, device=DEV)
    bias[0, 0, 0] = -INF  # query row 0 sees nothing
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = attention(*leaves[:3], bias=leaves[3])
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    assert torch.isnan(out[..., 2]).all()  # 0 * NaN through p @ v, as eager's matmul gives
    assert torch.equal(grads[0][0, 0, 0], torch.zeros(8, device=DEV))  # dq of the dead row
    assert torch.equal(grads[3][0, 0, 0], torch.zeros(3, device=DEV))  # its dbias
