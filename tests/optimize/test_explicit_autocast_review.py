"""Review findings on ``passes/explicit_autocast.py``: graphs where autocast's casts are not "cast each
argument, then run the op", and the pass must refuse (keep the node under autocast) rather than compute
something else."""
from __future__ import annotations

import os
import sys

import torch
import torch.fx
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from test_explicit_autocast import _assert_computes_like_autocast, _explicit  # noqa: E402


def test_einsum_whose_autocast_casts_an_intermediate_is_refused():
    """``einsum("ij,ij,jk->ik", a, b, c)`` multiplies a and b first (in fp32: mul is not in autocast's lists),
    and autocast casts that product to bf16 for the bmm: round(a*b). Casting the operands first computes
    round(round(a)*round(b)) in bf16, another value. The pass must keep it under autocast."""
    torch.manual_seed(0)
    a, b, c = torch.randn(6, 7), torch.randn(6, 7), torch.randn(7, 5)

    def f(a, b, c):
        return torch.einsum("ij,ij,jk->ik", a, b, c) + torch.einsum("ij,jk->ik", a, c)

    gm, result = _explicit(f, a, b, c)
    refused = {r["node"]: r["reason"] for r in result.record["refused"]}
    # refused (on the CPU already because the op does not run on its arguments cast to bf16; where it does,
    # because autocast cast a value computed inside the op)
    assert list(refused) == ["einsum"]
    assert "computed inside the op" in refused["einsum"] or "without autocast gives" in refused["einsum"]
    # the two-operand einsum (autocast casts views of its operands: exact) is still made explicit
    assert [c["node"] for c in result.record["changed"]] == ["einsum_1"]
    _assert_computes_like_autocast(gm, f, a, b, c)


@torch.fx.wrap
def _scaled_linear(x, w, s):
    return F.linear(x, w) * s   # autocast casts x and w for the linear; s (0-dim fp32) multiplies in fp32


def test_an_argument_autocast_did_not_cast_is_not_cast():
    """A call whose op casts some arguments and not others: ``s`` is a 0-dim fp32 tensor (it does not
    promote the bf16 product), read in fp32 under autocast. Casting it to bf16 too rounds 0.1234567."""
    torch.manual_seed(0)
    x, w, s = torch.randn(4, 8), torch.randn(8, 8), torch.tensor(0.1234567)

    def f(x, w, s):
        return _scaled_linear(x, w, s)

    gm, result = _explicit(f, x, w, s)
    assert [c["casts"] for c in result.record["changed"]] == [[("x", "torch.bfloat16"), ("w", "torch.bfloat16")]]
    _assert_computes_like_autocast(gm, f, x, w, s)
