"""normalize: in-place spellings become functional where nothing can tell, and only there."""
import operator

import pytest
import torch

from foldcompile.capture import trace
from foldcompile.passes import normalize_pass


def _normalized(module, *args):
    gm = trace(module, *args)
    res = normalize_pass(gm)
    return res.graph_module, res.record


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class ScaleAndBiasInPlace(torch.nn.Module):
    """OpenFold's ``q /= sqrt(d)`` and ``a += b`` spellings."""

    def forward(self, q, k, bias):
        q = q * 1.0
        q /= q.shape[-1] ** 0.5
        a = q @ k.transpose(-1, -2)
        a += bias
        a += bias
        return a.softmax(-1)


class ScaleAndBiasFunctional(torch.nn.Module):
    def forward(self, q, k, bias):
        q = q / q.shape[-1] ** 0.5
        a = q @ k.transpose(-1, -2)
        return (a + bias + bias).softmax(-1)


class MethodsInPlace(torch.nn.Module):
    """Protenix-style in-place gating: ``sigmoid_()`` and ``b *= a``."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        a = self.a(x).sigmoid_()
        b = self.b(x)
        b *= a
        return b.mul_(2.0).add_(1.0)


def test_in_place_operators_and_methods_become_functional_and_agree_with_eager():
    q, k, bias = torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 5)
    gm, record = _normalized(ScaleAndBiasInPlace(), q, k, bias)
    assert record["inplace_to_functional"] == {"itruediv": 1, "iadd": 2}
    assert not {operator.iadd, operator.itruediv} & set(_targets(gm))
    assert torch.allclose(gm(q, k, bias), ScaleAndBiasFunctional()(q, k, bias), atol=1e-6)
    x = torch.randn(4, 8)
    model = MethodsInPlace()
    gm, record = _normalized(model, x)
    assert record["inplace_to_functional"] == {"sigmoid_": 1, "imul": 1, "mul_": 1, "add_": 1}
    assert torch.allclose(gm(x), model(x), atol=1e-6)


class WritesIntoItsInput(torch.nn.Module):
    def forward(self, x):
        x += 1.0  # the caller's tensor changes: must stay in place
        return x * 2


class ViewReadAfterTheWrite(torch.nn.Module):
    def forward(self, x):
        h = x * 1.0
        row = h[0]          # a view of h, read after the write below: it sees the write
        h += 1.0
        return row * 3, h


class ValueReadAgain(torch.nn.Module):
    def forward(self, x):
        h = x * 1.0
        alias = h           # the same tensor object under another name
        h += 1.0
        return alias + h


class PromotingOperand(torch.nn.Module):
    def forward(self, x16, y32):
        h = x16 * 1.0
        h += y32            # in place stays fp16; h + y32 would be fp32
        return h


@pytest.mark.parametrize("module, args, reason", [
    (WritesIntoItsInput(), (torch.randn(4),), "writes into an input, a parameter or a constant"),
    (ViewReadAfterTheWrite(), (torch.randn(3, 4),), "another view of the same memory exists"),
    (ValueReadAgain(), (torch.randn(4),), "the value is read again after the in-place write"),
    (PromotingOperand(), (torch.randn(4, dtype=torch.float16), torch.randn(4)),
     "an operand of another dtype (type promotion differs out of place)"),
])
def test_near_misses_stay_in_place_and_still_agree_with_eager(module, args, reason):
    eager = module(*[a.clone() for a in args])
    gm, record = _normalized(module, *[a.clone() for a in args])
    assert record["inplace_to_functional"] == {}
    assert record["inplace_kept"] == {reason: 1}
    got = gm(*[a.clone() for a in args])
    for g, e in zip(got if isinstance(got, tuple) else (got,), eager if isinstance(eager, tuple) else (eager,)):
        assert g.dtype == e.dtype and torch.allclose(g, e)
