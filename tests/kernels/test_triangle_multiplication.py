"""Fused triangle multiplicative update (foldcompile.kernels.triangle_multiplication) against
the zoo's own modules: AF2's TriangleMultiplicativeUpdate and the Pairformer's
TriangleMultiplication, outgoing and incoming, with their (re-randomised) parameters.

Runs the real Triton kernels: through the interpreter on CPU (conftest sets
TRITON_INTERPRET=1), natively on CUDA. Shapes are tiny and not multiples of the
interpreter's 16-wide blocks (N = 13, 19; c_z = 20, c_hidden = 12). Errors are relative
to the module run in float64 (PITFALLS correctness guide); NaN never passes.
"""
import copy
import importlib

import pytest
import torch
import triton

from foldcompile.kernels._dispatch import record_launches, use_triton
from foldcompile.kernels.triangle_multiplication import (MAX_TRITON_DIM, TriangleMultiplicationParams,
                                                         params_from_module,
                                                         triangle_multiplication,
                                                         triangle_multiplication_module,
                                                         triangle_multiplication_reference)
from foldcompile.models import pairformer
from foldcompile.models.alphafold2.triangle import TriangleMultiplicativeUpdate
from foldcompile.models.zoo import randomize_parameters

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FWD = ["trimul_proj", "trimul_out"]
BWD = ["trimul_out_bwd", "trimul_proj_bwd"]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert a is not None, "missing gradient"
    assert not torch.isnan(a).any(), "NaN in the kernel's result"
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_module(kind: str, outgoing: bool, c_z: int = 20, c_h: int = 12, seed: int = 0) -> torch.nn.Module:
    cls = TriangleMultiplicativeUpdate if kind == "af2" else pairformer.TriangleMultiplication
    return randomize_parameters(cls(c_z, c_h, outgoing=outgoing), seed).to(DEVICE)


def make_inputs(n: int, c_z: int, lead=(1,), seed: int = 0):
    """z (float64, offset so LN's mean subtraction matters) and a 0/1 mask with a fully
    masked row (i = 3) and a fully masked column (j = 5)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, n, n, c_z, generator=g, dtype=torch.float64) * 2 + 1
    mask = (torch.rand(*lead, n, n, generator=g) > 0.2).double()
    mask[..., 3, :] = 0
    mask[..., :, 5] = 0
    return z.to(DEVICE), mask.to(DEVICE)


def fwd_bwd(fn, module, z, mask, dout, **kwargs):
    """Output and the gradients of z and of every module parameter (in named_parameters order)."""
    z = z.detach().requires_grad_()
    out = fn(module, z, mask, **kwargs)
    grads = torch.autograd.grad(out, [z, *module.parameters()], dout)
    return out, grads


def run_module(module, z, mask):
    return module(z, mask)


def check_against_float64(module, z64, mask64, dtype, tol, dout=None, product="cublas"):
    """Kernel in ``dtype`` vs the module in float64 (forward, dz and every parameter
    gradient, each under ``tol(name)``); returns the worst error."""
    dout = torch.randn_like(z64) if dout is None else dout
    m64 = copy.deepcopy(module).double()
    ref, gref = fwd_bwd(run_module, m64, z64, mask64, dout)
    mk = copy.deepcopy(module).to(dtype)
    with record_launches() as launched:
        out, grads = fwd_bwd(triangle_multiplication_module, mk, z64.to(dtype), mask64.to(dtype), dout.to(dtype),
                             product=product)
    if product == "cublas":
        assert launched == FWD + BWD
    else:  # the Triton batched GEMM runs the triangle product: once forward, twice backward
        assert launched == ["trimul_proj", "trimul_bmm", "trimul_out", "trimul_out_bwd", "trimul_bmm", "trimul_bmm",
                            "trimul_proj_bwd"]
    assert out.dtype == dtype and out.shape == z64.shape and grads[0].dtype == dtype
    names = ["out", "z"] + [n for n, _ in module.named_parameters()]
    errs = {n: rel(a, r) for n, a, r in zip(names, (out, *grads), (ref, *gref))}
    bad = {n: e for n, e in errs.items() if not e < tol(n)}
    assert not bad, f"errors over the bar: {bad}"
    return max(errs.values())


VARIANTS = [("af2", True), ("af2", False), ("pf", True), ("pf", False)]


def test_triton_path_is_active():
    assert use_triton(torch.empty(1, device=DEVICE))


@pytest.mark.parametrize("kind,outgoing", VARIANTS)
def test_fp32_matches_zoo_module(kind, outgoing):
    torch.manual_seed(1)
    module = make_module(kind, outgoing)
    z, mask = make_inputs(13, 20)
    check_against_float64(module, z, mask, torch.float32, lambda n: 1e-5)


@pytest.mark.parametrize("kind,outgoing", VARIANTS)
def test_fp16_matches_zoo_module(kind, outgoing):
    # Bar: 2e-3, or twice the error of the module itself run in fp16 (measured ~1e-3 for both).
    torch.manual_seed(2)
    module = make_module(kind, outgoing, seed=1)
    z, mask = make_inputs(13, 20, seed=1)
    m64, m16 = copy.deepcopy(module).double(), copy.deepcopy(module).half()
    dout = torch.randn_like(z)
    ref, gref = fwd_bwd(run_module, m64, z, mask, dout)
    own, gown = fwd_bwd(run_module, m16, z.half(), mask.half(), dout.half())
    names = ["out", "z"] + [n for n, _ in module.named_parameters()]
    module_err = {n: rel(a, r) for n, a, r in zip(names, (own, *gown), (ref, *gref))}
    check_against_float64(module, z, mask, torch.float16, lambda n: max(2e-3, 2 * module_err[n]), dout)


@pytest.mark.parametrize("kind,outgoing,dtype,n", [("af2", False, torch.float32, 19), ("pf", True, torch.float16, 13)])
def test_triton_batched_gemm_product(kind, outgoing, dtype, n):
    # product="triton": the triangle product (forward and backward) in this module's own batched
    # GEMM instead of cuBLAS; N = 19 leaves a tail in every tile dimension, including K.
    module = make_module(kind, outgoing, seed=13)
    z, mask = make_inputs(n, 20, seed=13)
    check_against_float64(module, z, mask, dtype, lambda n: 1e-5 if dtype == torch.float32 else 2e-3,
                          product="triton")


def test_every_output_element_written(monkeypatch):
    """NaN-filled buffers from torch.empty: any element a kernel fails to write shows up.
    Two leading rows, power-of-two channels (c_z = 32, c_hidden = 16), N = 19."""
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    module = make_module("af2", False, c_z=32, c_h=16, seed=3)
    z, mask = make_inputs(19, 32, lead=(2,), seed=3)
    monkeypatch.setattr(torch, "empty", poisoned)
    check_against_float64(module, z, mask, torch.float32, lambda n: 1e-5)


@pytest.mark.full
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check of the GPU tile lists (on a GPU the "
                    "tuner runs them)")
@pytest.mark.parametrize("index", range(8))
def test_gpu_tile_configs_through_the_interpreter(index, monkeypatch):
    """Each kernel with the index-th entry of its Hopper config list (cycling): tiles far larger
    than N = 13, c_z = 20, c_hidden = 12 (every load and store masked), 256-row projection
    tiles, one-tile-a-program (CTAS = 0) and persistent (CTAS > 0) forms, partial-sum buffers
    sized for the config that ran (buffers NaN-poisoned), and the Triton batched GEMM's grouped
    ordering."""
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    monkeypatch.setattr(tm, "interpreting", lambda: False)
    lists = {k: tm._configs(k) for k in ("proj", "out", "out_bwd", "proj_bwd")}
    bmm = tm._bmm_configs()
    monkeypatch.undo()
    forced = {k: v[index % len(v)] for k, v in lists.items()}
    monkeypatch.setattr(tm, "_FORCED", forced)
    c = bmm[index % len(bmm)]
    monkeypatch.setattr(tm._trimul_bmm_kernel, "configs", [triton.Config(c.kwargs, num_warps=c.num_warps)])
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                         else t)(real_empty(*a, **k)))
    module = make_module("af2", index % 2 == 0, seed=15)
    z, mask = make_inputs(13, 20, seed=15)
    check_against_float64(module, z, mask, torch.float32, lambda n: 1e-5, product="triton")


@pytest.mark.parametrize("ctas,rows,out_block", [(0, 0, 16), (1, 0, 32), (3, 0, 16), (1, 1, 32), (0, 1, 16),
                                               (0, 2, 16), (1, 2, 32), (3, 2, 8)])
def test_persistent_and_one_tile_forward_variants(ctas, rows, out_block, monkeypatch):
    """The forward kernels' structural variants: one tile a program (CTAS = 0) and persistent
    loops over 2 x 23 tiles with the next tile's loads prefetched and a loop longer than the
    work (CTAS = 1: 4 programs of 11-12 tiles in a 16-step loop; CTAS = 3: 12 programs of
    3-4 tiles in a 4-step loop); the projection GEMM in each orientation (ROWS = 0: W · x^T,
    1: x · W^T, 2: x · [W_p; W_g]^T as one GEMM over interleaved weight rows, with c_hidden = 12
    over BLOCK_H = 16: a masked tail in the interleaving); and the output kernel's epilogue fused
    (BLOCK_H = 32 >= the 32-wide channel block of c_z = 20) or column-blocked (BLOCK_H = 16: a full
    and a masked block; 8: three blocks, the last masked).
    Every output element is checked (NaN-poisoned buffers)."""
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    cfg = dict(BLOCK_M=16, BLOCK_H=16, num_warps=4, num_stages=1, CTAS=ctas, ROWS=rows)
    monkeypatch.setattr(tm, "_FORCED", {"proj": cfg, "out": dict(cfg, BLOCK_H=out_block)})
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                         else t)(real_empty(*a, **k)))
    module = make_module("af2" if rows else "pf", ctas != 1, seed=17)
    z, mask = make_inputs(19, 20, lead=(2,), seed=17)
    with torch.no_grad():
        out = triangle_multiplication_module(copy.deepcopy(module).float(), z.float(), mask.float())
        ref = copy.deepcopy(module).double()(z, mask)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("rows", [0, 2])
def test_forward_variants_fp16_forward_and_backward(rows, monkeypatch):
    """The paired projection GEMM (ROWS = 2) and the column-blocked output epilogue in fp16,
    forward and backward (the backward kernels recompute with their own configs)."""
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    cfg = dict(BLOCK_M=16, BLOCK_H=8, num_warps=4, num_stages=1, CTAS=0, ROWS=rows)
    monkeypatch.setattr(tm, "_FORCED", {"proj": cfg, "out": cfg})
    torch.manual_seed(21)
    module = make_module("pf", rows == 0, seed=21)
    z, mask = make_inputs(13, 20, seed=21)
    dout = torch.randn_like(z)
    ref, gref = fwd_bwd(run_module, copy.deepcopy(module).double(), z, mask, dout)
    own, gown = fwd_bwd(run_module, copy.deepcopy(module).half(), z.half(), mask.half(), dout.half())
    names = ["out", "z"] + [n for n, _ in module.named_parameters()]
    module_err = {n: rel(a, r) for n, a, r in zip(names, (own, *gown), (ref, *gref))}
    check_against_float64(module, z, mask, torch.float16, lambda n: max(2e-3, 2 * module_err[n]), dout)


def test_in_place_parameter_update_is_seen_by_the_next_call():
    """An optimizer step updates the weights in place: the next call must use the new values
    (the kernels read the caller's own parameter tensors; nothing derived from them is cached)."""
    module = make_module("af2", True, seed=18).float()
    z, mask = make_inputs(13, 20, seed=18)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    zf, mf = z.float(), mask.float()
    first = triangle_multiplication_module(module, zf, mf)
    first.square().sum().backward()
    opt.step()                                        # in-place update of every parameter
    with torch.no_grad():
        module.linear_a_p.weight.mul_(-1.0)           # and one more plain in-place write
        second = triangle_multiplication_module(module, zf, mf)
        ref = copy.deepcopy(module).double()(z, mask)
    assert rel(second, ref) < 1e-5
    assert rel(second, first.detach()) > 1e-3


def test_module_parameter_cache_sees_reassignment_and_eps():
    """triangle_multiplication_module caches params_from_module per module; re-assigning a
    parameter or a submodule, flipping `outgoing` or changing a LayerNorm eps must not be served
    from the stale entry."""
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    module = make_module("pf", True, seed=20).float()
    z, mask = make_inputs(13, 20, seed=20)

    def check():
        with torch.no_grad():
            out = triangle_multiplication_module(module, z.float(), mask.float())
            ref = copy.deepcopy(module).double()(z, mask)
        assert rel(out, ref) < 1e-5
    check()
    assert tm._module_params(module) is tm._module_params(module)
    module.linear_a.weight = torch.nn.Parameter(torch.randn_like(module.linear_a.weight))
    check()
    module.linear_g = torch.nn.Linear(20, 20, bias=True).to(DEVICE)
    check()
    module.layer_norm_in.eps = 0.5
    check()
    module.outgoing = False
    check()


def test_second_call_creates_no_constants_and_concatenates_nothing(monkeypatch):
    """Host path: absent biases (the Pairformer module has none) are cached constants made on the
    first call only, and no call concatenates weights; forward and backward."""
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    module = make_module("pf", True, seed=19).float()
    z, mask = make_inputs(13, 20, seed=19)
    zf = z.float().requires_grad_()
    triangle_multiplication_module(module, zf, mask.float()).sum().backward()
    consts = dict(tm._CONSTS)

    def refuse(name):
        def f(*a, **k):
            raise AssertionError(f"torch.{name} called on the kernel path")
        return f
    for name in ("cat", "full", "zeros", "ones", "stack"):
        monkeypatch.setattr(torch, name, refuse(name))
    out = triangle_multiplication_module(module, zf, mask.bool())
    out.sum().backward()
    monkeypatch.undo()
    assert tm._CONSTS.keys() == consts.keys() and all(tm._CONSTS[k] is v for k, v in consts.items())


def test_tuner_picks_the_fastest_config_once_per_size_class(monkeypatch):
    """The GPU tuner (exercised on CPU with a fake timer): the fastest candidate that compiles wins,
    a failing candidate is skipped, and a second N in the same power-of-two bucket reuses it."""
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    monkeypatch.setattr(tm, "interpreting", lambda: False)
    monkeypatch.setattr(tm, "_TUNED", {})
    cands = tm._configs("proj")
    times = {i: 5.0 - i for i in range(len(cands))}          # the last candidate is fastest ...
    calls = []

    def fake_bench(fn, warmup, rep):
        fn()
        return times[calls[-1]]

    def launch(cfg):
        i = cands.index(cfg)
        calls.append(i)
        if i == len(cands) - 1:                              # ... but fails to compile
            raise RuntimeError("out of resources")
    monkeypatch.setattr(tm.triton.testing, "do_bench", fake_bench)
    key = tm._tune_key(1, 200 * 200, 128, 128, torch.bfloat16, True)
    assert tm._pick("proj", key, launch) == cands[-2]
    n = len(calls)
    assert tm._pick("proj", tm._tune_key(1, 210 * 210, 128, 128, torch.bfloat16, True), launch) == cands[-2]
    assert len(calls) == n and key == tm._tune_key(1, 210 * 210, 128, 128, torch.bfloat16, True)


def test_no_mask_and_broadcast_mask():
    # AF2's module takes pair_mask=None (all ones); a [N, N] mask broadcasts over leading dims.
    module = make_module("af2", True, seed=4)
    z, mask = make_inputs(13, 20, lead=(2,), seed=4)
    z32 = z.float()
    with torch.no_grad():
        m32 = copy.deepcopy(module).float()
        ref_none = copy.deepcopy(module).double()(z, None)
        out_none = triangle_multiplication_module(m32, z32, None)
        shared = mask[0]
        ref_b = copy.deepcopy(module).double()(z, shared.expand(2, 13, 13))
        out_b = triangle_multiplication_module(m32, z32, shared.float())
    assert rel(out_none, ref_none) < 1e-5
    assert rel(out_b, ref_b) < 1e-5


def test_non_contiguous_z_and_double_backward_raises():
    module = make_module("pf", False, seed=14).float()
    z, mask = make_inputs(13, 20, seed=14)
    zt = z.float().transpose(-2, -3).detach().requires_grad_()      # a strided view, not a copy
    assert not zt.is_contiguous()
    out = triangle_multiplication_module(module, zt, mask.float())
    ref = copy.deepcopy(module).double()(zt.detach().double(), mask)
    assert rel(out, ref) < 1e-5
    (gz,) = torch.autograd.grad(out.square().sum(), [zt], create_graph=True)
    assert gz.shape == zt.shape
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gz.sum().backward()


def test_bool_mask_equals_float_mask():
    module = make_module("pf", True, seed=5).float()
    z, mask = make_inputs(13, 20, seed=5)
    with torch.no_grad():
        a = triangle_multiplication_module(module, z.float(), mask.bool())
        b = triangle_multiplication_module(module, z.float(), mask.float())
    assert torch.equal(a, b)


def test_inference_runs_forward_kernels_only():
    module = make_module("pf", False, seed=6)
    z, mask = make_inputs(13, 20, seed=6)
    with torch.no_grad():
        ref = copy.deepcopy(module).double()(z, mask)
        with record_launches() as launched:
            out = triangle_multiplication_module(module.float(), z.float(), mask.float())
    assert launched == FWD
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("param, n", [("layer_norm_in.weight", 7), ("layer_norm_in.bias", 7), ("linear_z.weight", 1)])
def test_an_inf_parameter_gives_eager_s_non_finite_gradients_only(param, n):
    """Lanes past the tile's rows and channels hold 0 * (a weight, or LN(z) built from one): NaN where
    that is ±inf, and it reached the parameter gradients through the products and the partial row
    sums: a NaN LN-out bias gradient where eager's is finite (an inf LN-in weight; found by
    test_properties_triangle_multiplication), NaN LN-out gradients where eager's are ±inf (an inf
    output weight and one pair: a single term, so eager keeps its sign). NaN and ±inf must be
    exactly where eager has them."""
    module = make_module("af2", False, c_z=4, c_h=4)
    with torch.no_grad():
        module.get_parameter(param).view(-1)[1] = float("inf")
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(1, n, n, 4, generator=g, dtype=torch.float64) * 2 + 1).to(DEVICE)
    mask = torch.ones(1, n, n, dtype=torch.float64, device=DEVICE)
    dout = torch.randn(z.shape, generator=g, dtype=torch.float64).to(DEVICE)
    ref, gref = fwd_bwd(run_module, copy.deepcopy(module).double(), z, mask, dout)
    out, grads = fwd_bwd(triangle_multiplication_module, copy.deepcopy(module).float(), z.float(), mask.float(),
                         dout.float())
    names = ["out", "z"] + [n for n, _ in module.named_parameters()]
    for name, a, r in zip(names, (out, *grads), (ref, *gref)):
        assert torch.equal(torch.isnan(a), torch.isnan(r)), (name, int(torch.isnan(a).sum()), int(torch.isnan(r).sum()))
        assert torch.equal(torch.isinf(a), torch.isinf(r)), name
    # not vacuous: eager's gradients hold both non-finite entries and entries that are not NaN
    assert any(not torch.isfinite(r).all() for r in gref) and any((~torch.isnan(r)).any() for r in gref)


def test_fully_masked_input_and_frozen_parameters():
    # mask all zero: a = b = p = 0, LN(p) = its bias; everything stays finite. Frozen
    # parameters: only dz is computed (and correct).
    module = make_module("af2", False, seed=7)
    for p in module.parameters():
        p.requires_grad_(False)
    z, _ = make_inputs(13, 20, seed=7)
    mask = torch.zeros(1, 13, 13, dtype=torch.float64, device=DEVICE)
    dout = torch.randn_like(z)
    z64 = z.detach().requires_grad_()
    ref = copy.deepcopy(module).double()(z64, mask)
    (gref,) = torch.autograd.grad(ref, [z64], dout)
    m32 = copy.deepcopy(module).float()
    zk = z.float().requires_grad_()
    out = triangle_multiplication_module(m32, zk, mask.float())
    (gz,) = torch.autograd.grad(out, [zk], dout.float())
    assert rel(out, ref) < 1e-5 and rel(gz, gref) < 1e-5


def test_float64_runs_reference():
    module = make_module("pf", True, seed=8).double()
    z, mask = make_inputs(7, 20, seed=8)
    with record_launches() as launched:
        out = triangle_multiplication_module(module, z, mask)
    assert launched == []
    assert rel(out, module(z, mask)) < 1e-12


def test_channels_over_the_kernel_limit_run_reference():
    # c_z > MAX_TRITON_DIM: the kernels hold whole rows in registers, so the reference runs.
    module = make_module("pf", True, c_z=MAX_TRITON_DIM + 8, c_h=8, seed=16).float()
    z, mask = make_inputs(7, MAX_TRITON_DIM + 8, seed=16)
    with torch.no_grad(), record_launches() as launched:
        out = triangle_multiplication_module(module, z.float(), mask.float())
        ref = copy.deepcopy(module).double()(z, mask)
    assert launched == []
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("kind,outgoing", VARIANTS)
def test_reference_matches_zoo_module_float64(kind, outgoing):
    # The reference (F.layer_norm, F.linear, einsum) is written independently of the kernels;
    # this pins its orientation conventions to the modules'.
    module = make_module(kind, outgoing, seed=9).double()
    z, mask = make_inputs(9, 20, seed=9)
    params, out_flag = params_from_module(module)
    assert out_flag == outgoing
    assert rel(triangle_multiplication_reference(z, mask, params, out_flag), module(z, mask)) < 1e-12


def test_af2_incoming_is_not_the_supplement_orientation_without_the_swap():
    # Guards the a<->b swap in params_from_module: without it the AF2 incoming result differs.
    module = make_module("af2", False, seed=10).double()
    z, mask = make_inputs(9, 20, seed=10)
    params, _ = params_from_module(module)
    unswapped = TriangleMultiplicationParams(**{**vars(params), "a_proj_weight": params.b_proj_weight,
                                                "b_proj_weight": params.a_proj_weight,
                                                "a_gate_weight": params.b_gate_weight,
                                                "b_gate_weight": params.a_gate_weight,
                                                "a_proj_bias": params.b_proj_bias, "b_proj_bias": params.a_proj_bias,
                                                "a_gate_bias": params.b_gate_bias, "b_gate_bias": params.a_gate_bias})
    assert rel(triangle_multiplication_reference(z, mask, unswapped, False), module(z, mask)) > 1e-2


def test_gradcheck_reference():
    module = make_module("af2", True, c_z=3, c_h=2, seed=11).double()
    params, _ = params_from_module(module)
    z = torch.randn(1, 4, 4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = (torch.rand(1, 4, 4, device=DEVICE) > 0.3).double()
    assert torch.autograd.gradcheck(lambda z, w: triangle_multiplication_reference(
        z, mask, TriangleMultiplicationParams(**{**vars(params), "a_gate_weight": w}), True),
        (z, params.a_gate_weight.detach().clone().requires_grad_()))


def test_bad_inputs_raise_naming_the_argument():
    module = make_module("pf", True)
    params, _ = params_from_module(module)
    z = torch.randn(1, 5, 5, 20, device=DEVICE)
    with pytest.raises(ValueError, match=r"z must be \[\.\.\., N, N, c_z\]"):
        triangle_multiplication(torch.randn(1, 5, 6, 20, device=DEVICE), None, params)
    with pytest.raises(TypeError, match="z has dtype torch.int64"):
        triangle_multiplication(z.long(), None, params)
    with pytest.raises(ValueError, match=r"mask has shape \(1, 5, 4\)"):
        triangle_multiplication(z, torch.ones(1, 5, 4, device=DEVICE), params)
    with pytest.raises(TypeError, match="mask has dtype torch.int32"):
        triangle_multiplication(z, torch.ones(1, 5, 5, dtype=torch.int32, device=DEVICE), params)
    with pytest.raises(ValueError, match="mask requires grad"):
        triangle_multiplication(z, torch.ones(1, 5, 5, device=DEVICE, requires_grad=True), params)
    with pytest.raises(ValueError, match=r"params.gate_weight has shape \(20, 19\), expected \(20, 20\)"):
        triangle_multiplication(z, None, TriangleMultiplicationParams(**{**vars(params),
                                                                         "gate_weight": torch.randn(20, 19)}))
    with pytest.raises(ValueError, match=r"params.ln_out_bias has shape \(20,\), expected \(12,\)"):
        triangle_multiplication(z, None, TriangleMultiplicationParams(**{**vars(params),
                                                                         "ln_out_bias": torch.randn(20)}))
    with pytest.raises(ValueError, match="product must be one of"):
        triangle_multiplication(z, None, params, product="cutlass")
    with pytest.raises(TypeError, match="outgoing must be a bool"):
        triangle_multiplication(z, None, params, outgoing="incoming")
    with pytest.raises(TypeError, match="params must be a TriangleMultiplicationParams"):
        triangle_multiplication(z, None, {"a_proj_weight": None})
    with pytest.raises(TypeError, match="not a known triangle multiplication module"):
        params_from_module(torch.nn.Linear(3, 3))
    impostor = torch.nn.Linear(3, 3)
    impostor.outgoing = True
    with pytest.raises(TypeError, match="Linear is not a known triangle multiplication module"):
        params_from_module(impostor)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="params.out_weight is on"):
            triangle_multiplication(z, None, TriangleMultiplicationParams(**{**vars(params),
                                                                             "out_weight": params.out_weight.cpu()}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; needs CUDA")
@pytest.mark.parametrize("product", ["cublas", "triton"])
@pytest.mark.parametrize("kind,outgoing", VARIANTS)
def test_bf16_on_cuda(kind, outgoing, product):
    # AlphaFold widths (c_z = c_hidden = 128), N = 100 (not a multiple of any block size).
    # Bar: 1e-2, or 3x the error of the module itself run in bf16.
    module = make_module(kind, outgoing, c_z=128, c_h=128, seed=12)
    z, mask = make_inputs(100, 128, seed=12)
    m64, mbf = copy.deepcopy(module).double(), copy.deepcopy(module).bfloat16()
    dout = torch.randn_like(z)
    ref, gref = fwd_bwd(run_module, m64, z, mask, dout)
    own, gown = fwd_bwd(run_module, mbf, z.bfloat16(), mask.bfloat16(), dout.bfloat16())
    names = ["out", "z"] + [n for n, _ in module.named_parameters()]
    module_err = {n: rel(a, r) for n, a, r in zip(names, (own, *gown), (ref, *gref))}
    check_against_float64(module, z, mask, torch.bfloat16, lambda n: max(1e-2, 3 * module_err[n]), dout,
                          product=product)


def test_untuned_gpu_path_takes_the_first_config_that_launches(monkeypatch):
    """FOLDCOMPILE_TRIMUL_TUNE=0 on a GPU: no timing; a candidate that fails to compile or launch
    (e.g. out of shared memory for fp32 operands) is passed over for the next (fake launches)."""
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    monkeypatch.setattr(tm, "interpreting", lambda: False)
    monkeypatch.setattr(tm, "_TUNED", {})
    monkeypatch.setenv("FOLDCOMPILE_TRIMUL_TUNE", "0")
    monkeypatch.setattr(tm.triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed with tuning off"))
    cands = tm._configs("out")
    tried = []

    def launch(cfg):
        tried.append(cfg)
        if len(tried) == 1:
            raise RuntimeError("out of resources: shared memory")
    key = tm._tune_key(1, 64 * 64, 128, 128, torch.float32, False)
    assert tm._pick("out", key, launch) == cands[1]
    assert tm._pick("out", key, launch) == cands[1] and len(tried) == 2


@pytest.mark.full
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check of the sweep's candidates (on a GPU the "
                    "sweep itself runs them)")
def test_sweep_forward_candidates_through_the_interpreter(monkeypatch):
    """Every forward candidate of bench/kernels/triangle_tune.py's sweep that the in-module lists
    do not already cover (paired-GEMM projection at 64-256 rows, column-blocked output epilogue,
    persistent forms) runs through the interpreter on a tiny problem with NaN-poisoned buffers:
    tiles far larger than N = 11, c_z = 20, c_hidden = 12, so every load and store is masked."""
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    tune = importlib.import_module("bench.kernels.triangle_tune")
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                         else t)(real_empty(*a, **k)))
    module = make_module("af2", False, seed=23)
    z, mask = make_inputs(11, 20, seed=23)
    ref = copy.deepcopy(module).double()(z, mask)
    m32 = copy.deepcopy(module).float()
    for kind in ("proj", "out"):
        for c in tune.SWEEP[kind]:
            if c in tm._GPU_CONFIGS[kind]:
                continue
            monkeypatch.setattr(tm, "_FORCED", {kind: tm._cfg(c)})
            with torch.no_grad():
                out = triangle_multiplication_module(m32, z.float(), mask.float())
            assert rel(out, ref) < 1e-5, (kind, c)
