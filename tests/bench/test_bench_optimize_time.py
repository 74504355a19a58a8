"""bench/optimize_time.py: the cold-optimize timing of a zoo Evoformer stack, on a CPU at tiny dims."""
from __future__ import annotations

import json

import pytest

from bench import optimize_time as ot


def test_measure_splits_optimize_into_its_phases():
    row = ot.measure("infer", "cpu", blocks=1, smoke=True)
    phases = row["phase_s"]
    assert set(phases) == set(ot.PHASES) | {"other"}
    assert phases["capture"] > 0 and phases["shape_prop"] > 0 and phases["fuse"] > 0
    # the phases and the rest add up to optimize's wall time
    assert sum(phases.values()) == pytest.approx(row["optimize_s"], abs=0.05)
    assert row["first_call_s"] > 0 and row["second_call_s"] > 0 and row["executor"] == "eager"
    assert "triangle_multiplication" in row["fused"] and row["nodes"] > 100


@pytest.mark.full
def test_cold_children_and_append(tmp_path):
    """Each case in a fresh child with empty caches; --append keeps the other case's row of today's file."""
    ot.main(["--smoke", "--cases", "infer", "--no-calls", "--out", str(tmp_path)])
    results = ot.main(["--smoke", "--cases", "train", "--no-calls", "--append", "--out", str(tmp_path)])
    assert [r["case"] for r in results.rows] == ["infer", "train"]
    assert all(r["status"] == "ok" and r["optimize_s"] > 0 for r in results.rows)
    saved = json.loads(next(p for p in tmp_path.iterdir() if p.suffix == ".json").read_text())
    assert [r["case"] for r in saved["rows"]] == ["infer", "train"]
