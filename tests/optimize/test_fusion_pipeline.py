"""One fusion pipeline (``foldcompile.optimize.fuse_annotated``: chunk-loop merges, then the rules) in
every path that fuses: ``optimize``, and the HTML report's plan (``report_html.page_data`` without an
optimized variant). A transition run in a Python chunk loop over its rows is merged into one layer in
both, so its layer norm -> up projection is one fused kernel for the whole loop, not one per chunk.
(A DAP rank's graph runs the same pipeline: tests/distributed/test_sharded_chunk_loops.py.)"""
from __future__ import annotations

import torch

import foldcompile
from foldcompile.report_html import page_data


class ChunkedTransition(torch.nn.Module):
    """LN -> up -> relu -> down on chunks of 3 rows of ``m [N_seq, N_res, 8]``, concatenated."""

    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, m):
        pieces = [self.down(torch.relu(self.up(self.norm(m[i:i + 3])))) for i in range(0, m.shape[0], 3)]
        return torch.cat(pieces, dim=0)


def test_optimize_and_the_report_plan_merge_the_chunk_loop():
    model, m = ChunkedTransition(), torch.randn(7, 5, 8)
    fast = foldcompile.optimize(model, m)
    assert fast.report.counts()["chunk_loop"] == {"matched": 1, "rejected": 0}
    assert fast.report.counts()["ln_linear"]["matched"] == 1

    plan = page_data(foldcompile.explain(model, m), depth=1, at={"N_res": 64})  # N_seq: the loop unrolled at 7
    assert plan["mode"] == "plan"
    assert plan["counts"]["chunk_loop"]["matched"] == 1, plan["counts"]
    assert plan["counts"]["ln_linear"]["matched"] == 1, plan["counts"]
    assert plan["code"].count("fused_layer_norm_linear(") == 1 and "torch.cat(" not in plan["code"], plan["code"]
