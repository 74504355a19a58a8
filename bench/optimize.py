"""End-to-end: ``foldcompile.optimize`` (each executor) and the ``foldcompile`` Dynamo backend against eager
and torch.compile on the reference trunks.

One process, one card. For each model (zoo Evoformer and Pairformer stacks, 4 blocks, the
papers' dimensions, parameters and activations in bf16) and case:

  train      forward+backward at the training crop (N_seq=128, N_res=256), train mode (dropout on)
  infer1024  forward at N_seq=128, N_res=1024, eval mode, under no_grad

rows (``--variants``):

  eager                          the model as written
  torch.compile                  default mode
  torch.compile reduce-overhead  Inductor with its CUDA graphs (cudagraph_mark_step_begin per step)
  optimize eager                 the rewritten graph run by PyTorch, our kernels inside it
  optimize cuda_graph            forward (and backward) replayed as CUDA graphs
  optimize inductor              our kernels as torch.library ops, the rest compiled by Inductor (reduce-overhead)
  backend foldcompile            torch.compile(model, backend="foldcompile") (auto executor: CUDA graphs)

Each row: ms per block (median of the whole call / 4, after 3 warm-up calls: the executors'
watched call and capture, Inductor's recording, are not timed), peak memory, the build time of
the first call (capture/compile/optimize; warm Triton cache unless the machine is fresh), the
executor actually running (``optimize`` and the backend fall back to eager with a reason, which
then shows here), the fused matches, and the error of the first output against eager fp32 on the
same inputs (inference; so a faster row that computes something else shows).

Resumable and bounded: rows are written to ``--out`` as each finishes; ``--resume`` skips the
rows today's file (same card) already holds; ``--budget-s`` (default 450) stops starting rows
once the next row's estimated time would pass it, so one device call of 10 minutes never
loses a finished row. The whole benchmark is one command, run again until it prints
``all rows done``:

    python -m bench.optimize --resume

A group (``--cases`` / ``--models`` / ``--variants``) narrows it.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time
import traceback

import torch

from bench.common import Results, card_name, peak_memory_bytes, time_ms
from foldcompile.models import zoo

N_BLOCKS = 4
CASES = {
    "train": dict(n_seq=128, n_res=256, train=True),
    "infer1024": dict(n_seq=128, n_res=1024, train=False),
}
VARIANTS = ("eager", "torch.compile", "torch.compile reduce-overhead", "optimize eager", "optimize cuda_graph",
            "optimize inductor", "backend foldcompile")
# seconds a row takes from a cold start on an H200 (4-block stack; build + warm-up + timing), to
# decide whether it still fits the budget; the measured ones are used once a row has run
ESTIMATE_S = {"eager": 20, "torch.compile": 120, "torch.compile reduce-overhead": 150, "optimize eager": 90,
              "optimize cuda_graph": 100, "optimize inductor": 200, "backend foldcompile": 110}
# the executor each foldcompile row should run (auto picks CUDA graphs on CUDA for the backend)
EXPECTED_EXECUTOR = {"optimize eager": "eager", "optimize cuda_graph": "cuda_graph", "optimize inductor": "inductor",
                     "backend foldcompile": "cuda_graph"}
COLUMNS = ["model", "case", "variant", "status", "ms_per_block", "x_eager", "x_compile", "peak_gib", "held_gib",
           "build_s", "rel_err_vs_fp32", "executor", "fused"]
STEM = "optimize"


def _outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


def _loss(out) -> torch.Tensor:
    return sum(t.float().square().mean() for t in _outputs(out))


def _fused_summary(report) -> str:
    counts = report.counts()
    return ", ".join(f"{rule} {c['matched']}" for rule, c in counts.items() if c.get("matched"))


def _build(variant: str, module: torch.nn.Module, inputs: tuple, train: bool):
    """``(the callable to time, a function giving its foldcompile report (or None) once it has run)``."""
    if variant == "eager":
        return module, lambda: None
    if variant == "torch.compile":
        return torch.compile(module), lambda: None
    if variant == "torch.compile reduce-overhead":
        compiled = torch.compile(module, mode="reduce-overhead")

        def stepped(*a):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*a)
        return stepped, lambda: None
    if variant == "backend foldcompile":
        from foldcompile.dynamo_backend import Backend
        backend = Backend()
        return torch.compile(module, backend=backend), lambda: backend.graphs[0].report if backend.graphs else None
    import foldcompile
    executor = variant.split()[1]
    with torch.enable_grad() if train else torch.no_grad():
        fast = foldcompile.optimize(module, *inputs, executor=executor)
    return fast, lambda: fast.report


def run_case(results: Results, name: str, case: str, variants, out_dir: str, deadline: float,
             done: set[tuple[str, str, str]], smoke: bool = False) -> bool:
    """The rows of one (model, case); False once the budget stopped it."""
    todo = [v for v in variants if (name, case, v) not in done]
    if not todo:
        return True
    if time.monotonic() + min(ESTIMATE_S[v] for v in todo) > deadline:
        return False
    spec = dict(CASES[case])
    device = "cpu" if smoke else "cuda"
    sized = dict(size="tiny", n_blocks=1) if smoke else dict(size="af2", n_seq=spec["n_seq"], n_res=spec["n_res"],
                                                            n_blocks=N_BLOCKS)
    torch.manual_seed(0)
    module, inputs = zoo.get(name, device=device, dtype=torch.float32 if smoke else torch.bfloat16, **sized)
    module.train(spec["train"])
    # the fp32 truth for the error column: the same parameters and inputs, eval mode only
    # (train-mode dropout masks differ between implementations, so no error is shown there)
    ref = None
    if not spec["train"]:
        ref_module = zoo.get(name, device=device, dtype=torch.float32, **sized)[0]
        ref_module.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
        ref_module.eval()
        with torch.no_grad():
            ref = _outputs(ref_module(*[x.float() if x.is_floating_point() else x for x in inputs]))[0].float()
        del ref_module
        gc.collect()
        if not smoke:
            torch.cuda.empty_cache()
    params = [p for p in module.parameters() if p.requires_grad]
    blocks = sized["n_blocks"]
    times = {r["variant"]: r["ms_per_block"] * blocks for r in results.rows
             if r["model"] == name and r["case"] == case and r.get("status") == "ok"}
    for variant in todo:
        if time.monotonic() + ESTIMATE_S[variant] > deadline:
            return False
        row = dict(model=name, case=case, variant=variant)
        fn = step = report_of = None
        try:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            fn, report_of = _build(variant, module, inputs, spec["train"])
            if spec["train"]:
                def step():
                    return torch.autograd.grad(_loss(fn(*inputs)), params)
            else:
                def step():
                    with torch.no_grad():
                        return fn(*inputs)
            first = step()
            if not smoke:
                torch.cuda.synchronize()
            build_s = time.perf_counter() - t0
            err = "-"
            if ref is not None:
                got = _outputs(first)[0].float()
                err = float((got - ref).norm() / ref.norm())
            del first
            if smoke:  # the script's logic on CPU: wall time, no memory counters
                for _ in range(3):
                    step()
                t1 = time.perf_counter()
                step()
                ms, peak, held = (time.perf_counter() - t1) * 1e3, 0, 0
            else:
                ms = time_ms(step, warmup=3, reps=5 if spec["n_res"] >= 1024 else 10)
                peak = peak_memory_bytes(step)
                torch.cuda.empty_cache()  # what stays reserved: live tensors and CUDA-graph pools
                held = torch.cuda.memory_reserved()
            times[variant] = ms
            report = report_of()
            executor = "-"
            if report is not None:
                expected = EXPECTED_EXECUTOR[variant] if device == "cuda" else "eager"
                executor = report.executor + ("" if report.executor == expected else f" ({report.executor_reason})")
            results.add(**row, status="ok", ms_per_block=ms / blocks,
                        x_eager=times["eager"] / ms if "eager" in times else "-",
                        x_compile=times["torch.compile"] / ms if "torch.compile" in times else "-",
                        peak_gib=(peak + (0 if smoke else torch.cuda.memory_allocated())) / 2**30,
                        held_gib=held / 2**30, build_s=round(build_s, 1),
                        rel_err_vs_fp32=err, executor=executor,
                        fused=_fused_summary(report) if report is not None else "-")
        except Exception as e:  # noqa: BLE001 - a failure (OOM, compile error) is a result
            oom = "out of memory" in str(e).lower()
            results.add(**row, status="OOM" if oom else f"failed: {type(e).__name__}")
            if not oom:
                results.notes.append(f"{name} {case} {variant}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                traceback.print_exc()
        finally:
            fn = step = report_of = None  # noqa: F841 - release the variant (and its graphs) before the next one
            gc.collect()
            if not smoke:
                torch.cuda.empty_cache()
            results.save(out_dir, STEM)
    return True


def _previous(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, f"{STEM}_{card_name().replace(' ', '_')}_{datetime.date.today().isoformat()}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


NOTES = [
    "ms_per_block = median of the whole 4-block call / 4 after 3 untimed calls; train = forward+backward "
    "(train mode, dropout on), infer = forward under no_grad in eval mode.",
    "optimize <executor>: foldcompile.optimize(model, executor=...); executor = the one actually running "
    "(with the reason where it is not the one asked for).",
    "build_s = first call including capture/compile/optimize; rel_err_vs_fp32 = first output vs the same model "
    "in fp32.",
    "peak_gib = peak allocated memory during one call, parameters and inputs included; a CUDA graph's pool "
    "is reserved, not allocated, between replays, so held_gib = memory still reserved after the timed calls "
    "(empty_cache'd: live tensors, parameters and the graphs' pools) is the footprint to compare for those rows.",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--models", nargs="+", default=["evoformer_stack", "pairformer_stack"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--resume", action="store_true", help="skip the rows today's results file already holds")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no row whose estimated time would end past this many seconds")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU: tiny models, one block, wall-clock times (not a benchmark)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench.optimize times GPU runs; no CUDA device is visible (--smoke checks the script on CPU)")
    deadline = time.monotonic() + args.budget_s
    results = Results(title=f"optimize (each executor) and the foldcompile backend vs eager and torch.compile: "
                            f"reference trunks, {N_BLOCKS} blocks, bf16", columns=COLUMNS)
    done: set[tuple[str, str, str]] = set()
    previous = _previous(args.out) if args.resume else None
    if previous:
        results.rows = list(previous["rows"])
        results.notes = [n for n in previous["notes"] if n not in NOTES]
        done = {(r["model"], r["case"], r["variant"]) for r in results.rows
                if r.get("status") == "ok" or r.get("status") == "OOM"}
        results.rows = [r for r in results.rows if (r["model"], r["case"], r["variant"]) in done]
    results.notes = NOTES + results.notes
    finished = True
    for case in args.cases:
        for name in args.models:
            finished = run_case(results, name, case, args.variants, args.out, deadline, done, args.smoke) and finished
            if not finished:
                break
        if not finished:
            break
    print(results.markdown())
    left = [(n, c, v) for c in args.cases for n in args.models for v in args.variants
            if not any(r["model"] == n and r["case"] == c and r["variant"] == v for r in results.rows)]
    print("all rows done" if not left else
          f"stopped by the time budget: {len(left)} rows left; run the same command (with --resume) again")


if __name__ == "__main__":
    main()
