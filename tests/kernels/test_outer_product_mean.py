"""The fused outer product mean (kernels/outer_product_mean.py) against float64 and the plain reference.

Interpreter-sized shapes that are not block multiples (N_res 13 / 37, N_seq 5 / 33, c 3..8), masks
with fully masked residues (rows and columns of the count are then eps only), every gradient,
outputs poisoned with NaN before the kernels write them, and the zoo's own AlphaFold module.
"""
import importlib

import pytest
import torch

from foldcompile.kernels._dispatch import record_launches
from foldcompile.models.alphafold2.outer_product_mean import OPM_EPS, OuterProductMean
from foldcompile.models.zoo import randomize_parameters

K = importlib.import_module("foldcompile.kernels.outer_product_mean")
outer_product_mean, outer_product_mean_reference = K.outer_product_mean, K.outer_product_mean_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(lead, S, I, J, C, E, Z, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask_a = (torch.rand(*lead, S, I, generator=g) > 0.3).float()
    mask_b = (torch.rand(*lead, S, J, generator=g) > 0.3).float()
    mask_a[..., 0] = 0.0  # residue 0 of a masked in every sequence: its count row is 0 (+ eps)
    mask_b[..., J - 1] = 0.0
    a = torch.randn(*lead, S, I, C, generator=g) * mask_a[..., None]
    b = torch.randn(*lead, S, J, E, generator=g) * mask_b[..., None]
    w = torch.randn(Z, C * E, generator=g) / (C * E) ** 0.5
    bias = torch.randn(Z, generator=g)
    to = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return to(a), to(b), to(w), to(bias), to(mask_a), to(mask_b)


def _run(fn, a, b, w, bias, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, b, w, bias)]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout)
    return [out, *grads]


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _poisoned(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel does not write shows."""
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device))


CASES = [  # lead, S, I, J, C, E, Z, dtype, options
    ((2,), 5, 13, 13, 4, 4, 8, torch.float32, dict(masks=True, bias=True, bias_divided=True)),
    ((), 33, 13, 37, 8, 4, 16, torch.float32, dict(masks=True, bias=True, bias_divided=False)),
    ((), 5, 37, 13, 4, 8, 8, torch.float16, dict(masks=True, bias=True, bias_divided=True)),
    ((1,), 6, 7, 9, 3, 5, 6, torch.float16, dict(masks=False, bias=False, bias_divided=True)),
]


@pytest.mark.parametrize("lead, S, I, J, C, E, Z, dtype, opts", CASES)
def test_kernel_matches_float64_and_the_reference_forward_and_backward(lead, S, I, J, C, E, Z, dtype, opts,
                                                                       monkeypatch):
    _poisoned(monkeypatch)
    a, b, w, bias, mask_a, mask_b = _inputs(lead, S, I, J, C, E, Z, dtype)
    bias = bias if opts["bias"] else None
    kw = dict(bias_divided=opts["bias_divided"])
    if opts["masks"]:
        kw.update(mask_a=mask_a, mask_b=mask_b, eps=OPM_EPS)
    dout = torch.randn(*lead, I, J, Z, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    with record_launches() as launched:
        got = _run(outer_product_mean, a, b, w, bias, dout, **kw)
    assert launched == ["opm_fwd", "opm_bwd_da", "opm_bwd_da", "opm_bwd_dw"]
    ref = _run(outer_product_mean_reference, a, b, w, bias, dout, **kw)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    kw64 = {k: (up(v) if torch.is_tensor(v) else v) for k, v in kw.items()}
    exact = _run(outer_product_mean_reference, up(a), up(b), up(w), up(bias), dout.double(), **kw64)
    for name, x, r, e in zip(("out", "da", "db", "dw", "dbias"), got, ref, exact):
        assert x.dtype == r.dtype and x.shape == r.shape and not torch.isnan(x).any(), name
        err, err_ref = _rel(x, e), _rel(r, e)
        if dtype == torch.float32:
            assert err < 1e-5, f"{name}: {err:.3g}"
        else:  # the kernel rounds o (as eager does) and do to fp16; the reference stays in fp32
            assert err < 3e-3 and err < 4 * err_ref + 1e-4, f"{name}: {err:.3g} (reference {err_ref:.3g})"


@pytest.mark.parametrize("case", ["inf_weight", "inf_b", "zero_count"])
def test_padded_lanes_do_not_turn_inf_into_nan(case):
    """Lanes past the problem's edge (pairs, channels padded to the block sizes) hold 0 * (a value
    of the other operand), or 0 / 0 where a count is 0: NaN where that value is ±inf, and it reached
    real entries through the next product, where eager gives ±inf (found by
    test_properties_outer_product_mean; the first and last case are its shrunk examples). Every
    non-finite entry must be where eager has it, NaN or ±inf alike."""
    g = torch.Generator().manual_seed(3)
    S, I, J, C, E, Z = (3, 5, 6, 3, 3, 5) if case == "inf_b" else (1, 1, 1, 1, 1, 1)
    a, b = torch.randn(S, I, C, generator=g), torch.randn(S, J, E, generator=g)
    w, dout = torch.randn(Z, C * E, generator=g), torch.randn(I, J, Z, generator=g)
    mask_a, mask_b, eps = torch.ones(S, I), torch.ones(S, J), OPM_EPS
    if case == "inf_weight":
        w[0, 0] = float("inf")
    elif case == "inf_b":
        b[1, 2, 1] = float("inf")
    else:  # no sequence keeps residue 0 of a and eps is 0: its pairs divide by 0
        mask_a[:, 0], eps = 0.0, 0.0
    kw = dict(mask_a=mask_a.to(DEVICE), mask_b=mask_b.to(DEVICE), eps=eps)
    got = _run(outer_product_mean, a.to(DEVICE), b.to(DEVICE), w.to(DEVICE), None, dout.to(DEVICE), **kw)
    a64, b64, w64 = (t.double().requires_grad_() for t in (a, b, w))
    o = torch.einsum("sic,sje->ijce", a64, b64).reshape(I, J, C * E)
    want = o @ w64.T / (eps + torch.einsum("si,sj->ij", mask_a.double(), mask_b.double()))[..., None]
    exact = [want, *torch.autograd.grad(want, (a64, b64, w64), dout.double())]
    for name, x, e in zip(("out", "da", "db", "dw"), got, exact):
        x = x.cpu()
        assert torch.equal(torch.isnan(x), torch.isnan(e)), (name, int(torch.isnan(x).sum()), int(torch.isnan(e).sum()))
        assert torch.equal(torch.isinf(x), torch.isinf(e)), name
    assert any(torch.isinf(e).any() for e in exact[1:])  # a gradient is ±inf, and must stay so


def test_the_zoo_module_s_own_function(monkeypatch):
    """AlphaFold's OuterProductMean (LN, masked projections, einsum, linear, count + eps) equals the kernel
    fed with the module's own projections and parameters."""
    _poisoned(monkeypatch)
    torch.manual_seed(0)
    module = randomize_parameters(OuterProductMean(c_m=8, c_z=8, c_hidden=4), 0).to(DEVICE)
    m = torch.randn(5, 13, 8, device=DEVICE)
    msa_mask = (torch.rand(5, 13, device=DEVICE) > 0.25).float()
    msa_mask[:, 3] = 0.0  # a residue no sequence has
    want = module(m, msa_mask)
    x = module.layer_norm(m)
    a = msa_mask[..., None] * module.linear_a(x)
    b = msa_mask[..., None] * module.linear_b(x)
    got = outer_product_mean(a, b, module.linear_out.weight, module.linear_out.bias, mask_a=msa_mask,
                             mask_b=msa_mask, eps=OPM_EPS)
    assert _rel(got, want) < 1e-5
    params = list(module.parameters())
    for g, r in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert _rel(g, r) < 1e-5


def test_a_permuted_weight_view_is_read_in_place():
    """weight [Z, C, E] as a strided view (an ``...ijec`` spelling's [Z, E·C] weight transposed)."""
    a, b, w, bias, *_ = _inputs((), 5, 7, 9, 4, 8, 8, torch.float32)
    w_ec = torch.randn(8, 8 * 4, dtype=torch.float32, device=DEVICE)
    view = w_ec.view(8, 8, 4).transpose(1, 2)  # [Z, C, E], not contiguous
    got = outer_product_mean(a, b, view, bias)
    o = torch.einsum("sic,sje->ijec", a, b).reshape(7, 9, 32)
    assert _rel(got, (o @ w_ec.T + bias) / 5) < 1e-6


def test_bad_arguments_are_refused_with_the_shapes():
    a, b, w, bias, mask_a, mask_b = _inputs((), 5, 7, 9, 4, 4, 8, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \[Z, 4·4\]"):
        outer_product_mean(a, b, w[:, :15], bias)
    with pytest.raises(ValueError, match="both mask_a and mask_b"):
        outer_product_mean(a, b, w, bias, mask_a=mask_a)
    with pytest.raises(ValueError, match="does not broadcast"):
        outer_product_mean(a, b, w, bias, mask_a=mask_b, mask_b=mask_b)
    with pytest.raises(ValueError, match="requires grad"):
        outer_product_mean(a, b, w, bias, mask_a=mask_a.requires_grad_(), mask_b=mask_b)
    with pytest.raises(TypeError, match="share one of"):
        outer_product_mean(a, b.half(), w, bias)


def test_double_backward_raises():
    a, b, w, bias, *_ = _inputs((), 5, 7, 9, 4, 4, 8, torch.float32)
    a.requires_grad_()
    (ga,) = torch.autograd.grad(outer_product_mean(a, b, w, bias).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        ga.sum().backward()


def test_the_library_op_forward_backward_and_fake():
    import foldcompile.kernels.ops  # noqa: F401  (registers torch.ops.foldcompile.*)
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, b, w, bias, mask_a, mask_b = _inputs((), 5, 7, 9, 4, 4, 8, torch.float32)
    dout = torch.randn(7, 9, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    op = torch.ops.foldcompile.outer_product_mean
    kw = dict(mask_a=mask_a, mask_b=mask_b, eps=OPM_EPS, bias_divided=False)
    got = _run(lambda *t: op(*t, **kw), a, b, w, bias, dout)
    want = _run(lambda *t: outer_product_mean(*t, **kw), a, b, w, bias, dout)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-6)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) for t in (a, b, w, bias)))
    assert fake.shape == (7, 9, 8) and fake.dtype == a.dtype
    torch.library.opcheck(op, (a, b, w, bias, mask_a, mask_b, OPM_EPS, False),
                          test_utils=("test_schema", "test_faketensor"))
    back = torch.ops.foldcompile.outer_product_mean_backward.default
    grads = back(dout, a, b, w, bias, mask_a, mask_b, OPM_EPS, False, [True, False, True, True])
    assert [t.numel() > 0 for t in grads] == [True, False, True, True]
    for g, wnt in zip((grads[0], grads[2], grads[3]), (want[1], want[3], want[4])):
        assert torch.allclose(g, wnt, atol=1e-6)
    torch.library.opcheck(back, (dout, a, b, w, bias, mask_a, mask_b, OPM_EPS, False, [True, True, False, True]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; needs CUDA")
@pytest.mark.parametrize("n_seq, n_res", [(128, 100), (37, 61)])
def test_bf16_on_cuda_at_alphafold_channels(n_seq, n_res):
    """c = 32, c_z = 128 (the GPU block sizes), bf16: within 3x the plain bf16 spelling's error of float64."""
    a, b, w, bias, mask_a, mask_b = _inputs((), n_seq, n_res, n_res, 32, 32, 128, torch.bfloat16)
    kw = dict(mask_a=mask_a, mask_b=mask_a, eps=OPM_EPS)
    dout = torch.randn(n_res, n_res, 128, device=DEVICE, dtype=torch.bfloat16)
    with record_launches() as launched:
        got = _run(outer_product_mean, a, b, w, bias, dout, **kw)
    assert launched == ["opm_fwd", "opm_bwd_da", "opm_bwd_da", "opm_bwd_dw"]
    up = lambda t: t.double()  # noqa: E731
    exact = _run(outer_product_mean_reference, up(a), up(b), up(w), up(bias), dout.double(),
                 mask_a=up(mask_a), mask_b=up(mask_a), eps=OPM_EPS)

    def plain(a, b, w, bias):  # eager bf16, as a model computes it
        o = torch.einsum("sic,sje->ijce", a, b).reshape(n_res, n_res, -1)
        return torch.nn.functional.linear(o, w, bias) / (OPM_EPS + torch.einsum("si,sj->ij", mask_a, mask_a))[..., None]

    eager = _run(plain, a, b, w, bias, dout)
    for name, x, e, p in zip(("out", "da", "db", "dw", "dbias"), got, exact, eager):
        assert _rel(x, e) < max(1e-2, 3 * _rel(p, e)), (name, _rel(x, e), _rel(p, e))
