"""The card's two ceilings, measured: device-to-device copy bandwidth and dense matrix-product rates.

    python -m bench.ceilings [--out DIR] [--size 8192]

Writes ``bench/results/ceilings_<card>_<date>.{md,json}``, the file ``foldcompile explain
--html ... --card NAME`` reads for its roofline (``foldcompile/ceilings.py``). Rows:

- ``copy``: ``dst.copy_(src)`` of 1 GiB, bytes read plus bytes written over the median time (GB/s);
- ``matmul`` per dtype (bfloat16, float16, float32 with TF32 off, tf32): an ``N x N x N`` product
  (default N = 8192) on random normal data — zeros would run faster than real work — 2·N³ FLOPs
  over the median time (TFLOP/s).

GPU only; about 15 s on an H100/H200.
"""
from __future__ import annotations

import argparse
import os

import torch

from bench.common import Results, card_name, copy_bandwidth_gbs, time_ms

_MATMUL_DTYPES = (("bfloat16", torch.bfloat16, False), ("float16", torch.float16, False),
                  ("float32", torch.float32, False), ("tf32", torch.float32, True))


def matmul_tflops(n: int, dtype: torch.dtype, tf32: bool) -> float:
    """Median rate of one ``n x n x n`` product on random data, TFLOP/s."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)
        b = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)
        out = torch.empty(n, n, device="cuda", dtype=dtype)
        ms = time_ms(lambda: torch.matmul(a, b, out=out), warmup=3, reps=20)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def run(size: int = 8192) -> Results:
    results = Results(f"measured ceilings of {card_name()}: copy bandwidth and dense matmul rates",
                      ["ceiling", "dtype", "value", "unit", "how"])
    results.add(ceiling="copy", dtype="", value=copy_bandwidth_gbs(1 << 30), unit="GB/s",
                how="1 GiB device-to-device copy_, (read + written bytes) / median of 20 runs")
    for name, dtype, tf32 in _MATMUL_DTYPES:
        results.add(ceiling="matmul", dtype=name, value=matmul_tflops(size, dtype, tf32), unit="TFLOP/s",
                    how=f"{size}x{size}x{size} torch.matmul on random normal data, 2*N^3 / median of 20 runs")
    results.notes.append("read by foldcompile/ceilings.py for the HTML report's roofline (--card)")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--size", type=int, default=8192, help="matrix size N of the N x N x N products")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.ceilings needs a CUDA GPU")
    results = run(args.size)
    print(results.markdown())
    print("saved", results.save(args.out, "ceilings"), flush=True)


if __name__ == "__main__":
    main()
