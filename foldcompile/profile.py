"""``profile``: where the time goes, per op class and per source module, against the cost model.

``profile(model, *example_inputs, dims=None)`` captures and classifies the model (as
``explain`` does), then runs the classified graph node by node with an ``fx.Interpreter``
that marks time after every op, and attributes each interval to its node, so every node's
time lands in exactly one op class and one module::

    >>> from foldcompile.models import zoo
    >>> block, ex = zoo.get("evoformer_block")          # tiny, on the CPU: timings are CPU wall-clock
    >>> with torch.no_grad():
    ...     prof = profile(block, *ex, warmup=1, reps=1)
    >>> print(prof)          # ms, share, TFLOP/s and GB/s per class and per module
    EvoformerBlock on cpu (CPU wall-clock timing (not GPU kernel times)); dims N_seq=5, N_res=11; ...
    >>> {c: v["count"] for c, v in prof.by_class().items()}
    {'GEMM': 53, 'REDUCTION': 17, 'ELEMENTWISE': 67, 'LAYOUT': 57, 'COMM': 0, 'OTHER': 0}
    >>> abs(sum(v["ms"] for v in prof.by_class().values()) - prof.profiled_ms) < 1e-9
    True

How it measures, and why. On a GPU, CUDA events are recorded on the stream after every node
(one more before the first): the time between consecutive events is the GPU time of that
node's kernels. torch.profiler's kernel times would need each kernel attributed back to its
node through the profiler's record-function / correlation API, which changed between torch
releases (the GPU machines run 2.11, development 2.13); events need nothing version-specific.
The interpreter is slower to issue work than the GPU is to run small kernels, and an event
interval on an idle stream would measure the Python in between, so before each timed run
the stream is given a spin kernel (``torch.cuda._sleep``, calibrated) long enough for the CPU
to issue the whole graph ahead of the GPU; the events then time back-to-back GPU work.
Events themselves still cost a little and split what the graph runs as one stream of
launches, so the report gives ``profiled_ms`` (the sum of node times) next to
``uninstrumented_ms`` (the same graph module called as is, CUDA-event timed) and the eager
model's time: their ratio is the instrumentation overhead.

On a CPU, each node is timed alone with ``time.perf_counter`` (``timing="cpu_wall"``): the
numbers are CPU timings, useful to test the machinery, not to judge GPU kernels.

Costs. By default the cost model comes from the same capture (``explain`` at the profiled
sizes). At sizes where shape propagation cannot name the dims (AlphaFold 2's N_seq=128 equals
c_z=128), pass ``cost_report=`` a report of a capture at small distinct sizes of the same model,
on the same device and dtype: its nodes are matched one to one (and checked) with the
profiled graph's, and its symbolic costs are evaluated at the sizes read from the inputs.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
import torch
import torch.fx

from foldcompile.capture import flat_inputs, trace
from foldcompile.explain import Report, explain_graph
from foldcompile.pass_manager import PassManager
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.registry import OP_CLASSES, op_name
from foldcompile.tables import cut_path, format_table

__all__ = ["profile", "ProfileReport", "NodeTime"]

_CALL_OPS = ("call_function", "call_method")


@dataclass
class NodeTime:
    """One graph node's measured time (median over the timed runs) and its cost-model cost."""

    name: str
    op: str
    op_class: str
    module_path: str
    ms: float
    flops: int
    bytes: int


def _rates(ms: float, flops: int, nbytes: int) -> dict[str, float]:
    s = ms * 1e-3
    return {"tflops": flops / s / 1e12 if s > 0 else 0.0, "gbs": nbytes / s / 1e9 if s > 0 else 0.0}


@dataclass
class ProfileReport:
    """Per-node times of one profiled run with per-class and per-module views.

    ``timing`` is ``"cuda_events"`` or ``"cpu_wall"`` (CPU timings, marked as such in every
    table); ``profiled_ms`` is the sum of node times (the per-class and per-module times sum to
    it), ``instrumented_wall_ms`` the wall time of one instrumented run, ``uninstrumented_ms``
    the graph module's own run time and ``eager_ms`` the model's, both timed the same way.
    """

    nodes: list[NodeTime]
    device: str
    timing: str
    profiled_ms: float
    instrumented_wall_ms: float
    uninstrumented_ms: float
    eager_ms: float
    dims: dict[str, int]
    model_name: str = "model"
    reps: int = 1
    notes: list[str] = field(default_factory=list)
    #: every timed run's total, per measurement ("profiled", "graph", "eager"), so a noisy run shows
    runs_ms: dict[str, list[float]] = field(default_factory=dict)

    def spread(self, what: str = "profiled") -> tuple[float, float]:
        """``(min, max)`` over the timed runs of ``what`` ("profiled", "graph" or "eager")."""
        runs = self.runs_ms.get(what) or [self.profiled_ms]
        return min(runs), max(runs)

    @property
    def overhead(self) -> float:
        """``profiled_ms / uninstrumented_ms``: how much the per-node timing inflates the run."""
        return self.profiled_ms / self.uninstrumented_ms if self.uninstrumented_ms > 0 else float("inf")

    def _group(self, key) -> dict[str, dict[str, Any]]:
        acc: dict[str, list] = {}
        for n in self.nodes:
            a = acc.setdefault(key(n), [0, 0.0, 0, 0])
            a[0] += 1
            a[1] += n.ms
            a[2] += n.flops
            a[3] += n.bytes
        total = self.profiled_ms
        return {k: {"count": c, "ms": ms, "share": ms / total if total > 0 else 0.0, "flops": f, "bytes": b,
                    **_rates(ms, f, b)} for k, (c, ms, f, b) in acc.items()}

    def by_class(self) -> dict[str, dict[str, Any]]:
        """``{class: {"count", "ms", "share", "flops", "bytes", "tflops", "gbs"}}``, every class listed."""
        g = self._group(lambda n: n.op_class)
        empty = {"count": 0, "ms": 0.0, "share": 0.0, "flops": 0, "bytes": 0, "tflops": 0.0, "gbs": 0.0}
        return {c: g.get(c, dict(empty)) for c in list(OP_CLASSES) + sorted(set(g) - set(OP_CLASSES))}

    def by_module(self, depth: int | None = None) -> dict[str, dict[str, Any]]:
        """The same per module path (cut to ``depth`` components when given; root ``"(root)"``)."""
        return self._group(lambda n: cut_path(n.module_path, depth))

    def to_dict(self, depth: int | None = None) -> dict[str, Any]:
        """Plain JSON-able values: settings, totals, ``classes``, ``modules`` and ``nodes``."""
        return {
            "model": self.model_name, "device": self.device, "timing": self.timing, "dims": dict(self.dims),
            "reps": self.reps, "profiled_ms": self.profiled_ms, "instrumented_wall_ms": self.instrumented_wall_ms,
            "uninstrumented_ms": self.uninstrumented_ms, "eager_ms": self.eager_ms, "overhead": self.overhead,
            "runs_ms": {k: list(v) for k, v in self.runs_ms.items()},
            "classes": self.by_class(), "modules": self.by_module(depth),
            "nodes": [vars(n).copy() for n in self.nodes], "notes": list(self.notes),
        }

    def to_json(self, path: str | None = None, depth: int | None = None) -> str:
        """``to_dict`` as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(depth), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def rows(self, depth: int | None = None) -> list[dict[str, Any]]:
        """Table rows (``level`` "class" or "module") with rounded units, for ``bench.common.Results``."""
        out = []
        for level, groups in (("class", self.by_class()), ("module", self.by_module(depth))):
            for name, e in groups.items():
                if level == "class" and e["count"] == 0:
                    continue
                out.append({"level": level, "name": name, "nodes": e["count"], "ms": e["ms"],
                            "share_%": 100 * e["share"], "GFLOP": e["flops"] / 1e9, "MB": e["bytes"] / 1e6,
                            "TFLOP/s": e["tflops"], "GB/s": e["gbs"]})
        return out

    def table(self, depth: int | None = 1) -> str:
        """Class and module tables as text, with the totals and the instrumentation overhead."""
        kind = "CUDA events" if self.timing == "cuda_events" else "CPU wall-clock timing (not GPU kernel times)"
        lines = [f"{self.model_name} on {self.device} ({kind}); dims " +
                 ", ".join(f"{k}={v}" for k, v in self.dims.items()) + f"; median of {self.reps} runs",
                 f"profiled (sum of nodes) {self.profiled_ms:.4g} ms; instrumented wall "
                 f"{self.instrumented_wall_ms:.4g} ms; graph as is {self.uninstrumented_ms:.4g} ms; eager "
                 f"{self.eager_ms:.4g} ms; overhead x{self.overhead:.3g}"]
        if self.runs_ms:
            lines.append("spread over runs (min-max): " + "; ".join(
                f"{what} {lo:.4g}-{hi:.4g} ms" for what in ("profiled", "graph", "eager") if what in self.runs_ms
                for lo, hi in [self.spread(what)]))
            noisy = [what for what in self.runs_ms if self.spread(what)[0] > 0
                     and self.spread(what)[1] / self.spread(what)[0] > 1.5]
            reasons = (["fewer than 3 runs"] if self.reps < 3 else []) + \
                ([f"runs differ by more than 1.5x ({', '.join(noisy)})"] if noisy else [])
            if reasons:
                lines.append(f"note: {' and '.join(reasons)}: compare medians of more runs (--reps) "
                             "before reading a ratio")
        lines += [f"note: {n}" for n in self.notes]
        if self.timing == "cuda_events" and self.overhead < 1:
            lines.append("note: profiled < graph as is: the plain run leaves the GPU idle between launches "
                         "(CPU-bound); the padded profile times GPU work only")
        head = ["nodes", "ms", "%", "GFLOP", "MB", "TFLOP/s", "GB/s"]
        for level, groups in (("op class", self.by_class()), (f"module (depth {depth})", self.by_module(depth))):
            lines.append("")
            lines += format_table([level] + head, [
                [k, e["count"], e["ms"], 100 * e["share"], e["flops"] / 1e9, e["bytes"] / 1e6, e["tflops"], e["gbs"]]
                for k, e in groups.items() if e["count"]])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _Timer(torch.fx.Interpreter):
    """Runs the graph, marking time after each op node (CUDA events, or CPU wall time per node)."""

    def __init__(self, gm: torch.fx.GraphModule, cuda: bool):
        super().__init__(gm)
        self.cuda = cuda
        self.marks: list[tuple[torch.fx.Node, Any]] = []
        self.cpu_ms: dict[torch.fx.Node, float] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in _CALL_OPS:
            return super().run_node(n)
        if self.cuda:
            out = super().run_node(n)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((n, ev))
            return out
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.cpu_ms[n] = (time.perf_counter() - t0) * 1e3
        return out

    def timed_run(self, inputs: Sequence[Any], pad_cycles: int = 0) -> tuple[dict[torch.fx.Node, float], float]:
        """One run: ``({node: ms}, wall ms)``."""
        self.marks, self.cpu_ms = [], {}
        if self.cuda:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if pad_cycles:
                torch.cuda._sleep(pad_cycles)
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.run(*inputs)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
            times, prev = {}, start
            for n, ev in self.marks:
                times[n] = prev.elapsed_time(ev)
                prev = ev
            return times, wall
        t0 = time.perf_counter()
        self.run(*inputs)
        return dict(self.cpu_ms), (time.perf_counter() - t0) * 1e3


def _time_call(fn, cuda: bool, warmup: int, reps: int) -> list[float]:
    """Each timed run's milliseconds (``warmup`` untimed runs first)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _sleep_cycles_per_ms() -> float | None:
    """Calibrate ``torch.cuda._sleep`` (a spin kernel counting GPU clock cycles); None without it."""
    if not hasattr(torch.cuda, "_sleep"):
        return None
    cycles = 2_000_000
    torch.cuda._sleep(cycles)  # warm-up launch
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(cycles)
    b.record()
    b.synchronize()
    ms = a.elapsed_time(b)
    return cycles / ms if ms > 0 else None


def _dims_from_inputs(report: Report, flat: Sequence[Any]) -> dict[str, int]:
    """Read each named dim's size off the inputs, where the cost report's placeholders have it."""
    phs = [n for n in report.graph_module.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(flat):
        raise ValueError(f"cost_report's graph takes {len(phs)} inputs, the profiled call has {len(flat)}")
    dims: dict[str, int] = {}
    for ph, x in zip(phs, flat):
        if not isinstance(x, torch.Tensor):
            continue
        if ph.meta.get("dtype") is not None and ph.meta["dtype"] != x.dtype:
            raise ValueError(f"input {ph.name!r} is {x.dtype} but cost_report was captured with {ph.meta['dtype']}:"
                             " bytes would be wrong; capture the cost report in the profiled dtype")
        sym = ph.meta.get("sym_shape")
        if sym is None or len(sym) != x.dim():
            raise ValueError(f"input {ph.name!r} has shape {tuple(x.shape)}, cost_report has {sym}")
        for s, size in zip(sym, x.shape):
            s = sympy.sympify(s)
            if s.is_Symbol:
                if dims.setdefault(str(s), int(size)) != int(size):
                    raise ValueError(f"{s} is {dims[str(s)]} and {int(size)} in the profiled inputs")
            elif s.is_Integer and int(s) != int(size):
                raise ValueError(f"input {ph.name!r} size {int(size)} where cost_report has the constant {s}")
    return dims


def profile(model: torch.nn.Module, *example_inputs: Any, dims: dict[str, int] | None = None,
            cost_report: Report | None = None, warmup: int = 2, reps: int = 5, **example_kwargs: Any) -> ProfileReport:
    """Time ``model`` on the examples per op class and per source module (see the module docstring).

    Runs on the inputs' device (CUDA events on a GPU, wall-clock per node on a CPU) in the
    caller's grad mode (wrap in ``torch.no_grad()`` to profile inference). ``dims`` names the
    sizes as for ``explain``; ``cost_report`` supplies the cost model from a capture at other
    sizes. ``warmup`` untimed runs precede ``reps`` timed ones; node times are medians.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    gm = trace(model, *example_inputs, **example_kwargs)
    flat = flat_inputs(gm, example_inputs, example_kwargs)
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    cuda = any(x.is_cuda for x in tensors)
    notes: list[str] = []
    if cost_report is None:
        report = explain_graph(gm, example_inputs, example_kwargs, dims=dims, model_name=type(model).__name__)
        run_gm = report.graph_module
        costs = {name: (cls, path, f, b) for name, cls, path, f, b in report.node_costs()}
        node_info = {n: costs[n.name] for n in run_gm.graph.nodes if n.name in costs}
        run_dims = dict(report.dims)
    else:
        pm = PassManager([("normalize", normalize_pass)])
        run_gm = pm.run(gm)
        run_dims = _dims_from_inputs(cost_report, flat)
        if dims:
            run_dims.update(dims)
        rows = cost_report.node_costs(**run_dims)
        ours = [n for n in run_gm.graph.nodes if n.op in _CALL_OPS]
        if len(ours) != len(rows):
            raise ValueError(f"the profiled graph has {len(ours)} op nodes, cost_report {len(rows)}: "
                             "the structure depends on the size; profile without cost_report at distinct sizes")
        theirs = {n.name: n for n in cost_report.graph_module.graph.nodes}
        node_info = {}
        for n, (name, cls, path, f, b) in zip(ours, rows):
            if op_name(n) != op_name(theirs[name]):
                raise ValueError(f"node {n.name!r} ({op_name(n)}) does not match cost_report's {name!r} "
                                 f"({op_name(theirs[name])}): the graphs differ")
            node_info[n] = (cls, path, f, b)
        notes.append(f"costs from a capture at {cost_report.dims}, evaluated at {run_dims}")

    timer = _Timer(run_gm, cuda)
    device = f"cuda: {torch.cuda.get_device_name(tensors[0].device)}" if cuda else "cpu"
    for _ in range(max(warmup, 1)):
        _, wall = timer.timed_run(flat)
    pad, per_ms = 0, None
    if cuda:
        per_ms = _sleep_cycles_per_ms()
        if per_ms is None:
            notes.append("torch.cuda._sleep missing: no queue-ahead padding, small ops include launch gaps")
        else:
            pad = int(per_ms * 1.5 * wall)
    samples: dict[torch.fx.Node, list[float]] = {}
    walls = []
    for _ in range(reps):
        times, wall = timer.timed_run(flat, pad)
        walls.append(wall - (pad / per_ms if pad and per_ms else 0.0))
        for n, ms in times.items():
            samples.setdefault(n, []).append(ms)
    nodes = []
    for n in run_gm.graph.nodes:
        if n.op not in _CALL_OPS:
            continue
        cls, path, f, b = node_info.get(n, ("OTHER", str(n.meta.get("module_path") or ""), 0, 0))
        nodes.append(NodeTime(n.name, op_name(n), cls, path, statistics.median(samples[n]), f, b))
    profiled = sum(n.ms for n in nodes)
    per_run = [sum(samples[n][i] for n in samples) for i in range(reps)]
    graph_runs = _time_call(lambda: run_gm(*example_inputs, **example_kwargs), cuda, warmup, reps)
    eager_runs = _time_call(lambda: model(*example_inputs, **example_kwargs), cuda, warmup, reps)
    return ProfileReport(nodes, device, "cuda_events" if cuda else "cpu_wall", profiled, statistics.median(walls),
                         statistics.median(graph_runs), statistics.median(eager_runs), run_dims, type(model).__name__,
                         reps, notes, runs_ms={"profiled": per_run, "graph": graph_runs, "eager": eager_runs})
