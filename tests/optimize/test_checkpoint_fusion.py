"""Fusion inside activation-checkpoint regions: the rules match in the body, the body stays a
checkpoint (its fused kernels are recomputed in backward), and the region saves no more for
backward than before.

A capture turns ``torch.utils.checkpoint.checkpoint(fn, ...)`` into a call of the body subgraph
(``wrap_body_0``) through ``checkpoint(..., use_reentrant=False)``; shape propagation annotates
the body's nodes, so the rules see them like any others.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402


class CheckpointedBlock(nn.Module):
    """LN -> gated attention with a mask bias -> dropout + residual, the body under checkpoint."""

    def __init__(self, c: int = 16, heads: int = 2, p: float = 0.25, use_checkpoint: bool = True):
        super().__init__()
        self.heads, self.p, self.use_checkpoint = heads, p, use_checkpoint
        self.ln = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.gate = nn.Linear(c, c)
        self.out = nn.Linear(c, c)

    def body(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        q, k, v = self.qkv(h).view(*h.shape[:-1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + (mask[:, None, None, :] - 1) * 1e9
        o = (torch.softmax(logits, -1) @ v).transpose(1, 2)
        o = torch.sigmoid(self.gate(h)).view(o.shape) * o
        return F.dropout(self.out(o.reshape(h.shape)), self.p, self.training) + x

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint:
            return checkpoint(self.body, x, mask, use_reentrant=False) * 0.5
        return self.body(x, mask) * 0.5


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(3, 7, generator=g) < 0.7).float()
    mask[:, 0] = 1.0
    return torch.randn(3, 7, 16, generator=g, requires_grad=True), mask


def _bodies(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    return [m for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]


def test_rules_match_inside_the_checkpoint_body_and_it_stays_a_checkpoint():
    model = CheckpointedBlock().train()
    fast = foldcompile.optimize(model, *_inputs(0))
    counts = fast.report.counts()
    assert counts["attention"] == {"matched": 1, "rejected": 0}, fast.report
    # the layer norm and its two projections (qkv, gate): one layer-norm -> projections kernel
    assert counts["ln_linear"] == {"matched": 1, "rejected": 0}, fast.report
    assert {m["graph"] for m in fast.report.matches if m["rule"] in ("attention", "ln_linear")} == {"GraphModule"}
    gm = fast.graph_module
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(checkpoint) == 1
    (body,) = _bodies(gm)
    names = [getattr(n.target, "__name__", "") for n in body.graph.nodes if n.op == "call_function"]
    assert "fused_attention" in names and "fused_layer_norm_linear" in names
    assert "softmax" not in names and "layer_norm" not in names
    assert_same_function(model, _inputs(1), fast)  # dropout in the body: torch's masks, replayed in backward


def test_fused_kernels_in_the_body_are_recomputed_in_backward(monkeypatch):
    """Forward runs each fused kernel once; backward runs the body again (checkpoint recompute),
    so each runs a second time, and only then its backward."""
    att = importlib.import_module("foldcompile.passes.rules.attention")
    ln = importlib.import_module("foldcompile.passes.rules.ln_multi_linear")
    calls = {"attention": 0, "layer_norm": 0}

    def counting(name, fn):
        def run(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return run

    monkeypatch.setattr(att, "_attention_kernel", counting("attention", att._attention_kernel))
    monkeypatch.setattr(ln, "_layer_norm_linear_kernel", counting("layer_norm", ln._layer_norm_linear_kernel))
    model = CheckpointedBlock(p=0.0).train()
    fast = foldcompile.optimize(model, *_inputs(0))
    x, mask = _inputs(2)
    calls.update(attention=0, layer_norm=0)
    y = fast(x, mask)
    assert calls == {"attention": 1, "layer_norm": 1}
    y.square().sum().backward()
    assert calls == {"attention": 2, "layer_norm": 2}
    assert x.grad is not None and model.qkv.weight.grad is not None


def _saved_for_backward(fn, *args) -> tuple[int, int, int]:
    """(tensors saved for backward, their bytes, the bytes of those that are not parameters) while
    ``fn(*args)`` runs: the activation memory a forward keeps for its backward."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    nbytes = [t.numel() * t.element_size() for t in saved]
    activations = [b for t, b in zip(saved, nbytes) if not isinstance(t, nn.Parameter)]
    return len(saved), sum(nbytes), sum(activations)


def test_a_checkpointed_block_saves_no_more_for_backward_once_fused():
    """The fused kernels save their tensors inside the region, where checkpoint drops them: the
    optimized block keeps exactly what the traced (unfused) block keeps, and no more activation
    bytes than eager (the capture passes the parameters as the region's inputs, saved by reference).
    Without the checkpoint the fused block keeps far more (what the check would see if recompute
    were lost)."""
    model = CheckpointedBlock().train()
    x, mask = _inputs(3)
    fast = foldcompile.optimize(model, x, mask)
    variant = fast.variant_for(x, mask)
    n_fast, bytes_fast, act_fast = _saved_for_backward(fast, x, mask)
    n_traced, bytes_traced, act_traced = _saved_for_backward(variant.traced, x, mask)
    _, _, act_eager = _saved_for_backward(model, x, mask)
    assert (n_fast, bytes_fast) == (n_traced, bytes_traced)
    assert act_fast == act_traced <= act_eager
    plain = CheckpointedBlock(use_checkpoint=False).train()
    plain.load_state_dict(model.state_dict())
    _, _, act_plain = _saved_for_backward(foldcompile.optimize(plain, x, mask), x, mask)
    assert act_plain > 4 * act_fast


class NestedCheckpoints(nn.Module):
    """A checkpoint inside a checkpointed function (OpenFold's blocks inside a checkpointed stack)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.lin = nn.Linear(c, c)

    def inner(self, x):
        return torch.relu(self.lin(self.ln2(x))) * 2.0 + x

    def outer(self, x):
        return checkpoint(self.inner, self.ln1(x), use_reentrant=False)

    def forward(self, x):
        return checkpoint(self.outer, x, use_reentrant=False)


def test_nested_checkpoint_bodies_are_annotated_and_fused():
    model, x = NestedCheckpoints().train(), torch.randn(3, 7, 16, requires_grad=True)
    fast = foldcompile.optimize(model, x)
    # ln1 alone (its output is a checkpoint's operand) and ln2 with its linear, in the inner body
    assert fast.report.counts()["layer_norm"] == {"matched": 1, "rejected": 0}, fast.report
    assert fast.report.counts()["ln_linear"] == {"matched": 1, "rejected": 0}, fast.report
    assert fast.report.counts()["elementwise"]["matched"] >= 1, fast.report
    assert_same_function(model, (x,), fast)


class PairCheckpoint(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, z):
        return checkpoint(lambda t: self.ln(t).sigmoid() * t, z, use_reentrant=False)


def test_shape_prop_gives_the_body_the_callers_symbolic_sizes_and_classify_classifies_it():
    from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass

    z = torch.randn(11, 11, 8)
    gm = normalize_pass(foldcompile.trace(PairCheckpoint(), z)).graph_module
    result = shape_prop_pass(gm, (z,))
    assert result.record["dims"] == {"N_res": 11} and result.record["fallback"] == []
    (body,) = _bodies(gm)
    n_res = next(iter(gm.meta["dims"]))
    norm = next(n for n in body.graph.nodes if getattr(n.target, "__name__", "") == "layer_norm")
    assert str(norm.meta["sym_shape"]) == f"({n_res}, {n_res}, 8)" and norm.meta["dtype"] == torch.float32
    record = classify_pass(gm).record
    assert list(record["bodies"].values()) == [{"REDUCTION": 1, "ELEMENTWISE": 2}]
    assert norm.meta["op_class"] == "REDUCTION" and norm.meta["cost"]["bytes"] != 0


def test_checkpoint_bodies_are_annotated_and_fused_without_named_dims():
    """A graph whose named dims are ambiguous (N_res = 8 = the channel size) is annotated with
    constant sizes; that path annotates checkpoint bodies too, so their ops are still fused."""
    model, z = PairCheckpoint(), torch.randn(8, 8, 8, requires_grad=True)
    fast = foldcompile.optimize(model, z)
    assert "ambiguous" in fast.graph_module.meta["named_dims_unavailable"]
    counts = fast.report.counts()
    assert counts["layer_norm"] == {"matched": 1, "rejected": 0}, fast.report
    assert counts["elementwise"] == {"matched": 1, "rejected": 0}, fast.report
    (body,) = _bodies(fast.graph_module)
    names = [getattr(n.target, "__name__", "") for n in body.graph.nodes if n.op == "call_function"]
    assert "fused_layer_norm" in names and "layer_norm" not in names
    assert_same_function(model, (torch.randn(8, 8, 8, requires_grad=True),), fast)


def _called_and_bound(code: str) -> tuple[set[str], set[str]]:
    import ast

    tree = ast.parse(code)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    bound = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    bound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) for a in n.args.args}
    return called, bound


def test_code_shows_the_fused_calls_inside_checkpoint_bodies_with_the_callers_names():
    model = CheckpointedBlock().train()
    fast = foldcompile.optimize(model, *_inputs(0))
    code = fast.code
    root, body = code.split("# wrap_body_0: an activation-checkpoint region")
    assert "checkpoint(wrap_body_0, x, ln_weight, ln_bias, qkv_weight, mask," in root
    assert "def wrap_body_0(self, x, ln_weight, ln_bias, qkv_weight, mask, gate_weight, gate_bias, out_weight, " \
           "out_bias):" in body
    # the layer norm with the projections it feeds (q/k/v and the gate): one layer-norm -> projections call
    assert "fused_attention(" in body and "fused_layer_norm_linear(x, ln_weight, ln_bias, [qkv_weight, gate_weight]" in body
    assert not any(w in code for w in ("l_x_", "l__self", "FakeTensor", "foldcompile_passes"))
    called, bound = _called_and_bound(code)  # valid Python, and no value rebinds a kernel's name
    assert {"fused_attention", "fused_layer_norm_linear"} <= called and not (called & bound)
    assert_same_function(model, _inputs(1), fast)  # the renamed body still runs


def test_code_shows_nested_checkpoint_bodies():
    model, x = NestedCheckpoints().train(), torch.randn(3, 7, 16, requires_grad=True)
    fast = foldcompile.optimize(model, x)
    code = fast.code
    assert "# wrap_body_1: an activation-checkpoint region (" in code
    assert "# wrap_body_1.wrap_body_0: an activation-checkpoint region, inside wrap_body_1" in code
    inner = code.split("# wrap_body_1.wrap_body_0")[1]
    assert "fused_layer_norm_linear(fused_layer_norm_0, ln2_weight, ln2_bias, [lin_weight], [lin_bias]" in inner
    assert "fused_elementwise_relu_mul_add(" in inner
    called, bound = _called_and_bound(code)
    assert not (called & bound)
