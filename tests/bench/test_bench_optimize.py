"""bench/optimize.py on a CPU (``--smoke``: tiny models, one block): every code path of the end-to-end
benchmark runs (the zoo stacks, the unmodified Boltz-2 Pairformer under its autocast and in fp32, the
chunked eager rows, the profile columns, a missing peer, an OOM row, resume), so a GPU run of the lead
does not fail on a path nobody ran. Timings on a CPU mean nothing; the rows' structure is checked."""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from bench import optimize as bo
from bench import trunks


def _boltz_importable() -> bool:
    try:
        trunks.boltz_pairformer_module()
        return True
    except trunks.MissingPeer:
        return False


def _rows(results) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["variant"]): r for r in results.rows}


def test_smoke_zoo_inference_rows_with_profile(tmp_path):
    results = bo.main(["--smoke", "--cases", "infer2048", "--models", "pairformer_stack", "--variants", "eager",
                       "eager chunked", "optimize cuda_graph", "boltz cuequivariance", "--profile",
                       "--budget-s", "1e9", "--out", str(tmp_path)])
    rows = _rows(results)
    # a row the model does not have is not a row: no cuEquivariance path in the zoo model
    assert set(rows) == {("pairformer_stack", v) for v in ("eager", "eager chunked", "optimize cuda_graph")}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    opt = rows[("pairformer_stack", "optimize cuda_graph")]
    assert "triangle_multiplication" in opt["fused"] and opt["executor"] == "eager"  # CPU: the eager executor
    assert opt["rel_err_vs_fp32"] < 1e-5  # the fp32 smoke model against its fp32 reference
    assert isinstance(opt["fused_frac"], float) and opt["profile"].startswith(("kernels", "no kernel"))
    assert "profile" not in rows[("pairformer_stack", "eager")]  # --profile: the optimize rows only
    saved = json.loads(next(p for p in tmp_path.iterdir() if p.suffix == ".json").read_text())
    assert len(saved["rows"]) == len(results.rows) == 3


def _boltz_rows(tmp_path, variants) -> dict[str, dict]:
    results = bo.main(["--smoke", "--cases", "infer1024", "--models", "boltz2_pairformer", "--variants", *variants,
                       "--budget-s", "1e9", "--out", str(tmp_path)])
    rows = {v: r for (m, v), r in _rows(results).items() if m == "boltz2_pairformer"}
    assert set(rows) == set(variants) - {"eager chunked"}  # Boltz has no chunk_size argument: no such row
    if not _boltz_importable():
        assert all(r["status"].startswith("missing-peer: boltz==2.2.1") for r in rows.values())
        pytest.skip("boltz 2.2.1 is not importable here: its rows say missing-peer (checked)")
    return rows, results


def test_smoke_boltz_rows(tmp_path):
    rows, _ = _boltz_rows(tmp_path, ["eager", "eager chunked", "boltz cuequivariance", "optimize cuda_graph fp32"])
    assert rows["eager"]["status"] == "ok" and rows["eager"]["rel_err_vs_fp32"] < 0.05  # bf16 autocast vs fp32
    # cuEquivariance: not installed here, or no CUDA: the row says what is missing, the group goes on
    assert rows["boltz cuequivariance"]["status"].startswith("missing-peer: ")
    fp32 = rows["optimize cuda_graph fp32"]  # the unmodified module's attentions fused, in fp32
    assert fp32["status"] == "ok" and "attention 3" in fp32["fused"] and fp32["rel_err_vs_fp32"] < 1e-5


@pytest.mark.full
def test_smoke_boltz_under_its_autocast_is_fused_with_explicit_casts(tmp_path):
    rows, results = _boltz_rows(tmp_path, ["optimize cuda_graph"])
    assert rows["optimize cuda_graph"]["status"] == "ok" and rows["optimize cuda_graph"]["fused"] != "none"
    assert not any("boltz2_pairformer" in n and "autocast is active" in n for n in results.notes)


def test_an_oom_row_is_a_result_and_resume_keeps_it(tmp_path, monkeypatch):
    real_build = bo._build
    built = []

    def build(variant, subj, inputs, train):
        built.append(variant)
        if variant == "eager":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real_build(variant, subj, inputs, train)

    monkeypatch.setattr(bo, "_build", build)
    argv = ["--smoke", "--cases", "infer1024", "--models", "evoformer_stack", "--variants", "eager",
            "eager chunked", "--budget-s", "1e9", "--out", str(tmp_path)]
    rows = _rows(bo.main(argv))
    assert rows[("evoformer_stack", "eager")]["status"] == "OOM"
    chunked = rows[("evoformer_stack", "eager chunked")]
    assert chunked["status"] == "ok" and chunked["x_eager"] == 1.0  # eager did not fit: chunked is the baseline
    assert built == ["eager", "eager chunked"]
    rows = _rows(bo.main(argv + ["--resume"]))  # both rows done (an OOM is a result): nothing runs again
    assert built == ["eager", "eager chunked"] and rows[("evoformer_stack", "eager")]["status"] == "OOM"


def test_the_budget_stops_before_a_row_that_would_not_fit(tmp_path, capsys):
    results = bo.main(["--smoke", "--cases", "infer1024", "--models", "evoformer_stack", "--variants", "eager",
                       "--budget-s", "1", "--out", str(tmp_path)])
    assert results.rows == [] and "1 rows left" in capsys.readouterr().out


def test_groups_name_valid_rows_and_cover_the_issue():
    covered = set()
    for g in bo.GROUPS.values():
        for case in g["cases"]:
            for model in g["models"]:
                for v in g["variants"]:
                    assert v in bo.VARIANTS and trunks.has_row(model, bo.CASES[case]["train"], v), (model, case, v)
                    covered.add((model, case, v))
    for model in trunks.ZOO:  # the issue's rows: eager, both torch.compile modes, optimize at each case
        for case in ("train", "infer1024"):
            assert all((model, case, v) in covered for v in bo.CORE), (model, case)
        assert {(model, "infer2048", v) for v in ("eager", "torch.compile", "optimize cuda_graph")} <= covered
    assert {(trunks.BOLTZ, "infer1024", v) for v in ("eager", "torch.compile", "optimize cuda_graph",
                                                     "boltz cuequivariance")} <= covered


@pytest.mark.full
def test_smoke_training_rows(tmp_path):
    results = bo.main(["--smoke", "--cases", "train", "--models", "evoformer_stack", "--variants", "eager",
                       "optimize cuda_graph", "backend foldcompile", "--profile", "--budget-s", "1e9",
                       "--out", str(tmp_path)])
    rows = _rows(results)
    assert set(rows) == {("evoformer_stack", v) for v in ("eager", "optimize cuda_graph", "backend foldcompile")}
    assert all(r["status"] == "ok" and r["rel_err_vs_fp32"] == "-" for r in rows.values())  # train: no fp32 truth
    assert "outer_product_mean" in rows[("evoformer_stack", "optimize cuda_graph")]["fused"]


@pytest.mark.parametrize("name", ["bench.op_profile", "bench.trunks", "bench.optimize_time"])
def test_docstring_examples(name):
    import doctest

    failures, _ = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert failures == 0
