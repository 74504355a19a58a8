"""Where the AlphaFold 2 Evoformer block's forward time goes, per op class and per module, on a GPU.

Profiles zoo ``evoformer_block`` (AF2 dims: c_m=256, c_z=128) in bf16, eval mode, forward
under ``torch.no_grad()``, at the training crop (N_seq=128, N_res=256) and at N_res=1024
(N_seq=128), with :func:`foldcompile.profile`: CUDA events between the graph's nodes, with the
stream padded ahead so the events time back-to-back GPU work (see ``foldcompile/profile.py``).
Achieved TFLOP/s and GB/s come from the symbolic cost model of a capture of the same block at
N_seq=11, N_res=13 (sizes distinct from every channel size; N_seq=128 itself equals c_z),
evaluated at each profiled size.

Writes, per shape, the class and module table (markdown + JSON, via ``bench.common.Results``)
and the full per-node profile (``*_nodes.json``) into ``--out``::

    python -m bench.profile_evoformer --out bench/results
    python -m bench.profile_evoformer --shapes 128x256 --reps 3     # a subset

"profiled ms" is the sum of node times; "graph ms" the same graph module called as is and
"eager ms" the model itself, both timed with CUDA events: their ratio to the profiled time is
the instrumentation's overhead.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable for bench.common
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Results, card_name  # noqa: E402
from foldcompile.explain import explain  # noqa: E402
from foldcompile.models import zoo  # noqa: E402
from foldcompile.profile import profile  # noqa: E402

DEFAULT_SHAPES = ("128x256", "128x1024")
COLUMNS = ["level", "name", "nodes", "ms", "share_%", "GFLOP", "MB", "TFLOP/s", "GB/s"]


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        n_seq, n_res = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes takes N_SEQxN_RES items such as 128x256, got {text!r}") from None
    return n_seq, n_res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for the tables")
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="N_SEQxN_RES, e.g. 128x256")
    p.add_argument("--reps", type=int, default=5, help="timed runs per shape (node times are medians)")
    p.add_argument("--depth", type=int, default=1, help="module path depth of the module rows")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_evoformer needs a CUDA GPU (foldcompile.profile on a CPU gives CPU timings only)",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    shapes = [_parse_shape(s) for s in args.shapes]
    t_start = time.perf_counter()
    with torch.no_grad():
        small, small_inputs = zoo.get("evoformer_block", size="af2", n_seq=11, n_res=13, device="cuda", dtype=dtype)
        cost = explain(small, *small_inputs)
        del small, small_inputs
        print(f"cost model: capture at {cost.dims} in {time.perf_counter() - t_start:.1f} s", flush=True)
        written = []
        for n_seq, n_res in shapes:
            t0 = time.perf_counter()
            module, inputs = zoo.get("evoformer_block", size="af2", n_seq=n_seq, n_res=n_res, device="cuda",
                                     dtype=dtype)
            prof = profile(module, *inputs, cost_report=cost, reps=args.reps)
            print(prof.table(depth=args.depth), flush=True)
            res = Results(f"Evoformer block (AF2 dims) forward profile, {args.dtype}, N_seq={n_seq}, N_res={n_res}",
                          COLUMNS)
            for row in prof.rows(depth=args.depth):
                res.add(**row)
            res.notes += [
                f"timing: {prof.timing} per graph node (median of {prof.reps} runs), eval mode, torch.no_grad()",
                f"profiled (sum of node times) {prof.profiled_ms:.3f} ms; graph as is {prof.uninstrumented_ms:.3f} ms;"
                f" eager {prof.eager_ms:.3f} ms; instrumented wall {prof.instrumented_wall_ms:.3f} ms; "
                f"overhead x{prof.overhead:.3f}",
                "GFLOP/MB from foldcompile's symbolic cost model (unfused: every op reads its inputs and writes "
                "its output); TFLOP/s and GB/s are those divided by the measured time",
                *prof.notes,
            ]
            stem = f"profile_evoformer_{args.dtype}_s{n_seq}_r{n_res}"
            md = res.save(args.out, stem)
            nodes_path = md[:-3] + "_nodes.json"
            prof.to_json(nodes_path, depth=args.depth)
            written += [md, nodes_path]
            print(f"{n_seq}x{n_res}: {time.perf_counter() - t0:.1f} s; wrote {md}", flush=True)
            del module, inputs, prof
            gc.collect()
            torch.cuda.empty_cache()
    print(f"done on {card_name()} in {time.perf_counter() - t_start:.1f} s: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
