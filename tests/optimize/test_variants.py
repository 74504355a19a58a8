"""The variant cache behind OptimizedModule: each guarded axis selects or builds another variant,
a miss says which guard differed, and past the build limit calls run eagerly (or raise when strict)."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import kernel_draws_masks, rel  # noqa: E402

from foldcompile.verify import same_masks  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.variants import VariantLimitError  # noqa: E402


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.nn.functional.dropout(self.lin(self.norm(x)), 0.3, self.training)


def _check(fast, model, x):
    got = fast(x)  # the optimized module's own call (builds or selects the variant)
    reference, optimized = model, fast
    if model.training and kernel_draws_masks(fast, (x,)):
        # the kernels draw their own dropout masks: compare with the traced graph replaying them
        reference, optimized = same_masks(fast, x)
    torch.manual_seed(0)
    ref = reference(x)
    torch.manual_seed(0)
    got = optimized(x)
    assert rel(got, ref) <= 1e-5
    return got


def test_each_guarded_axis_builds_a_variant_and_says_why():
    model = Block().eval()
    x = torch.randn(3, 5, 16)
    fast = foldcompile.optimize(model, x)
    assert len(fast.variants) == 1 and fast.variants.misses == ["first call"]
    _check(fast, model, x)
    assert len(fast.variants) == 1  # a hit
    _check(fast, model, torch.randn(4, 5, 16))
    assert fast.variants.misses[-1] == "input 'x': shape (3, 5, 16) -> (4, 5, 16)"
    with torch.no_grad():
        _check(fast, model, x)
    assert fast.variants.misses[-1] == "grad mode True -> False"
    fast.train()  # follows to the model
    assert model.training
    _check(fast, model, x)
    assert fast.variants.misses[-1] == "training mode False -> True"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        got = fast(x)
    assert fast.variants.misses[-1].startswith("autocast")
    assert got.dtype == ref.dtype
    n = len(fast.variants)
    fast.eval()
    _check(fast, model, x)  # back to the first key: reused, nothing built
    assert len(fast.variants) == n
    model.double()  # parameters and input in float64: another dtype
    _check(fast, model, x.double())
    assert fast.variants.misses[-1] == "input 'x': dtype torch.float32 -> torch.float64"


def test_past_the_build_limit_runs_eagerly_with_a_warning_or_raises_when_strict():
    model = Block().eval()
    fast = foldcompile.optimize(model, torch.randn(2, 16), max_builds=2)
    _check(fast, model, torch.randn(3, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _check(fast, model, torch.randn(4, 16))
    assert out.shape == (4, 16) and any("running the model eagerly" in str(w.message) for w in caught)
    strict = foldcompile.optimize(model, torch.randn(2, 16), max_builds=1, strict=True)
    with pytest.raises(VariantLimitError, match="shape"):
        strict(torch.randn(5, 16))


def test_lru_keeps_at_most_max_variants():
    model = Block().eval()
    fast = foldcompile.optimize(model, torch.randn(2, 16), max_variants=2)
    for n in (3, 4, 5):
        _check(fast, model, torch.randn(n, 16))
    assert len(fast.variants) == 2


def test_a_changed_module_attribute_rebuilds_the_variant():
    model = Block().eval()
    x = torch.randn(3, 16)
    fast = foldcompile.optimize(model, x)
    model.norm.eps = 1e-1  # the captured graph baked eps in: its guard fails, the variant is rebuilt
    _check(fast, model, x)
    assert any("guard failed" in m for m in fast.variants.misses)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: not one graph
            return x * 2
        return x


def test_a_model_the_front_end_refuses_gets_its_error_naming_the_line():
    with pytest.raises(foldcompile.CaptureError, match="test_variants.py"):
        foldcompile.optimize(DataDependent(), torch.randn(3))
