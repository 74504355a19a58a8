"""The ``foldcompile`` command.

    foldcompile zoo
        List the bundled reference models.
    foldcompile explain TARGET [--size tiny|af2] [--n-seq N] [--n-res N] [--depth D]
                               [--at DIM=V ...] [--json] [--html out.html [--card NAME]]
        Capture TARGET, classify every op, print the op-class and module tables (or the JSON
        report with --json), the costs at other sizes with --at (e.g. --at N_seq=128 N_res=256),
        and write the HTML report at that size with --html (a roofline against a card's measured
        ceilings in bench/results/ with --card).
    foldcompile profile TARGET [--size ...] [--n-seq N] [--n-res N] [--device auto|cpu|cuda]
                               [--dtype float32|bfloat16|float16] [--json]
        Time TARGET per op class and per module (CUDA events on a GPU, CPU wall-clock otherwise).
    foldcompile demo [--models NAME ...] [--size tiny|af2] [--device auto|cpu|cuda]
        What the compiler does today, on the bundled models.
    foldcompile verify TARGET [--size ...] [--n-seq N] [--n-res N] [--bisect]
        Optimize TARGET, print its fusion report and verify it against the float64 truth
        (exit status 1 when it does not verify; --bisect names the culprit match).
    foldcompile optimize TARGET [--size ...] [--at DIM=V ...] [--bench [--reps N]] [--html out.html]
        Optimize TARGET (fusion judged at --at, default the training crop), print what was fused
        and what was left and why; --bench times eager against optimized with the spread of runs;
        --html writes the before/after report.

TARGET is a zoo name (``foldcompile zoo``) or ``package.module:attr`` where ``attr`` is either

- a callable returning ``(module, example_inputs)`` (or ``(module, example_inputs,
  example_kwargs)``); it is called with no arguments, or with ``size=``, ``n_seq=``, ``n_res=``
  for the options given on the command line (it must accept those it is given), or
- a module factory: a callable (an ``nn.Module`` subclass included) that takes no arguments and
  returns an ``nn.Module`` with an ``example_inputs`` attribute (a tuple, or a method returning
  one, called with the size options given as above).

With ``--size af2`` and no ``--n-seq/--n-res``, zoo models are captured at N_seq=11, N_res=13
(extra-MSA depth 17, 3 templates), sizes distinct from every AF2 channel size, so shape
propagation can name them; use ``--at`` to read the costs at the sizes you care about.

The arguments are parsed and checked before torch or any of the compiler is imported, so
``--help``, ``--version`` and argument errors answer at once. ``-v`` logs each stage on stderr
(capture, every pass, the size check, fusion with a bar over its rules on a terminal, kernel
compilation on the first call) and ends with the time each stage took.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from foldcompile.progress import StageTimes, stage
from foldcompile.tables import format_table, human

if TYPE_CHECKING:  # torch and the compiler are imported by the commands that need them
    import torch

    from foldcompile.explain import Report

__all__ = ["main", "load_target"]

_AF2_SMALL = dict(n_seq=11, n_res=13, n_extra=17, n_templ=3)
_DEMO_TOL = 1e-5  # fp32 graph vs eager; on a GPU the same kernels run, so the bar holds there too


_DTYPES = ("float32", "bfloat16", "float16")
_log = logging.getLogger("foldcompile.cli")


def _dtype(name: str | None) -> "torch.dtype | None":
    import torch
    return getattr(torch, name) if name else None


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device here")
    return name


def _size_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "size", None) is not None:
        out["size"] = args.size
    if getattr(args, "n_seq", None) is not None:
        out["n_seq"] = args.n_seq
    if getattr(args, "n_res", None) is not None:
        out["n_res"] = args.n_res
    return out


def _call_with(fn: Any, what: str, options: dict[str, Any]) -> Any:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    refused = [k for k in options if k not in params and not var_kw]
    if refused:
        raise CLIError(f"{what} does not take {', '.join('--' + k.replace('_', '-') for k in refused)}")
    return fn(**options)


def load_target(target: str, size: str | None = None, n_seq: int | None = None, n_res: int | None = None,
                device: str = "cpu", dtype: torch.dtype | None = None
                ) -> tuple[torch.nn.Module, tuple, dict, str]:
    """Resolve a CLI target to ``(module, example_inputs, example_kwargs, name)`` (see the module
    docstring). Zoo models are built on ``device`` (in ``dtype``, default float32); user targets are
    moved to ``device`` and cast to ``dtype`` only when one is given (their own dtype is kept)."""
    import torch

    from foldcompile.models import zoo

    if ":" not in target:
        if target not in zoo.names():
            raise CLIError(f"unknown model {target!r}: give a zoo name ({', '.join(zoo.names())}) "
                           "or package.module:attr")
        size = size or "tiny"
        sizes: dict[str, Any] = {"n_seq": n_seq, "n_res": n_res}
        if size == "af2" and n_seq is None and n_res is None:
            sizes = dict(_AF2_SMALL)
        module, inputs = zoo.get(target, size=size, device=device, dtype=dtype or torch.float32, **sizes)
        return module, tuple(inputs), {}, target
    mod_name, _, attr = target.rpartition(":")
    if not mod_name or not attr:
        raise CLIError(f"target {target!r}: expected a zoo name, package.module:attr or path/to/file.py:attr")
    obj: Any = _import_target_module(mod_name, target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{target} is a {type(obj).__name__}; it must be a callable returning "
                       "(module, example_inputs) or a module factory")
    options = {k: v for k, v in (("size", size), ("n_seq", n_seq), ("n_res", n_res)) if v is not None}
    try:
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            made = obj()
        else:
            made = _call_with(obj, target, options)
            options = {}
    except CLIError:
        raise
    except Exception as e:  # the user's own builder failed: say where, in a few lines, no traceback
        raise CLIError(f"{target} raised {type(e).__name__}: {e}{_user_frame(e)}") from None
    kwargs: dict = {}
    if isinstance(made, torch.nn.Module):
        ex = getattr(made, "example_inputs", None)
        if ex is None:
            raise CLIError(f"{target} returned a {type(made).__name__} without an example_inputs attribute; "
                           "return (module, example_inputs) instead")
        inputs = _call_with(ex, f"{target}().example_inputs", options) if callable(ex) else ex
        module = made
    elif isinstance(made, (tuple, list)) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module):
        module, inputs = made[0], made[1]
        kwargs = dict(made[2]) if len(made) == 3 else {}
    else:
        raise CLIError(f"{target}() returned {type(made).__name__}; expected (module, example_inputs) "
                       "or an nn.Module with example_inputs")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device=device, dtype=dtype) if (dtype is not None and x.is_floating_point()) else x.to(device)

    module = module.to(device=device) if dtype is None else module.to(device=device, dtype=dtype)
    return module, tuple(move(x) for x in inputs), {k: move(v) for k, v in kwargs.items()}, target


def _import_target_module(spec: str, target: str) -> Any:
    """Import ``package.module`` (from the working directory too, as ``python -m`` would) or a
    ``path/to/file.py``."""
    if spec.endswith(".py") or "/" in spec or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise CLIError(f"target {target!r}: no file {spec!r} (from {os.getcwd()})")
        name = "_foldcompile_target_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise CLIError(f"target {target!r}: cannot load {spec!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise CLIError(f"importing {spec!r} raised {type(e).__name__}: {e}{_user_frame(e)}") from None
        return module
    # a console script does not put the working directory on sys.path; `python -m` does
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        hint = ""
        if e.name and spec.split(".")[0] == e.name.split(".")[0]:
            hint = (f" (run from the folder that holds {spec.split('.')[0]!r}, add it to PYTHONPATH, "
                    f"or give the file: path/to/{spec.replace('.', '/')}.py:ATTR)")
        raise CLIError(f"cannot import {spec!r} for target {target!r}: {e}{hint}") from None
    except Exception as e:
        raise CLIError(f"importing {spec!r} raised {type(e).__name__}: {e}{_user_frame(e)}") from None


def _user_frame(e: BaseException) -> str:
    """`` (at file:line: code)`` for the innermost traceback frame outside foldcompile and torch."""
    import traceback

    import torch

    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository / install root
    library = (os.path.join(ours, d) + os.sep for d in ("foldcompile", "passes", "kernels"))
    skip = tuple(library) + (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, importlib.__file__)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not os.path.abspath(f.filename).startswith(skip) and not f.filename.startswith("<frozen")]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno}: {(f.line or '').strip()})"


def _parse_at(items: Sequence[str] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items or ():
        for part in item.split(","):
            name, eq, value = part.partition("=")
            if not eq or not value.strip().isdigit():
                raise CLIError(f"--at takes DIM=INT (e.g. N_res=256), got {part!r}")
            out[name.strip()] = int(value)
    return out


def _cmd_zoo(args: argparse.Namespace) -> int:
    from foldcompile.models import zoo
    for name in zoo.names():
        print(f"{name:22s} {zoo.describe(name)}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    at_given = _parse_at(args.at)          # syntax checked before any work
    ceilings = _check_html_args(args)
    if args.link_GBps is not None and args.world_size is None and args.world_sizes is None:
        raise CLIError("--link-GBps is for the DAP scaling: give --world-size P (or --world-sizes) too")
    t0 = time.perf_counter()
    with stage("load the target", _log):
        module, inputs, kwargs, name = load_target(args.target, args.size, args.n_seq, args.n_res,
                                                   dtype=_dtype(args.dtype))
    _log.info("loaded %s in %.1f s; capturing and analysing", name, time.perf_counter() - t0)
    report = _explain(module, inputs, kwargs, name)
    _log.info("explained %s in %.1f s", name, time.perf_counter() - t0)
    at = _resolve_at(at_given, report)
    if at:
        with stage(f"check the graph at {_sizes_text(at)} (a capture there on the meta device)", _log):
            report.cost(**at)
    if args.world_size is not None or args.world_sizes is not None:
        from foldcompile.dap_scaling import dap_scaling
        with stage("plan DAP at each world size", _log):
            report.dap = dap_scaling(report, world_size=args.world_size, link_GBps=args.link_GBps,
                                     world_sizes=args.world_sizes, at=at or None)
    if args.json:
        d = report.to_dict(depth=args.depth)
        if at:
            d["at"] = report.cost(depth=args.depth, **at)
        if report.dap is not None:
            d["dap"] = report.dap.to_dict()
        import json
        print(json.dumps(d, indent=1))
    else:
        print(report.table(depth=args.depth, with_dap=False))
        if at:
            print(f"\nat {_sizes_text(at)}:\n")
            print(report.table(depth=args.depth, **at))
        if report.dap is not None:
            print(f"\n{report.dap}")
    if args.html:
        _write_html(args, report, at, ceilings=ceilings)
    return 0


def _explain(module: Any, inputs: tuple, kwargs: dict, name: str) -> "Report":
    """``foldcompile.explain`` in its stages (capture, then the passes, each logged with its time)."""
    from foldcompile.capture import flat_inputs, trace
    from foldcompile.explain import explain_graph
    from foldcompile.passes.base import PassError

    with stage("capture (Dynamo)", _log):
        gm = trace(module, *inputs, **kwargs)
    try:
        report = explain_graph(gm, inputs, kwargs, model_name=name)
    except PassError as e:
        if "ambiguous" not in str(e):
            raise
        # the library's advice names its Python API; a CLI user changes flags instead
        raise CLIError(f"{e.__class__.__name__}: {str(e).split(';')[0]}; give distinct example sizes "
                       "(e.g. --n-seq 11 --n-res 13) and read the costs at the sizes you want with "
                       "--at N_seq=... N_res=...") from None
    report.model = module
    report.example_values = flat_inputs(gm, inputs, kwargs)
    return report


def _sizes_text(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def _check_html_args(args: argparse.Namespace) -> Any:
    """``--html`` writable and ``--card`` found in the results, before any work; the card's ceilings."""
    if getattr(args, "html", None):
        _check_writable(args.html, "--html")
    if getattr(args, "card", None) is None:
        if getattr(args, "results", None):
            raise CLIError("--results names where --card's measured ceilings are: give --card too")
        return None
    if not args.html:
        raise CLIError("--card draws the roofline of the HTML report: give --html OUT.html too")
    from foldcompile.ceilings import CeilingsError, find_ceilings
    try:
        return find_ceilings(args.card, args.results)
    except CeilingsError as e:
        raise CLIError(f"--card {args.card}: {e}") from None


def _write_html(args: argparse.Namespace, report: "Report", at: dict[str, int], **options: Any) -> None:
    from foldcompile.report_html import write_html
    what = "before / after fusion" if options.get("optimized") is not None else "with the fusion plan at that size"
    with stage(f"the HTML report ({what})", _log):
        write_html(args.html, report, args.depth, at=at, **options)
    print(f"wrote {args.html}", file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def _resolve_at(at: dict[str, int], report: "Report") -> dict[str, int]:
    """Map ``--at`` names onto the report's dims: exact, else case- and dash-insensitive
    (``n_res`` / ``n-res`` for ``N_res``, the spelling of the ``--n-res`` flag)."""
    folded = {k.lower().replace("-", "_"): k for k in report.dims}
    out: dict[str, int] = {}
    for name, value in at.items():
        dim = name if name in report.dims else folded.get(name.lower().replace("-", "_"))
        if dim is None:
            raise CLIError(f"--at {name}={value}: this model's dims are "
                           f"{', '.join(report.dims) or 'none (no size was named)'}")
        out[dim] = value
    return out


def _check_writable(path: str, flag: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.isdir(path) or not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CLIError(f"{flag} {path}: cannot write there")


def _cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from foldcompile.profile import profile
    ceilings = _check_html_args(args)
    device = _device(args.device)
    with stage("load the target", _log):
        module, inputs, kwargs, name = load_target(args.target, args.size, args.n_seq, args.n_res, device,
                                                   _dtype(args.dtype))
    with torch.no_grad():
        with stage(f"profile ({args.reps} timed runs after warm-up)", _log):
            prof = profile(module, *inputs, reps=args.reps, **kwargs)
        prof.model_name = name
        print(prof.to_json(depth=args.depth) if args.json else prof.table(depth=args.depth))
        if args.html:  # the page is at the profiled size: every number on it is at one size
            report = _explain(module, inputs, kwargs, name)
            _write_html(args, report, {}, profile=prof, ceilings=ceilings)
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    import torch

    import foldcompile
    from foldcompile.passes.fuse import DEFAULT_AT
    from foldcompile.passes.rules import all_rules
    from foldcompile.progress import rules_with_progress
    at_given = _parse_at(args.at)
    ceilings = _check_html_args(args)
    device = _device(args.device)
    # --at names folded onto the dims fusion knows (n_res -> N_res); checked against the model's below
    known = {k.lower().replace("-", "_"): k for k in DEFAULT_AT}
    at = {known.get(k.lower().replace("-", "_"), k): v for k, v in at_given.items()}
    with stage("load the target", _log):
        module, inputs, kwargs, name = load_target(args.target, args.size, args.n_seq, args.n_res, device,
                                                   _dtype(args.dtype))
    # inference: a variant is specialised on grad mode, so build it in the mode it is timed in
    with torch.no_grad():
        rules, bar = rules_with_progress(all_rules(), _log)
        with stage("optimize: capture, normalize, shape_prop, classify, fuse", _log):
            try:
                fast = foldcompile.optimize(module, *inputs, at=at or None, rules=rules, **kwargs)
            finally:
                bar.close()  # ends the bar's line before the stage's own
        opt_report = fast.report
        opt_report.model_name = name
        unknown = sorted(set(at) - set(opt_report.dims))
        if unknown:
            raise CLIError(f"--at {unknown[0]}: this model's dims are "
                           f"{', '.join(opt_report.dims) or 'none (no size was named)'}")
        bench = _bench(module, fast, inputs, kwargs, args.reps, device) if args.bench else None
        if args.json:
            import json
            print(json.dumps({"model": name, "fusion": _jsonable(opt_report.to_dict()), "bench": bench}, indent=1))
        else:
            print(opt_report)
            if bench is not None:
                print()
                print("\n".join(_bench_lines(bench)))
        if args.html:
            report = _explain(module, inputs, kwargs, name)
            shown = dict(opt_report.record.get("at") or {})
            _write_html(args, report, shown, optimized=fast.variant_for(*inputs, **kwargs), ceilings=ceilings)
    return 0


def _jsonable(x: Any) -> Any:
    import json
    return json.loads(json.dumps(x, default=str))


def _bench(model: Any, fast: Any, inputs: tuple, kwargs: dict, reps: int, device: str) -> dict[str, Any]:
    """Eager and optimized calls timed in turns (so drift hits both alike), after one untimed call
    each (the optimized one compiles its kernels there), with their outputs compared."""
    import statistics

    import torch

    from foldcompile.pass_manager import max_rel_error
    from foldcompile.progress import Bar

    def timed(fn: Any) -> tuple[float, Any]:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*inputs, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3, out

    with stage("first optimized call (kernel compilation / autotuning happen here)", _log):
        first_ms, out = timed(fast)
    _, ref = timed(model)
    runs: dict[str, list[float]] = {"eager": [], "optimized": []}
    bar = Bar(reps, "bench runs", _log)
    for i in range(reps):
        runs["eager"].append(timed(model)[0])
        runs["optimized"].append(timed(fast)[0])
        bar.advance(f"run {i + 1}")
    bar.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"device": device if device == "cpu" else f"cuda: {torch.cuda.get_device_name()}", "reps": reps,
            "first_call_ms": first_ms, "runs_ms": runs, "median_ms": med,
            "spread_ms": {k: [min(v), max(v)] for k, v in runs.items()},
            "speedup": med["eager"] / med["optimized"] if med["optimized"] > 0 else float("inf"),
            "max_rel_error": max_rel_error(out, ref)}


def _bench_lines(b: dict[str, Any]) -> list[str]:
    how = "CUDA-synchronised wall clock" if b["device"].startswith("cuda") else "CPU wall clock"
    lines = [f"bench on {b['device']} ({how}, {b['reps']} runs each, in turns, torch.no_grad):"]
    for k in ("eager", "optimized"):
        lo, hi = b["spread_ms"][k]
        lines.append(f"  {k:<10} median {human(b['median_ms'][k] * 1e-3, 's'):>9}  "
                     f"(min {human(lo * 1e-3, 's')}, max {human(hi * 1e-3, 's')})")
    lines.append(f"  speed-up   {b['speedup']:.2f}x (median over median); first optimized call "
                 f"{human(b['first_call_ms'] * 1e-3, 's')}; outputs differ by {b['max_rel_error']:.1e} (relative)")
    lo_e, hi_e = b["spread_ms"]["eager"]
    lo_o, hi_o = b["spread_ms"]["optimized"]
    if b["reps"] < 3 or lo_e <= hi_o and lo_o <= hi_e:
        why = "fewer than 3 runs" if b["reps"] < 3 else "the spreads overlap"
        lines.append(f"  note: {why}: the difference may be noise; more runs with --reps")
    return lines


def _class_table(report: "Report", **sizes: int) -> list[str]:
    c = report.cost(**sizes)
    rows = [[cls, e["count"], e["flops"] / 1e9, e["bytes"] / 1e6, e["intensity"]]
            for cls, e in c["classes"].items() if e["count"]]
    rows.append(["total", c["total"]["count"], c["total"]["flops"] / 1e9, c["total"]["bytes"] / 1e6,
                 c["total"]["intensity"]])
    return ["    " + line for line in format_table(["op class", "nodes", "GFLOP", "MB", "FLOP/B"], rows)]


def _demo_one(name: str, size: str, device: str) -> dict[str, Any]:
    from foldcompile.capture import trace
    from foldcompile.explain import explain_graph
    from foldcompile.models import zoo
    from foldcompile.pass_manager import max_rel_error

    module, inputs = zoo.get(name, size=size, device=device, **(_AF2_SMALL if size == "af2" else {}))
    t0 = time.perf_counter()
    gm = trace(module, *inputs)
    t_capture = time.perf_counter() - t0
    report = explain_graph(gm, inputs, model_name=name)
    t_total = time.perf_counter() - t0
    err = max_rel_error(report.graph_module(*inputs), module(*inputs))
    cap = report.capture
    print(f"\n== {name} ({size}, {device}): {zoo.describe(name)}")
    print(f"   captured as {cap['graphs']} graph, {cap['leaves']} leaves ({cap['tracer']}) in {t_capture:.1f} s; "
          f"{sum(1 for n in report.graph_module.graph.nodes if n.op not in ('placeholder', 'get_attr', 'output'))} "
          f"ops after normalize; dims " + ", ".join(f"{k}={v}" for k, v in report.dims.items()))
    print(f"   captured+normalised graph vs eager: max rel error {err:.2e} "
          f"({'ok' if err <= _DEMO_TOL else 'MISMATCH'}, bar {_DEMO_TOL:g})")
    print("\n".join(_class_table(report)))
    c = report.cost()
    return {"name": name, "ok": err <= _DEMO_TOL, "err": err, "graphs": cap["graphs"], "leaves": cap["leaves"],
            "ops": c["total"]["count"], "gflop": c["total"]["flops"] / 1e9,
            "gemm_share": c["classes"]["GEMM"]["flops"] / c["total"]["flops"] if c["total"]["flops"] else 0.0,
            "seconds": t_total}


def _demo_af2_scaling(device: str) -> None:
    from foldcompile.explain import explain
    from foldcompile.models import zoo
    module, inputs = zoo.get("evoformer_block", size="af2", n_seq=11, n_res=13, device=device)
    report = explain(module, *inputs)
    print("\n== evoformer_block at AlphaFold 2 dims (c_m=256, c_z=128), captured once at N_seq=11, N_res=13;"
          " costs read from the symbolic expressions:")
    for sizes in ({"N_seq": 128, "N_res": 256}, {"N_seq": 128, "N_res": 1024}):
        c = report.cost(**sizes)
        print(f"\n   at N_seq={sizes['N_seq']}, N_res={sizes['N_res']}: GEMM {c['classes']['GEMM']['flops'] / 1e9:.2f} "
              f"GFLOP forward, {c['total']['bytes'] / 1e9:.2f} GB moved with every op unfused")
        print("\n".join(_class_table(report, **sizes)))


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from foldcompile.models import zoo
    device = _device(args.device)
    names = args.models or zoo.names()
    unknown = [n for n in names if n not in zoo.names()]
    if unknown:
        raise CLIError(f"unknown models {unknown}; valid: {', '.join(zoo.names())}")
    print(f"foldcompile demo: capture -> normalize -> shape_prop -> classify on {len(names)} reference model(s), "
          f"size {args.size}, {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    t0 = time.perf_counter()
    results = []
    with torch.no_grad():
        for name in names:
            try:
                results.append(_demo_one(name, args.size, device))
            except Exception as e:  # one model failing must not hide the others' results
                print(f"\n== {name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                results.append({"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
        if "evoformer_block" in names:
            _demo_af2_scaling(device)
    from foldcompile.demo_kernels import demo_kernels
    kernels_ok = demo_kernels(device)
    optimized_ok = _demo_optimize(names, args.size, device)
    print(f"\n== summary ({time.perf_counter() - t0:.0f} s)")
    for r in results:
        if "error" in r:
            print(f"   {r['name']:20s} FAILED  {r['error'].splitlines()[0]}")
        else:
            print(f"   {r['name']:20s} {'ok    ' if r['ok'] else 'FAILED'}  {r['graphs']} graph, {r['leaves']} leaves, "
                  f"{r['ops']:4d} ops, max rel err {r['err']:.1e}, {r['gflop']:.3g} GFLOP "
                  f"({100 * r['gemm_share']:.0f}% GEMM), {r['seconds']:.1f} s")
    print(f"   kernels              {'ok' if kernels_ok else 'FAILED'}")
    print(f"   optimize + verify    {'ok' if optimized_ok else 'FAILED'}")
    return 0 if all(r["ok"] for r in results) and kernels_ok and optimized_ok else 1


def _demo_optimize(names: Sequence[str], size: str, device: str) -> bool:
    """optimize + verify each model; one line of match counts each (at the tiny size the zoo's head
    dim is 4, below the attention kernel's 8: those attentions are listed as rejected, with the reason)."""
    import foldcompile
    from foldcompile.models import zoo
    print("\n== optimize + verify (fused kernels; errors vs the float64 truth, next to eager's own)")
    ok = True
    for name in names:
        try:
            model, inputs = zoo.get(name, size=size, device=device)
            fast = foldcompile.optimize(model, *inputs)
            report = foldcompile.verify(model, *inputs, optimized=fast)
            counts = ", ".join(f"{r} {c['matched']}" + (f" (-{c['rejected']})" if c["rejected"] else "")
                               for r, c in fast.report.counts().items() if c["matched"] or c["rejected"])
            worst = max((r["optimized"] for r in report.outputs), default=0.0)
            eager = max((r["eager"] for r in report.outputs), default=0.0)
            reasons = sorted({r["reason"] for r in fast.report.rejections if r["rule"] != "elementwise"})
            print(f"   {name:20s} {'ok    ' if report.ok else 'FAILED'} matched {counts}; output error "
                  f"{worst:.1e} (eager {eager:.1e})" + (f"; rejected: {'; '.join(reasons)}" if reasons else ""))
            ok &= report.ok
        except Exception as e:  # one model failing must not hide the others'
            print(f"   {name:20s} FAILED  {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            ok = False
    return ok


def _cmd_verify(args: argparse.Namespace) -> int:
    import foldcompile
    module, inputs, kwargs, name = load_target(args.target, args.size, args.n_seq, args.n_res,
                                               dtype=_dtype(args.dtype))
    with stage("optimize", _log):
        fast = foldcompile.optimize(module, *inputs, **kwargs)
    print(fast.report)
    report = foldcompile.verify(module, *inputs, optimized=fast, bisect=args.bisect, **kwargs)
    print()
    print(report)
    return 0 if report.ok else 1


_EPILOG = """examples:
  foldcompile zoo
  foldcompile explain evoformer_block --size af2 --at N_seq=128 N_res=1024 --html evo.html --card H200
  foldcompile explain mymodel.py:build --n-res 64      # a file in the working directory
  foldcompile explain my_pkg.models:build --dtype bfloat16
  foldcompile explain evoformer_block --size af2 --world-size 8 --link-GBps 50   # DAP on paper, P = 2 ... 512
  foldcompile profile pairformer_block --device cpu --reps 3
  foldcompile verify pairformer_block --bisect         # optimize, then check it against float64
  foldcompile optimize evoformer_block --bench --reps 5 --html evo_optimized.html
  foldcompile demo --models evoformer_block
"""

_TARGET_HELP = ("a zoo model (`foldcompile zoo`), package.module:ATTR or path/to/file.py:ATTR, where ATTR "
                "returns (module, example_inputs) or is a module factory with example_inputs")


def _add_verbosity(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="progress of each stage on stderr (-vv: every pass's details)")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="only errors on stderr")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    _add_verbosity(p, argparse.SUPPRESS)
    p.add_argument("target", help=_TARGET_HELP)
    p.add_argument("--size", choices=("tiny", "af2"), default=None,
                   help="zoo model dimensions: tiny (default) or AlphaFold's own channel sizes")
    p.add_argument("--n-seq", type=_positive_int, default=None, metavar="N",
                   help="MSA depth of the example inputs (passed to the target as n_seq=)")
    p.add_argument("--n-res", type=_positive_int, default=None, metavar="N",
                   help="number of residues of the example inputs (passed to the target as n_res=)")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="cast the model and its floating-point inputs (default: zoo models float32, "
                        "your own model as it is)")


def _add_html_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--html", metavar="OUT.html", help=f"write the self-contained HTML report ({what})")
    p.add_argument("--card", metavar="NAME", help="draw the HTML report's roofline against this card's measured "
                   "ceilings (copy bandwidth, matmul rate) read from bench/results/, e.g. --card H200")
    p.add_argument("--results", metavar="DIR", help="the folder of measured results --card reads "
                   "(default: bench/results of the source checkout)")


def _world_size(text: str) -> int:
    v = _positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"a world size of at least 2, got {text!r}")
    return v


def _world_sizes(text: str) -> tuple[int, ...]:
    return tuple(_world_size(part) for part in text.split(",") if part.strip())


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"a positive number, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from foldcompile import __version__

    p = argparse.ArgumentParser(prog="foldcompile", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="A compiler for AlphaFold-family PyTorch models: capture, classify, "
                                            "explain, profile, optimize (fused Triton kernels) and verify.")
    p.add_argument("--version", action="version", version=f"foldcompile {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="progress of each stage on stderr (-vv: every pass's details)")
    p.add_argument("-q", "--quiet", action="store_true", default=False, help="only errors on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("zoo", help="list the bundled reference models",
                   description="List the bundled reference models with their sizes.")

    e = sub.add_parser("explain", help="op classes, FLOPs and bytes by class and by module",
                       description="Capture TARGET as one graph, classify every op (GEMM / REDUCTION / ELEMENTWISE / "
                                   "LAYOUT / COMM / OTHER) with symbolic FLOPs and bytes, and print them by op class "
                                   "and by module.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target_args(e)
    e.add_argument("--depth", type=_positive_int, default=None, metavar="D",
                   help="group the module table by the first D parts of each module path (default: full paths)")
    e.add_argument("--at", nargs="+", metavar="DIM=V",
                   help="also evaluate the costs at these sizes, e.g. --at N_seq=128 N_res=1024 "
                        "(dim names as in the report; n_res works too)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--world-size", type=_world_size, default=None, metavar="P",
                   help="DAP on paper: the plan over P ranks and, for P = 2 ... 512, the communication volume and "
                        "time per collective and per block next to the compute and the memory per rank (at the "
                        "--at sizes, default the training crop)")
    e.add_argument("--world-sizes", type=_world_sizes, default=None, metavar="P,P,...",
                   help="the world sizes of the DAP scaling table (default 2,4,...,512)")
    e.add_argument("--link-GBps", type=_positive_float, default=None, metavar="X",
                   help="the link bandwidth per rank of the DAP scaling, GB/s (default 300: NVLink)")
    _add_html_args(e, "at the --at size: per-module FLOPs and bytes, the fusion plan, a roofline with --card")

    pr = sub.add_parser("profile", help="time per op class and per module",
                        description="Run TARGET node by node and attribute the time to op classes and modules "
                                    "(CUDA events on a GPU, CPU wall-clock otherwise), next to the cost model.",
                        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target_args(pr)
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where to run (auto: the GPU when there is one)")
    pr.add_argument("--reps", type=_positive_int, default=5, help="timed runs (node times are medians)")
    pr.add_argument("--depth", type=_positive_int, default=1, metavar="D", help="module path depth of the table")
    pr.add_argument("--json", action="store_true", help="print the profile as JSON")
    _add_html_args(pr, "at the profiled size, with each module's measured time")

    d = sub.add_parser("demo", help="the whole pipeline on the bundled models",
                       description="Capture, normalise and classify each bundled model, check it against eager, "
                                   "read costs at AlphaFold sizes, and run each fused kernel against its reference.")
    _add_verbosity(d, argparse.SUPPRESS)
    d.add_argument("--models", nargs="+", metavar="NAME", help="only these zoo models (default: all)")
    d.add_argument("--size", choices=("tiny", "af2"), default="tiny", help="zoo model dimensions")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: the GPU when there is one)")

    v = sub.add_parser("verify", help="optimize a model and verify it against the float64 truth",
                       description="Optimize TARGET, then run the traced graph in float64 (the truth), in the run "
                                   "dtype, and optimized; report each output's and parameter gradient's error next "
                                   "to eager's own and the first node where the optimized error exceeds it.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target_args(v)
    v.add_argument("--bisect", action="store_true", help="on a failure, find the match that causes it")

    o = sub.add_parser("optimize", help="fuse a model's memory-bound chains into kernels; what was fused and why not",
                       description="Optimize TARGET (capture, normalize, shape_prop, classify, fuse, under "
                                   "torch.no_grad), print every match, every rejected candidate with its reason and "
                                   "what was left unfused; --bench times eager against optimized.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target_args(o)
    o.add_argument("--at", nargs="+", metavar="DIM=V",
                   help="the size fusion's profitability is judged at and the HTML report shows "
                        "(default: the training crop, N_seq=128 N_res=256)")
    o.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: the GPU when there is one)")
    o.add_argument("--bench", action="store_true",
                   help="time eager and optimized calls in turns and print medians with their spread")
    o.add_argument("--reps", type=_positive_int, default=5, help="timed runs of each with --bench")
    o.add_argument("--depth", type=_positive_int, default=None, metavar="D",
                   help="module path depth of the HTML report's module rows")
    o.add_argument("--json", action="store_true", help="print the fusion record (and the timings) as JSON")
    _add_html_args(o, "before / after fusion at the --at size")
    return p


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Progress goes to stderr through the ``foldcompile`` logger hierarchy (``foldcompile.passes.*``)."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    log = logging.getLogger("foldcompile")
    log.setLevel(level)
    if not any(getattr(h, "_foldcompile_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[foldcompile %(relativeCreated)6.0f ms] %(message)s"))
        handler._foldcompile_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``foldcompile`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    handlers = {"zoo": _cmd_zoo, "explain": _cmd_explain, "profile": _cmd_profile, "demo": _cmd_demo,
                "verify": _cmd_verify, "optimize": _cmd_optimize}
    times = StageTimes()
    log = logging.getLogger("foldcompile")
    log.addHandler(times)
    try:
        return handlers[args.command](args)
    except CLIError as e:
        print(f"foldcompile {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # errors the library raises for the user's model: one clear line, no traceback
        from foldcompile.capture import CaptureError
        from foldcompile.passes.base import PassError
        if isinstance(e, (CaptureError, PassError, ValueError)):  # ValueError: argument checks
            print(f"foldcompile {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        log.removeHandler(times)
        if args.verbose and not args.quiet and times.stages:
            print("\n".join(times.table()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
