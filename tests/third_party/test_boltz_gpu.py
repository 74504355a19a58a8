"""The unmodified Boltz-2 Pairformer on the GPU as Boltz-2 runs it (``-m gpu``; skipped without CUDA):
fp32 parameters under ``torch.autocast("cuda", dtype=torch.bfloat16)`` ("bf16-mixed"), with its own
``autocast("cuda", enabled=False)`` islands.

``optimize`` makes autocast's casts explicit (:mod:`foldcompile.passes.explicit_autocast`), fuses the
explicit graph and replays it as a CUDA graph (the explicit graph runs inside ``autocast(enabled=False)``:
no weight-cache cast is made, so the executor's cache refusal does not apply). Checked: the CUDA-graph
executor runs (replays), the rules matched, and the optimized error against an fp32 run of the same
module (no autocast; Boltz's own ``.float()`` casts make a float64 run impossible: they would mix fp32 into
it) is at most 3x eager-under-autocast's own error (+1e-3): the bf16 fidelity bound of the GPU tests.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils import _pytree as pytree

import foldcompile

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _flat(out) -> list[torch.Tensor]:
    return [o.detach() for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]


def test_boltz2_pairformer_under_cuda_bf16_autocast_fuses_replays_and_stays_within_the_bf16_bound():
    tb = importlib.import_module("third_party.test_boltz")
    pf = tb._pairformer()
    model = tb._module(pf, training=False, checkpointing=False).cuda()
    s, z, mask, pair_mask = (t.detach().cuda() for t in tb._inputs(0))
    inputs = (s, z, mask, pair_mask)
    with torch.no_grad():
        truth = _flat(model(*inputs))  # fp32 parameters and inputs, no autocast
        with torch.autocast("cuda", dtype=torch.bfloat16):
            base = _flat(model(*inputs))
            fast = foldcompile.optimize(model, *inputs)
            for _ in range(3):  # watched eager call, capture, replay
                got = _flat(fast(*inputs))
    report = fast.report
    assert report.executor == "cuda_graph", report.executor_reason
    assert report.execution["replays"] >= 1
    record = report.record
    assert record["explicit_autocast"]["explicit"] and not record["explicit_autocast"]["refused"]
    counts = report.counts()
    assert counts["layer_norm"]["matched"] + counts["ln_linear"]["matched"] >= 8, counts
    assert counts["softmax"]["matched"] + counts["attention"]["matched"] >= 6, counts
    assert [g.dtype for g in got] == [b.dtype for b in base]
    for i, (g, b, t) in enumerate(zip(got, base, truth, strict=True)):
        e_opt, e_eager = _rel(g, t), _rel(b, t)
        assert e_opt <= 3 * e_eager + 1e-3, f"output {i}: optimized {e_opt:.3g} vs eager bf16-mixed {e_eager:.3g} (against fp32)"
