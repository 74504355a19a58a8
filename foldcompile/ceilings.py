r"""A card's measured ceilings (copy bandwidth, matmul rates), read from the recorded results in ``bench/results/``.

The roofline of the HTML report (``foldcompile explain ... --html out.html --card H200``) draws
two roofs: memory (bytes per second) and arithmetic (FLOP per second, for the model's dtype).
They are never typed in here: they are read from the JSON files the benchmarks wrote, each of
which names its ``card``. Three kinds of record are understood, the first found winning:

1. ``ceilings_<card>_<date>.json`` (``python -m bench.ceilings`` on the card): rows
   ``{"ceiling": "copy", "value": GB/s}`` and ``{"ceiling": "matmul", "dtype": "bfloat16",
   "value": TFLOP/s}``;
2. a note ``device-to-device copy bandwidth measured: 2968 GB/s`` (the memory-bound kernel
   benchmarks measure it in the same run);
3. a column ``pct_<X>TBs``: a benchmark that compared its kernels against a copy bandwidth of X TB/s.

Several files of one card: the newest date first. Each number keeps the file it came from.

    >>> import json, os, tempfile
    >>> tmp = tempfile.mkdtemp()
    >>> rows = [{"ceiling": "copy", "dtype": "", "value": 4300.0, "unit": "GB/s"},
    ...         {"ceiling": "matmul", "dtype": "bfloat16", "value": 790.0, "unit": "TFLOP/s"}]
    >>> with open(os.path.join(tmp, "ceilings_NVIDIA_H200_2026-12-03.json"), "w") as f:
    ...     json.dump({"card": "NVIDIA H200", "date": "2026-12-03", "rows": rows, "notes": []}, f)
    >>> c = find_ceilings("h200", tmp)
    >>> c.card, c.copy_gbs, c.matmul_tflops
    ('NVIDIA H200', 4300.0, {'bfloat16': 790.0})
    >>> c.ridge("bfloat16")                    # FLOP per byte where the two roofs meet
    183.72093023255815
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ceilings", "CeilingsError", "find_ceilings", "recorded_cards", "default_results_dir"]

_COPY_NOTE = re.compile(r"copy bandwidth measured:\s*([0-9.]+)\s*GB/s", re.I)
_PCT_COLUMN = re.compile(r"^pct_([0-9.]+)TBs$")


class CeilingsError(ValueError):
    """No such card in the results, or several match, or no results folder."""


@dataclass(frozen=True)
class Ceilings:
    """``copy_gbs``: device-to-device copy, bytes read plus written per second / 1e9 (None if not
    recorded); ``matmul_tflops``: dtype name -> TFLOP/s; ``sources``: what -> ``file (date)``."""

    card: str
    copy_gbs: float | None
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def compute_tflops(self, dtype: str) -> float | None:
        """The matmul rate recorded for ``dtype`` ("bfloat16", "float16", "float32"), or None."""
        return self.matmul_tflops.get(dtype)

    def ridge(self, dtype: str) -> float | None:
        """The arithmetic intensity (FLOP/byte) at which the compute roof meets the memory roof."""
        peak = self.compute_tflops(dtype)
        if peak is None or not self.copy_gbs:
            return None
        return peak * 1e12 / (self.copy_gbs * 1e9)

    def floor_seconds(self, flops: float, nbytes: float, dtype: str) -> float | None:
        """The least time ``flops`` and ``nbytes`` can take under both roofs (None without a roof)."""
        times = []
        if self.copy_gbs:
            times.append(nbytes / (self.copy_gbs * 1e9))
        peak = self.compute_tflops(dtype)
        if peak:
            times.append(flops / (peak * 1e12))
        return max(times) if times else None


def default_results_dir() -> str | None:
    """``bench/results`` of the source checkout foldcompile runs from, if there is one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "bench", "results")
    return path if os.path.isdir(path) else None


def _records(results_dir: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("card"), str):
            out.append((path, d))
    return out


def recorded_cards(results_dir: str) -> list[str]:
    """The card names that have results in ``results_dir``."""
    return sorted({d["card"] for _, d in _records(results_dir) if d["card"] != "cpu"})


def _resolve_results_dir(results_dir: str | None) -> str:
    path = results_dir or default_results_dir()
    if path is None or not os.path.isdir(path):
        raise CeilingsError(f"no results folder {path or '(bench/results of a source checkout)'}: "
                            "give the folder holding the benchmarks' JSON results")
    return path


def find_ceilings(card: str, results_dir: str | None = None) -> Ceilings:
    """The ceilings recorded for the card whose name contains ``card`` (case-insensitive:
    ``"h200"`` for ``"NVIDIA H200"``). Raises :class:`CeilingsError` when no card or several match,
    or when nothing for that card records a copy bandwidth or a matmul rate."""
    folder = _resolve_results_dir(results_dir)
    cards = recorded_cards(folder)
    wanted = card.lower().replace("_", " ")
    matches = [c for c in cards if c.lower() == wanted] or [c for c in cards if wanted in c.lower()]
    if len(matches) != 1:
        listed = ", ".join(cards) or "none"
        how = "several match" if matches else "none matches"
        raise CeilingsError(f"card {card!r}: {how}; cards with results in {folder}: {listed}")
    name = matches[0]
    mine = sorted(((d.get("date", ""), p, d) for p, d in _records(folder) if d["card"] == name), reverse=True)
    copies: list[tuple[int, int, float, str]] = []  # (kind of record, newest first, GB/s, source)
    matmul: dict[str, tuple[float, str]] = {}
    for order, (date, path, d) in enumerate(mine):
        src = f"{os.path.basename(path)} ({date})" if date else os.path.basename(path)
        rows = [r for r in d.get("rows") or [] if isinstance(r, dict)]
        if os.path.basename(path).startswith("ceilings_"):
            for r in rows:
                if r.get("ceiling") == "copy":
                    copies.append((1, order, float(r["value"]), src))
                elif r.get("ceiling") == "matmul" and r.get("dtype"):
                    matmul.setdefault(str(r["dtype"]), (float(r["value"]), src))
        for note in d.get("notes") or []:
            m = _COPY_NOTE.search(str(note))
            if m:
                copies.append((2, order, float(m.group(1)), src))
        for column in (rows[0] if rows else {}):
            m = _PCT_COLUMN.match(str(column))
            if m:
                copies.append((3, order, float(m.group(1)) * 1000.0,
                               f"{src}: the copy bandwidth its {column} column is against"))
    copy = min(copies) if copies else None
    if copy is None and not matmul:
        raise CeilingsError(f"no copy bandwidth or matmul rate is recorded for {name} in {folder}: "
                            "run `python -m bench.ceilings` on that card")
    sources = {f"matmul {k}": v[1] for k, v in matmul.items()}
    if copy is not None:
        sources["copy"] = copy[3]
    return Ceilings(name, copy[2] if copy else None, {k: v[0] for k, v in matmul.items()}, sources)
