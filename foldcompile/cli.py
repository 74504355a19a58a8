"""The ``foldcompile`` command.

    foldcompile zoo
        List the bundled reference models.
    foldcompile explain TARGET [--size tiny|af2] [--n-seq N] [--n-res N] [--depth D]
                               [--at DIM=V ...] [--json] [--html out.html]
        Capture TARGET, classify every op, print the op-class and module tables (or the JSON
        report with --json), the costs at other sizes with --at (e.g. --at N_seq=128 N_res=256),
        and write the picture with --html.
    foldcompile profile TARGET [--size ...] [--n-seq N] [--n-res N] [--device auto|cpu|cuda]
                               [--dtype float32|bfloat16|float16] [--json]
        Time TARGET per op class and per module (CUDA events on a GPU, CPU wall-clock otherwise).
    foldcompile demo [--models NAME ...] [--size tiny|af2] [--device auto|cpu|cuda]
        What the compiler does today, on the bundled models.
    foldcompile verify TARGET [--size ...] [--n-seq N] [--n-res N] [--bisect]
        Optimize TARGET, print its fusion report and verify it against the float64 truth
        (exit status 1 when it does not verify; --bisect names the culprit match).

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
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from typing import Any, Sequence

import torch

from foldcompile.explain import Report, explain, explain_graph, format_table

__all__ = ["main", "load_target"]

_AF2_SMALL = dict(n_seq=11, n_res=13, n_extra=17, n_templ=3)
_DEMO_TOL = 1e-5  # fp32 graph vs eager; on a GPU the same kernels run, so the bar holds there too


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _device(name: str) -> str:
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
                device: str = "cpu", dtype: torch.dtype = torch.float32
                ) -> tuple[torch.nn.Module, tuple, dict, str]:
    """Resolve a CLI target to ``(module, example_inputs, example_kwargs, name)`` (see the module
    docstring). Zoo models are built on ``device`` in ``dtype``; user targets are moved there."""
    from foldcompile.models import zoo

    if ":" not in target:
        if target not in zoo.names():
            raise CLIError(f"unknown model {target!r}: give a zoo name ({', '.join(zoo.names())}) "
                           "or package.module:attr")
        size = size or "tiny"
        sizes: dict[str, Any] = {"n_seq": n_seq, "n_res": n_res}
        if size == "af2" and n_seq is None and n_res is None:
            sizes = dict(_AF2_SMALL)
        module, inputs = zoo.get(target, size=size, device=device, dtype=dtype, **sizes)
        return module, tuple(inputs), {}, target
    mod_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise CLIError(f"cannot import {mod_name!r} for target {target!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{target} is a {type(obj).__name__}; it must be a callable returning "
                       "(module, example_inputs) or a module factory")
    options = {k: v for k, v in (("size", size), ("n_seq", n_seq), ("n_res", n_res)) if v is not None}
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        made = obj()
    else:
        made = _call_with(obj, target, options)
        options = {}
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
    move = lambda x: (x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)) \
        if isinstance(x, torch.Tensor) else x
    module = module.to(device=device, dtype=dtype)
    return module, tuple(move(x) for x in inputs), {k: move(v) for k, v in kwargs.items()}, target


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
    module, inputs, kwargs, name = load_target(args.target, args.size, args.n_seq, args.n_res)
    report = explain(module, *inputs, **kwargs)
    report.model_name = name
    at = _parse_at(args.at)
    if args.json:
        d = report.to_dict(depth=args.depth)
        if at:
            d["at"] = report.cost(depth=args.depth, **at)
        import json
        print(json.dumps(d, indent=1))
    else:
        print(report.table(depth=args.depth))
        if at:
            print(f"\nat {', '.join(f'{k}={v}' for k, v in at.items())}:\n")
            print(report.table(depth=args.depth, **at))
    if args.html:
        report.to_html(args.html, depth=args.depth)
        print(f"wrote {args.html}", file=sys.stderr if args.json else sys.stdout)
    return 0


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cmd_profile(args: argparse.Namespace) -> int:
    from foldcompile.profile import profile
    device = _device(args.device)
    module, inputs, kwargs, name = load_target(args.target, args.size, args.n_seq, args.n_res, device,
                                               _DTYPES[args.dtype])
    with torch.no_grad():
        prof = profile(module, *inputs, reps=args.reps, **kwargs)
    prof.model_name = name
    print(prof.to_json(depth=args.depth) if args.json else prof.table(depth=args.depth))
    return 0


def _class_table(report: Report, **sizes: int) -> list[str]:
    c = report.cost(**sizes)
    rows = [[cls, e["count"], e["flops"] / 1e9, e["bytes"] / 1e6, e["intensity"]]
            for cls, e in c["classes"].items() if e["count"]]
    rows.append(["total", c["total"]["count"], c["total"]["flops"] / 1e9, c["total"]["bytes"] / 1e6,
                 c["total"]["intensity"]])
    return ["    " + line for line in format_table(["op class", "nodes", "GFLOP", "MB", "FLOP/B"], rows)]


def _demo_one(name: str, size: str, device: str) -> dict[str, Any]:
    from foldcompile.capture import trace
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
    module, inputs, kwargs, name = load_target(args.target, args.size, args.n_seq, args.n_res)
    fast = foldcompile.optimize(module, *inputs, **kwargs)
    print(fast.report)
    report = foldcompile.verify(module, *inputs, optimized=fast, bisect=args.bisect, **kwargs)
    print()
    print(report)
    return 0 if report.ok else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foldcompile", description="A compiler for AlphaFold-family PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("zoo", help="list the bundled reference models")

    e = sub.add_parser("explain", help="op classes, FLOPs and bytes by class and by module")
    e.add_argument("target", help="zoo name or package.module:attr")
    e.add_argument("--size", choices=("tiny", "af2"), default=None)
    e.add_argument("--n-seq", type=int, default=None)
    e.add_argument("--n-res", type=int, default=None)
    e.add_argument("--depth", type=int, default=None, help="module path depth of the module table")
    e.add_argument("--at", nargs="+", metavar="DIM=V", help="also evaluate the costs at these sizes")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--html", metavar="OUT.html", help="write the self-contained HTML picture")

    pr = sub.add_parser("profile", help="time per op class and per module")
    pr.add_argument("target")
    pr.add_argument("--size", choices=("tiny", "af2"), default=None)
    pr.add_argument("--n-seq", type=int, default=None)
    pr.add_argument("--n-res", type=int, default=None)
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    pr.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    pr.add_argument("--reps", type=int, default=5)
    pr.add_argument("--depth", type=int, default=1)
    pr.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="what the compiler does today, on the bundled models")
    d.add_argument("--models", nargs="+", metavar="NAME")
    d.add_argument("--size", choices=("tiny", "af2"), default="tiny")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    v = sub.add_parser("verify", help="optimize a model and verify it against the float64 truth")
    v.add_argument("target", help="zoo name or package.module:attr")
    v.add_argument("--size", choices=("tiny", "af2"), default=None)
    v.add_argument("--n-seq", type=int, default=None)
    v.add_argument("--n-res", type=int, default=None)
    v.add_argument("--bisect", action="store_true", help="on a failure, find the match that causes it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``foldcompile`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    handlers = {"zoo": _cmd_zoo, "explain": _cmd_explain, "profile": _cmd_profile, "demo": _cmd_demo,
                "verify": _cmd_verify}
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


if __name__ == "__main__":
    sys.exit(main())
