"""``foldcompile.verify``: a correct optimization passes; a deliberately wrong rule is named by
verify (first node past the bound, with its module path) and found by bisect."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import foldcompile
from foldcompile.passes.rules import all_rules
from foldcompile.passes.rules import attention as attention_rules

S, L, H, D = 2, 9, 2, 8
C = H * D


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.out = nn.Linear(C, C)

    def forward(self, x, keep):
        q, k, v = self.qkv(self.norm(x)).view(S, L, 3, H, D).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2)) * D ** -0.5
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(S, L, C)
        return x + self.out(o)


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x, keep):
        for layer in self.layers:
            x = layer(x, keep)
        return x


def _inputs():
    torch.manual_seed(3)
    keep = torch.rand(S, L) > 0.3
    keep[:, 0] = True
    return torch.randn(S, L, C), keep


def _faulty(kind: str) -> list:
    """The attention rule, wrong at ``layers.1`` only: the scale applied twice, or the mask dropped."""
    good = next(r for r in all_rules() if r.name == "attention")

    def replace(c, ctx):
        if c.site.startswith("layers.1"):
            if kind == "scale":
                c.parts["scale"] = c.parts["scale"] * c.parts["scale"] * 2.0
            else:
                c.parts["masks"] = []
        return attention_rules._replace(c, ctx)

    bad = dataclasses.replace(good, replace=replace)
    return [bad if r.name == "attention" else r for r in all_rules()]


def test_a_correct_optimization_verifies():
    model = Two()
    x, keep = _inputs()
    report = foldcompile.verify(model, x, keep)
    assert report.ok, str(report)
    assert report.outputs and len(report.gradients) == len(list(model.parameters()))
    assert all(r["optimized"] < 1e-5 for r in report.outputs + report.gradients)


@pytest.mark.parametrize("kind", ["scale", "mask"])
def test_a_wrong_rule_is_named_by_verify_and_found_by_bisect(kind):
    model = Two()
    x, keep = _inputs()
    fast = foldcompile.optimize(model, x, keep, rules=_faulty(kind))
    assert fast.report.counts()["attention"]["matched"] == 2
    report = foldcompile.verify(model, x, keep, optimized=fast, bisect=True)
    assert not report.ok
    bad = report.first_bad
    assert bad is not None and bad["module_path"].startswith("layers.1"), bad
    assert bad["match"] == "attention#1" and bad["optimized"] > 1e-3
    assert report.culprit is not None and report.culprit["id"] == "attention#1", report.bisect_steps
    assert report.culprit["site"].startswith("layers.1")
    assert "attention#1" in str(report)


class CheckpointedTwo(nn.Module):
    """``Two`` with each layer under an activation checkpoint: the rules fuse inside the bodies."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x, keep):
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, keep, use_reentrant=False)
        return x


def test_the_truth_of_a_checkpointed_model_is_its_unfused_bodies():
    """verify's truth is the traced graph; its checkpoint bodies must be the traced ones, not the
    fused graph's (they were shared: a wrong rule inside a body then agreed with itself)."""
    model = CheckpointedTwo()
    x, keep = _inputs()
    fast = foldcompile.optimize(model, x, keep)
    variant = fast.variant_for(x, keep)
    traced_bodies = [m for _, m in variant.traced.named_modules() if isinstance(m, torch.fx.GraphModule)][1:]
    fused_bodies = [m for _, m in variant.graph.named_modules() if isinstance(m, torch.fx.GraphModule)][1:]
    assert len(traced_bodies) == len(fused_bodies) == 2
    assert not any(getattr(n.target, "__name__", "").startswith("fused_") for b in traced_bodies for n in b.graph.nodes)
    assert all(any(getattr(n.target, "__name__", "") == "fused_attention" for n in b.graph.nodes) for b in fused_bodies)
    assert foldcompile.verify(model, x, keep, optimized=fast).ok


@pytest.mark.parametrize("kind", ["scale", "mask"])
def test_a_wrong_rule_inside_a_checkpoint_body_is_named_and_found(kind):
    model = CheckpointedTwo()
    x, keep = _inputs()
    fast = foldcompile.optimize(model, x, keep, rules=_faulty(kind))
    assert fast.report.counts()["attention"]["matched"] == 2
    report = foldcompile.verify(model, x, keep, optimized=fast, bisect=True)
    assert not report.ok
    assert report.culprit is not None and report.culprit["id"] == "attention#1", report.bisect_steps
    assert report.culprit["site"].startswith("layers.1")


class DropoutTwo(Two):
    """``Two`` in training mode with a dropout after each layer."""

    def forward(self, x, keep):
        for layer in self.layers:
            x = torch.nn.functional.dropout(layer(x, keep), 0.3, self.training)
        return x


def test_bisect_replays_the_dropout_masks_of_the_failing_check(monkeypatch):
    """Every bisect step compares with the masks the failing check drew: a failure that depends on
    the masks cannot vanish (or appear) because a step drew others."""
    import importlib

    module = importlib.import_module("foldcompile.verify")
    seen = []
    real = module._check

    def recording(*args, random=None, **kwargs):
        out = real(*args, random=random, **kwargs)
        seen.append({k: v.clone() for k, v in random.items()})
        return out

    monkeypatch.setattr(module, "_check", recording)
    model = DropoutTwo().train()
    x, keep = _inputs()
    fast = foldcompile.optimize(model, x, keep, rules=_faulty("scale"))
    report = foldcompile.verify(model, x, keep, optimized=fast, bisect=True)
    assert report.culprit is not None and report.culprit["id"] == "attention#1", report.bisect_steps
    assert len(seen) >= 3 and len(seen[0]) == 3  # the two dropouts' masks (drawn by kernels) and their seed state
    assert all(s.keys() == seen[0].keys() and all(torch.equal(s[k], seen[0][k]) for k in s) for s in seen)


class _Transition(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def test_a_run_that_crosses_a_relu_kink_is_compared_on_its_own_pieces():
    """One pre-activation 1e-5 above 0 in float64 that the optimized run puts at or below 0 (as a
    rounding can): its relu output moves by 1e-5, but that element's gradient loses the whole upstream
    gradient. verify compares the run's gradients with the truth's on the run's pieces, so a
    rounding-sized move across a kink passes, and the report names the node that crossed."""
    torch.manual_seed(0)
    model, x = _Transition(), torch.randn(5, 7, 8)
    with torch.no_grad():  # put pre-activation [0, 0, 3] at 1e-5 in float64
        h = nn.functional.linear(nn.functional.layer_norm(x.double(), (8,), model.norm.weight.double(),
                                                          model.norm.bias.double()), model.up.weight.double(),
                                 model.up.bias.double())
        model.up.bias[3] -= float(h[0, 0, 3]) - 1e-5
    fast = foldcompile.optimize(model, x)
    graph = fast.variant_for(x).graph
    relu = next(n for n in graph.graph.nodes if n.target is torch.relu)
    pre = relu.args[0]
    with graph.graph.inserting_before(relu):  # the optimized run's value there: -|h| where |h| < 3e-5
        small = graph.graph.call_function(torch.lt, (graph.graph.call_function(torch.abs, (pre,)), 3e-5))
        neg = graph.graph.call_function(torch.neg, (graph.graph.call_function(torch.abs, (pre,)),))
        nudged = graph.graph.call_function(torch.where, (small, neg, pre))
    relu.replace_input_with(pre, nudged)
    graph.recompile()
    report = foldcompile.verify(model, x, optimized=fast)
    assert report.crossed["optimized"] == {relu.name: 1}, report
    assert report.crossed["eager"] == {}, report
    assert report.ok, str(report)


class FloatMethodBeforeLayerNorm(torch.nn.Module):
    """``x.float()`` names its dtype in the method (Boltz's triangle multiplication): the float64 truth
    must keep float64 there, or CPU layer_norm refuses the float64 weight next to a float32 input."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(torch.einsum("ij,kj->ik", x, x).float()[..., :8]) * 2.0


def test_the_float64_truth_keeps_float64_through_x_float():
    model, x = FloatMethodBeforeLayerNorm(), torch.randn(9, 8)
    report = foldcompile.verify(model, x)
    assert report.ok and report.outputs[0]["eager"] > 0  # fp32 eager against a float64 truth: some rounding
