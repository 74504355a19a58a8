"""Layer norm -> several projections as one kernel (kernels/ln_linear.py) against float64 and the plain reference.

Interpreter-sized shapes that are not block multiples (rows 37·3, 61, channels 24 / 40 / 100, projection
widths 7 / 16 / 40 / 53 across the 16-wide column tiles), with and without the layer norm's affine
parameters and the projections' biases, strided inputs (read in place or copied), ``W.T`` weights, every
gradient, partial gradients, the normalised value returned as well, outputs poisoned with NaN before the
kernels write them, the library op under AOTAutograd, and the zoo's own trunk modules.
"""
import importlib

import pytest
import torch

from foldcompile.kernels._dispatch import record_launches
from foldcompile.models.alphafold2.attention import MSARowAttentionWithPairBias, TriangleAttention
from foldcompile.models.zoo import randomize_parameters

L = importlib.import_module("foldcompile.kernels.ln_linear")
layer_norm_linear, layer_norm_linear_reference = L.layer_norm_linear, L.layer_norm_linear_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(lead, K, widths, dtype, *, affine=(True, True), bias=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g) * 1.5 + 0.3  # a mean and a scale to remove
    lnw = 1 + 0.5 * torch.randn(K, generator=g) if affine[0] else None
    lnb = 0.5 * torch.randn(K, generator=g) if affine[1] else None
    ws = [torch.randn(n, K, generator=g) / K ** 0.5 for n in widths]
    bias = bias if bias is not None else [p % 2 == 1 for p in range(len(widths))]
    bs = [torch.randn(n, generator=g) if b else None for n, b in zip(widths, bias)]
    to = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return to(x), to(lnw), to(lnb), [to(w) for w in ws], [to(b) for b in bs]


def _run(fn, x, lnw, lnb, ws, bs, douts, **kw):
    """Outputs and the gradients of every tensor input (in the order x, lnw, lnb, *ws, *bs; None skipped)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, lnw, lnb, *ws, *bs)]
    n = len(ws)
    outs = fn(leaves[0], leaves[1], leaves[2], leaves[3:3 + n], leaves[3 + n:], **kw)
    grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], douts)
    return list(outs), list(grads)


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _douts(lead, widths, K, dtype, normalized=False):
    g = torch.Generator().manual_seed(1)
    shapes = [(*lead, n) for n in widths] + ([(*lead, K)] if normalized else [])
    return [torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in shapes]


def _poisoned(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel does not write shows."""
    monkeypatch.setattr(L, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device))


def _check_against_float64(got, ref, exact, dtype):
    for i, (x, r, e) in enumerate(zip(got, ref, exact)):
        assert x.dtype == r.dtype and x.shape == r.shape and not torch.isnan(x).any(), i
        err, err_ref = _rel(x, e), _rel(r, e)
        if dtype == torch.float32:
            assert err < 1e-5, f"{i}: {err:.3g}"
        else:  # fp16 y and products as eager's; the kernel's dy is fp32 where eager sums fp16 gradients
            assert err < 3e-3 and err < 4 * err_ref + 1e-4, f"{i}: {err:.3g} (reference {err_ref:.3g})"


CASES = [  # lead, K, widths, dtype, options
    ((3, 37), 24, (16, 40, 7), torch.float32, dict()),
    ((61,), 40, (53,), torch.float32, dict(affine=(False, False), bias=[True])),
    ((2, 5, 7), 100, (16, 16, 16, 16, 4), torch.float32, dict(normalized=True)),  # a trunk attention's 5
    ((3, 37), 24, (16, 40, 7), torch.float16, dict(affine=(True, False))),
    ((29,), 64, (24, 8), torch.float16, dict(normalized=True, bias=[True, True])),
]


@pytest.mark.parametrize("lead, K, widths, dtype, opts", CASES)
def test_kernel_matches_float64_and_the_reference_forward_and_backward(lead, K, widths, dtype, opts, monkeypatch):
    _poisoned(monkeypatch)
    normalized = opts.get("normalized", False)
    x, lnw, lnb, ws, bs = _inputs(lead, K, widths, dtype, affine=opts.get("affine", (True, True)),
                                  bias=opts.get("bias"))
    douts = _douts(lead, widths, K, dtype, normalized)
    kw = dict(eps=1e-5, return_normalized=normalized)
    with record_launches() as launched:
        got = _run(layer_norm_linear, x, lnw, lnb, ws, bs, douts, **kw)
    assert launched == ["ln_linear_fwd", "ln_linear_bwd"]
    ref = _run(layer_norm_linear_reference, x, lnw, lnb, ws, bs, douts, **kw)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    exact = _run(layer_norm_linear_reference, up(x), up(lnw), up(lnb), [up(w) for w in ws], [up(b) for b in bs],
                 [d.double() for d in douts], **kw)
    _check_against_float64(got[0] + got[1], ref[0] + ref[1], exact[0] + exact[1], dtype)


@pytest.mark.parametrize("layout", ["transposed", "sliced_rows", "copied", "weight_t"])
def test_strided_inputs_and_transposed_weights(layout, monkeypatch):
    """x as the MSA column attention's ``m.transpose(-2, -3)`` with a batch dim (three strided row dims: read
    in place), every other row, a layout that needs a copy, and weights given as ``W.T`` views of [K, N]
    tensors."""
    _poisoned(monkeypatch)
    K, widths = 24, (16, 7)
    x, lnw, lnb, ws, bs = _inputs((6, 5, 3), K, widths, torch.float32)
    if layout == "transposed":
        x = x.transpose(0, 1)  # [5, 6, 3, K]: three strided row dims
        assert L._rows_of(x)[0] is x
    elif layout == "sliced_rows":
        x = x[::2, :, ::2]  # [3, 5, 2, K], every other row of dims 0 and 2
        assert L._rows_of(x)[0] is x
    elif layout == "copied":
        x = x.reshape(2, 3, 5, 3, K).permute(3, 2, 1, 0, 4)  # four row dims that do not collapse: copied once
        assert L._rows_of(x)[0] is not x
    else:
        ws = [torch.randn(K, n, device=DEVICE).t() for n in widths]  # [N, K] with strides (1, N)
    lead = tuple(x.shape[:-1])
    douts = _douts(lead, widths, K, torch.float32)
    got = _run(layer_norm_linear, x, lnw, lnb, ws, bs, douts)
    exact = _run(layer_norm_linear_reference, x.double(), lnw.double(), lnb.double(), [w.double() for w in ws],
                 [b.double() if b is not None else None for b in bs], [d.double() for d in douts])
    for a, e in zip(got[0] + got[1], exact[0] + exact[1]):
        assert a.shape == e.shape and _rel(a, e) < 1e-5


def test_gradients_of_some_outputs_and_some_inputs_only():
    """A loss that reads one projection only (the others get no gradient: None in the backward), and inputs
    of which only the weights need a gradient: only what is needed is computed, and it is right."""
    x, lnw, lnb, ws, bs = _inputs((4, 9), 24, (16, 40, 7), torch.float32)
    params = [w.clone().requires_grad_() for w in ws]
    outs = layer_norm_linear(x, lnw, lnb, params, bs)
    ref = layer_norm_linear_reference(x.double(), lnw.double(), lnb.double(), [p.double() for p in params],
                                      [b.double() if b is not None else None for b in bs])
    got = torch.autograd.grad(outs[1].square().sum(), params, allow_unused=True)
    want = torch.autograd.grad(ref[1].square().sum(), params, allow_unused=True)
    assert got[0] is None and got[2] is None and want[0] is None
    assert _rel(got[1], want[1]) < 1e-5
    xg = x.clone().requires_grad_()
    with record_launches() as launched:
        (gx,) = torch.autograd.grad(layer_norm_linear(xg, lnw, lnb, ws, bs)[2].sum(), xg)
    assert launched == ["ln_linear_fwd", "ln_linear_bwd"]
    x64 = x.double().requires_grad_()
    (wx,) = torch.autograd.grad(layer_norm_linear_reference(x64, lnw.double(), lnb.double(), [w.double() for w in ws],
                                                            [b.double() if b is not None else None for b in bs])[2].sum(),
                                x64)
    assert _rel(gx, wx) < 1e-5


def test_what_runs_the_reference():
    """float64, rows longer than the kernel holds, more projections than it unrolls, no rows: the plain
    reference, no Triton launch, the same function."""
    x, lnw, lnb, ws, bs = _inputs((5,), 24, (8, 8), torch.float64)
    long_x = torch.randn(3, L.MAX_TRITON_DIM + 1, device=DEVICE)
    many = [torch.randn(4, 24, device=DEVICE) for _ in range(L.MAX_PROJECTIONS + 1)]
    with record_launches() as launched:
        layer_norm_linear(x, lnw, lnb, ws, bs)
        layer_norm_linear(long_x, None, None, [torch.randn(4, L.MAX_TRITON_DIM + 1, device=DEVICE)])
        out = layer_norm_linear(x.float(), None, None, many)
        empty = layer_norm_linear(torch.randn(0, 24, device=DEVICE), None, None, many[:2])
    assert launched == []
    assert len(out) == L.MAX_PROJECTIONS + 1 and empty[0].shape == (0, 4)


def test_bad_arguments_are_refused_with_the_shapes():
    x, lnw, lnb, ws, bs = _inputs((5,), 24, (8, 8), torch.float32)
    with pytest.raises(ValueError, match=r"weights\[1\] must be a \[N, 24\] tensor"):
        layer_norm_linear(x, lnw, lnb, [ws[0], ws[1][:, :23]], bs)
    with pytest.raises(ValueError, match="2 weights but 1 biases"):
        layer_norm_linear(x, lnw, lnb, ws, bs[:1])
    with pytest.raises(ValueError, match=r"ln_weight has shape \(23,\), expected \(24,\)"):
        layer_norm_linear(x, lnw[:23], lnb, ws, bs)
    with pytest.raises(TypeError, match=r"weights\[0\] has dtype torch.float16 but x has torch.float32"):
        layer_norm_linear(x, lnw, lnb, [ws[0].half(), ws[1]], bs)
    with pytest.raises(ValueError, match=r"biases\[1\] must be None or a torch.float32 \[8\] tensor"):
        layer_norm_linear(x, lnw, lnb, ws, [None, torch.zeros(7, device=DEVICE)])
    with pytest.raises(TypeError, match="non-empty list"):
        layer_norm_linear(x, lnw, lnb, ws[0], None)
    with pytest.raises(ValueError, match="eps must be a finite Python number"):
        layer_norm_linear(x, lnw, lnb, ws, bs, eps=float("nan"))


def test_outputs_may_be_written_in_place_as_linear_s_may():
    """No output is a view made inside the autograd Function: an in-place write into one (a model's
    ``q *= scale``) works and differentiates as on F.linear's result."""
    x, lnw, lnb, ws, bs = _inputs((5, 3), 24, (8, 8), torch.float32)
    x.requires_grad_()
    q, k = layer_norm_linear(x, lnw, lnb, ws, bs)
    assert q._base is None and k._base is None
    q *= 0.5
    (gx,) = torch.autograd.grad((q * k).sum(), x)
    x64 = x.detach().double().requires_grad_()
    q64, k64 = layer_norm_linear_reference(x64, lnw.double(), lnb.double(), [w.double() for w in ws],
                                           [b.double() if b is not None else None for b in bs])
    (want,) = torch.autograd.grad((q64 * 0.5 * k64).sum(), x64)
    assert _rel(gx, want) < 1e-5


def test_double_backward_raises():
    x, lnw, lnb, ws, bs = _inputs((5,), 24, (8, 8), torch.float32)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(layer_norm_linear(x, lnw, lnb, ws, bs)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@pytest.mark.parametrize("module", ["msa_row_attention", "triangle_attention"])
def test_the_zoo_modules_projections(module):
    """AlphaFold's MSA row attention (LN(m) -> q, k, v, gate; LN(z) -> pair bias) and triangle attention
    (LN(z) -> q, k, v, gate, pair bias): the kernel fed with the modules' own parameters gives their
    projections and their gradients."""
    torch.manual_seed(0)
    if module == "msa_row_attention":
        mod = randomize_parameters(MSARowAttentionWithPairBias(c_m=24, c_z=16, c_hidden=8, n_heads=2), 0)
        ln, linears = mod.layer_norm_m, [mod.mha.linear_q, mod.mha.linear_k, mod.mha.linear_v, mod.mha.linear_g]
        x = torch.randn(5, 13, 24)
    else:
        mod = randomize_parameters(TriangleAttention(c_z=16, c_hidden=8, n_heads=2), 0)
        ln = mod.layer_norm
        linears = [mod.mha.linear_q, mod.mha.linear_k, mod.mha.linear_v, mod.mha.linear_g, mod.linear_bias]
        x = torch.randn(11, 11, 16)
    mod = mod.to(DEVICE)
    x = x.to(DEVICE)
    got = layer_norm_linear(x, ln.weight, ln.bias, [lin.weight for lin in linears], [lin.bias for lin in linears],
                            eps=ln.eps)
    want = [lin(ln(x)) for lin in linears]
    params = [ln.weight, ln.bias, *[p for lin in linears for p in lin.parameters()]]
    loss = lambda outs: sum((o * (i + 1)).sin().sum() for i, o in enumerate(outs))  # noqa: E731
    for g, w in zip(torch.autograd.grad(loss(got), params), torch.autograd.grad(loss(want), params)):
        assert _rel(g, w) < 1e-5
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


def test_the_library_op_forward_backward_fake_and_aot_autograd():
    import foldcompile.kernels.ops  # noqa: F401  (registers torch.ops.foldcompile.*)
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, lnw, lnb, ws, bs = _inputs((3, 7), 24, (16, 7, 9), torch.float32, bias=[False, True, True])
    op = torch.ops.foldcompile.layer_norm_linear.default
    present, has_bias = [b for b in bs if b is not None], [b is not None for b in bs]
    args = (x.requires_grad_(), lnw.requires_grad_(), None, [w.requires_grad_() for w in ws],
            [b.requires_grad_() for b in present], has_bias, 1e-5, True, torch.float32)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with FakeTensorMode() as mode:
        fake = op(mode.from_tensor(x), mode.from_tensor(lnw), None, [mode.from_tensor(w) for w in ws],
                  [mode.from_tensor(b) for b in present], has_bias, 1e-5, True, torch.float32)
    assert [tuple(f.shape) for f in fake] == [(3, 7, 16), (3, 7, 7), (3, 7, 9), (3, 7, 24)]
    leaves = [x, lnw, *ws, *present]

    def f(x, lnw, w0, w1, w2, b1, b2):
        o = op(x, lnw, None, [w0, w1, w2], [b1, b2], has_bias, 1e-5, True, torch.float32)
        return o[0] * 2.0, o[1], o[3].square()  # o[2] unused: its gradient is materialised as zeros

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*leaves)
    g_got = torch.autograd.grad(sum(t.sum() for t in got), leaves)
    ref = layer_norm_linear_reference(x, lnw, None, ws, bs, return_normalized=True)
    want = (ref[0] * 2.0, ref[1], ref[3].square())
    g_want = torch.autograd.grad(sum(t.sum() for t in want), leaves, allow_unused=True)
    assert g_want[4] is None and g_want[6] is None and not g_got[4].any() and not g_got[6].any()  # w2, b2
    for a, b in zip((*got, *g_got), (*want, *g_want)):
        if b is not None:
            assert _rel(a, b) < 1e-5
    back = torch.ops.foldcompile.layer_norm_linear_backward.default
    grads = [torch.ones_like(t) for t in got[:2]] + [torch.zeros(3, 7, 9, device=DEVICE), torch.ones(3, 7, 24,
                                                                                                    device=DEVICE)]
    needs = [True, False, False, True, True, False, False, True]
    res = back(grads, x.detach(), lnw.detach(), None, [w.detach() for w in ws], [b.detach() for b in present],
               has_bias, 1e-5, True, torch.float32, needs)
    assert [t.numel() > 0 for t in res] == needs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; needs CUDA")
@pytest.mark.parametrize("lead, K, widths", [((64, 100), 256, (256, 256, 256, 256)),
                                             ((100, 100), 128, (128, 128, 128, 128, 4)),
                                             ((37, 61), 384, (384, 53)), ((1000,), 128, (512,))])
def test_bf16_on_cuda_at_alphafold_widths(lead, K, widths):
    """The MSA row attention's 4 x 256, the triangle attention's 4 x 128 + 4 heads, a single attention's
    c_s = 384 and a transition's first linear, bf16: within 3x the plain bf16 spelling's error of float64."""
    dtype = torch.bfloat16
    x, lnw, lnb, ws, bs = _inputs(lead, K, widths, dtype)
    douts = _douts(lead, widths, K, dtype)
    with record_launches() as launched:
        got = _run(layer_norm_linear, x, lnw, lnb, ws, bs, douts)
    assert launched == ["ln_linear_fwd", "ln_linear_bwd"]
    up = lambda t: None if t is None else t.double()  # noqa: E731
    exact = _run(layer_norm_linear_reference, up(x), up(lnw), up(lnb), [up(w) for w in ws], [up(b) for b in bs],
                 [d.double() for d in douts])

    def plain(x, lnw, lnb, ws, bs):  # eager bf16, as a model computes it
        y = torch.nn.functional.layer_norm(x, (K,), lnw, lnb)
        return tuple(torch.nn.functional.linear(y, w, b) for w, b in zip(ws, bs))

    eager = _run(plain, x, lnw, lnb, ws, bs, douts)
    for i, (a, e, p) in enumerate(zip(got[0] + got[1], exact[0] + exact[1], eager[0] + eager[1])):
        assert _rel(a, e) < max(1e-2, 3 * _rel(p, e)), (i, _rel(a, e), _rel(p, e))
