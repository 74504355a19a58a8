"""Cold ``foldcompile.optimize`` time of the 48-block zoo Evoformer stack, split by phase.

Each run is one fresh child process whose ``TRITON_CACHE_DIR`` and ``TORCHINDUCTOR_CACHE_DIR`` are
new empty folders (a cold start: every Triton kernel compiled, nothing of Inductor's cached); the
parent collects the child's numbers and writes ``bench/results/optimize_time_<card>_<date>.md``
(and ``.json``). The child times:

  optimize_s   ``foldcompile.optimize(model, *inputs)``: capture, passes, executor choice
  phases       the pipeline's steps inside it, each the wall time of the function
               ``foldcompile.optimize`` calls for it (wrapped for the run; nothing else changes):
               capture (``trace``), normalize, shape_prop, classify, merge_chunk_loops, fuse,
               graph copies, executor selection; ``other`` is the rest of ``optimize_s``
  first_call_s the first call (on CUDA: every Triton kernel's JIT compile and autotuning; the
               CUDA-graph executor watches this call); train case: forward and backward
  second_call_s the second call (the CUDA-graph executor captures its graphs here)
  cold_total_s optimize_s + first_call_s + second_call_s: from the model to a replaying module

Cases: ``train`` (train mode, grad on: forward+backward) and ``infer`` (eval, no_grad). On CUDA the
model is the papers' size in bf16 at the training crop (N_seq=128, N_res=256); on a CPU
(``--device cpu``) the same 48 blocks at AF2's channel dims in fp32 with small sequence sizes
(N_seq=5, N_res=11; the rules judge profitability at the training crop either way), so the run
measures the host work of optimize, not a CPU forward of the full crop; the calls then go
through Triton's interpreter (their times say nothing about a GPU). ``--cprofile N`` runs the
child under cProfile and keeps its N costliest functions (cumulative and own time).

    python -m bench.optimize_time                        # train and infer on the GPU
    python -m bench.optimize_time --device cpu --cases train --cprofile 25
    python -m bench.optimize_time --smoke --out /tmp/x   # 2 blocks, tiny dims: checks the script
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import importlib
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from bench.common import Results, card_name

STEM = "optimize_time"
# the functions foldcompile.optimize calls for each phase, by the names its module binds them to
PHASES = {"capture": "trace", "normalize": "normalize_pass", "shape_prop": "shape_prop_pass",
          "classify": "classify_pass", "merge_chunk_loops": "merge_chunk_loops_pass", "fuse": "fuse_pass",
          "graph_copies": "_copy_with_bodies", "executor_select": "select_executor"}
COLUMNS = ["case", "device", "blocks", "dims", "status", "optimize_s", "first_call_s", "second_call_s",
           "cold_total_s", "phases", "executor", "fused", "nodes"]
CHILD_TIMEOUT_S = 1500


@contextlib.contextmanager
def phase_timers(times: dict[str, float]) -> Iterator[None]:
    """Wrap each :data:`PHASES` function in ``foldcompile.optimize``'s namespace so its calls add their wall
    time to ``times[phase]``; restored on exit. A phase whose call is nested in another's is counted in
    both (none of these are nested: capture, the annotation passes, merge and fuse run one after another).

    >>> import importlib, torch
    >>> fo = importlib.import_module("foldcompile.optimize")
    >>> times = {}
    >>> with phase_timers(times):
    ...     fast = fo.optimize(torch.nn.Linear(4, 4), torch.randn(2, 4))
    >>> sorted(times) == sorted(PHASES) and all(t >= 0 for t in times.values())
    True
    >>> fo.trace.__name__
    'trace'
    """
    fo = importlib.import_module("foldcompile.optimize")  # the module (``foldcompile.optimize`` is the function)
    originals = {phase: getattr(fo, name) for phase, name in PHASES.items()}
    for phase in PHASES:
        times.setdefault(phase, 0.0)

    def timed(phase: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[phase] += time.perf_counter() - t0
        return wrapper

    try:
        for phase, fn in originals.items():
            setattr(fo, PHASES[phase], timed(phase, fn))
        yield
    finally:
        for phase, fn in originals.items():
            setattr(fo, PHASES[phase], fn)


def _model(device: str, blocks: int, smoke: bool, n_seq: int | None, n_res: int | None):
    import torch

    from foldcompile.models import zoo

    if smoke:
        return zoo.get("evoformer_stack", size="tiny", n_blocks=blocks), "tiny"
    if device == "cuda":
        sizes = dict(n_seq=n_seq or 128, n_res=n_res or 256)
        dtype = torch.bfloat16
    else:
        sizes = dict(n_seq=n_seq or 5, n_res=n_res or 11)
        dtype = torch.float32
    module, inputs = zoo.get("evoformer_stack", size="af2", n_blocks=blocks, device=device, dtype=dtype, **sizes)
    return (module, inputs), f"af2 {str(dtype).replace('torch.', '')} N_seq={sizes['n_seq']} N_res={sizes['n_res']}"


def measure(case: str, device: str, blocks: int, smoke: bool = False, n_seq: int | None = None,
            n_res: int | None = None, calls: bool = True,
            partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One cold-or-warm measurement in this process (the child's work): see the module docstring.
    ``partial(row)`` is given the row once optimize is timed (before the calls, which may run long)."""
    import torch

    import foldcompile

    (module, inputs), dims = _model(device, blocks, smoke, n_seq, n_res)
    train = case == "train"
    module.train(train)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    params = [p for p in module.parameters() if p.requires_grad]

    def step(fn):
        if train:
            out = fn(*inputs)
            loss = sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,))
                       if isinstance(o, torch.Tensor))
            return torch.autograd.grad(loss, params)
        with torch.no_grad():
            return fn(*inputs)

    phases: dict[str, float] = {}
    grad = torch.enable_grad() if train else torch.no_grad()
    t0 = time.perf_counter()
    with phase_timers(phases), grad:
        fast = foldcompile.optimize(module, *inputs)
    optimize_s = time.perf_counter() - t0
    phases["other"] = optimize_s - sum(phases.values())
    row: dict[str, Any] = dict(case=case, device=device, blocks=blocks, dims=dims, status="ok",
                               optimize_s=round(optimize_s, 2),
                               phases=", ".join(f"{k} {v:.2f}" for k, v in phases.items()),
                               nodes=len(fast.graph_module.graph.nodes))
    report = fast.report
    row["fused"] = ", ".join(f"{rule} {c['matched']}" for rule, c in report.counts().items() if c.get("matched"))
    row["phase_s"] = {k: round(v, 3) for k, v in phases.items()}
    if partial is not None:
        partial(dict(row, status="optimize timed; the first calls did not finish"))
    call_times = []
    if calls:
        for _ in range(2):
            t1 = time.perf_counter()
            step(fast)
            sync()
            call_times.append(time.perf_counter() - t1)
        row.update(first_call_s=round(call_times[0], 2), second_call_s=round(call_times[1], 2),
                   cold_total_s=round(optimize_s + sum(call_times), 2))
    row["executor"] = fast.report.executor
    return row


def _write(path: str, row: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(row, f)
    os.replace(path + ".tmp", path)


def _child(args: argparse.Namespace) -> None:
    kwargs = dict(case=args.case, device=args.device, blocks=args.blocks, smoke=args.smoke, n_seq=args.n_seq,
                  n_res=args.n_res, calls=not args.no_calls, partial=lambda row: _write(args.child_out, row))
    if args.cprofile:
        prof = cProfile.Profile()
        row = prof.runcall(measure, **kwargs)
        row["cprofile"] = top_functions(prof, args.cprofile)
    else:
        row = measure(**kwargs)
    _write(args.child_out, row)


def top_functions(prof: cProfile.Profile, n: int) -> list[str]:
    """The ``n`` functions with the most cumulative time, one line each: cumulative s, own s, calls, where.

    >>> import cProfile
    >>> p = cProfile.Profile()
    >>> _ = p.runcall(sorted, range(1000))
    >>> len(top_functions(p, 2)) <= 2
    True
    """
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (filename, line, func), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{_short(filename)}:{line}({func})" if line else func
        rows.append((cum, own, calls, where))
    rows.sort(reverse=True)
    return [f"{cum:8.2f} s cum {own:8.2f} s own {calls:>9} calls  {where}" for cum, own, calls, where in rows[:n]]


def _short(filename: str) -> str:
    """A source path relative to the repository or to site-packages."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    if filename.startswith(root):
        return filename[len(root):]
    return filename.split("site-packages/", 1)[-1]


def run_cold(case: str, device: str, blocks: int, *, smoke: bool = False, cprofile: int = 0,
             n_seq: int | None = None, n_res: int | None = None, calls: bool = True,
             timeout_s: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """:func:`measure` in a fresh child process with empty Triton and Inductor caches."""
    with tempfile.TemporaryDirectory(prefix="foldcompile_cold_") as tmp:
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-m", "bench.optimize_time", "--child-out", out, "--cases", case, "--device", device,
               "--blocks", str(blocks)] + (["--smoke"] if smoke else []) + \
              (["--cprofile", str(cprofile)] if cprofile else []) + (["--no-calls"] if not calls else []) + \
              (["--n-seq", str(n_seq)] if n_seq else []) + (["--n-res", str(n_res)] if n_res else [])
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            proc = subprocess.run(cmd, env=env, cwd=root, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            row = dict(case=case, device=device, blocks=blocks, status="")
            if os.path.exists(out):  # optimize finished, the calls did not
                with open(out) as f:
                    row = json.load(f)
            row["status"] = f"timeout after {timeout_s:.0f} s" + (f" ({row['status']})" if row["status"] else "")
            return row
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            sys.stderr.write(proc.stderr[-4000:])
            return dict(case=case, device=device, blocks=blocks, status=f"failed: {tail[0][:200]}")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> "Results":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda where visible")
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--n-seq", type=int, default=None)
    parser.add_argument("--n-res", type=int, default=None)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="run under cProfile and keep the N costliest functions (slows the run)")
    parser.add_argument("--timeout-s", type=float, default=CHILD_TIMEOUT_S,
                        help="stop a row's child after this long (the row keeps what was timed)")
    parser.add_argument("--no-calls", action="store_true", help="time optimize only, not the first two calls")
    parser.add_argument("--smoke", action="store_true", help="check the script: tiny dims, 2 blocks, CPU")
    parser.add_argument("--append", action="store_true",
                        help="keep the other cases' rows of today's results file (one case a device call)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.blocks = "cpu", min(args.blocks, 2)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child_out:
        args.case = args.cases[0]
        _child(args)
        return None

    from bench.common import Results, card_name

    results = Results(title=f"cold foldcompile.optimize of the zoo Evoformer stack ({args.blocks} blocks): "
                            "empty Triton and Inductor caches, one fresh process a row", columns=COLUMNS)
    results.notes += [
        "optimize_s = foldcompile.optimize(model, *inputs) (executor auto); phases (s) = the functions it calls "
        "for each step, wrapped and timed (other = the rest); first_call_s / second_call_s = the first two calls "
        "(JIT compile and autotuning of the Triton kernels; the CUDA-graph executor captures on the second); "
        "cold_total_s = their sum with optimize_s. Train = forward+backward in train mode.",
        "dims: af2 = AF2's channel dims; on a CPU small sequence sizes (the rules judge profitability at the "
        "training crop either way) and the calls run Triton's interpreter (not GPU times).",
    ]
    stem = STEM + ("_cprofile" if args.cprofile else "")
    if args.append:
        previous = os.path.join(args.out, f"{stem}_{card_name().replace(' ', '_')}_{datetime.date.today()}.json")
        if os.path.exists(previous):
            with open(previous) as f:
                old = json.load(f)
            results.rows = [r for r in old["rows"] if r.get("case") not in args.cases]
            results.notes += [n for n in old["notes"] if n not in results.notes and not n.startswith("load average")]
    profiles = []
    for case in args.cases:
        t0 = time.perf_counter()
        row = run_cold(case, args.device, args.blocks, smoke=args.smoke, cprofile=args.cprofile,
                       n_seq=args.n_seq, n_res=args.n_res, calls=not args.no_calls, timeout_s=args.timeout_s)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if row.get("cprofile"):
            profiles.append((case, row.pop("cprofile")))
        results.add(**{k: v for k, v in row.items() if k != "phase_s"})
        results.rows[-1]["phase_s"] = row.get("phase_s", {})
        results.save(args.out, stem)  # each row as it finishes: a device call stopped later keeps it
    if args.cprofile:
        results.notes.append("cProfile was on: its overhead is in every time above (compare them with a run "
                             "without --cprofile).")
    for case, lines in profiles:
        results.notes.append(f"cProfile, {case}, the {len(lines)} costliest functions (cumulative):<br>"
                             + "<br>".join(f"`{line.strip()}`" for line in lines))
    try:
        load = os.getloadavg()[0]
        results.notes.append(f"load average at the end: {load:.1f} on {os.cpu_count()} cores")
    except OSError:
        pass
    print("written:", results.save(args.out, stem))
    print(results.markdown())
    return results


if __name__ == "__main__":
    main()
