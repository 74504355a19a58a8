"""What a variant cache builds on: ``Guards.mismatch`` (which guard a call breaks, without raising) and
``variant_key`` (a hashable key of what a call specialises on: shapes, dtypes, devices, grad mode,
autocast, training mode). The bare ``trace`` result keeps refusing with a GuardError naming the guard."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from foldcompile.capture import trace
from foldcompile.guards import GuardError, Mismatch, variant_key


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)
        self.scale = 2.0

    def forward(self, x, mask=None):
        y = self.drop(self.lin(x)) * self.scale
        return y if mask is None else y * mask


X = torch.randn(3, 4)


@pytest.fixture(scope="module")
def captured():
    model = Block().eval()
    return model, trace(model, X)


def _context(axis):
    if axis == "grad_mode":
        return torch.no_grad()
    if axis == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.enable_grad()  # a no-op here: the capture ran with grad enabled


@pytest.mark.parametrize("axis, call, guard", [
    ("shape", lambda: ((torch.randn(5, 4),), {}), "input 'x'"),
    ("dtype", lambda: ((X.double(),), {}), "input 'x'"),
    ("layout", lambda: ((torch.randn(4, 3).t(),), {}), "input 'x'"),
    ("requires_grad", lambda: ((X.clone().requires_grad_(),), {}), "input 'x'"),
    ("optional input", lambda: ((X,), {"mask": torch.ones(3, 4)}), "input 'mask'"),
    ("grad_mode", lambda: ((X,), {}), "grad_mode"),
    ("autocast", lambda: ((X,), {}), "autocast"),
])
def test_each_axis_changes_the_key_and_names_its_guard(captured, axis, call, guard):
    model, gm = captured
    base = variant_key(model, (X,))
    args, kwargs = call()
    with _context(axis):
        key = variant_key(model, args, kwargs)
        miss = gm.guards.mismatch(args, kwargs, gm)
        assert key != base and hash(key) != hash(base)
        assert key == gm.guards.variant_key(args, kwargs)  # the same key before and after a capture
        assert isinstance(miss, Mismatch) and miss.guard == guard, miss
        with pytest.raises(GuardError) as e:
            gm(*args, **kwargs)
        assert e.value.guard == guard and str(e.value) == miss.message


def test_training_mode_changes_the_key_and_names_its_guard(captured):
    model, gm = captured
    base = variant_key(model, (X,))
    model.train()
    try:
        assert variant_key(model, (X,)) != base
        miss = gm.guards.mismatch((X,), {}, gm)
        assert miss is not None and miss.guard == "training" and "training=True != captured False" in miss.message
        with pytest.raises(GuardError, match="training=True"):
            gm(X)
    finally:
        model.eval()


def test_the_captured_call_has_no_mismatch_and_an_equal_key(captured):
    model, gm = captured
    assert gm.guards.mismatch((torch.randn(3, 4),), {}, gm) is None
    assert gm.guards.variant_key((torch.randn(3, 4),), {"mask": None}) == variant_key(model, (X,))
    cache = {variant_key(model, (X,)): gm}  # hashable: usable as a cache key
    assert cache[variant_key(model, (torch.randn(3, 4),))] is gm


def test_mismatch_names_state_guards_and_never_raises(captured):
    model, gm = captured
    assert gm.guards.mismatch((X, None, 1), {}, gm).guard == "signature"
    model.scale = 3.0
    try:
        miss = gm.guards.mismatch((X,), {}, gm)
        assert miss.guard == "module_state" and "scale" in miss.message
        assert variant_key(model, (X,)) == variant_key(model, (torch.randn(3, 4),))  # state is the guards' job
    finally:
        model.scale = 2.0
    with torch.no_grad():
        model.lin.weight.data = model.lin.weight.data.double()
    try:
        assert gm.guards.mismatch((X,), {}, gm).guard == "parameters"
    finally:
        with torch.no_grad():
            model.lin.weight.data = model.lin.weight.data.float()
    assert gm.guards.mismatch((X,), {}, gm) is None


def test_values_of_other_types_are_other_keys():
    class Scaled(nn.Module):
        def forward(self, x, s):
            return x * s

    m = Scaled()
    keys = {variant_key(m, (X, v)) for v in (1, 1.0, True, "1")}
    assert len(keys) == 4
