"""GPU sweep: tile rows, warps and programs per SM of the layer-norm and softmax kernels, per shape.

The kernels pick their blocking from one rule (``_row_blocking``: about 4096 elements a program;
backward: about 4 programs per SM). This sweep times each pass (forward alone; backward alone,
from one saved forward) under other blockings, by replacing the module's planning functions for
the duration of one timing, and reports per shape the measured bandwidth of every blocking, the
rule's own, and the best. Bytes as in :mod:`bench.kernels.norm_softmax` (one read of each input,
one write of each output); ``%copy`` is over the device-to-device copy bandwidth measured in
the same run.

Run on the GPU from the repository root::

    python -m bench.kernels.norm_tune [--budget-s 420] [--only layer_norm|softmax]

writes ``bench/results/kernels_norm_tune_<card>_<date>.{md,json}`` (rows saved as they finish).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from typing import Callable, Iterator

import torch
import triton

from bench.common import Results, copy_bandwidth_gbs, time_ms
import importlib

# the modules themselves: ``import foldcompile.kernels.layer_norm as m`` binds the package's function of
# that name, which shadows the submodule
ln_mod = importlib.import_module("foldcompile.kernels.layer_norm")
sm_mod = importlib.import_module("foldcompile.kernels.softmax")

DEVICE = "cuda"
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@contextlib.contextmanager
def _blocking(module, block_m: int | None, num_warps: int | None, per_sm: int | None) -> Iterator[None]:
    """``module``'s planning functions replaced for one timing: rows a program, warps, programs per SM."""
    saved = {name: getattr(module, name) for name in ("_row_blocking", "_bwd_split", "_num_programs_target")
             if hasattr(module, name)}
    rule = saved["_row_blocking"]

    def row_blocking(n: int, *args, **kwargs):
        bm, bn, w = rule(n, *args, **kwargs)
        return (block_m or bm), bn, (num_warps or w)

    def bwd_split(m: int, bm: int, device):
        target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
        blocks = triton.cdiv(m, bm)
        iters = triton.next_power_of_2(triton.cdiv(blocks, target))
        return triton.cdiv(blocks, iters), iters

    try:
        module._row_blocking = row_blocking
        if per_sm is not None:
            if "_bwd_split" in saved:
                module._bwd_split = bwd_split
            if "_num_programs_target" in saved:
                module._num_programs_target = lambda device: per_sm * torch.cuda.get_device_properties(
                    device).multi_processor_count
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def _ln_case(shape, dtype):
    c = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=True)
    el = x.element_size()
    run = lambda: ln_mod.layer_norm(x, w, b)  # noqa: E731
    return run, (x, w, b), 2 * x.numel() * el + 2 * c * el, 3 * x.numel() * el + 2 * c * el


def _sm_case(shape, bias_shape, mask_shape, dtype):
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(bias_shape, device=DEVICE, dtype=dtype, requires_grad=True)
    mask = torch.rand(mask_shape, device=DEVICE) > 0.1
    el = x.element_size()
    run = lambda: sm_mod.softmax(x, scale=1 / math.sqrt(32), bias=bias, mask=mask)  # noqa: E731
    return (run, (x, bias), 2 * x.numel() * el + bias.numel() * el + mask.numel(),
            3 * x.numel() * el + bias.numel() * el + mask.numel())


CASES = {
    "layer_norm": [
        ("pair [256,256,128] (train)", lambda dt: _ln_case((256, 256, 128), dt)),
        ("msa [128,256,256] (train)", lambda dt: _ln_case((128, 256, 256), dt)),
        ("pair [1024,1024,128] (infer)", lambda dt: _ln_case((1024, 1024, 128), dt)),
        ("pair [2048,2048,128] (infer)", lambda dt: _ln_case((2048, 2048, 128), dt)),
    ],
    "softmax": [
        ("tri att [256,4,256,256] (train)", lambda dt: _sm_case((256, 4, 256, 256), (4, 256, 256), (256, 1, 1, 256), dt)),
        ("msa row [128,8,256,256] (train)", lambda dt: _sm_case((128, 8, 256, 256), (8, 256, 256), (128, 1, 1, 256), dt)),
        ("tri att chunk [64,4,1024,1024] (infer)",
         lambda dt: _sm_case((64, 4, 1024, 1024), (4, 1024, 1024), (64, 1, 1, 1024), dt)),
    ],
}


def _grid(n: int, backward: bool, wide: bool = False) -> list[tuple[int | None, int | None, int | None]]:
    """(rows a program, warps, programs per SM) to try for rows of ``n``; (None, None, None) = the rule.
    ``wide``: the second round, larger tiles and fewer/more warps around the first round's best."""
    bn = triton.next_power_of_2(n)
    if wide:
        sizes = (8192, 16384) if backward else (4096, 8192, 16384, 32768)
        warp_choices = (4, 8, 16) if backward else (1, 2, 4, 8, 16, 32)
        per_sm = (1, 2, 4)
    else:
        sizes = (2048, 4096, 8192) if backward else (2048, 4096, 8192, 16384)
        warp_choices = (4, 8) if backward else (4, 8, 16)
        per_sm = (4, 8, 16)
    rows = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r * bn in sizes]
    out: list[tuple[int | None, int | None, int | None]] = [(None, None, None)]
    for r in rows:
        for w in warp_choices:
            if w * 32 > r * bn or r * bn // (w * 32) > 128:  # more threads than elements; spills
                continue
            if backward:
                out += [(r, w, p) for p in per_sm]
            else:
                out.append((r, w, None))
    return out


def run(budget_s: float, only: list[str], out: str, wide: bool = False, large: bool = False) -> Results:
    t_start = time.time()
    bw = copy_bandwidth_gbs()
    res = Results(title="Layer norm and softmax blocking sweep (per pass, per shape)",
                  columns=["kernel", "shape", "dtype", "pass", "block_m", "num_warps", "per_sm", "ms", "GB/s",
                           "%copy", "rule ms", "rule %copy", "x rule"])
    res.notes.append(f"device-to-device copy bandwidth measured: {bw:.0f} GB/s")
    res.notes.append("one row per (shape, dtype, pass): the best blocking found; 'rule' = the kernel's own "
                     "blocking; backward timed alone from one saved forward (autograd.grad, retain_graph)")
    for kernel in only:
        module = ln_mod if kernel == "layer_norm" else sm_mod
        for label, build in CASES[kernel]:
            if large and "(train)" in label:
                continue
            for dname, dtype in _DTYPES.items():
                if time.time() - t_start > budget_s:
                    res.notes.append(f"stopped on the budget before {kernel} {label} {dname}")
                    return res
                torch.cuda.empty_cache()
                fn, leaves, fwd_bytes, bwd_bytes = build(dtype)
                n = leaves[0].shape[-1]
                for pass_name, nbytes in (("fwd", fwd_bytes), ("bwd", bwd_bytes)):
                    timings = {}
                    if pass_name == "bwd":
                        y = fn()
                        dy = torch.randn_like(y)
                    for cfg in _grid(n, pass_name == "bwd", wide):
                        with _blocking(module, *cfg):
                            if pass_name == "fwd":
                                call: Callable[[], object] = lambda: fn()  # noqa: E731
                            else:
                                call = lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)  # noqa: E731
                            try:
                                timings[cfg] = time_ms(call, warmup=2, reps=10)
                            except Exception as e:  # a blocking the compiler refuses (registers, smem)
                                res.notes.append(f"{kernel} {label} {dname} {pass_name} {cfg}: "
                                                 f"{type(e).__name__}: {str(e)[:80]}")
                    rule_ms = timings[(None, None, None)]
                    best = min(timings, key=timings.get)
                    ms = timings[best]
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    bm, bn, w = module._row_blocking(n, *(() if module is sm_mod else (leaves[0].element_size(), pass_name == "bwd")))
                    res.add(**{"kernel": kernel, "shape": label, "dtype": dname, "pass": pass_name,
                             "block_m": best[0] or f"rule ({bm})", "num_warps": best[1] or f"rule ({w})",
                             "per_sm": best[2] or ("rule (4)" if pass_name == "bwd" else "-"),
                             "ms": round(ms, 4), "GB/s": round(gbs), "%copy": round(100 * gbs / bw, 1),
                             "rule ms": round(rule_ms, 4),
                             "rule %copy": round(100 * nbytes / (rule_ms * 1e-3) / 1e9 / bw, 1),
                             "x rule": round(rule_ms / ms, 3),
                             "all": {str(k): round(v, 4) for k, v in sorted(timings.items(), key=lambda kv: kv[1])}})
                    res.save(out, "norm_tune_wide" if wide else "norm_tune")  # each row kept as it finishes
                    if pass_name == "bwd":
                        del y, dy
                del fn, leaves
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--only", nargs="*", default=["layer_norm", "softmax"])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--wide", action="store_true", help="the second round: larger tiles, more warp counts")
    parser.add_argument("--large", action="store_true", help="the inference shapes only (>= 256 MiB)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels.norm_tune needs a CUDA GPU")
    res = run(args.budget_s, args.only, args.out, args.wide, args.large)
    print(res.markdown())
    print("saved", res.save(args.out, "norm_tune_wide" if args.wide else "norm_tune"))


if __name__ == "__main__":
    main()
