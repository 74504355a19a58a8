"""GPU benchmark: a layer norm feeding several projections as one kernel (``kernels/ln_linear.py``).

Compares ``foldcompile.kernels.ln_linear.layer_norm_linear`` with the module it replaces — ``nn.LayerNorm``
then one ``nn.Linear`` per projection (cuBLAS), run eagerly and under ``torch.compile`` — and with the same
layer norm followed by one linear over the weights concatenated per call (what a hand-fused model does).
bf16, AlphaFold 2 trunk widths, the gate projection with a bias and the others without (as AF2's
``Attention`` has them):

- MSA ``[N_seq=128, N_res=256, c_m=256]`` -> q, k, v, gate (4 x 256: 8 heads x 32), the MSA row attention's;
- pair ``[1024, 1024, c_z=128]`` -> q, k, v, gate (4 x 128: 4 heads x 32) and the pair bias (4 heads), the
  triangle attention's five projections at N_res = 1024;
- pair ``[256, 256, 128]`` -> the same five at the training crop.

Each shape forward and forward+backward (gradients of x, the layer norm's weight and bias, every weight and
bias). Each row: median time (CUDA events), the same call replayed from a CUDA graph (the GPU's time without
host launch gaps), host time per call, peak extra memory (peak allocated during the
call minus its outputs and, for forward+backward, the gradient buffers), speed-ups against eager and
torch.compile, the outputs' error relative to the fp32 reference on the same inputs. Then a sweep of the
kernels' block sizes (the forward at the pair's N_res = 1024, the backward at the MSA), each row naming its
config, and the per-kernel GPU times of our calls (torch.profiler, after every timing). Target (issue 11):
>= 1.3x torch.compile.

Run from the repository root: ``python -m bench.kernels.ln_linear [--quick] [--no-sweep] [--out DIR]``
(results to ``bench/results/kernels_ln_linear_<card>_<date>.{md,json}``, or DIR). ``--smoke`` runs every
code path at tiny sizes on the CPU (under ``TRITON_INTERPRET=1``) without timing anything meaningful: a
check that the script itself works.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
import traceback
from typing import Callable

import torch
from torch import nn

from bench.common import Results, kernel_breakdown, peak_memory_bytes, time_ms

L = importlib.import_module("foldcompile.kernels.ln_linear")

COLUMNS = ["shape", "projections", "pass", "impl", "ms", "graph_ms", "host_ms", "peak_extra_MiB", "x_eager",
           "x_compile", "x_compile_graph", "rel_err_vs_fp32", "config", "note"]

# (name, leading dims, channels, projection widths, which projections have a bias)
SHAPES = [("MSA", (128, 256), 256, (256, 256, 256, 256), (False, False, False, True)),
          ("pair N_res=1024", (1024, 1024), 128, (128, 128, 128, 128, 4), (False, False, False, True, False)),
          ("pair N_res=256", (256, 256), 128, (128, 128, 128, 128, 4), (False, False, False, True, False))]
SMOKE_SHAPES = [("MSA", (6, 13), 32, (16, 16, 16, 16), (False, False, False, True)),
                ("pair", (11, 11), 16, (16, 16, 16, 16, 4), (False, False, False, True, False))]

# Block-size candidates (every tl.dot dim >= 16; the module's own choice is timed as "foldcompile").
FWD_SWEEP = [dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
             dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
             dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
             dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3),
             dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
             dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)]
BWD_SWEEP = [dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
             dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
             dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
             dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
             dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)]
# where each sweep runs (the shapes' names): the forward at the MSA (K=256) and the pair at N_res=1024, the
# backward at the two training-crop shapes
FWD_SWEEP_AT = ("MSA", "pair N_res=1024")
BWD_SWEEP_AT = ("MSA", "pair N_res=256")


class LayerNormProjections(nn.Module):
    """The module the kernel replaces: ``nn.LayerNorm`` and one ``nn.Linear`` per projection."""

    def __init__(self, k: int, widths: tuple[int, ...], biases: tuple[bool, ...]):
        super().__init__()
        self.norm = nn.LayerNorm(k)
        self.projections = nn.ModuleList(nn.Linear(k, n, bias=b) for n, b in zip(widths, biases))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.norm(x)
        return tuple(p(y) for p in self.projections)


def _concatenated(module: LayerNormProjections) -> Callable:
    """The layer norm, then one linear over the weights (and zero-filled biases) concatenated per call."""
    widths = [p.out_features for p in module.projections]

    def run(x):
        w = torch.cat([p.weight for p in module.projections])
        b = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                       for p in module.projections])
        return torch.nn.functional.linear(module.norm(x), w, b).split(widths, dim=-1)

    return run


def _ours(module: LayerNormProjections) -> Callable:
    ps = list(module.projections)
    return lambda x: L.layer_norm_linear(x, module.norm.weight, module.norm.bias, [p.weight for p in ps],
                                         [p.bias for p in ps], eps=module.norm.eps)


def _module(k: int, widths, biases, dtype, dev) -> LayerNormProjections:
    torch.manual_seed(0)
    module = LayerNormProjections(k, widths, biases)
    with torch.no_grad():  # a layer norm that is not the identity
        module.norm.weight.add_(0.2 * torch.randn(k))
        module.norm.bias.add_(0.2 * torch.randn(k))
    return module.to(device=dev, dtype=dtype)


class _Clock:
    """CUDA-event timing and allocator peaks on the GPU; wall time and no peaks for ``--smoke``."""

    def __init__(self, smoke: bool):
        self.smoke = smoke

    def ms(self, fn: Callable, reps: int) -> float:
        if not self.smoke:
            return time_ms(fn, warmup=3, reps=reps)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def peak(self, fn: Callable) -> int:
        return 0 if self.smoke else peak_memory_bytes(fn)

    def sync(self) -> None:
        if not self.smoke:
            torch.cuda.synchronize()

    def graph_ms(self, fn: Callable, reps: int) -> float | None:
        """Median time of ``fn`` replayed from a CUDA graph: the GPU's time alone, without the host's
        launch gaps (a call whose host work outlasts its kernels is timed at its host's pace by ``ms``;
        optimize's default CUDA-graph executor replays it like this). None for ``--smoke``."""
        if self.smoke:
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture (allocator and autograd state)
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        try:
            return time_ms(graph.replay, warmup=3, reps=reps)
        finally:
            del graph
            torch.cuda.synchronize()


def _measure(clock: _Clock, fn: Callable, x: torch.Tensor, params: list, backward: bool, reps: int):
    """(median ms, peak extra MiB, host ms, CUDA-graph replay ms or None) of one forward (and backward) call
    of ``fn(x)``."""
    with torch.no_grad():
        outs = fn(x)
    out_bytes = sum(o.numel() * o.element_size() for o in outs)
    douts = [torch.randn_like(o) for o in outs]
    del outs
    leaves = [x, *params]

    def call():
        if backward:
            torch.autograd.grad(fn(x), leaves, douts)
        else:
            with torch.no_grad():
                fn(x)

    ms = clock.ms(call, reps)
    peak = clock.peak(call)
    grad_bytes = sum(t.numel() * t.element_size() for t in leaves) if backward else 0
    clock.sync()
    start = time.perf_counter()
    for _ in range(1 if clock.smoke else 5):
        call()
    host_ms = (time.perf_counter() - start) / (1 if clock.smoke else 5) * 1e3
    clock.sync()
    try:
        graph_ms = clock.graph_ms(call, reps)
    except Exception as exc:  # noqa: BLE001 - a call that cannot be captured is a result, not a crash
        graph_ms = f"capture failed: {type(exc).__name__}"
    return ms, (peak - out_bytes - grad_bytes) / 2**20, host_ms, graph_ms


def _rel_err(outs, refs) -> float:
    num = sum((o.float() - r).square().sum().item() for o, r in zip(outs, refs))
    den = sum(r.square().sum().item() for r in refs)
    return (num / den) ** 0.5


def _with_config(kind: str, override: dict | None):
    """Replace the block sizes ``L._config`` gives for ``kind`` (None: the module's own choice)."""
    original = L._config

    def patched(k, K, dtype):
        cfg = original(k, K, dtype)
        if override is not None and k == kind:
            cfg = {**cfg, **override}
        return cfg

    L._config = patched
    return original


def _row_error(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"failed: {type(exc).__name__}: {text}"


def _speedups(row: dict, times: dict, graph_times: dict) -> None:
    for ref_impl, col in (("eager", "x_eager"), ("torch.compile", "x_compile")):
        if ref_impl in times and "ms" in row:
            row[col] = times[ref_impl] / row["ms"]
    if isinstance(graph_times.get("torch.compile"), float) and isinstance(row.get("graph_ms"), float):
        row["x_compile_graph"] = graph_times["torch.compile"] / row["graph_ms"]


def run(quick: bool = False, sweep: bool = True, smoke: bool = False) -> Results:
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("bench.kernels.ln_linear needs a CUDA GPU (or --smoke)")
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter's bf16 is wrong
    clock = _Clock(smoke)
    res = Results(f"layer norm -> projections ({str(dtype)[6:]}): foldcompile vs LayerNorm + cuBLAS linears (eager), "
                  "torch.compile", COLUMNS)
    res.notes.append("eager = nn.LayerNorm then one nn.Linear per projection (the gate with a bias); eager cat = the "
                     "layer norm then one linear over the weights concatenated per call; torch.compile = the module "
                     "compiled (dynamic=False). ms = median of CUDA-event-timed calls (host launch gaps included "
                     "where the host is the slower); graph_ms = the same call replayed from a CUDA graph (the GPU "
                     "alone, as optimize's CUDA-graph executor runs it); x_compile_graph = torch.compile's graph_ms "
                     "over ours. peak_extra = peak allocated during the call minus its outputs (and the gradient "
                     "buffers for fwd+bwd). rel_err_vs_fp32: all outputs vs the fp32 reference on the same inputs.")
    res.notes.append("target (issue 11): >= 1.3x torch.compile.")
    reps = 3 if (quick or smoke) else 20
    breakdowns = []
    for name, lead, k, widths, biases in (SMOKE_SHAPES if smoke else SHAPES):
        module = _module(k, widths, biases, dtype, dev)
        params = list(module.parameters())
        g = torch.Generator(device=dev).manual_seed(1)
        x0 = (torch.randn(*lead, k, device=dev, generator=g) * 1.5 + 0.3).to(dtype)
        with torch.no_grad():
            ref32 = L.layer_norm_linear_reference(
                x0.float(), module.norm.weight.float(), module.norm.bias.float(),
                [p.weight.float() for p in module.projections],
                [p.bias.float() if p.bias is not None else None for p in module.projections], eps=module.norm.eps)
        compiled = None if smoke else torch.compile(module, dynamic=False)
        impls = [("foldcompile", _ours(module)), ("eager", module), ("eager cat", _concatenated(module))]
        if compiled is not None:
            impls.append(("torch.compile", compiled))
        shape = f"{name} {list(lead) + [k]}"
        proj = " + ".join(str(w) for w in widths)
        for pass_name in ("fwd", "fwd_bwd"):
            backward = pass_name == "fwd_bwd"
            x = x0.clone().requires_grad_(backward)
            times, graph_times, rows = {}, {}, []
            for impl, fn in impls:
                row = dict(shape=shape, projections=proj, impl=impl, note="", config="")
                row["pass"] = pass_name
                try:
                    with torch.no_grad():
                        row["rel_err_vs_fp32"] = _rel_err(fn(x), ref32)
                    row["ms"], row["peak_extra_MiB"], row["host_ms"], row["graph_ms"] = _measure(
                        clock, fn, x, params, backward, reps)
                    times[impl], graph_times[impl] = row["ms"], row["graph_ms"]
                except Exception as exc:  # noqa: BLE001 - OOM or a compile failure is a result
                    row["note"] = _row_error(exc)
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
                    if not smoke:
                        torch.cuda.empty_cache()
                rows.append(row)
            for row in rows:
                _speedups(row, times, graph_times)
                res.add(**row)
            if not smoke:
                ours, douts = impls[0][1], [torch.randn_like(r).to(dtype) for r in ref32]
                breakdowns.append((f"{shape} {pass_name} foldcompile kernels",
                                   lambda ours=ours, x=x, douts=douts, backward=backward, params=params: (
                                       torch.autograd.grad(ours(x), [x, *params], douts) if backward
                                       else ours(x.detach()))))
            # the block-size sweep (FWD_SWEEP_AT, BWD_SWEEP_AT)
            plan = []
            if sweep and not backward and (smoke or name in FWD_SWEEP_AT):
                plan = [("fwd", cfg) for cfg in FWD_SWEEP]
            if sweep and backward and name in BWD_SWEEP_AT:
                plan = [("bwd", cfg) for cfg in BWD_SWEEP]
            for kind, cfg in plan:
                row = dict(shape=shape, projections=proj, impl=f"foldcompile sweep {kind}", note="",
                           config=" ".join(f"{a}={v}" for a, v in cfg.items()))
                row["pass"] = pass_name
                original = _with_config(kind, cfg)
                try:
                    with torch.no_grad():
                        row["rel_err_vs_fp32"] = _rel_err(impls[0][1](x), ref32)
                    row["ms"], row["peak_extra_MiB"], row["host_ms"], row["graph_ms"] = _measure(
                        clock, impls[0][1], x, params, backward, reps)
                    _speedups(row, times, graph_times)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is a result
                    row["note"] = _row_error(exc)
                finally:
                    L._config = original
                res.add(**row)
            del x
        del module, params, x0, ref32, compiled, impls
        if not smoke:
            torch.cuda.empty_cache()
            torch._dynamo.reset()
    res.notes.append("module defaults (L._config), bf16: " + "; ".join(
        f"{kind} K={k}: {L._config(kind, k, torch.bfloat16)}" for kind in ("fwd", "bwd") for k in (128, 256)))
    for label, call in breakdowns:  # the profiler runs only after every timing (see bench/kernels/triangle.py)
        try:
            res.notes.append(f"{label}: {kernel_breakdown(call)}")
        except Exception as exc:  # noqa: BLE001
            res.notes.append(f"profiler failed: {exc}")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: check the script runs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = parser.parse_args()
    res = run(quick=args.quick, sweep=not args.no_sweep, smoke=args.smoke)
    print(res.markdown())
    if not args.smoke:
        print("saved", res.save(os.path.abspath(args.out), "kernels_ln_linear"))


if __name__ == "__main__":
    main()
