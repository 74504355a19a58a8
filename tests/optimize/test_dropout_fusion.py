"""Dropout inside the generated element-wise kernels (passes/rules/elementwise.py, passes/rules/_dropout.py).

The kernels draw each mask from the graph's device seed state (``draw_dropout_seed``, once per
forward) and a fixed counter base, regenerate it in backward, and ``verify`` / ``same_masks`` replay
the same masks in the traced graph, so training mode is compared exactly. Tiny shapes, fp32,
through the Triton interpreter.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function, outputs_and_grads, rel  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.kernels import record_launches  # noqa: E402
from foldcompile.kernels.philox import draw_dropout_seed  # noqa: E402
from foldcompile.passes.registry import draws_random  # noqa: E402
from foldcompile.verify import same_masks  # noqa: E402

C = 8


class BiasDropoutResidual(nn.Module):
    """``F.dropout(x @ W + b, p, training=self.training) + r``: the bias add is the kernel's too."""

    def __init__(self, p: float = 0.25):
        super().__init__()
        self.p = p
        self.w = nn.Parameter(torch.randn(C, C) / C ** 0.5)
        self.b = nn.Parameter(torch.randn(C))

    def forward(self, x, r):
        return F.dropout(x @ self.w + self.b, self.p, training=self.training) + r


class ModuleDropout(nn.Module):
    """``nn.Dropout`` after a gate, then the residual."""

    def __init__(self, p: float = 0.3):
        super().__init__()
        self.lin = nn.Linear(C, C)
        self.drop = nn.Dropout(p)

    def forward(self, x, r):
        return r + self.drop(torch.sigmoid(self.lin(x)) * x)


class SharedRowDropout(nn.Module):
    """AlphaFold's row-wise dropout, written as ``dropout(ones_like(x[..., :1, :, :])) * x``."""

    def __init__(self, p: float = 0.25):
        super().__init__()
        self.p = p
        self.lin = nn.Linear(C, C)

    def forward(self, z, r):
        u = self.lin(z)
        mask = F.dropout(torch.ones_like(u[..., :1, :, :]), self.p, self.training)
        return r + mask * u


class NewOnesColumnDropout(nn.Module):
    """OpenFold's spelling: ``self.dropout(x.new_ones(shape)) * x`` with the mask shared along dim -2."""

    def __init__(self, p: float = 0.25):
        super().__init__()
        self.lin = nn.Linear(C, C)
        self.dropout = nn.Dropout(p)

    def forward(self, z, r):
        u = self.lin(z)
        shape = list(u.shape)
        shape[-2] = 1
        return r + u * self.dropout(u.new_ones(shape))


class BernoulliRowDropout(nn.Module):
    """Our reference models' spelling: ``x * bernoulli(full(S, 1 - p)) / (1 - p)``."""

    def __init__(self, p: float = 0.25):
        super().__init__()
        self.p = p
        self.lin = nn.Linear(C, C)

    def forward(self, z, r):
        u = self.lin(z)
        shape = list(u.shape)
        shape[-3] = 1
        keep = torch.bernoulli(torch.full(shape, 1.0 - self.p, dtype=u.dtype, device=u.device))
        return r + u * keep / (1.0 - self.p)


def _pair(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, n, C, generator=g), torch.randn(2, n, n, C, generator=g)


def _random_ops(fast, inputs) -> list[str]:
    graph = fast.variant_for(*inputs).graph
    return [n.name for n in graph.graph.nodes if n.op == "call_function" and draws_random(n)]


def _drawn(fast, inputs) -> list[dict]:
    graph = fast.variant_for(*inputs).graph
    return [m for n in graph.graph.nodes for m in n.meta.get("dropout_masks", ())]


@pytest.mark.parametrize("cls", [BiasDropoutResidual, ModuleDropout, SharedRowDropout, NewOnesColumnDropout,
                                 BernoulliRowDropout])
def test_dropout_spellings_are_drawn_in_the_kernel_and_compare_exactly(cls):
    model = cls().train()
    inputs = _pair()
    fast = foldcompile.optimize(model, *inputs)
    assert _random_ops(fast, inputs) == ["dropout_seed"], fast.code  # every mask drawn by a kernel
    (drawn,) = _drawn(fast, inputs)
    assert drawn["offset"] == 0 and drawn["seed"] == "dropout_seed"
    code = fast.code
    assert "dropout_seed = draw_dropout_seed(" in code and "seed = dropout_seed" in code
    # the shared masks are drawn on their own shape (size 1 along the shared dim), not the output's
    shared = {SharedRowDropout: (2, 1, 5, C), NewOnesColumnDropout: (2, 5, 1, C), BernoulliRowDropout: (2, 1, 5, C)}
    assert drawn["shape"] == shared.get(cls, (2, 5, 5, C))
    # the traced graph's function with the kernels' masks: bit for bit in fp32 for chains of adds and
    # products (the kernel rounds as eager does), within rounding where a sigmoid is fused
    traced, fused = same_masks(fast, *inputs)
    if cls is ModuleDropout:
        assert rel(fused(*inputs), traced(*inputs)) <= 1e-6
    else:
        assert torch.equal(fused(*inputs), traced(*inputs))
    assert assert_same_function(model, inputs, fast) <= 1e-6
    report = foldcompile.verify(model, *inputs, optimized=fast)
    assert report.ok, str(report)
    assert report.outputs[0]["optimized"] <= 1e-6


def test_shared_mask_is_broadcast_along_the_shared_dim():
    model = SharedRowDropout(p=0.5).train()
    z, r = _pair(n=6)
    fast = foldcompile.optimize(model, z, r)
    dropped = (fast(z, r) - r) == 0                       # where u was multiplied by 0
    assert dropped.any() and (~dropped).any()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # one mask for every row i


def test_each_call_draws_new_masks_and_torch_s_seed_reproduces_them():
    model = BiasDropoutResidual(p=0.5).train()
    inputs = _pair()
    fast = foldcompile.optimize(model, *inputs)
    with torch.no_grad():
        first, second = fast(*inputs), fast(*inputs)
        torch.manual_seed(7)
        a = fast(*inputs)
        torch.manual_seed(7)
        b = fast(*inputs)
    assert not torch.equal(first, second)  # a new device seed state per forward
    assert torch.equal(a, b)               # drawn by torch's generator


class NoHostRead(TorchDispatchMode):
    """Fails on any read of a tensor's value on the host (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``),
    which a CUDA graph cannot capture: ``aten._local_scalar_dense`` is what they all dispatch to."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise RuntimeError(f"host read of a device value: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_read_of_the_seed_forward_or_backward():
    # torch.cuda.set_sync_debug_mode needs CUDA; on CPU a dispatch mode sees every host read instead
    with pytest.raises(RuntimeError, match="host read"), NoHostRead():
        int(torch.randint(0, 2**31 - 1, (1,)))  # what a host seed (the old kernels' seed=None) did
    model = BiasDropoutResidual().train()
    x, r = _pair()
    x.requires_grad_(True)
    fast = foldcompile.optimize(model, x, r)
    fast(x, r)  # the first call builds the kernels' launch plans
    with NoHostRead():
        out = fast(x, r)
        out.sum().backward()
        fused = fast.variant_for(x, r).graph
        kernel = next(n.target.kernel for n in fused.graph.nodes if hasattr(n.target, "kernel"))
        kernel(x.detach(), torch.randn(C), r)  # a direct call without a seed draws one on the device
    assert x.grad is not None


def test_p_zero_is_the_identity_and_p_one_gives_torch_s_zeros():
    inputs = _pair()
    zero = foldcompile.optimize(BiasDropoutResidual(p=0.0).train(), *inputs)
    assert _drawn(zero, inputs) == [] and "dropout" not in _random_ops(zero, inputs)
    assert_same_function(zero.model, inputs, zero)
    model = BiasDropoutResidual(p=1.0).train()
    fast = foldcompile.optimize(model, *inputs)
    assert len(_drawn(fast, inputs)) == 1
    x, r = inputs
    with torch.no_grad():
        assert torch.equal(fast(x, r), r + 0.0)
        x_nan = x.clone()
        x_nan[0, 0, 0, 0] = float("nan")
        got = fast(x_nan, r)
        want = model(x_nan, r)        # torch: x * 0, so a NaN stays NaN
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()


class TensorP(nn.Module):
    """A dropout probability read from a tensor, and a Bernoulli of a data tensor: not constant masks."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x, probs, r):
        u = self.lin(x)
        return r + u * torch.bernoulli(probs) + F.alpha_dropout(u, 0.2, self.training)


def test_near_misses_stay_on_torch_s_generator():
    model = TensorP().train()
    x, r = _pair()
    probs = torch.rand(2, 5, 5, C)
    fast = foldcompile.optimize(model, x, probs, r)
    ops = _random_ops(fast, (x, probs, r))
    assert any(n.startswith("bernoulli") for n in ops) and any(n.startswith("alpha_dropout") for n in ops)
    assert _drawn(fast, (x, probs, r)) == []
    reasons = {u["op"]: u["reason"] for u in fast.report.unfused}
    assert "random op" in reasons["bernoulli"] and "random op" in reasons["alpha_dropout"]
    assert_same_function(model, (x, probs, r), fast)  # torch's masks, seeded alike


def test_a_graph_value_p_is_refused_by_the_kernel_lowering():
    from foldcompile.kernels import unsupported_reason
    gm = torch.fx.symbolic_trace(lambda x, p: F.dropout(x, p) + 1.0)
    node = next(n for n in gm.graph.nodes if n.target is F.dropout)
    assert "must be a constant number" in unsupported_reason(node, gm)
    gm = torch.fx.symbolic_trace(lambda x, t: F.dropout(x, 0.5, training=t) + 1.0)
    node = next(n for n in gm.graph.nodes if n.target is F.dropout)
    assert "must be a Python bool" in unsupported_reason(node, gm)


def test_eval_mode_dropout_is_identity_and_draws_nothing():
    model = ModuleDropout().eval()
    inputs = _pair()
    fast = foldcompile.optimize(model, *inputs)
    assert _drawn(fast, inputs) == [] and "dropout_seed" not in _random_ops(fast, inputs)
    with torch.no_grad():
        assert_same_function(model, inputs, fast, grads=False)


class CheckpointedDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)

    def body(self, x, r):
        return r + F.dropout(torch.sigmoid(self.lin(x)) * x, 0.5, self.training)

    def forward(self, x, r):
        return checkpoint(self.body, x, r, use_reentrant=False)


def test_checkpointed_kernel_recomputes_with_the_same_mask_in_backward():
    model = CheckpointedDropout().train()
    x, r = _pair()
    x.requires_grad_(True)
    fast = foldcompile.optimize(model, x, r)
    body = fast.variant_for(x, r).graph.wrap_body_0
    assert [m["seed"] for n in body.graph.nodes for m in n.meta.get("dropout_masks", ())] == ["dropout_seed"]
    with record_launches() as launches:
        out = fast(x, r)
        out.backward(torch.ones_like(out))
    assert sum(name == "fused_elementwise_fwd" for name in launches) == 2  # forward, then recomputed
    # the backward used the forward's masks: gradients equal the traced graph's with the kernel's masks
    params = [p for p in model.parameters()]
    traced, fused = same_masks(fast, x, r)
    o_ref, g_ref = outputs_and_grads(traced, params, (x, r))
    o_got, g_got = outputs_and_grads(fused, params, (x, r))
    assert rel(o_got[0], o_ref[0]) <= 1e-6
    for a, b in zip(g_got, g_ref):
        assert rel(a, b) <= 1e-5
    assert foldcompile.verify(model, x, r, optimized=fast).ok


def test_a_dropout_without_its_scale_is_named_by_verify_and_found_by_bisect(monkeypatch):
    lowering = importlib.import_module("foldcompile.kernels.elementwise_lowering")
    monkeypatch.setattr(lowering, "_dropout_scale", lambda p: 1.0)  # the kernels forget 1 / (1 - p)
    model = BiasDropoutResidual(p=0.5).train()
    inputs = _pair()
    fast = foldcompile.optimize(model, *inputs)
    report = foldcompile.verify(model, *inputs, optimized=fast, bisect=True)
    assert not report.ok
    assert report.first_bad["op"] in ("dropout", "add") and report.first_bad["match"] == "elementwise#0", report
    assert report.culprit is not None and report.culprit["rule"] == "elementwise"


class TwoDropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x, r):
        h = F.dropout(self.a(x), 0.25, self.training) + r
        return F.dropout(self.b(h), 0.25, self.training) + h


def test_counter_bases_do_not_depend_on_the_grouping():
    from foldcompile.optimize import build_variant
    model = TwoDropouts().train()
    inputs = _pair()
    fast = foldcompile.optimize(model, *inputs)
    whole = {m["node"]: m["offset"] for m in _drawn(fast, inputs)}
    numel = inputs[0].numel()
    assert whole == {"dropout": 0, "dropout_1": numel}
    for off in ("elementwise#0", "elementwise#1"):  # one chain left unfused (as a bisect step does)
        v = build_variant(model, inputs, {}, at=fast.at, dims=fast.dims, rules=fast.rules, disabled=[off])
        left = {m["node"]: m["offset"] for n in v.graph.graph.nodes for m in n.meta.get("dropout_masks", ())}
        assert len(left) == 1 and all(whole[k] == o for k, o in left.items()), (off, left)


def test_draw_dropout_seed_is_a_device_state_from_torch_s_generator():
    torch.manual_seed(3)
    a = draw_dropout_seed(torch.empty(2))
    torch.manual_seed(3)
    b = draw_dropout_seed(torch.empty(2))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (2,) and int(a[1]) == 0
