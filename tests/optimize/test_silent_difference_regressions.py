"""Regressions: five ways optimize once computed something other than the model (found by review).

Each module here is optimized and compared with eager; each failed before its fix."""
import pytest
import torch

import foldcompile


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.allclose(
        a.nan_to_num(), b.nan_to_num(), atol=1e-5, rtol=1e-5)


class FillWith(torch.nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, m):
        logits = q @ k.transpose(-1, -2) * 8 ** -0.5
        return torch.softmax(logits.masked_fill(m, self.fill), -1) @ v


@pytest.mark.parametrize("fill", [0.0, -10.0, float("inf")])
def test_a_finite_masked_fill_that_is_not_the_lowest_value_is_not_a_mask(fill):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    m = torch.rand(2, 3, 6, 6) > 0.5
    model = FillWith(fill)
    fast = foldcompile.optimize(model, q, k, v, m)
    assert fast.report.counts()["attention"] == {"matched": 0, "rejected": 1}
    assert "neither -inf nor the dtype's lowest value" in str(fast.report)
    assert _same(fast(q, k, v, m), model(q, k, v, m))


class TwoFills(torch.nn.Module):
    def forward(self, q, k, v, m1, m2):
        logits = q @ k.transpose(-1, -2) * 8 ** -0.5
        logits = logits.masked_fill(m1, float("-inf")).masked_fill(m2, -1e9)
        return torch.softmax(logits, -1) @ v


def test_mixed_fills_are_refused_and_fully_masked_rows_keep_eager_values():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    m1 = torch.zeros(2, 3, 6, 6, dtype=torch.bool)
    m1[0, 0, 0] = True          # a row masked only by -inf: NaN in eager
    m1[0, 0, 1, :2] = True      # a row split across the two masks
    m2 = torch.zeros_like(m1)
    m2[0, 0, 1, 2:] = True
    fast = foldcompile.optimize(TwoFills(), q, k, v, m1, m2)
    assert fast.report.counts()["attention"]["matched"] == 0
    assert _same(fast(q, k, v, m1, m2), TwoFills()(q, k, v, m1, m2))


class ReadBeforeWrite(torch.nn.Module):
    def forward(self, a):
        x = a.reshape(-1)
        y = x * 1.0
        x.mul_(2.0)               # y was read before this write
        return y + a.sum()


def test_fusion_never_moves_a_read_past_an_in_place_write():
    a = torch.randn(4, 5)
    fast = foldcompile.optimize(ReadBeforeWrite(), a.clone())
    assert _same(fast(a.clone()), ReadBeforeWrite()(a.clone()))
    assert "in-place write" in str(fast.report) or fast.report.counts()["elementwise"]["matched"] == 0


class WritesIntoAView(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, a):
        self.calls.view(-1).add_(1.0)
        x = a.view(-1)
        x += 1.0
        return torch.sigmoid(x) * 2.0


def test_building_a_variant_does_not_apply_the_model_s_in_place_writes():
    model = WritesIntoAView()
    b = torch.zeros(4)
    fast = foldcompile.optimize(model, b)
    assert b.tolist() == [0.0] * 4 and model.calls.item() == 0.0   # the build wrote nothing
    out = fast(b)
    eager_b = torch.zeros(4)
    eager = WritesIntoAView()(eager_b)
    assert b.tolist() == eager_b.tolist() and _same(out, eager)
    assert model.calls.item() == 1.0
    fast(torch.zeros(5))  # a new shape builds another variant: still one write per call
    assert model.calls.item() == 2.0


class Attend(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1) @ v


def test_under_ambient_autocast_the_casts_are_made_explicit_and_the_attention_fused():
    """Under autocast the kernels (which compute in their inputs' dtypes) get autocast's casts written into
    the graph (passes/explicit_autocast.py); fp16, which the Triton interpreter computes right."""
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    model = Attend()
    with torch.autocast("cpu", dtype=torch.float16):
        fast = foldcompile.optimize(model, q, k, v)
        eager, ours = model(q, k, v), fast(q, k, v)
        report = foldcompile.verify(model, q, k, v, optimized=fast)
    assert ours.dtype == eager.dtype == torch.float16 and report.ok
    assert fast.report.counts()["attention"]["matched"] == 1
    assert "autocast made explicit: 2 op(s) with 3 cast(s)" in str(fast.report)
    assert "fused_attention(" in fast.code and "torch.Tensor.to(q, torch.float16)" in fast.code


class SoftmaxOfInf(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x * 0.5, -1) * 2


def test_a_lone_softmax_keeps_torch_nan_on_an_all_minus_inf_row():
    x = torch.randn(3, 5, 7)
    x[1, 1] = float("-inf")
    fast = foldcompile.optimize(SoftmaxOfInf(), x)
    assert fast.report.counts()["softmax"]["matched"] == 1
    assert _same(fast(x), SoftmaxOfInf()(x))


def test_verify_measures_vanishing_gradients_against_the_model_s_gradient_size():
    """The pair-bias layer norm's bias has a zero gradient in exact arithmetic: relative to its tiny
    float64 value, fp32 rounding noise is ~1e9. verify must not fail a correct optimization on it
    (it did on the zoo's Evoformer stack in the demo), yet still fail a wrong one."""
    from foldcompile.models import zoo

    model, inputs = zoo.get("evoformer_stack")
    report = foldcompile.verify(model, *inputs)
    assert report.ok, str(report)
