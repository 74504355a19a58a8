"""Autocast made explicit (``passes/explicit_autocast.py``): the pass alone on hand-built graphs, and
``optimize`` under an ambient ``torch.autocast("cpu", ...)`` on zoo blocks, the Boltz-style corpus module
and the unmodified Boltz-2 Pairformer.

The explicit graph must compute what the graph computes under autocast: the same dtypes and, on CPU, where
the explicit casts run the very kernels autocast runs, the same values bit for bit. Which ops CPU autocast
changes in torch 2.13 is checked here too (the pass itself lists none: it reads them off the annotation).

The Triton interpreter computes bfloat16 on raw bits (``PITFALLS.md``): the bf16 optimize tests run the
kernels' PyTorch references (what a CPU user gets); an fp16 autocast test runs the Triton kernels through
the interpreter.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import flat, outputs_and_grads, rel  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.models import zoo  # noqa: E402
from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass  # noqa: E402
from foldcompile.passes.explicit_autocast import explicit_autocast_pass  # noqa: E402
from foldcompile.passes.registry import enters_autocast  # noqa: E402

BF16 = torch.bfloat16
explicit_module = importlib.import_module("foldcompile.passes.explicit_autocast")


def cpu_autocast(dtype=BF16, enabled=True):
    return torch.autocast("cpu", dtype=dtype, enabled=enabled)


@pytest.fixture
def reference_kernels(monkeypatch):
    """The kernels' PyTorch references on CPU (the interpreter's bf16 is wrong: see the module docstring)."""
    monkeypatch.setattr(importlib.import_module("foldcompile.kernels._dispatch"), "_INTERPRETING", False)


def _explicit(fn, *inputs, dtype=BF16):
    """``fn`` traced, annotated under CPU autocast and made explicit: (graph module, record)."""
    gm = normalize_pass(torch.fx.symbolic_trace(fn)).graph_module
    with cpu_autocast(dtype):
        shape_prop_pass(gm, inputs, dims={})
        classify_pass(gm)
        result = explicit_autocast_pass(gm)
    return gm, result


def _same(a, b):
    for x, y in zip(flat(a), flat(b), strict=True):
        assert x.dtype == y.dtype, (x.dtype, y.dtype)
        assert torch.equal(x, y)


def _assert_computes_like_autocast(gm, fn, *inputs, dtype=BF16):
    with cpu_autocast(dtype):
        ref = fn(*inputs)
        _same(gm(*inputs), ref)
    # explicit: the graph no longer depends on the caller's autocast
    _same(gm(*inputs), ref)


def _changed_ops(record):
    return sorted({c["op"] for c in record["changed"]})


# ----------------------------------------------------------------------------- the pass alone

def mixed(x, a, ln_w, ln_b, lin_w, lin_b, w):
    """fp32 parameters, bf16 activations: linear / matmul / einsum / bmm / layer norm / softmax / sum / exp."""
    h = F.linear(F.layer_norm(x, (8,), ln_w, ln_b), lin_w, lin_b)  # LN in fp32, linear cast to bf16
    g = torch.einsum("bij,jk->bik", h, w)             # bf16 x fp32 parameter
    m = torch.matmul(g, a.transpose(-1, -2))          # bf16 x fp32 input
    b = torch.bmm(m, a) + torch.baddbmm(a, m, a)      # bf16 x fp32, and a promoting add
    p = torch.softmax(b, -1) * torch.exp(b) + b.sum(-1, keepdim=True)
    return p + a                                      # bf16 + fp32: type promotion, not autocast


def _mixed_inputs():
    torch.manual_seed(0)
    return (torch.randn(3, 5, 8), torch.randn(3, 5, 8), 1 + 0.1 * torch.randn(8), 0.1 * torch.randn(8),
            torch.randn(8, 8) / 3, 0.1 * torch.randn(8), torch.randn(8, 8) / 3)


def test_mixed_dtypes_are_made_explicit_and_compute_like_autocast():
    inputs = _mixed_inputs()
    gm, result = _explicit(mixed, *inputs)
    record = result.record
    assert result.changed and record["explicit"] and not record["refused"]
    assert _changed_ops(record) == ["baddbmm", "bmm", "einsum", "linear", "matmul"]
    linear = next(c for c in record["changed"] if c["op"] == "linear")
    assert linear["casts"] == [("layer_norm", "torch.bfloat16"), ("lin_w", "torch.bfloat16"),
                               ("lin_b", "torch.bfloat16")]
    # the casts are plain x.to(dtype) calls in normalize's spelling, with shape / dtype / class meta
    casts = [n for n in gm.graph.nodes if "autocast_cast_for" in n.meta]
    assert len(casts) == record["casts"] > 0
    for c in casts:
        assert c.target is torch.Tensor.to and c.args[1] in (BF16, torch.float32) and not c.kwargs
        assert c.meta["dtype"] == c.args[1] and c.meta["shape"] == c.args[0].meta["shape"]
        assert c.meta["op_class"] == "ELEMENTWISE" and "cost" in c.meta
    # a value cast once serves every op after it (the input ``a`` feeds matmul, bmm and baddbmm)
    assert sum(1 for c in casts if c.args[0].name == "a") == 1
    # wrapped in autocast(enabled=False): under the caller's autocast it computes the explicit graph
    enters = [n for n in gm.graph.nodes if enters_autocast(n)]
    assert len(enters) == 1 and enters[0].args[:3] == ("cpu", None, False)
    assert record["wrapped"] == ["cpu"] and record["regions"][0]["status"] == "explicit"
    _assert_computes_like_autocast(gm, mixed, *inputs)


def test_cpu_autocast_lists_of_this_torch_empirically():
    """torch 2.13's CPU autocast (bf16): the GEMMs run in bf16; of the ops CUDA autocast runs in fp32,
    CPU runs layer_norm / softmax / log_softmax / exp / log / pow / rsqrt / softplus / sum / cumsum in
    their input dtype, but prod and mse_loss in fp32 (CUDA's lists differ: the pass lists neither)."""
    def f(x, y, w, b):
        lower = [F.linear(x, w, b[0]), x @ y, torch.mm(x, y), torch.addmm(x, x, y), torch.einsum("ij,jk->ik", x, y),
                 torch.bmm(x[None], y[None])[0], torch.baddbmm(x[None], x[None], y[None])[0],
                 F.scaled_dot_product_attention(x[None], y[None], y[None])[0]]
        h = x.bfloat16()
        same = [F.layer_norm(h, (8,)), torch.softmax(h, -1), torch.log_softmax(h, -1), torch.exp(h), torch.log(h.abs()),
                h.pow(2), torch.rsqrt(h.abs()), F.softplus(h), h.sum(-1, keepdim=True).expand(8, 8),
                torch.cumsum(h, 0)]
        fp32 = [h.prod(-1, keepdim=True).expand(8, 8), F.mse_loss(h, h, reduction="none")]
        return lower, same, fp32

    args = (torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8), torch.randn(1, 8))
    gm, result = _explicit(f, *args)
    with cpu_autocast():
        lower, same, fp32 = f(*args)
    assert all(t.dtype == BF16 for t in lower + same) and all(t.dtype == torch.float32 for t in fp32)
    assert _changed_ops(result.record) == ["addmm", "baddbmm", "bmm", "einsum", "linear", "matmul", "mm",
                                           "mse_loss", "prod", "scaled_dot_product_attention"]
    _assert_computes_like_autocast(gm, f, *args)


def test_a_nested_enabled_false_region_is_left_alone_and_dropped():
    def f(x, w):
        h = F.linear(x, w)                              # bf16 under autocast
        with torch.autocast("cpu", enabled=False):
            k = F.linear(h.float(), w)                  # fp32: autocast is off here
        return h, k

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with cpu_autocast():  # captured under the autocast it runs in (a guard); symbolic_trace would drop the region
        gm = normalize_pass(foldcompile.trace(_Module(f), x, w)).graph_module
    assert sum(enters_autocast(n) for n in gm.graph.nodes) == 1
    with cpu_autocast():
        shape_prop_pass(gm, (x, w), dims={})
        classify_pass(gm)
        result = explicit_autocast_pass(gm)
    rec = result.record
    assert [c["node"] for c in rec["changed"]] == ["h"] and rec["dropped"] == ["_enter_autocast"]
    enters = [n for n in gm.graph.nodes if enters_autocast(n)]
    assert len(enters) == 1 and enters[0].args[2] is False        # only the wrap is left
    with cpu_autocast():
        ref = f(x, w)
        _same(gm(x, w), ref)
    assert ref[1].dtype == torch.float32


class _Module(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_an_in_graph_casting_region_without_ambient_autocast_is_made_explicit():
    def f(x, w):
        with torch.autocast("cpu", dtype=BF16):
            h = F.linear(x, w)
        return h * 2.0 + x

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    gm = normalize_pass(foldcompile.trace(_Module(f), x, w)).graph_module
    shape_prop_pass(gm, (x, w), dims={})
    classify_pass(gm)
    result = explicit_autocast_pass(gm)
    rec = result.record
    assert rec["wrapped"] == [] and rec["dropped"] == ["_enter_autocast"]
    assert rec["regions"][0]["kind"] == "in-graph" and rec["regions"][0]["status"] == "explicit"
    assert not any(enters_autocast(n) for n in gm.graph.nodes)
    _same(gm(x, w), f(x, w))


@torch.fx.wrap
def _scaled_by_its_max(x, w):
    return F.linear(x, w) * x.abs().max().item()   # .item(): fake tensors cannot run it


def test_an_op_it_cannot_evaluate_is_refused_and_stays_under_autocast():
    def f(x, w):
        return torch.sigmoid(F.linear(x, w)) + _scaled_by_its_max(x, w)

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    gm, result = _explicit(f, x, w)
    rec = result.record
    assert [r["node"] for r in rec["refused"]] == ["_scaled_by_its_max"]
    assert "fails under autocast" in rec["refused"][0]["reason"] and rec["refused"][0]["op"] == "_scaled_by_its_max"
    assert rec["regions"][0]["status"] == "partly explicit" and _changed_ops(rec) == ["linear"]
    # the refused node sits in a casting region of its own, which fuse_pass treats as a barrier
    fuse = importlib.import_module("foldcompile.passes.fuse")
    regions = fuse._autocast_regions(gm.graph)
    refused = next(n for n in gm.graph.nodes if n.name == "_scaled_by_its_max")
    assert regions[refused][1] is True
    assert not any(casts for n, (_, casts) in regions.items() if n is not refused)
    _assert_computes_like_autocast(gm, f, x, w)


def test_a_wrong_cast_is_caught(monkeypatch):
    """The checks above fail when a cast is wrong: casts to fp16 instead of the dtype autocast used."""
    real = explicit_module._CastCache.get

    def wrong(self, owner, a, dtype, consumer):
        return real(self, owner, a, torch.float16, consumer)

    monkeypatch.setattr(explicit_module._CastCache, "get", wrong)
    inputs = _mixed_inputs()
    gm, _ = _explicit(mixed, *inputs)
    with pytest.raises((AssertionError, RuntimeError)):
        _assert_computes_like_autocast(gm, mixed, *inputs)


def test_without_autocast_the_pass_does_nothing():
    gm, result = _explicit(lambda x, w: F.linear(x, w).softmax(-1), torch.randn(4, 8), torch.randn(8, 8))
    gm2 = normalize_pass(torch.fx.symbolic_trace(lambda x, w: F.linear(x, w).softmax(-1))).graph_module
    shape_prop_pass(gm2, (torch.randn(4, 8), torch.randn(8, 8)), dims={})
    classify_pass(gm2)
    plain = explicit_autocast_pass(gm2)
    assert not plain.changed and plain.record["regions"] == [] and plain.record["explicit"]
    assert result.changed


# ----------------------------------------------------------------------------- optimize under autocast

def _optimize_under_autocast(model, inputs, dtype=BF16):
    with cpu_autocast(dtype):
        fast = foldcompile.optimize(model, *inputs)
        torch.manual_seed(0)
        ref = flat(model(*inputs))
        torch.manual_seed(0)
        got = flat(fast(*inputs))
        report = foldcompile.verify(model, *inputs, optimized=fast)
    assert [g.dtype for g in got] == [r.dtype for r in ref]
    assert report.ok, str(report)
    rec = fast.report.record
    assert "not_fused_because" not in rec
    ac = rec["explicit_autocast"]
    assert ac["explicit"] and ac["wrapped"] == ["cpu"] and ac["casts"] > 0
    assert rec["counts"]["elementwise"]["matched"] >= 1
    return fast, ref, got


@pytest.mark.parametrize("name", ["evoformer_block", "pairformer_block"])
def test_zoo_blocks_under_bf16_autocast(name, reference_kernels):
    model, inputs = zoo.get(name)
    fast, ref, got = _optimize_under_autocast(model.eval(), inputs)
    assert sum(c["matched"] for c in fast.report.counts().values()) >= 5
    for g, r in zip(got, ref):
        assert rel(g, r) <= 2e-2


def test_zoo_block_under_fp16_autocast_through_the_triton_interpreter():
    model, inputs = zoo.get("pairformer_block")
    fast, ref, got = _optimize_under_autocast(model.eval(), inputs, dtype=torch.float16)
    assert any(m["rule"] in ("layer_norm", "ln_linear", "softmax") for m in fast.report.matches)


def test_boltz_style_layer_under_bf16_autocast(reference_kernels):
    bz = importlib.import_module("third_party.boltz_style")
    torch.manual_seed(0)
    layer = bz.BZPairStackLayer().eval()
    z = torch.randn(1, 11, 11, 16)
    pair_mask = torch.ones(1, 11, 11)
    pair_mask[:, -2:] = 0
    _optimize_under_autocast(layer, (z, pair_mask))


def test_training_under_autocast_gradients_land_in_fp32_like_eager(reference_kernels):
    model, inputs = zoo.get("pairformer_block")
    model = model.eval()
    inputs = tuple(x.requires_grad_(True) if x.is_floating_point() and x.dim() >= 3 else x for x in inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    with cpu_autocast():
        fast = foldcompile.optimize(model, *inputs)
        o_ref, g_ref = outputs_and_grads(model, params, inputs)
        o_got, g_got = outputs_and_grads(fast, params, inputs)
    assert fast.report.record["explicit_autocast"]["explicit"]
    assert [o.dtype for o in o_got] == [o.dtype for o in o_ref]
    sizes = [float(g.double().norm()) for g in g_ref]
    typical = (sum(s * s for s in sizes) / len(sizes)) ** 0.5
    for got, want, p in zip(g_got, g_ref, params + [x for x in inputs if x.requires_grad]):
        assert got.dtype == want.dtype == p.dtype == torch.float32
        err = float((got.double() - want.double()).norm()) / max(float(want.double().norm()), typical)
        assert err <= 3e-2


def _boltz():
    tb = importlib.import_module("third_party.test_boltz")
    return tb, tb._pairformer()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_unmodified_boltz2_pairformer_under_bf16_autocast(training, reference_kernels):
    tb, pf = _boltz()
    model = tb._module(pf, training=training, checkpointing=training)
    s, z, mask, pair_mask = tb._inputs(0)
    fast, ref, got = _optimize_under_autocast(model, (s, z, mask, pair_mask))
    rec = fast.report.record
    counts = fast.report.counts()
    assert counts["layer_norm"]["matched"] + counts["ln_linear"]["matched"] >= 8
    assert counts["softmax"]["matched"] + counts["attention"]["matched"] >= 6
    # Boltz's own autocast("cuda", enabled=False) islands are gone: the explicit graph runs with autocast off
    assert len(rec["explicit_autocast"]["dropped"]) >= 2 and not rec["explicit_autocast"]["refused"]
    if not training:  # eval draws no masks: the explicit casts run the kernels autocast runs
        for g, r in zip(got, ref):
            assert rel(g, r) <= 1e-2


@pytest.mark.parametrize("name", ["BufferLoop", "CatNarrowTransition"])
def test_chunk_loops_still_merge_under_autocast(name):
    loops = importlib.import_module("test_chunk_loops")
    torch.manual_seed(0)
    model = getattr(loops, name)().eval()
    g = torch.Generator().manual_seed(0)
    if name == "BufferLoop":
        mask = torch.ones(7, 10)
        mask[:, -1] = 0
        inputs = (torch.randn(7, 10, loops.C, generator=g), mask)
    else:
        inputs = (torch.randn(3, 10, loops.C, generator=g),)
    fast, _, _ = _optimize_under_autocast(model, inputs, dtype=torch.float16)
    assert fast.report.counts()["chunk_loop"]["matched"] == 1


def test_the_dynamo_backend_fuses_under_autocast():
    model, inputs = zoo.get("pairformer_block")
    model = model.eval()
    backend = importlib.import_module("foldcompile.dynamo_backend").Backend(executor="eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with cpu_autocast(torch.float16):
        ref = flat(model(*inputs))
        got = flat(compiled(*inputs))
    assert [g.dtype for g in got] == [r.dtype for r in ref]
    for g, r in zip(got, ref):
        assert rel(g, r) <= 2e-2
    assert not backend.handed_on
    records = [c.report.record for c in backend.graphs]
    assert records and all(r["explicit_autocast"]["explicit"] for r in records)
    assert sum(r["counts"]["elementwise"]["matched"] for r in records) >= 1
