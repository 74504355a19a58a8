"""End-to-end: ``foldcompile.optimize`` (each executor) and the ``foldcompile`` Dynamo backend against eager,
torch.compile and cuEquivariance on the reference trunks.

One process, one card. Models (``bench/trunks.py``): the zoo Evoformer and Pairformer stacks (4 blocks,
AF2 / AF3 dims, parameters and activations in bf16) and the unmodified Boltz-2 ``PairformerModule``
(4 blocks, Boltz-2's dims, run as Boltz-2 runs inference: fp32 parameters under bf16 autocast).
Cases:

  train      forward+backward at the training crop (N_seq=128, N_res=256), train mode (dropout on)
  infer1024  forward at N_seq=128, N_res=1024, eval mode, under no_grad
  infer2048  forward at N_seq=128, N_res=2048 (eager and torch.compile materialise the triangle
             attentions' [N, H, N, N] logits, 64 GiB in bf16: a row that does not fit says OOM)

rows (``--variants``; each model has the ones that apply to it):

  eager                          the model as written (Boltz-2: under its bf16 autocast)
  eager chunked                  the zoo model with its own inference chunking (chunk_size=512)
  torch.compile                  default mode
  torch.compile reduce-overhead  Inductor with its CUDA graphs (cudagraph_mark_step_begin per step)
  optimize eager                 the rewritten graph run by PyTorch, our kernels inside it
  optimize cuda_graph            forward (and backward) replayed as CUDA graphs
  optimize inductor              our kernels as torch.library ops, the rest compiled by Inductor (reduce-overhead)
  backend foldcompile            torch.compile(model, backend="foldcompile") (auto executor: CUDA graphs)
  boltz cuequivariance           Boltz-2 with use_kernels=True: its cuEquivariance triangle kernels
  eager fp32 / optimize cuda_graph fp32   Boltz-2 without autocast (fp32): optimize fuses nothing under
                                 an ambient autocast (the kernels have no autocast rules yet), so these
                                 rows show what fusion does to the same module

Each row: ms per block (median of the whole call / blocks, after untimed warm-up calls: the executors'
watched call and capture, Inductor's recording, are not timed), peak memory, memory held between calls,
the build time of the first call (capture/compile/optimize; warm Triton cache unless the machine is
fresh), the executor actually running (``optimize`` and the backend fall back to eager with a reason,
which then shows here), the fused matches, the error of the first output against the same model in fp32
on the same inputs (inference), and with ``--profile`` the share of kernel time in our fused kernels and
the time by op class (``bench/op_profile.py``: torch.profiler over one call, after the row's timings).

Resumable and bounded: rows are written to ``--out`` as each finishes; ``--resume`` skips the rows
today's file (same card) already holds; ``--budget-s`` (default 330) stops starting rows once the next
row's estimated time would pass it, so one device call never loses a finished row. ``--group N`` runs
one of :data:`GROUPS` (each sized for one device call of ~6 minutes); ``--list-groups`` prints them.
A row whose package is missing says ``missing-peer: <what>`` and is run again by the next ``--resume``.

    python -m bench.optimize --group 3 --profile --resume
    python -m bench.optimize --smoke --group 4 --out /tmp/smoke   # the code paths on a CPU, tiny models
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
from bench.trunks import BOLTZ, MODELS, ZOO, MissingPeer, Subject, cuequivariance_kernels, has_row, subject

CASES = {
    "train": dict(n_seq=128, n_res=256, train=True),
    "infer1024": dict(n_seq=128, n_res=1024, train=False),
    "infer2048": dict(n_seq=128, n_res=2048, train=False),
}
VARIANTS = ("eager", "eager chunked", "torch.compile", "torch.compile reduce-overhead", "optimize eager",
            "optimize cuda_graph", "optimize inductor", "backend foldcompile", "boltz cuequivariance",
            "eager fp32", "optimize cuda_graph fp32")
CHUNK = 512          # the zoo models' inference chunk_size of the "eager chunked" rows
REF_CHUNK_2048 = 256  # the fp32 reference at N_res >= 2048 runs the model's own chunking (fits; same function)
CORE = ("eager", "torch.compile", "torch.compile reduce-overhead", "optimize cuda_graph")
# One device call each (~6 minutes of work, --budget-s 330); estimated from the H200 runs of 2026-12-02
# (compiles of a 4-block stack 25-80 s, optimize 43-62 s). A group that stops on its budget is finished by
# running the same command again (--resume).
GROUPS = {
    "1": dict(cases=["train"], models=["evoformer_stack"], variants=list(CORE)),
    "2": dict(cases=["train"], models=["pairformer_stack"], variants=list(CORE)),
    "3": dict(cases=["infer1024"], models=["evoformer_stack", "pairformer_stack"], variants=list(CORE)),
    "4": dict(cases=["infer1024"], models=[BOLTZ],
              variants=["eager", "boltz cuequivariance", "optimize cuda_graph", "torch.compile", "eager fp32",
                        "optimize cuda_graph fp32"]),
    "5": dict(cases=["infer2048"], models=["evoformer_stack"],
              variants=["eager", "eager chunked", "optimize cuda_graph", "torch.compile"]),
    "6": dict(cases=["infer2048"], models=["pairformer_stack"],
              variants=["eager", "eager chunked", "optimize cuda_graph", "torch.compile"]),
}
# seconds a row takes on an H200 with cold caches (build + warm-up + timing), to decide whether it still
# fits the budget: per case, and per model where that differs (Boltz-2's chunk loops compile longer)
ESTIMATE_S = {
    "train": {"eager": 15, "torch.compile": 100, "torch.compile reduce-overhead": 110, "optimize eager": 60,
              "optimize cuda_graph": 80, "optimize inductor": 200, "backend foldcompile": 80},
    "infer1024": {"eager": 15, "eager chunked": 15, "torch.compile": 45, "torch.compile reduce-overhead": 50,
                  "optimize eager": 50, "optimize cuda_graph": 60, "optimize inductor": 150,
                  "backend foldcompile": 60, "boltz cuequivariance": 20, "eager fp32": 45,
                  "optimize cuda_graph fp32": 80},
    "infer2048": {"eager": 20, "eager chunked": 45, "torch.compile": 70, "torch.compile reduce-overhead": 80,
                  "optimize eager": 80, "optimize cuda_graph": 80, "optimize inductor": 200,
                  "backend foldcompile": 80, "boltz cuequivariance": 40, "eager fp32": 120,
                  "optimize cuda_graph fp32": 120},
}
MODEL_ESTIMATE_S = {BOLTZ: {"torch.compile": 150, "torch.compile reduce-overhead": 170}}
# the executor each foldcompile row should run (auto picks CUDA graphs on CUDA for the backend)
EXPECTED_EXECUTOR = {"optimize eager": "eager", "optimize cuda_graph": "cuda_graph", "optimize inductor": "inductor",
                     "backend foldcompile": "cuda_graph", "optimize cuda_graph fp32": "cuda_graph"}
COLUMNS = ["model", "case", "variant", "status", "ms_per_block", "x_eager", "x_compile", "peak_gib", "held_gib",
           "build_s", "rel_err_vs_fp32", "executor", "fused", "fused_frac", "profile"]
STEM = "optimize"
DONE = ("ok", "OOM")  # statuses a --resume keeps (a failure or a missing peer is tried again)


def estimate_s(model: str, case: str, variant: str) -> float:
    return MODEL_ESTIMATE_S.get(model, {}).get(variant, ESTIMATE_S[case].get(variant, 100))


def _outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


def _loss(out) -> torch.Tensor:
    return sum(t.float().square().mean() for t in _outputs(out))


def _fused_summary(report) -> str:
    counts = report.counts()
    return ", ".join(f"{rule} {c['matched']}" for rule, c in counts.items() if c.get("matched")) or "none"


def _is_fp32(variant: str) -> bool:
    return variant.endswith(" fp32")


def _call_kwargs(variant: str) -> dict:
    if variant == "eager chunked":
        return {"chunk_size": CHUNK}
    if variant == "boltz cuequivariance":
        return {"use_kernels": True}
    return {}


def _build(variant: str, subj: Subject, inputs: tuple, train: bool):
    """``(the callable to time, a function giving its foldcompile report (or None) once it has run)``."""
    module = subj.module
    if variant in ("eager", "eager chunked", "eager fp32", "boltz cuequivariance"):
        return module, lambda: None
    if variant == "torch.compile":
        return torch.compile(module), lambda: None
    if variant == "torch.compile reduce-overhead":
        compiled = torch.compile(module, mode="reduce-overhead")

        def stepped(*a, **kw):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*a, **kw)
        return stepped, lambda: None
    if variant == "backend foldcompile":
        from foldcompile.dynamo_backend import Backend
        backend = Backend()
        return torch.compile(module, backend=backend), lambda: backend.graphs[0].report if backend.graphs else None
    import foldcompile
    executor = variant.split()[1]
    with torch.enable_grad() if train else torch.no_grad(), subj.precision(_is_fp32(variant)):
        fast = foldcompile.optimize(module, *inputs, executor=executor)
    return fast, lambda: fast.report


def _profiled(variant: str, profile: str | None) -> bool:
    return profile == "all" or (profile == "optimize" and variant.startswith(("optimize", "backend")))


def _reference(subj: Subject, spec: dict, results: Results, smoke: bool) -> torch.Tensor | None:
    """The fp32 truth of the error column (inference only: train-mode dropout masks differ between
    implementations), or None where it does not fit (said in the notes)."""
    if spec["train"]:
        return None
    chunk = REF_CHUNK_2048 if spec["n_res"] >= 2048 and subj.chunk_kwarg else None
    try:
        return subj.reference(chunk)
    except Exception as e:  # noqa: BLE001 - an OOM of the reference is a result: no error column
        results.notes.append(f"{subj.name} {spec['n_res']}: fp32 reference failed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}): no rel_err_vs_fp32")
        return None
    finally:
        gc.collect()
        if not smoke:
            torch.cuda.empty_cache()


def _timed(step, spec: dict, smoke: bool) -> tuple[float, int, int]:
    """``(ms per call, peak bytes above the start, bytes held after the calls)`` of ``step``."""
    if smoke:  # the script's logic on CPU: one call's wall time (after the first), no memory counters
        t1 = time.perf_counter()
        step()
        return (time.perf_counter() - t1) * 1e3, 0, 0
    big = spec["n_res"] >= 2048
    ms = time_ms(step, warmup=1 if big else 3, reps=3 if big else (5 if spec["n_res"] >= 1024 else 10))
    peak = peak_memory_bytes(step)
    torch.cuda.empty_cache()  # what stays reserved: live tensors and CUDA-graph pools
    return ms, peak, torch.cuda.memory_reserved()


def run_case(results: Results, name: str, case: str, variants, out_dir: str, deadline: float,
             done: set[tuple[str, str, str]], smoke: bool = False, profile: str | None = None,
             stem: str = STEM) -> bool:
    """The rows of one (model, case); False once the budget stopped it."""
    todo = [v for v in variants if (name, case, v) not in done and has_row(name, CASES[case]["train"], v)]
    if not todo:
        return True
    if time.monotonic() + min(estimate_s(name, case, v) for v in todo) > deadline:
        return False
    spec = dict(CASES[case])
    device = "cpu" if smoke else "cuda"
    try:
        subj = subject(name, spec, device, smoke)
    except MissingPeer as e:
        for variant in todo:
            results.add(model=name, case=case, variant=variant, status=f"missing-peer: {e}")
        results.save(out_dir, stem)
        return True
    ref = _reference(subj, spec, results, smoke)
    params = [p for p in subj.module.parameters() if p.requires_grad]
    blocks = subj.blocks
    times = {r["variant"]: r["ms_per_block"] * blocks for r in results.rows
             if r["model"] == name and r["case"] == case and r.get("status") == "ok"}
    for variant in todo:
        if time.monotonic() + estimate_s(name, case, variant) > deadline:
            return False
        row = dict(model=name, case=case, variant=variant)
        fn = step = report_of = None
        try:
            if variant == "boltz cuequivariance":
                cuequivariance_kernels(device)
            torch._dynamo.reset()
            inputs = subj.fp32_inputs() if _is_fp32(variant) else subj.inputs
            kwargs = _call_kwargs(variant)
            t0 = time.perf_counter()
            fn, report_of = _build(variant, subj, inputs, spec["train"])
            if spec["train"]:
                def step():
                    with subj.precision(_is_fp32(variant)):
                        return torch.autograd.grad(_loss(fn(*inputs, **kwargs)), params)
            else:
                def step():
                    with torch.no_grad(), subj.precision(_is_fp32(variant)):
                        return fn(*inputs, **kwargs)
            first = step()
            if not smoke:
                torch.cuda.synchronize()
            build_s = time.perf_counter() - t0
            err = "-"
            if ref is not None:
                got = _outputs(first)[0].float()
                err = float((got - ref).norm() / ref.norm())
            del first
            ms, peak, held = _timed(step, spec, smoke)
            times[variant] = ms
            report = report_of()
            executor = "-"
            if report is not None:
                expected = EXPECTED_EXECUTOR[variant] if device == "cuda" else "eager"
                executor = report.executor + ("" if report.executor == expected else f" ({report.executor_reason})")
                if report.record.get("not_fused_because"):
                    results.notes.append(f"{name} {case} {variant}: {report.record['not_fused_because']}")
            eager_ms = times.get("eager", times.get("eager chunked"))
            extra = {}
            if _profiled(variant, profile):
                extra = _profile(step)
            results.add(**row, status="ok", ms_per_block=ms / blocks,
                        x_eager=eager_ms / ms if eager_ms else "-",
                        x_compile=times["torch.compile"] / ms if "torch.compile" in times else "-",
                        peak_gib=(peak + (0 if smoke else torch.cuda.memory_allocated())) / 2**30,
                        held_gib=held / 2**30, build_s=round(build_s, 1),
                        rel_err_vs_fp32=err, executor=executor,
                        fused=_fused_summary(report) if report is not None else "-", **extra)
        except MissingPeer as e:
            results.add(**row, status=f"missing-peer: {e}")
        except Exception as e:  # noqa: BLE001 - a failure (OOM, compile error) is a result
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
            results.add(**row, status="OOM" if oom else f"failed: {type(e).__name__}")
            if not oom:
                results.notes.append(f"{name} {case} {variant}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                     if str(e) else f"{name} {case} {variant}: {type(e).__name__}")
                traceback.print_exc()
        finally:
            fn = step = report_of = None  # noqa: F841 - release the variant (and its graphs) before the next one
            gc.collect()
            if not smoke:
                torch.cuda.empty_cache()
            results.save(out_dir, stem)
    return True


def _profile(step) -> dict:
    """The row's ``fused_frac`` and ``profile`` columns (bench/op_profile.py), or why the profiler failed."""
    from bench.op_profile import profile_call

    try:
        frac, text = profile_call(step)
        return dict(fused_frac=round(frac, 3), profile=text)
    except Exception as e:  # noqa: BLE001 - a profiler failure is a result, not the row's failure
        return dict(fused_frac="-", profile=f"profiler failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


def _previous(out_dir: str, stem: str) -> dict | None:
    path = os.path.join(out_dir, f"{stem}_{card_name().replace(' ', '_')}_{datetime.date.today().isoformat()}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


NOTES = [
    "ms_per_block = median of the whole 4-block call / 4 after untimed calls (3, one at N_res=2048); train = "
    "forward+backward (train mode, dropout on), infer = forward under no_grad in eval mode.",
    "optimize <executor>: foldcompile.optimize(model, executor=...); executor = the one actually running "
    "(with the reason where it is not the one asked for).",
    "build_s = first call including capture/compile/optimize; rel_err_vs_fp32 = first output vs the same model "
    "in fp32 (at N_res=2048 the zoo reference runs the model's own chunk_size=256: the same function).",
    "peak_gib = peak allocated memory during one call, parameters and inputs included; a CUDA graph's pool "
    "is reserved, not allocated, between replays, so held_gib = memory still reserved after the timed calls "
    "(empty_cache'd: live tensors, parameters and the graphs' pools) is the footprint to compare for those rows.",
    "x_eager: against eager, or eager chunked where eager did not fit. boltz2_pairformer = the unmodified "
    "Boltz-2 PairformerModule (boltz 2.2.1; token_s 384, token_z 128, 16 heads, pair heads 4 x 32) run as "
    "Boltz-2 runs inference: fp32 parameters under bf16 autocast (its 'bf16-mixed'); its fp32 rows without "
    "autocast.",
    "fused_frac / profile (--profile): kernel time of one call by op class (torch.profiler, after the row's "
    "timings; bench/op_profile.py): our kernels by family, GEMMs (cuBLAS/CUTLASS), Inductor's kernels, copies, "
    "other; fused_frac = the share in our kernels.",
]


def _selection(args) -> tuple[list[str], list[str], list[str]]:
    if args.group:
        g = GROUPS[args.group]
        return list(g["cases"]), list(g["models"]), list(g["variants"])
    return list(args.cases), list(args.models), list(args.variants)


def main(argv=None) -> Results:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", choices=sorted(GROUPS), default=None,
                        help="one device call's rows (overrides --cases/--models/--variants); see --list-groups")
    parser.add_argument("--list-groups", action="store_true", help="print the groups and exit")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(CORE), choices=list(VARIANTS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--stem", default=STEM, help="results file name: <stem>_<card>_<date>.md/.json")
    parser.add_argument("--resume", action="store_true", help="skip the rows today's results file already holds")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="start no row whose estimated time would end past this many seconds")
    parser.add_argument("--profile", nargs="?", const="optimize", choices=["optimize", "all"], default=None,
                        help="profile by op class after the timings: the optimize/backend rows (or all rows)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU: tiny models, one block, wall-clock times (not a benchmark)")
    args = parser.parse_args(argv)
    if args.list_groups:
        for key, g in GROUPS.items():
            est = sum(estimate_s(m, c, v) for c in g["cases"] for m in g["models"] for v in g["variants"])
            print(f"group {key}: cases {' '.join(g['cases'])}; models {' '.join(g['models'])}; "
                  f"variants {', '.join(g['variants'])}  (~{est} s estimated)")
        return Results(title="groups", columns=[])
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench.optimize times GPU runs; no CUDA device is visible (--smoke checks the script on CPU)")
    cases, models, variants = _selection(args)
    deadline = time.monotonic() + args.budget_s
    results = Results(title="optimize (each executor) and the foldcompile backend vs eager, torch.compile and "
                            "cuEquivariance: reference trunks, 4 blocks, bf16", columns=COLUMNS)
    done: set[tuple[str, str, str]] = set()
    previous = _previous(args.out, args.stem) if args.resume else None
    if previous:
        results.rows = [r for r in previous["rows"] if r.get("status") in DONE]
        results.notes = [n for n in previous["notes"] if n not in NOTES]
        done = {(r["model"], r["case"], r["variant"]) for r in results.rows}
    results.notes = NOTES + results.notes
    finished = True
    for case in cases:
        for name in models:
            finished = run_case(results, name, case, variants, args.out, deadline, done, args.smoke,
                                args.profile, args.stem) and finished
            if not finished:
                break
        if not finished:
            break
    print(results.markdown())
    wanted = [(n, c, v) for c in cases for n in models for v in variants if has_row(n, CASES[c]["train"], v)]
    status = {(r["model"], r["case"], r["variant"]): r.get("status", "") for r in results.rows}
    left = [k for k in wanted if k not in status]
    peers = [k for k in wanted if status.get(k, "").startswith("missing-peer")]
    print("all rows done" if not left else
          f"stopped by the time budget: {len(left)} rows left; run the same command (with --resume) again")
    if peers:
        print(f"{len(peers)} rows lack a peer package (see their status); --resume runs them again")
    return results


if __name__ == "__main__":
    main()
