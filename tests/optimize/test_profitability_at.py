"""``optimize(..., at={...})``: a rule's profitability is judged by the symbolic size at the stated dims,
never at the example's. The softmax kernel takes rows of at most 16384 (longer ones run its reference):
a softmax over the keys of a pair tensor ``z [N_res, N_res, c]`` has rows of ``N_res``, so the rule
takes it at the training crop and refuses it, with the report's reason, where ``N_res`` is 20000 —
on the same tiny example inputs."""
from __future__ import annotations

import torch

import foldcompile


class PairSoftmax(torch.nn.Module):
    """Softmax over the second residue index of a pair tensor (rows of N_res keys)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z.transpose(-1, -2) * 0.5, dim=-1)


def test_softmax_rule_decision_follows_the_stated_size():
    z = torch.randn(13, 13, 4)
    taken = foldcompile.optimize(PairSoftmax(), z, at={"N_res": 256})
    refused = foldcompile.optimize(PairSoftmax(), z, at={"N_res": 20000})

    assert taken.report.counts()["softmax"] == {"matched": 1, "rejected": 0}, taken.report
    assert refused.report.counts()["softmax"]["matched"] == 0, refused.report
    reasons = [r["reason"] for r in refused.report.rejections if r["rule"] == "softmax"]
    assert len(reasons) == 1 and "not profitable at the stated size" in reasons[0], refused.report
    assert "rows of 20000 > 16384" in reasons[0], reasons
    assert "not profitable at the stated size" in str(refused.report)
    # both compute the model's function (the refused one eagerly)
    for fast in (taken, refused):
        torch.testing.assert_close(fast(z), PairSoftmax()(z))
