"""Timing and reporting helpers shared by every benchmark in bench/.

GPU only: times with CUDA events after warm-up, reports the median of several
repetitions, and measures peak memory with the caching allocator's counters.
A speed-up a benchmark reports is always a ratio against a baseline timed in the same
process on the same card; bench/baseline.py itself records the baselines' absolute times.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch


def card_name() -> str:
    """The GPU's name, e.g. 'NVIDIA H100 80GB HBM3', or 'cpu'."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10, min_time_ms: float = 0.0) -> float:
    """Median wall time of ``fn()`` on the GPU in milliseconds (CUDA events).

    Each repetition is timed on its own so a single slow launch cannot hide in a mean.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    total = 0.0
    while len(times) < reps or total < min_time_ms:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        total += times[-1]
        if len(times) > 1000:
            break
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """The card's measured device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def add_memory_bound_rows(results: "Results", key: dict, passes, ours, eager, compiled, copy_gbs: float,
                          extra: dict) -> None:
    """Time ``ours``, ``eager`` and ``compiled`` (None if torch.compile failed) for each
    ``(pass name, make, bytes)`` in ``passes`` — ``make(fn)`` returns the thunk to time — and add
    one row per pass: times, our GB/s and % of the card's copy bandwidth, ratios, peak memory.
    A compile failure is recorded in the notes, not raised: it is a result."""
    for pass_name, make, n_bytes in passes:
        t_ours = time_ms(make(ours))
        t_eager = time_ms(make(eager))
        t_comp = float("nan")
        if compiled is not None:
            try:
                t_comp = time_ms(make(compiled))
            except Exception as exc:  # noqa: BLE001 - any compile failure is a result
                results.notes.append(f"torch.compile failed on {' '.join(map(str, key.values()))}: "
                                     f"{type(exc).__name__}")
                compiled = None
        gbs = n_bytes / (t_ours * 1e-3) / 1e9
        results.add(**key, **{
            "pass": pass_name, "ours ms": t_ours, "eager ms": t_eager, "compile ms": t_comp,
            "ours GB/s": gbs, "%copy": 100.0 * gbs / copy_gbs, "×eager": t_eager / t_ours,
            "×compile": t_comp / t_ours,
            "ours peak MiB": peak_memory_bytes(make(ours)) / 2**20,
            "eager peak MiB": peak_memory_bytes(make(eager)) / 2**20}, **extra)


@dataclass
class Results:
    """Rows of one benchmark run, written as a markdown table and JSON in bench/results/."""

    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)
        print(" | ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def markdown(self) -> str:
        head = [f"# {self.title}", "", f"card: {card_name()}  ", f"date: {datetime.date.today().isoformat()}  ",
                f"torch {torch.__version__}", ""]
        table = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            table.append("| " + " | ".join(_fmt(row.get(c, "")) for c in self.columns) + " |")
        notes = [""] + [f"- {n}" for n in self.notes] if self.notes else []
        return "\n".join(head + table + notes) + "\n"

    def save(self, directory: str, stem: str) -> str:
        os.makedirs(directory, exist_ok=True)
        card = card_name().replace(" ", "_")
        base = os.path.join(directory, f"{stem}_{card}_{datetime.date.today().isoformat()}")
        with open(base + ".md", "w") as f:
            f.write(self.markdown())
        with open(base + ".json", "w") as f:
            json.dump({"title": self.title, "card": card_name(), "date": datetime.date.today().isoformat(),
                       "torch": torch.__version__, "rows": self.rows, "notes": self.notes}, f, indent=1, default=str)
        return base + ".md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
