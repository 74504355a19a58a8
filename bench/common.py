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
import time
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


class Clock:
    """How a benchmark times a call: CUDA events and allocator peaks on the GPU; with ``smoke``, one wall-time
    call and no peaks (a CPU check that a script's code paths run; its numbers mean nothing)."""

    def __init__(self, smoke: bool = False):
        self.smoke = smoke

    def ms(self, fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
        if not self.smoke:
            return time_ms(fn, warmup=warmup, reps=reps)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def peak(self, fn: Callable[[], object]) -> int:
        return 0 if self.smoke else peak_memory_bytes(fn)

    def sync(self) -> None:
        if not self.smoke:
            torch.cuda.synchronize()


def host_ms(call: Callable[[], object], reps: int = 5, clock: Clock | None = None) -> float:
    """Host wall time per call, the GPU queue kept busy: close to the GPU time means launch-bound."""
    clock = clock or Clock()
    clock.sync()
    start = time.perf_counter()
    for _ in range(reps):
        call()
    elapsed = (time.perf_counter() - start) / reps * 1e3
    clock.sync()
    return elapsed


def measure_call(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool, reps: int, *,
                 clock: Clock | None = None, dout: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                 host: bool = True, host_reps: int = 5) -> tuple[float, float, float]:
    """``(median ms, peak extra bytes, host ms per call)`` of ``forward()`` under no_grad, or with
    ``backward`` of forward and backward (gradients of ``leaves`` for an upstream gradient ``dout(out)``
    made before the timed calls). Peak extra = peak allocated during the call minus its output and, with
    ``backward``, the gradient buffers. ``host``: False gives NaN host time (not measured)."""
    clock = clock or Clock()
    with torch.no_grad():
        out = forward()
    out_bytes = out.numel() * out.element_size()
    upstream = dout(out)
    del out

    def call():
        if backward:
            torch.autograd.grad(forward(), leaves, upstream)
        else:
            with torch.no_grad():
                forward()

    ms = clock.ms(call, reps)
    peak = clock.peak(call)
    grad_bytes = sum(t.numel() * t.element_size() for t in leaves) if backward else 0
    per_call = host_ms(call, host_reps, clock) if host else float("nan")
    return ms, peak - out_bytes - grad_bytes, per_call


def kernel_times(call: Callable[[], object]) -> list[tuple[float, str]]:
    """``(ms, name)`` of every kernel of one ``call()`` (torch.profiler, after one warm call), longest first,
    a kernel launched several times summed under its name. On a machine without CUDA (a benchmark's CPU
    smoke check) the profiler's CPU ops and their own CPU time instead: the code path, not a measurement.
    Run it after every timing of a benchmark: a profiler session leaves per-launch host overhead behind
    (seen on an H200, 2026-12-01: ~0.4 ms a call)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    call()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        call()
        sync()
    times = []
    for ev in prof.key_averages():
        if cuda:
            # kernels (and copies) only: a CPU op's own device time is 0, its kernels are its children
            if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CPU:
                continue
            t = getattr(ev, "self_device_time_total", None)
            if t is None:
                t = getattr(ev, "self_cuda_time_total", 0.0)
        else:
            t = ev.self_cpu_time_total
        if t:
            times.append((t / 1e3, ev.key))
    times.sort(reverse=True)
    return times


def kernel_breakdown(call: Callable[[], object], top: int = 8, width: int = 40) -> str:
    """GPU time of each kernel in one ``call()`` (:func:`kernel_times`), the ``top`` longest, as a note."""
    times = kernel_times(call)
    return ", ".join(f"{name[:width]} {ms:.3f} ms" for ms, name in times[:top])


def add_breakdown_notes(results: "Results", breakdowns: list[tuple[str, Callable[[], object]]], **kw) -> None:
    """One note per ``(label, call)``: its :func:`kernel_breakdown` (``kw`` passed on), or why the profiler
    failed (a result, not an error). Call it after every timing of the benchmark."""
    for label, call in breakdowns:
        try:
            results.notes.append(f"{label}: {kernel_breakdown(call, **kw)}")
        except Exception as exc:  # noqa: BLE001
            results.notes.append(f"profiler failed: {exc}")


def add_speedups(row: dict, times: dict[str, float]) -> None:
    """``x_eager`` / ``x_compile`` of a timed row: the eager and torch.compile times (where ``times`` has
    them) over the row's ``ms``."""
    if "ms" in row:
        for ref_impl, col in (("eager", "x_eager"), ("torch.compile", "x_compile")):
            if ref_impl in times:
                row[col] = times[ref_impl] / row["ms"]


def compiled_or_none(fn: Callable) -> Callable | None:
    """``torch.compile(fn, dynamic=False)``, or None where torch.compile is unavailable (reported as n/a)."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001 - torch.compile unavailable: a result, not an error
        return None


def row_error(exc: BaseException) -> str:
    """A failed row's note: the exception's type and the first line of its message."""
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"failed: {type(exc).__name__}: {text}"


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
