"""End-to-end: ``foldcompile.optimize`` against eager and torch.compile on the reference trunks.

One process, one card. For each model (zoo Evoformer and Pairformer stacks, 4 blocks, the
papers' dimensions, parameters and activations in bf16) and case:

  train      forward+backward at the training crop (N_seq=128, N_res=256), train mode (dropout on)
  infer1024  forward at N_seq=128, N_res=1024, eval mode, under no_grad

rows for eager, ``torch.compile`` (default mode) and ``optimize`` (the eager executor: the
rewritten graph run by PyTorch, our kernels inside it; the CUDA-graph and Inductor executors
are not built yet). Each row: ms per block (median of the whole call / 4), peak memory, the
build time of the first call (compile / optimize, warm Triton cache unless the machine is
fresh), the fused matches, and the error of the first output against eager fp32 on the same
inputs (so a faster row that computes something else shows).

Rows are written to ``--out`` as each finishes (the table is re-saved after every row), so a
run cut off by the device's time limit keeps what it measured; ``--cases``/``--models`` pick a
group that fits one call.

    python -m bench.optimize --cases train infer1024 --models evoformer_stack pairformer_stack
"""
from __future__ import annotations

import argparse
import gc
import os
import time
import traceback

import torch

from bench.common import Results, peak_memory_bytes, time_ms
from foldcompile.models import zoo

N_BLOCKS = 4
CASES = {
    "train": dict(n_seq=128, n_res=256, train=True),
    "infer1024": dict(n_seq=128, n_res=1024, train=False),
}
VARIANTS = ("eager", "torch.compile", "optimize")
COLUMNS = ["model", "case", "variant", "status", "ms_per_block", "x_eager", "x_compile", "peak_gib", "build_s",
           "rel_err_vs_fp32", "fused"]


def _outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


def _loss(out) -> torch.Tensor:
    return sum(t.float().square().mean() for t in _outputs(out))


def _fused_summary(fast) -> str:
    counts = fast.report.counts()
    return ", ".join(f"{rule} {c['matched']}" for rule, c in counts.items() if c.get("matched"))


def run_case(results: Results, name: str, case: str, variants, out_dir: str, stem: str) -> None:
    spec = CASES[case]
    torch.manual_seed(0)
    module, inputs = zoo.get(name, size="af2", n_seq=spec["n_seq"], n_res=spec["n_res"], device="cuda",
                             dtype=torch.bfloat16, n_blocks=N_BLOCKS)
    module.train(spec["train"])
    # the fp32 truth for the error column: the same parameters and inputs, eval mode only
    # (train-mode dropout masks differ between implementations, so no error is shown there)
    ref = None
    if not spec["train"]:
        ref_module = zoo.get(name, size="af2", n_seq=spec["n_seq"], n_res=spec["n_res"], device="cuda",
                             dtype=torch.float32, n_blocks=N_BLOCKS)[0]
        ref_module.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
        ref_module.eval()
        with torch.no_grad():
            ref = _outputs(ref_module(*[x.float() if x.is_floating_point() else x for x in inputs]))[0].float()
        del ref_module
        gc.collect()
        torch.cuda.empty_cache()
    params = [p for p in module.parameters() if p.requires_grad]
    times: dict[str, float] = {}
    for variant in variants:
        row = dict(model=name, case=case, variant=variant)
        fast = None
        try:
            t0 = time.perf_counter()
            if variant == "eager":
                fn = module
            elif variant == "torch.compile":
                fn = torch.compile(module)
            else:
                import foldcompile
                if spec["train"]:
                    fast = foldcompile.optimize(module, *inputs)
                else:
                    with torch.no_grad():
                        fast = foldcompile.optimize(module, *inputs)
                fn = fast

            if spec["train"]:
                def step():
                    return torch.autograd.grad(_loss(fn(*inputs)), params)
            else:
                def step():
                    with torch.no_grad():
                        return fn(*inputs)
            first = step()
            torch.cuda.synchronize()
            build_s = time.perf_counter() - t0
            err = "-"
            if ref is not None:
                got = _outputs(first)[0].float()
                err = float((got - ref).norm() / ref.norm())
            del first
            ms = time_ms(step, warmup=1, reps=5 if spec["n_res"] >= 1024 else 10)
            peak = peak_memory_bytes(step)
            times[variant] = ms
            results.add(**row, status="ok", ms_per_block=ms / N_BLOCKS,
                        x_eager=times["eager"] / ms if "eager" in times else "-",
                        x_compile=times["torch.compile"] / ms if "torch.compile" in times else "-",
                        peak_gib=(peak + torch.cuda.memory_allocated()) / 2**30, build_s=round(build_s, 1),
                        rel_err_vs_fp32=err, fused=_fused_summary(fast) if fast is not None else "-")
        except Exception as e:  # noqa: BLE001 - a failure (OOM, compile error) is a result
            oom = "out of memory" in str(e).lower()
            results.add(**row, status="OOM" if oom else f"failed: {type(e).__name__}")
            if not oom:
                results.notes.append(f"{name} {case} {variant}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                traceback.print_exc()
        finally:
            fn = step = fast = None  # noqa: F841 - release the variant before the next one
            gc.collect()
            torch.cuda.empty_cache()
            results.save(out_dir, stem)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--models", nargs="+", default=["evoformer_stack", "pairformer_stack"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.optimize times GPU runs; no CUDA device is visible")
    results = Results(title=f"optimize vs eager and torch.compile: reference trunks, {N_BLOCKS} blocks, bf16",
                      columns=COLUMNS)
    results.notes += [
        "ms_per_block = median of the whole 4-block call / 4; train = forward+backward (train mode, dropout on), "
        "infer = forward under no_grad in eval mode.",
        "optimize runs its eager executor (the rewritten graph through PyTorch, our kernels inside); no CUDA graphs.",
        "build_s = first call including capture/compile; rel_err_vs_fp32 = first output vs the same model in fp32.",
        "peak_gib = peak allocated memory during one call, parameters and inputs included.",
    ]
    stem = "optimize_" + "-".join(args.cases)
    for case in args.cases:
        for name in args.models:
            run_case(results, name, case, args.variants, args.out, stem)
    print(results.markdown())


if __name__ == "__main__":
    main()
