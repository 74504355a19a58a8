"""GPU tuning sweep for the attention kernels' block sizes, warps and stages.

``kernels/attention.py`` autotunes each of its five Triton kernels over a short config list
(``_configs``). This sweep asks whether a wider list would be faster on this card: for one
kernel at a time, the autotuner is restricted to ONE candidate (its cache cleared), the other
kernels keep their own lists, and the whole call is timed (``bench.common.time_ms``, median):
the forward kernel by a forward call, each backward kernel by a forward+backward call. Cases are
``bench.kernels.attention``'s inputs: triangle attention 4 heads x 32 with pair bias and key mask
at N_res = 1024 (forward) and 256 (forward and forward+backward), MSA row attention at the
training crop (pair bias, key mask, gate).

A candidate that fails to compile (shared memory, registers) is a row with its error, not a
crash. The row marked best per (kernel, case) is the fastest; the in-module list's own choice
(all configs, autotuned) is the ``autotuned`` row of the same (kernel, case), so a better
candidate shows as a ratio against it.

    python -m bench.kernels.attention_tune [--budget 200] [--cases triangle_1024,triangle_256]

Writes bench/results/kernels_attention_tune_<card>_<date>.md/.json (and a copy under $OUT).
"""
from __future__ import annotations

import argparse
import importlib
import os
import time

import torch
import triton

from bench.common import Results, card_name, row_error, time_ms
from bench.kernels.attention import _fwd_bwd_call, _make_case
from foldcompile.kernels.attention import attention

am = importlib.import_module("foldcompile.kernels.attention")

COLUMNS = ["kernel", "case", "pass", "BLOCK_Q", "BLOCK_K", "num_warps", "num_stages", "ms", "x_autotuned",
           "TFLOP_s", "best", "note"]
KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel",
           "dbias": "_attn_bwd_dbias_kernel"}
# (BLOCK_Q, BLOCK_K, num_warps, num_stages) around the module's lists: longer pipelines, wider
# key blocks, 4 vs 8 warps at 128 query rows, and 256-row forward tiles.
CANDIDATES = {
    "fwd": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4), (64, 128, 4, 3),
            (128, 32, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 4, 2),
            (256, 64, 8, 3), (256, 32, 8, 4), (64, 32, 4, 4), (64, 64, 2, 3), (32, 64, 2, 3)],
    "dkdv": [(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 2), (32, 128, 4, 3), (64, 64, 8, 3),
             (128, 64, 8, 2), (32, 32, 4, 3), (64, 128, 4, 2)],
    "dq": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3), (128, 64, 4, 3),
           (64, 128, 4, 3), (128, 128, 8, 2)],
    "dbias": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 4, 3), (128, 64, 4, 3),
              (32, 64, 4, 3), (128, 128, 8, 3)],
}
# which kernels each case sweeps (backward at the training crop only: N = 1024 fwd+bwd compiles
# and runs too long for one device call)
PLAN = {"triangle_1024": ["fwd"], "triangle_256": ["fwd", "dkdv", "dq", "dbias"], "msa_row_128x256": ["fwd"]}


def _restrict(kernel, configs):
    """Point an Autotuner at these configs and forget its per-key choices."""
    kernel.configs = configs
    kernel.cache.clear()


def _flops(dims, backward: bool) -> float:
    B, H, Q, K, D = dims
    return 4.0 * B * H * Q * K * D * (3.5 if backward else 1.0)


def _time(inputs: dict, backward: bool) -> float:
    if backward:
        return time_ms(_fwd_bwd_call(attention, inputs), warmup=3, reps=10)
    with torch.no_grad():
        return time_ms(lambda: attention(**inputs), warmup=3, reps=20)


def sweep(res: Results, cases: list[str], budget: float, start: float) -> None:
    for case in cases:
        inputs, dims = _make_case(case, torch.bfloat16, "cuda")
        for kind in PLAN[case]:
            kernel = getattr(am, KERNELS[kind])
            module_list = list(kernel.configs)
            backward = kind != "fwd"
            pass_name = "fwd+bwd" if backward else "fwd"
            _restrict(kernel, module_list)
            auto_ms = _time(inputs, backward)
            chosen = next(iter(kernel.cache.values()), None)
            res.add(kernel=kind, case=case, **{"pass": pass_name}, ms=round(auto_ms, 4), x_autotuned=1.0,
                    TFLOP_s=round(_flops(dims, backward) / auto_ms / 1e9, 1),
                    note=f"autotuned over the module's {len(module_list)} configs; chose {chosen}")
            rows = []
            for bq, bk, w, s in CANDIDATES[kind]:
                if time.time() - start > budget:
                    res.notes.append(f"budget {budget:.0f} s reached: {case}/{kind} sweep stopped early")
                    break
                _restrict(kernel, [triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w, num_stages=s)])
                row = dict(kernel=kind, case=case, **{"pass": pass_name}, BLOCK_Q=bq, BLOCK_K=bk, num_warps=w,
                           num_stages=s, note="")
                try:
                    ms = _time(inputs, backward)
                    row.update(ms=round(ms, 4), x_autotuned=round(auto_ms / ms, 3),
                               TFLOP_s=round(_flops(dims, backward) / ms / 1e9, 1))
                except Exception as exc:  # noqa: BLE001 - a config that cannot compile is a row, not a crash
                    row["note"] = row_error(exc)
                rows.append(row)
            timed = [r for r in rows if "ms" in r]
            if timed:
                min(timed, key=lambda r: r["ms"])["best"] = "*"
            for r in rows:
                res.add(**r)
            _restrict(kernel, module_list)
        del inputs
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which no candidate is started")
    parser.add_argument("--cases", default=",".join(PLAN), help="comma-separated: " + ", ".join(PLAN))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels.attention_tune needs a CUDA GPU")
    start = time.time()
    res = Results("attention kernels: block-size / warps / stages sweep (bf16)", COLUMNS)
    res.notes.append(f"card: {card_name()}; torch {torch.__version__}; triton {triton.__version__}")
    sweep(res, args.cases.split(","), args.budget, start)
    res.notes.append("x_autotuned = the module's autotuned time / this candidate's (> 1: the candidate is faster). "
                     "TFLOP/s: fwd 4*B*H*Q*K*D, fwd+bwd 3.5x that.")
    res.notes.append(f"sweep wall time {time.time() - start:.0f} s")
    print(res.markdown())
    path = res.save(args.out, "kernels_attention_tune")
    if os.environ.get("OUT"):
        res.save(os.environ["OUT"], "kernels_attention_tune")
    print("saved", path)


if __name__ == "__main__":
    main()
