"""Host time per call of the generated element-wise kernels' Python wrapper, forward and backward.

What the wrapper does on the host before and after its launch (deriving the call's layout,
strides, kernel and grid; allocating outputs; in backward the gradient plan and the broadcast
reductions) is what a model with many small fused groups pays per group, and in backward
again. This script times exactly that, with the Triton launch itself replaced by a no-op
(``--stub``, the default without a GPU: the interpreter's own host time says nothing about a
compiled launch). On a GPU, ``--real`` keeps the real launches and reports the host wall time
per call (no synchronisation inside the loop) next to the stubbed one.

Fragments timed (the Evoformer's common groups, at its training-crop shapes in bf16 on CUDA,
fp32 on CPU): a gated output ``sigmoid(g) * o`` on [128, 256, 256], a bias add with a residual
``r + (x + b)`` (b [256] broadcast: its gradient is a row reduction), and a four-op chain.

    python bench/elementwise_host.py                      # CPU (stubbed launches), prints a table
    python bench/elementwise_host.py --real --stub         # GPU: both
    python bench/elementwise_host.py --json out.json

It only uses ``foldcompile.kernels.fuse_elementwise`` and the generator's ``_compile`` hook, so
the same script measures an older checkout (run it from that checkout's root) for a before/after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors take the Triton path (launches stubbed)

import importlib  # noqa: E402

from foldcompile.kernels import fuse_elementwise  # noqa: E402

ew = importlib.import_module("foldcompile.kernels.elementwise")  # the module (its _compile hook)


class _NoLaunch:
    """Stands in for a compiled kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _fragments(device: str, dtype: torch.dtype, small: bool):
    s, r, c = (8, 16, 32) if small else (128, 256, 256)
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    return [
        ("sigmoid(g) * o", lambda gate, o: torch.sigmoid(gate) * o, (t(s, r, c), t(s, r, c))),
        ("r + (x + b)  (b broadcast)", lambda r_, x, b: r_ + (x + b), (t(s, r, c), t(s, r, c), t(c))),
        ("relu(x * w + b) * m", lambda x, w, b, m: torch.relu(x * w + b) * m,
         (t(s, r, c), t(c), t(c), t(s, r, c))),
    ]


def _time_us(fn, reps: int) -> float:
    """Median host microseconds of ``fn()`` over ``reps`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def measure(device: str, dtype: torch.dtype, stub: bool, reps: int, small: bool) -> list[dict]:
    """One row per fragment: forward and backward host µs per call."""
    saved = ew._compile
    if stub:
        ew._compile = lambda source, name: _NoLaunch()
    try:
        rows = []
        for name, fn, inputs in _fragments(device, dtype, small):
            fused = fuse_elementwise(fn)
            out = fused(*inputs)
            grad = torch.ones_like(out)

            def forward():
                with torch.no_grad():
                    fused(*inputs)

            def forward_backward():
                y = fused(*inputs)
                torch.autograd.grad(y, inputs, grad)

            fwd = _time_us(forward, reps)
            both = _time_us(forward_backward, reps)
            if device == "cuda":
                torch.cuda.synchronize()
            rows.append({"fragment": name, "launch": "stubbed" if stub else "real", "device": device,
                         "dtype": str(dtype).replace("torch.", ""), "forward_us": round(fwd, 1),
                         "backward_us": round(both - fwd, 1), "fwd_plus_bwd_us": round(both, 1)})
        return rows
    finally:
        ew._compile = saved


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stub", action="store_true", help="replace the Triton launch by a no-op (default without CUDA)")
    p.add_argument("--real", action="store_true", help="real launches (CUDA only)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--small", action="store_true", help="tiny shapes (allocation cost out of the way)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    modes = []
    if args.real:
        if not cuda:
            raise SystemExit("--real needs a GPU")
        modes.append(False)
    if args.stub or not modes:
        modes.append(True)
    rows = [row for stub in modes for row in measure(device, dtype, stub, args.reps, args.small or not cuda)]
    head = ["fragment", "launch", "device", "dtype", "forward_us", "backward_us", "fwd_plus_bwd_us"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in head) + " |")
    print(f"\ntorch {torch.__version__}, python {sys.version.split()[0]}, {args.reps} calls per row (median)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
