"""Baseline benchmark: the reference trunks in eager PyTorch and torch.compile.

Times the AlphaFold 2 Evoformer stack and the AlphaFold 3 Pairformer stack (4 blocks
each, the papers' dimensions):

  train      forward+backward at the training crop (N_seq=128, N_res=256), train mode
             (dropout on), in eager fp32, eager bf16 and torch.compile bf16;
  infer1024  forward at N_seq=128, N_res=1024, eval mode, eager bf16 and torch.compile bf16;
  infer2048  the same at N_res=2048.

"bf16" means parameters and activations in bfloat16 (as FastFold's inference runs),
not autocast. Inference first runs unchunked; where that runs out of memory, the
OOM is recorded as a result and the model's own ``chunk_size`` is tried next.

Reports ms per block, achieved TFLOP/s (GEMM FLOPs as torch's FlopCounterMode counts
them on the meta device), peak memory and compile time. Every later speed-up
reruns this baseline in the same run on the same card.

    python -m bench.baseline --cases train infer1024 --models evoformer_stack
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Results, peak_memory_bytes, time_ms
from foldcompile.models import zoo

N_BLOCKS = 4
CASES = {
    "train": dict(n_seq=128, n_res=256, train=True, variants=("eager-fp32", "eager-bf16", "compile-bf16")),
    "infer1024": dict(n_seq=128, n_res=1024, train=False, variants=("eager-bf16", "compile-bf16")),
    "infer2048": dict(n_seq=128, n_res=2048, train=False, variants=("eager-bf16", "compile-bf16")),
}
CHUNK_FALLBACKS = (None, 512, 128, 32)


def gemm_flops(name: str, n_seq: int, n_res: int, train: bool) -> float:
    """GEMM FLOPs of one call (forward, plus backward when training), counted on the meta device."""
    module, inputs = zoo.get(name, size="af2", n_seq=n_seq, n_res=n_res, device="meta", n_blocks=N_BLOCKS)
    inputs = [x.requires_grad_(train) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    module.train(train)
    counter = FlopCounterMode(display=False)
    with counter:
        out = module(*inputs)
        if train:
            _loss(out).backward()
    return float(counter.get_total_flops())


def _loss(out) -> torch.Tensor:
    tensors = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
    return sum(t.float().square().mean() for t in tensors)


def run_case(results: Results, name: str, case: str, variant: str, flops: float,
             chunk_fallbacks: tuple = CHUNK_FALLBACKS) -> None:
    spec = CASES[case]
    dtype = torch.float32 if variant.endswith("fp32") else torch.bfloat16
    compiled = variant.startswith("compile")
    module, inputs = zoo.get(name, size="af2", n_seq=spec["n_seq"], n_res=spec["n_res"], device="cuda",
                             dtype=dtype, n_blocks=N_BLOCKS)
    module.train(spec["train"])
    fn_module = torch.compile(module) if compiled else module
    chunk_sizes = (None,) if spec["train"] else chunk_fallbacks
    for chunk in chunk_sizes:
        kwargs = {} if chunk is None else {"chunk_size": chunk}
        if spec["train"]:
            params = [p for p in module.parameters()]

            def step():
                out = fn_module(*inputs, **kwargs)
                grads = torch.autograd.grad(_loss(out), params)
                return grads
        else:
            def step():
                with torch.no_grad():
                    return fn_module(*inputs, **kwargs)
        row = dict(model=name, case=case, n_seq=spec["n_seq"], n_res=spec["n_res"], variant=variant,
                   chunk=chunk or "-")
        try:
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = time_ms(step, warmup=1, reps=3 if spec["n_res"] >= 2048 else 5 if spec["n_res"] >= 1024 else 10)
            peak = peak_memory_bytes(step)
            results.add(**row, ms_per_block=ms / N_BLOCKS, tflops=flops / (ms * 1e-3) / 1e12,
                        peak_gib=(peak + torch.cuda.memory_allocated()) / 2**30,
                        compile_s=round(first_s, 1) if compiled else "-", status="ok")
            break
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            # an allocation failing inside a Triton/Inductor kernel launch surfaces as a plain
            # RuntimeError/AcceleratorError "CUDA error: out of memory", not OutOfMemoryError
            if "out of memory" not in str(e).lower():
                raise
            results.add(**row, ms_per_block="-", tflops="-", peak_gib="-", compile_s="-", status="OOM")
        finally:
            gc.collect()
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--models", nargs="+", default=["evoformer_stack", "pairformer_stack"])
    parser.add_argument("--variants", nargs="+", default=None, help="subset, e.g. eager-bf16")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--stem", default="baseline")
    parser.add_argument("--chunks", nargs="+", default=None,
                        help="inference chunk sizes to try in order ('none' = unchunked); default none 512 128 32")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.baseline times GPU runs; no CUDA device is visible")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the eager baseline
    results = Results(
        title=f"Baseline: reference trunks, {N_BLOCKS} blocks, eager vs torch.compile",
        columns=["model", "case", "n_seq", "n_res", "variant", "chunk", "status", "ms_per_block", "tflops",
                 "peak_gib", "compile_s"])
    results.notes.append("ms_per_block = median time of the whole 4-block call / 4; train = forward+backward "
                         "(train mode, dropout on); infer = forward under no_grad, eval mode.")
    results.notes.append("tflops = GEMM FLOPs (torch FlopCounterMode, forward or forward+backward) / time.")
    results.notes.append("bf16 = parameters and activations in bfloat16; fp32 with TF32 off.")
    results.notes.append("peak_gib = peak allocated memory during one call, parameters and inputs included.")
    results.notes.append("chunk = the model's own inference chunk_size; an OOM row is followed by the chunked retry.")
    stem = args.stem + "_" + "-".join(args.cases)
    for case in args.cases:
        spec = CASES[case]
        for name in args.models:
            flops = gemm_flops(name, spec["n_seq"], spec["n_res"], spec["train"])
            for variant in spec["variants"]:
                if args.variants and variant not in args.variants:
                    continue
                chunks = CHUNK_FALLBACKS if args.chunks is None else \
                    tuple(None if c == "none" else int(c) for c in args.chunks)
                run_case(results, name, case, variant, flops, chunks)
                gc.collect()  # the case's model and inputs are gone once run_case returns
                torch.cuda.empty_cache()
                results.save(args.out, stem)  # after every row: a run cut short keeps what it measured
            torch._dynamo.reset()
    print(results.markdown())
    print("saved", results.save(args.out, stem))


if __name__ == "__main__":
    main()
