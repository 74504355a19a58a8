"""Cached launch plans of the generated element-wise kernels (kernels/elementwise.py).

A call derives its layout, strides, kernel, grid and argument order once per input signature
(shape, strides, dtype, device of each tensor; the type of each number) and reuses them in
forward and backward; the values of Python numbers are read at every launch. These tests
check that the derivation runs once per signature, that a new signature (other strides, a
broadcast input, another scalar type) gets its own plan with correct results, and that the
backward plan is reused across calls.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from foldcompile.kernels import fuse_elementwise

ew = importlib.import_module("foldcompile.kernels.elementwise")


@pytest.fixture
def derivations(monkeypatch):
    """Counts the layout derivations (``FusedElementwise._prepare`` calls)."""
    count = {"n": 0}
    original = ew.FusedElementwise._prepare

    def counting(self, inputs):
        count["n"] += 1
        return original(self, inputs)

    monkeypatch.setattr(ew.FusedElementwise, "_prepare", counting)
    return count


def test_one_derivation_per_signature_forward_and_backward(derivations):
    fused = fuse_elementwise(lambda x, b, r: r + torch.sigmoid(x + b) * 0.5)
    x = torch.randn(5, 7, 9, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    r = torch.randn(5, 7, 9, requires_grad=True)
    for _ in range(3):
        y = fused(x, b, r)
        gx, gb, gr = torch.autograd.grad(y, (x, b, r), torch.ones_like(y))
    assert derivations["n"] == 1  # the backward reuses the forward call's layout
    xr, br, rr = (t.detach().double().requires_grad_() for t in (x, b, r))
    ref = rr + torch.sigmoid(xr + br) * 0.5
    rx, rb, rrr = torch.autograd.grad(ref, (xr, br, rr), torch.ones_like(ref))
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in ((gx, rx), (gb, rb), (gr, rrr)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_new_signature_gets_its_own_plan(derivations):
    fused = fuse_elementwise(lambda x, y, s: (x * y) + s)
    x = torch.randn(6, 10)
    y = torch.randn(6, 10)
    assert torch.allclose(fused(x, y, 2.0), x * y + 2.0)
    assert torch.allclose(fused(x, y, 3.5), x * y + 3.5)  # same signature, another value: read at launch
    assert derivations["n"] == 1
    xt = torch.randn(10, 6).t()  # other strides
    assert torch.allclose(fused(xt, y, 2.0), xt * y + 2.0)
    yb = torch.randn(10)  # a broadcast input
    assert torch.allclose(fused(x, yb, 2.0), x * yb + 2.0)
    assert torch.allclose(fused(x, y, 2), x * y + 2)  # an int, not a float
    assert derivations["n"] == 4
    assert len(fused._calls) == 4


def test_backward_plan_per_needed_gradients_and_upstream_strides():
    fused = fuse_elementwise(lambda x, w: torch.relu(x) * w)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    y = fused(x, w.detach())
    (gx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))  # only x's gradient needed
    y = fused(x, w)
    gx2, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    y = fused(x, w)
    g_transposed = torch.ones(8, 4).t()  # an upstream gradient with other strides
    gx3, gw3 = torch.autograd.grad(y, (x, w), g_transposed)
    (call,) = fused._calls.values()
    assert len(call.backward) == 3
    want_gx = (x > 0).float() * w
    for got in (gx, gx2, gx3):
        torch.testing.assert_close(got, want_gx)
    torch.testing.assert_close(gw, torch.relu(x))
    torch.testing.assert_close(gw3, torch.relu(x))


def test_plans_are_bounded():
    fused = fuse_elementwise(lambda x: x * 2 + 1)
    for n in range(1, ew._MAX_CALL_PLANS + 6):
        x = torch.randn(n)
        assert torch.allclose(fused(x), x * 2 + 1)
    assert len(fused._calls) == ew._MAX_CALL_PLANS
