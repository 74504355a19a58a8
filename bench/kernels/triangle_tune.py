"""GPU tuning sweep for the fused triangle multiplicative update's four Triton kernels.

Times each kernel alone (``triton.testing.do_bench``, median) over a list of candidate configs
(BLOCK_M, BLOCK_H, num_warps, num_stages, and the structural flag CTAS: 0 = one tile a
program, k > 0 = persistent, ~k programs a multiprocessor looping over tiles with next-tile
prefetch; ROWS: the projection GEMM as x · W^T with x the register operand instead of W · x^T)
at N = 256 and N = 1024 (bf16, c_z = c_hidden = 128, batch 1, a pair mask), and
reports each config's time, its bandwidth and arithmetic rate against the kernel's minimal
bytes and FLOPs, and the best config per kernel and N. Then the end-to-end forward (N = 1024)
and forward+backward (N = 256) with the in-process tuner, and their host time per call.

One run is meant to fit in ~5 minutes on an H200 (compiles dominate); the sweep stops adding
configs after ``--budget`` seconds and says so. Run from the repository root::

    python -m bench.kernels.triangle_tune [--budget 240] [--quick]
    python -m bench.kernels.triangle_tune --ptxas      # any machine with Triton, no GPU: registers,
                                                        # spills, shared memory of every candidate
    TRITON_INTERPRET=0 python -m bench.kernels.triangle_tune --host-cpu [--host-n 32]
                                                        # no GPU: host microseconds of the wrapper
                                                        # (see host_cpu)

Writes bench/results/kernels_triangle_tune_<card>_<date>.md/.json (and a copy under $OUT when
that is set).
"""
from __future__ import annotations

import argparse
import importlib
import os
import time

import torch
import triton
import triton.testing

from bench.common import Results, card_name
from foldcompile.models.pairformer import TriangleMultiplication
from foldcompile.models.zoo import randomize_parameters

tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")

C = H = 128
COLUMNS = ["kernel", "N", "BLOCK_M", "BLOCK_H", "num_warps", "num_stages", "CTAS", "ROWS", "TILES", "ms", "GB_s",
           "pct_4.3TBs", "TFLOP_s", "best", "note"]

# Candidates (BLOCK_M, BLOCK_H, num_warps, num_stages, CTAS[, ROWS]). The in-module defaults
# (tm._GPU_CONFIGS) come first, then structural / shape variants around them.
SWEEP = {   # heavy register spillers (ptxas -v for sm_90) left out: they only spend the time budget
    # proj: the 2026-12-01 list (persistent forms, ROWS = 1, 3 stages), then the paired-GEMM variant
    # (ROWS = 2) at 64-256 rows, one tile a program and persistent.
    "proj": [(128, 64, 8, 2, 1), (128, 64, 8, 2, 1, 1), (64, 64, 4, 2, 2), (128, 128, 8, 2, 0),
             (128, 64, 8, 3, 1), (128, 64, 8, 2, 2), (64, 64, 4, 2, 4), (128, 64, 8, 2, 0, 1), (128, 64, 8, 3, 0),
             (256, 32, 8, 2, 0, 2), (256, 64, 8, 2, 0, 2), (128, 64, 8, 3, 0, 2), (64, 64, 4, 2, 0, 2),
             (128, 64, 8, 2, 1, 2), (128, 128, 8, 2, 0, 2), (128, 64, 8, 1, 0, 2), (128, 32, 8, 2, 0, 2),
             (256, 32, 8, 1, 0, 2), (256, 32, 8, 2, 0)],
    # out: the 2026-12-01 list (BLOCK_H = 128: the fused epilogue it measured), then the
    # column-blocked epilogue (BLOCK_H < C) at 64 and 128 rows, 4 and 8 warps, and persistent.
    "out": [(64, 128, 8, 1, 1), (64, 128, 4, 2, 0), (64, 128, 8, 1, 0), (32, 128, 8, 1, 1), (32, 128, 4, 1, 2),
            (128, 64, 8, 1, 0), (128, 64, 4, 2, 0), (64, 32, 4, 1, 0), (64, 64, 8, 2, 0), (128, 64, 8, 2, 1),
            (64, 64, 8, 2, 1), (256, 32, 8, 2, 0), (128, 32, 8, 1, 0), (64, 32, 8, 1, 0)],
    "out_bwd": [(32, 64, 4, 2, 0), (64, 64, 8, 1, 0), (32, 64, 8, 2, 0)],
    "proj_bwd": [(64, 32, 4, 2, 0), (32, 32, 4, 1, 0), (64, 64, 8, 1, 0), (32, 64, 8, 2, 0), (64, 32, 8, 3, 0)],
}


def candidates(kind: str, quick: bool) -> list[dict]:
    seen, out = set(), []
    for c in list(tm._GPU_CONFIGS[kind]) + ([] if quick else SWEEP[kind]):
        if c not in seen:
            seen.add(c)
            out.append(tm._cfg(c))
    return out


def cost(kind: str, n: int) -> tuple[float, float]:
    """(minimal bytes, FLOPs) of one launch: each input read once, each output written once (bf16,
    fp32 LN statistics, a bf16 mask)."""
    M = n * n
    e = 2
    if kind == "proj":
        return e * M * (C + 1 + 2 * H) + 8 * M, 2.0 * M * C * 4 * H
    if kind == "out":
        return e * M * (H + 2 * C) + 8 * M, 2.0 * M * (H * C + C * C)
    if kind == "out_bwd":
        return e * M * (H + C + C + H + C + H + C) + 8 * M, 2.0 * M * (2 * H * C + C * C)
    return e * M * (C + 2 * H + C + 1 + 4 * H + 2 * C) + 8 * M, 2.0 * M * (8 * H * C + C * C)


def setup(n: int, dev: str = "cuda"):
    """Inputs for every kernel at size n: a randomised Pairformer module in bf16 and all buffers."""
    module = randomize_parameters(TriangleMultiplication(C, H, outgoing=True), 0).to(dev).to(torch.bfloat16)
    params, _ = tm.params_from_module(module)
    ps = tm._filled([getattr(params, k) for k in tm._PARAM_ORDER], C, H, torch.device(dev))
    g = torch.Generator(device=dev).manual_seed(0)
    z4 = torch.randn(1, n, n, C, device=dev, dtype=torch.bfloat16, generator=g)
    seq = torch.ones(n, device=dev)
    seq[n - max(1, n // 20):] = 0
    mask3 = (seq[:, None] * seq[None, :]).unsqueeze(0).to(torch.bfloat16).contiguous()
    M = n * n
    bf = dict(dtype=torch.bfloat16, device=dev)
    t = dict(z4=z4, mask3=mask3, ps=ps,
             mean=torch.empty(M, dtype=torch.float32, device=dev), rstd=torch.empty(M, dtype=torch.float32, device=dev),
             ab=torch.empty((2, H, n, n), **bf), p=torch.randn((H, n, n), generator=g, **bf),
             out=torch.empty((1, n, n, C), **bf), dout=torch.randn((1, n, n, C), generator=g, **bf),
             dp=torch.empty((H, n, n), **bf), do=torch.empty((M, C), **bf), y=torch.empty((M, H), **bf),
             du=torch.randn((M, 4 * H + C), generator=g, **bf), dab=torch.randn((2, H, n, n), generator=g, **bf),
             x1=torch.empty((M, C), **bf), dz=torch.empty((M, C), **bf))
    # Real LN statistics for the output / backward kernels.
    tm._launch_proj(tm._cfg(tm._GPU_CONFIGS["proj"][-1]), z4, mask3, ps, t["ab"], t["mean"], t["rstd"],
                    1e-5)
    return t


def launcher(kind: str, t: dict, n: int):
    eps = 1e-5
    if kind == "proj":
        return lambda c: tm._launch_proj(c, t["z4"], t["mask3"], t["ps"], t["ab"], t["mean"], t["rstd"], eps)
    if kind == "out":
        return lambda c: tm._launch_out(c, t["p"], t["z4"], t["mean"], t["rstd"], t["ps"], t["out"], eps)
    parts: dict = {}

    def part(c):
        k = c["BLOCK_M"]
        if k not in parts:
            parts[k] = tm._part_buffer(kind, c, 1, n * n, C, H, t["z4"].device)
        return parts[k]
    if kind == "out_bwd":
        return lambda c: tm._launch_out_bwd(c, t["p"], t["z4"], t["mean"], t["rstd"], t["ps"], t["dout"], t["dp"],
                                            t["do"], t["y"], t["du"], part(c), eps)
    return lambda c: tm._launch_proj_bwd(c, t["z4"], t["mask3"], t["mean"], t["rstd"], t["ps"], t["dab"], t["du"],
                                         t["x1"], t["dz"], part(c))


def sweep(res: Results, sizes, quick: bool, budget: float, start: float) -> dict:
    best: dict = {}
    for n in sizes:
        t = setup(n)
        for kind in ("proj", "out", "out_bwd", "proj_bwd"):
            launch = launcher(kind, t, n)
            nbytes, flops = cost(kind, n)
            rows = []
            for cfg in candidates(kind, quick):
                row = dict(kernel=kind, N=n, **cfg, note="")
                total = tm._cdiv(n * n, cfg["BLOCK_M"])
                row["TILES"] = tm._persistent_grid(total, cfg, t["z4"].device)[1] if kind in ("proj", "out") else 1
                if time.time() - start > budget:
                    row["note"] = "skipped: over the time budget"
                    rows.append(row)
                    continue
                try:
                    ms = triton.testing.do_bench(lambda: launch(cfg), warmup=10, rep=40, return_mode="median")
                    row.update(ms=ms, GB_s=nbytes / ms / 1e6, TFLOP_s=flops / ms / 1e9)
                    row["pct_4.3TBs"] = 100 * nbytes / ms / 1e9 / 4.3
                except Exception as exc:  # noqa: BLE001 - out of resources etc. is a result
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                rows.append(row)
            timed = [r for r in rows if "ms" in r]
            if timed:
                b = min(timed, key=lambda r: r["ms"])
                b["best"] = "*"
                best[(kind, n)] = b
            for r in rows:
                res.add(**r)
        del t
        torch.cuda.empty_cache()
    return best


def end_to_end(res: Results) -> None:
    """Forward N=1024 and forward+backward N=256 through the public API (tuner on), and the host
    time per call (wall time with the GPU queue kept busy; close to the GPU time = host-bound)."""
    for n, backward in ((1024, False), (256, True), (256, False)):
        for outgoing in (True, False):
            module = randomize_parameters(TriangleMultiplication(C, H, outgoing=outgoing), 0).cuda().to(torch.bfloat16)
            z = torch.randn(1, n, n, C, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
            seq = torch.ones(n, device="cuda")
            seq[n - max(1, n // 20):] = 0
            mask = (seq[:, None] * seq[None, :]).unsqueeze(0).to(torch.bfloat16)
            leaves = [z, *module.parameters()]
            dout = torch.randn(1, n, n, C, device="cuda", dtype=torch.bfloat16)

            def call():
                if backward:
                    torch.autograd.grad(tm.triangle_multiplication_module(module, z, mask), leaves, dout)
                else:
                    with torch.no_grad():
                        tm.triangle_multiplication_module(module, z, mask)
            for _ in range(3):
                call()
            ms = triton.testing.do_bench(call, warmup=20, rep=100, return_mode="median")
            torch.cuda.synchronize()
            s = time.perf_counter()
            reps = 20
            for _ in range(reps):
                call()
            host = (time.perf_counter() - s) / reps * 1e3
            torch.cuda.synchronize()
            extra = host_split(call, module, z, mask, leaves, dout) if backward else ""
            res.add(kernel=f"e2e {'fwd_bwd' if backward else 'fwd'} {'outgoing' if outgoing else 'incoming'}",
                    N=n, ms=ms, note=f"host {host:.3f} ms/call{extra}; tuned: "
                    + ", ".join(f"{k[0]}={tuple(v.values())}" for k, v in tm._TUNED.items() if k[1] == n * n))
            del module, z, mask, leaves, dout


def host_split(call, module, z, mask, leaves, dout, reps: int = 20) -> str:
    """Where a forward+backward's host time goes on the GPU machine: the forward with grad alone,
    the backward alone (``autograd.grad`` on a retained graph), and inside the backward the body
    of ``TriangleMultiplicationFunction.backward`` (the rest is the autograd engine), each
    launch helper, the GEMM / sum calls. Wall time without synchronisation, as ``host``."""
    fn = tm.TriangleMultiplicationFunction
    spent: dict = {}

    def timed(name, f):
        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return g
    names = ("_launch_proj", "_launch_out", "_launch_out_bwd", "_launch_proj_bwd", "_bmm", "_wgrad", "_part_buffer")
    saved = {k: getattr(tm, k) for k in names}
    saved_bwd = fn.__dict__["backward"]

    sync = torch.cuda.synchronize if z.is_cuda else (lambda: None)

    def per_call(f):
        sync()
        s = time.perf_counter()
        for _ in range(reps):
            f()
        r = (time.perf_counter() - s) / reps * 1e3
        sync()
        return r

    def fwd():
        return tm.triangle_multiplication_module(module, z, mask)
    try:
        t_fwd = per_call(fwd)
        out = fwd()
        t_bwd = per_call(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
        for k in names:
            setattr(tm, k, timed(k, saved[k]))
        fn.backward = staticmethod(timed("backward body", saved_bwd.__func__))
        spent.clear()
        per_call(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
    finally:
        for k, v in saved.items():
            setattr(tm, k, v)
        fn.backward = saved_bwd
    parts = ", ".join(f"{k.lstrip('_')} {v / reps * 1e3:.3f}" for k, v in spent.items())
    return f" (fwd with grad {t_fwd:.3f}, bwd alone {t_bwd:.3f}; in bwd, ms/call: {parts})"


# --------------------------------------------------------------------------- --host-cpu (no GPU needed)
def host_cpu(n: int, reps: int = 300) -> None:
    """Host microseconds a call of the public API spends outside the kernels, on a CPU-only machine.

    The wrapper runs unchanged on CPU tensors of shape [1, n, n, 128] (bf16, a mask) with
    ``use_triton`` forced on and: each Triton kernel's launch replaced by what Triton's
    ``JITFunction.run`` does on the host before the C launcher (its argument binder and
    specialisation for an sm_90 target, the cache-key computation, the grid), the triangle
    products and weight-gradient GEMMs replaced by no-ops returning their outputs. So it counts
    our Python, the PyTorch dispatcher for every allocation / view / reduction / cast, the
    autograd.Function and engine, and Triton's Python launch path; not the CUDA driver's launch
    cost, cuBLAS's host code or the CUDA caching allocator (CPU allocations and the two small
    partial-row sums run for real: use a small n). Prints median-of-5 µs per call."""
    if tm.interpreting():
        raise SystemExit("--host-cpu times the compiled launch path: unset TRITON_INTERPRET")
    import statistics

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    backend = CUDABackend(GPUTarget("cuda", 90, 32))

    class HostOnly:
        def __init__(self, fn):
            self.binder = create_function_from_signature(fn.signature, fn.params, backend)
            self.cache: dict = {}

        def __getitem__(self, grid):
            def run(*args, **kw):
                kw["debug"] = False
                kw["instrumentation_mode"] = ""
                bound, spec, opts = self.binder(*args, **kw)
                compute_cache_key(self.cache, spec, opts)
                if callable(grid):
                    grid(bound)
                return tuple(bound.values())
            return run

    saved = {k: getattr(tm, k) for k in ("_trimul_proj_kernel", "_trimul_out_kernel", "_trimul_out_bwd_kernel",
                                         "_trimul_proj_bwd_kernel", "use_triton", "_bmm", "_wgrad")}
    try:
        for k in list(saved)[:4]:
            setattr(tm, k, HostOnly(saved[k]))
        tm.use_triton = lambda *t: True
        tm._bmm = lambda x, y, out, product: out
        tm._wgrad = lambda a, b: torch.empty((a.shape[1], b.shape[1]), dtype=a.dtype)
        torch.manual_seed(0)
        module = randomize_parameters(TriangleMultiplication(C, H, outgoing=True), 0).to(torch.bfloat16)
        z = torch.randn(1, n, n, C, dtype=torch.bfloat16, requires_grad=True)
        mask = (torch.rand(1, n, n) > 0.05).to(torch.bfloat16)
        leaves = [z, *module.parameters()]
        dout = torch.randn(1, n, n, C, dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                tm.triangle_multiplication_module(module, z, mask)

        def fwd_grad():
            return tm.triangle_multiplication_module(module, z, mask)

        def fwd_bwd():
            torch.autograd.grad(tm.triangle_multiplication_module(module, z, mask), leaves, dout)

        out = fwd_grad()

        def bwd():
            torch.autograd.grad(out, leaves, dout, retain_graph=True)

        def us(f):
            for _ in range(20):
                f()
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(reps):
                    f()
                runs.append((time.perf_counter() - t0) / reps * 1e6)
            return statistics.median(runs)

        print(f"host µs a call (CPU, N={n}, kernels / GEMMs stubbed): fwd no_grad {us(fwd):.0f}, "
              f"fwd with grad {us(fwd_grad):.0f}, bwd alone {us(bwd):.0f}, fwd+bwd {us(fwd_bwd):.0f}", flush=True)
    finally:
        for k, v in saved.items():
            setattr(tm, k, v)


# --------------------------------------------------------------------------- --ptxas (no GPU needed)
def _ptxas_report(kind: str, cfg: dict, n: int = 1024) -> tuple:
    """Compile one kernel for sm_90 with Triton (no GPU: ASTSource + an explicit target) and run
    the ptxas Triton ships with ``-v``: (registers a thread, spill bytes stored / loaded, shared
    memory bytes, wgmma instructions in the PTX). C = H = 128, bf16, the tile loop of N = n."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    p16, p32 = "*bf16", "*fp32"
    base = dict(C=C, H=H, PRECISION="tf32", BLOCK_C=128, BLOCK_M=cfg["BLOCK_M"])
    if kind == "proj":
        fn = tm._trimul_proj_kernel
        sig = dict(Z=p16, MASK=p16, LNW=p16, LNB=p16, WAP=p16, WBP=p16, WAG=p16, WBG=p16, BAP=p32, BBP=p32,
                   BAG=p32, BBG=p32, AB=p16, MEAN=p32, RSTD=p32, NN="i32", TILES_B="i32", TOTAL="i32", BHNN="i32",
                   eps="fp32")
        total = tm._cdiv(n * n, cfg["BLOCK_M"])
        consts = dict(base, HAS_MASK=True, BLOCK_H=cfg["BLOCK_H"], ROWS=cfg["ROWS"],
                      TILES=tm._persistent_grid(total, cfg, torch.device("cuda", 0))[1])
    elif kind == "out":
        fn = tm._trimul_out_kernel
        sig = dict(P=p16, Z=p16, MEAN=p32, RSTD=p32, LN1W=p16, LN1B=p16, LN2W=p16, LN2B=p16, WO=p16, BO=p32,
                   WGO=p16, BGO=p32, OUT=p16, NN="i32", TILES_B="i32", TOTAL="i32", eps2="fp32")
        total = tm._cdiv(n * n, cfg["BLOCK_M"])
        consts = dict(base, BLOCK_HF=128, BLOCK_N=min(cfg["BLOCK_H"], 128),
                      TILES=tm._persistent_grid(total, cfg, torch.device("cuda", 0))[1])
    elif kind == "out_bwd":
        fn = tm._trimul_out_bwd_kernel
        sig = dict(P=p16, Z=p16, MEAN=p32, RSTD=p32, LN1W=p16, LN1B=p16, LN2W=p16, LN2B=p16, WO=p16, BO=p32,
                   WGO=p16, BGO=p32, DOUT=p16, DP=p16, DO=p16, Y=p16, DU=p16, PART=p32, NN="i32", TILES_B="i32",
                   TOTAL="i32", eps2="fp32", LD_DU="i32", GATE_OFF="i32", LD_PART="i32")
        consts = dict(base, BLOCK_HF=128)
    else:
        fn = tm._trimul_proj_bwd_kernel
        sig = dict(Z=p16, MASK=p16, MEAN=p32, RSTD=p32, LNW=p16, LNB=p16, WAP=p16, WBP=p16, WAG=p16, WBG=p16,
                   BAP=p32, BBP=p32, BAG=p32, BBG=p32, WGO=p16, DAB=p16, DU=p16, X1=p16, DZ=p16, PART=p32,
                   NN="i32", TILES_B="i32", TOTAL="i32", BHNN="i32", LD_DU="i32", LD_PART="i32")
        consts = dict(base, HAS_MASK=True, BLOCK_H=cfg["BLOCK_H"])
    div = [k for k, v in sig.items() if v.startswith("*") or v == "i32"]   # all 16-divisible at C = H = 128
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div}
    full = {k: ("constexpr" if k in consts else sig[k]) for k in fn.arg_names}
    k = triton.compile(ASTSource(fn, full, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    ptx = k.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return (int(regs.group(1)) if regs else -1, tuple(map(int, spill.groups())) if spill else None,
            k.metadata.shared, ptx.count("wgmma.mma_async"))


def ptxas_table(quick: bool) -> None:
    if tm.interpreting():
        raise SystemExit("--ptxas compiles for sm_90: unset TRITON_INTERPRET")
    tm._SMS[0] = 132                      # an H200's multiprocessors, for the persistent loop bound
    for kind in ("proj", "out", "out_bwd", "proj_bwd"):
        for cfg in candidates(kind, quick):
            try:
                regs, spill, smem, wgmma = _ptxas_report(kind, cfg)
                print(f"{kind:9s} {tuple(cfg.values())}: {regs} regs, spill st/ld {spill}, "
                      f"{smem / 1024:.0f} KiB shared, {wgmma} wgmma", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"{kind:9s} {tuple(cfg.values())}: FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no more configs are timed")
    parser.add_argument("--quick", action="store_true", help="only the in-module candidate lists")
    parser.add_argument("--sizes", default="1024,256", help="largest first: the budget cuts the last")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--ptxas", action="store_true", help="no GPU: compile every candidate for sm_90 and print "
                        "registers, spills, shared memory (ptxas -v)")
    parser.add_argument("--host-cpu", action="store_true", help="no GPU: host µs of the wrapper with the kernels "
                        "stubbed (see host_cpu)")
    parser.add_argument("--host-n", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = parser.parse_args()
    if args.ptxas:
        ptxas_table(args.quick)
        return
    if args.host_cpu:
        torch.set_num_threads(1)
        host_cpu(args.host_n)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels.triangle_tune needs a CUDA GPU")
    start = time.time()
    res = Results("triangle multiplicative update: per-kernel tuning sweep (bf16, c_z = c_hidden = 128, batch 1, "
                  "mask)", COLUMNS)
    res.notes.append("GB_s / TFLOP_s: the kernel's minimal bytes (each input read once, each output written once) "
                     "and its GEMM FLOPs over the median time; pct_4.3TBs against the copy bandwidth KINDS.md "
                     "measured. CTAS 0 = one tile a program; k > 0 = persistent, ~k programs an SM, TILES each.")
    best = sweep(res, [int(s) for s in args.sizes.split(",")], args.quick, args.budget, start)
    if not args.no_e2e:
        tm._TUNED.clear()
        end_to_end(res)
    for (kind, n), b in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        res.notes.append(f"best {kind} N={n}: {tuple(b[k] for k in tm._KEYS)} {b['ms']:.4f} ms "
                         f"({b['GB_s']:.0f} GB/s, {b['TFLOP_s']:.0f} TFLOP/s)")
    res.notes.append(f"sweep wall time {time.time() - start:.0f} s on {card_name()}")
    print(res.markdown())
    print("saved", res.save(os.path.abspath(args.out), "kernels_triangle_tune"))
    if os.environ.get("OUT"):
        print("saved", res.save(os.environ["OUT"], "kernels_triangle_tune"))


if __name__ == "__main__":
    main()
