"""Property tests: every op of the element-wise generator's vocabulary, in its usual spellings
(``test_every_rule_of_the_generator_is_drawn_by_a_property_test`` fails when a rule has none), and
random chains of them with broadcasting and dropout, against the user's own PyTorch function run
eagerly in float64 (never the fragment's replay, which shares the generator's lowering table).

Special values (NaN, ±inf, ±0, -1e9, 1e-20) go into the inputs AND the upstream gradient:
ops differ in how they pass a NaN gradient (relu's and where's backward select, mul's and
abs's multiply), and the kernel must pass it as eager does. NaN / inf positions must match
exactly (property_support.assert_close_special).
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from foldcompile.kernels import _dispatch
from foldcompile.kernels import elementwise_codegen as codegen
from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.elementwise import dropout, dropout_mask_reference, fuse_elementwise
from foldcompile.kernels.philox import _mask_shape
from property_support import assert_close_special, broadcast_shape, dtypes, inject, plain_bar, randn, seeds, specials

pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() or _dispatch.interpreting()),
                                 reason="needs a GPU or TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
KINDS = ("nan", "inf", "-inf", "-1e9", "zero", "negzero", "tiny")
EXTRA = {"negzero": -0.0, "tiny": 1e-20}
# Per op spelling: half the profile's example count (12 in CI, 200 with FOLDCOMPILE_HYPOTHESIS=large).
PER_OP = max(10, settings().max_examples // 2)


def _inject(gen, t, kinds):
    t = inject(gen, t, [k for k in kinds if k not in EXTRA])
    flat = t.view(-1)
    for k in (k for k in kinds if k in EXTRA):
        if t.numel():
            flat[int(torch.randint(t.numel(), (1,), generator=gen))] = EXTRA[k]
    return t


# name -> (function as a user writes it, input kinds: "f" float tensor, "p" positive float, "b" bool)
OPS = {
    "add": (lambda a, b: a + b, "ff"),
    "torch.add_alpha": (lambda a, b: torch.add(a, b, alpha=0.5), "ff"),
    "sub": (lambda a, b: a - b, "ff"),
    "torch.sub": (lambda a, b: torch.sub(a, b), "ff"),
    "mul": (lambda a, b: a * b, "ff"),
    "div": (lambda a, b: a / b, "ff"),
    "torch.div": (lambda a, b: torch.div(a, b), "ff"),
    "neg": (lambda a: -a, "f"),
    "sigmoid": (lambda a: torch.sigmoid(a), "f"),
    "F.sigmoid": (lambda a: F.sigmoid(a), "f"),
    "relu": (lambda a: torch.relu(a), "f"),
    "F.relu": (lambda a: F.relu(a), "f"),
    "method.relu": (lambda a: a.relu(), "f"),
    "silu": (lambda a: F.silu(a), "f"),
    "gelu": (lambda a: F.gelu(a), "f"),
    "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), "f"),
    "tanh": (lambda a: torch.tanh(a), "f"),
    "abs": (lambda a: torch.abs(a), "f"),
    "operator.abs": (lambda a: abs(a), "f"),
    "exp": (lambda a: torch.exp(a), "f"),
    "log": (lambda a: torch.log(a), "p"),
    "sqrt": (lambda a: torch.sqrt(a), "p"),
    "rsqrt": (lambda a: torch.rsqrt(a), "p"),
    "where": (lambda c, a, b: torch.where(c, a, b), "bff"),
    "masked_fill": (lambda a, m: a.masked_fill(m, -1e4), "fb"),
    "torch.masked_fill": (lambda a, m: torch.masked_fill(a, m, 2.5), "fb"),
    "gt_times": (lambda a, b: (a > b) * a, "ff"),
    "ge_lt": (lambda a, b: torch.where((a >= b) & (a < 1.0), a, b), "ff"),
    "le_or_not": (lambda a, b: torch.where(~((a <= b) | (b > 2.0)), a * b, b), "ff"),
    "half_cast": (lambda a, b: a.half().float() * b, "ff"),
    "to_dtype": (lambda a, b: a.to(torch.float16) + b.to(dtype=torch.float32), "ff"),
    "bool_cast": (lambda a, b: torch.where(a.bool(), b, a) + a.to(torch.bool) * b, "ff"),
    "mask_multiply": (lambda a, m: a * m.float(), "fb"),
}


@st.composite
def op_inputs(draw, kinds: str, dtype_st=dtypes):
    out_shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    shapes = [draw(broadcast_shape(out_shape, min_rank=0)) for _ in kinds]
    shapes[0] = out_shape  # one operand at the full shape, so the output has it
    clean = draw(st.booleans())
    return dict(shapes=shapes, dtype=draw(dtype_st), seed=draw(seeds),
                specials=[[] if clean else draw(specials(2, kinds=KINDS)) for _ in kinds],
                grad_specials=[] if clean else draw(specials(2, kinds=("nan", "inf", "zero"))))


def _make_inputs(gen, kinds, case):
    inputs = []
    for kind, shape, sp in zip(kinds, case["shapes"], case["specials"]):
        if kind == "b":
            inputs.append(torch.rand(shape, generator=gen) < 0.5)
            continue
        t = randn(gen, shape, torch.float64, scale=2.0)
        if kind == "p":
            t = t.abs() + 0.1
        inputs.append(_inject(gen, t.to(case["dtype"]), sp))
    return inputs


def check_op(name, case):
    fn, kinds = OPS[name]
    gen = torch.Generator().manual_seed(case["seed"])
    inputs = _make_inputs(gen, kinds, case)
    fused = fuse_elementwise(fn)
    leaves = [x.to(DEV).requires_grad_(x.dtype.is_floating_point) for x in inputs]
    with record_launches() as launched:
        out = fused(*leaves)
    assert launched == ["fused_elementwise_fwd"], launched
    eager = fn(*[x.double() if x.dtype.is_floating_point else x for x in inputs])
    if out.dtype == torch.bool:  # a comparison's result: exact
        assert torch.equal(out.cpu(), eager)
        return
    assert out.dtype == fn(*[x.detach() for x in inputs]).dtype  # eager's promotion
    g = _inject(gen, randn(gen, out.shape, out.dtype), case["grad_specials"])
    diff = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(out, diff, g.to(DEV), allow_unused=True)
    ref = [x.double().requires_grad_() if x.dtype.is_floating_point else x for x in inputs]
    truth = fn(*ref)
    ref_diff = [x for x in ref if x.requires_grad]
    ref_grads = torch.autograd.grad(truth, ref_diff, g.double(), allow_unused=True)
    plain_in = [x.clone().requires_grad_(x.dtype.is_floating_point) for x in inputs]
    plain = fn(*plain_in)
    plain_grads = torch.autograd.grad(plain, [x for x in plain_in if x.requires_grad], g, allow_unused=True)
    assert_close_special(f"{name} out", out.cpu(), truth, plain_bar(TOL[out.dtype], plain, truth), plain=plain)
    for i, (gk, gr, gp) in enumerate(zip(grads, ref_grads, plain_grads)):
        if gr is None:  # eager: no path to this input; the kernel gives zeros (documented)
            assert gk is None or torch.equal(gk, torch.zeros_like(gk)), (name, i)
            continue
        assert gk.dtype == diff[i].dtype
        # An fp16 output's gradient is fp16 in eager (and in the truth, which casts too): a
        # gradient is no more precise than the output's dtype, whatever the input's.
        tol = max(TOL[gk.dtype], TOL[out.dtype])
        assert_close_special(f"{name} d{i}", gk.cpu(), gr, plain_bar(tol, gp, gr), floor=0.1,
                             summed_over=max(1, out.numel() // gk.numel()), plain=gp)


@pytest.mark.parametrize("name", list(OPS))
@settings(max_examples=PER_OP)
@given(data=st.data())
def test_every_op_against_eager(name, data):
    check_op(name, data.draw(op_inputs(OPS[name][1])))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPS))
@settings(max_examples=60)
@given(data=st.data())
def test_every_op_against_eager_large(name, data):
    check_op(name, data.draw(op_inputs(OPS[name][1])))


# --------------------------------------------------------------------------- random chains with dropout

UNARY = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, "silu": F.silu, "gelu": F.gelu,
         "exp_neg_abs": lambda a: torch.exp(-torch.abs(a)), "neg": operator.neg}
BINARY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
          "gate": lambda a, b: torch.sigmoid(a) * b, "where_gt": lambda a, b: torch.where(a > b, a, b)}


@st.composite
def chain_case(draw, dtype_st=dtypes):
    out_shape = tuple(draw(st.lists(st.integers(1, 9), min_size=2, max_size=3)))
    n_in = draw(st.integers(1, 3))
    shapes = [out_shape] + [draw(broadcast_shape(out_shape)) for _ in range(n_in - 1)]
    steps = []
    for i in range(draw(st.integers(1, 4))):
        n_vals = n_in + i
        if draw(st.booleans()):
            steps.append(("u", draw(st.sampled_from(sorted(UNARY))), draw(st.integers(0, n_vals - 1)), None))
        else:
            steps.append(("b", draw(st.sampled_from(sorted(BINARY))), draw(st.integers(0, n_vals - 1)),
                          draw(st.integers(0, n_vals - 1))))
    rank = len(out_shape)
    drop = draw(st.none() | st.tuples(st.sampled_from([0.1, 0.5, 1.0]),
                                      st.lists(st.integers(-rank, -1), max_size=1, unique=True)))
    clean = draw(st.booleans())
    return dict(shapes=shapes, steps=steps, drop=drop, dtype=draw(dtype_st), seed=draw(seeds),
                offset=draw(st.integers(0, 1000)),
                specials=[[] if clean else draw(specials(2, kinds=KINDS)) for _ in shapes])


def _chain(steps, drop, dropper, n_in):
    """The chain as a plain function of its ``n_in`` inputs (fixed arity: symbolic_trace takes
    no *args); ``dropper(x, p, shared_dims)`` after the last step."""
    def body(inputs):
        vals = list(inputs)
        for kind, op, a, b in steps:
            vals.append(UNARY[op](vals[a]) if kind == "u" else BINARY[op](vals[a], vals[b]))
        out = vals[-1] + vals[0]  # the full shape (a step may have used only broadcast inputs)
        if drop is not None:
            out = dropper(out, drop[0], tuple(drop[1]))
        return out + vals[0]  # a residual
    return {1: lambda a: body((a,)), 2: lambda a, b: body((a, b)), 3: lambda a, b, c: body((a, b, c))}[n_in]


def check_chain(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, seed, offset = case["dtype"], case["seed"], case["offset"]
    inputs = [_inject(gen, randn(gen, s, dtype, scale=2.0), sp) for s, sp in zip(case["shapes"], case["specials"])]
    n_in = len(inputs)
    fused = fuse_elementwise(_chain(case["steps"], case["drop"], lambda x, p, sd: dropout(x, p, shared_dims=sd), n_in))

    def torch_dropout(x, p, sd):
        # torch's semantics, x * mask / (1 - p), with the mask the kernel draws for (seed, offset)
        keep = dropout_mask_reference(seed, offset, _mask_shape(tuple(x.shape), sd, "x"), p)
        return x * keep * (0.0 if p >= 1.0 else 1.0 / (1.0 - p))

    eager = _chain(case["steps"], case["drop"], torch_dropout, n_in)
    leaves = [x.to(DEV).requires_grad_() for x in inputs]
    out = fused(*leaves, seed=seed, offset=offset)
    g = randn(gen, out.shape, out.dtype)
    grads = torch.autograd.grad(out, leaves, g.to(DEV), allow_unused=True)  # an input the chain never reads
    ref = [x.double().requires_grad_() for x in inputs]
    truth = eager(*ref)
    ref_grads = torch.autograd.grad(truth, ref, g.double(), allow_unused=True)
    plain_in = [x.clone().requires_grad_() for x in inputs]
    plain = eager(*plain_in)
    plain_grads = torch.autograd.grad(plain, plain_in, g, allow_unused=True)
    assert_close_special("chain out", out.cpu(), truth, plain_bar(TOL[dtype], plain, truth), plain=plain)
    for i, (gk, gr, gp) in enumerate(zip(grads, ref_grads, plain_grads)):
        gr = torch.zeros_like(ref[i]) if gr is None else gr
        gk = torch.zeros_like(leaves[i]) if gk is None else gk
        assert_close_special(f"chain d{i}", gk.cpu(), gr, plain_bar(TOL[dtype], gp, gr), floor=0.1,
                             summed_over=max(1, out.numel() // gk.numel()), plain=gp)


@given(chain_case())
def test_random_chains_against_eager(case):
    check_chain(case)


@pytest.mark.slow
@settings(max_examples=300)
@given(chain_case())
def test_random_chains_against_eager_large(case):
    check_chain(case)


# --------------------------------------------------------------------------- coverage of the vocabulary


def _rules_reached(fn) -> set[str]:
    """The generator's rules (``_RULES`` keys) a user function lowers to."""
    return {v.op for v in codegen._lower(torch.fx.symbolic_trace(fn)).vals if v.kind == "op"}


def test_every_rule_of_the_generator_is_drawn_by_a_property_test():
    """A rule added to the generator's vocabulary without a spelling in ``OPS`` (or, for dropout, the
    chain test) would never meet NaN, ±inf or a NaN upstream gradient here: the class of bug the fused
    relu had (NaN to 0) would go unseen for it."""
    covered = set().union(*(_rules_reached(fn) for fn, _ in OPS.values()))
    chain = _chain([("u", "relu", 0, None)], (0.5, ()), lambda x, p, sd: dropout(x, p, shared_dims=sd), 1)
    covered |= _rules_reached(chain)
    assert set(codegen._RULES) - covered == set(), "rules no property test draws"
    assert "dropout" in covered and "relu" in covered  # the check itself sees through both paths


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; CUDA only")
@pytest.mark.parametrize("name", list(OPS))
@settings(max_examples=PER_OP)
@given(data=st.data())
def test_every_op_against_eager_bf16_cuda(name, data):
    check_op(name, data.draw(op_inputs(OPS[name][1], dtype_st=st.just(torch.bfloat16))))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; CUDA only")
@given(chain_case(dtype_st=st.just(torch.bfloat16)))
def test_random_chains_against_eager_bf16_cuda(case):
    check_chain(case)
