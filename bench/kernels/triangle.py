"""GPU benchmark: the fused triangle multiplicative update.

Compares ``foldcompile.kernels.triangle_multiplication`` (its default, the triangle product in
cuBLAS, and ``product="triton"``, the same in its own Triton batched GEMM) with the zoo's Pairformer module
(``models/pairformer.py``'s ``TriangleMultiplication``: no projection biases, the same
function cuEquivariance computes) run eagerly, under ``torch.compile``, and with
cuEquivariance's ``cuequivariance_torch.triangle_multiplicative_update`` when importable
(carry it with ``bench/peers.py``). bf16, c_z = c_hidden = 128, a pair mask with the last
5% of residues padded (``mask_ij = s_i s_j``), batch 1:

- N = 256 (training crop): forward, and forward+backward (gradients of z and of every
  parameter);
- N = 1024 (inference): forward.

Each row: median time (CUDA events), host time per call (launch-bound when close to the
GPU time: expected for ours at N = 256), peak extra memory (peak allocated during the call,
minus its output and, for forward+backward, the gradient buffers), speed-ups against eager
and torch.compile, and the output's error relative to the module run in fp32 on the same
inputs (so a peer computing a different orientation shows). Targets (issue 11, H200):
N=1024 forward <= 1.1 ms; N=256 forward+backward <= 1.6 ms; peak extra memory no more than
cuEquivariance's (1.03 GiB at N=1024 forward).

Run from the repository root: ``python -m bench.kernels.triangle [--quick] [--impls foldcompile,cuequivariance]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import traceback
from typing import Callable

import torch

from bench.common import Results, add_breakdown_notes, add_speedups, measure_call, row_error
from foldcompile.kernels.triangle_multiplication import triangle_multiplication_module
from foldcompile.models.pairformer import TriangleMultiplication
from foldcompile.models.zoo import randomize_parameters

COLUMNS = ["N", "direction", "pass", "impl", "ms", "host_ms", "peak_extra_MiB", "x_eager", "x_compile",
           "rel_err_vs_fp32", "note"]
C_Z = C_HIDDEN = 128


def _cueq_fn():
    """cuEquivariance's triangle_multiplicative_update, or None when the package is absent."""
    try:
        import cuequivariance_torch  # type: ignore[import-not-found]
        return cuequivariance_torch.triangle_multiplicative_update
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def _cueq_call(fn, module: TriangleMultiplication) -> Callable:
    """Our module's parameters in cuEquivariance's layout: the a and b projections (and their
    gates) concatenated as [2H, C] weights, a first (its outgoing/incoming einsums are the
    Pairformer's)."""
    direction = "outgoing" if module.outgoing else "incoming"

    def call(z, mask):
        return fn(z, direction=direction, mask=mask,
                  norm_in_weight=module.layer_norm_in.weight, norm_in_bias=module.layer_norm_in.bias,
                  p_in_weight=torch.cat([module.linear_a.weight, module.linear_b.weight]),
                  g_in_weight=torch.cat([module.linear_a_gate.weight, module.linear_b_gate.weight]),
                  norm_out_weight=module.layer_norm_out.weight, norm_out_bias=module.layer_norm_out.bias,
                  p_out_weight=module.linear_out.weight, g_out_weight=module.linear_g.weight,
                  eps=module.layer_norm_in.eps)
    return call


def _inputs(n: int, dtype: torch.dtype, dev: str):
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(1, n, n, C_Z, device=dev, dtype=dtype, generator=g)
    seq = torch.ones(n, device=dev)
    seq[n - max(1, n // 20):] = 0  # a padded crop: the last 5% of residues
    mask = (seq[:, None] * seq[None, :]).unsqueeze(0).to(dtype)
    return z, mask


def _measure(fn: Callable, module: torch.nn.Module, z: torch.Tensor, mask: torch.Tensor, backward: bool,
             reps: int) -> tuple[float, float, float]:
    """(median ms, peak extra MiB, host ms) of one forward (and backward: gradients of z and of every
    parameter) call. host ms is the wall time per call with the GPU queue kept busy: close to ms means
    launch-bound."""
    ms, extra, host = measure_call(lambda: fn(z, mask), [z, *module.parameters()], backward, reps)
    return ms, extra / 2**20, host


def _ours_call(module: torch.nn.Module, z: torch.Tensor, mask: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One call of our kernels (forward, or forward and backward), every value bound now: the profiler runs
    it after the loop has moved on (and deleted its variables)."""
    leaves = [z, *module.parameters()]

    def call():
        if backward:
            out = triangle_multiplication_module(module, z, mask)
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        else:
            with torch.no_grad():
                triangle_multiplication_module(module, z, mask)
    return call


def run(quick: bool = False, only: tuple = ()) -> Results:
    """Benchmark every implementation on every case; returns the results table."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench.kernels.triangle needs a CUDA GPU")
    dev, dtype = "cuda", torch.bfloat16
    res = Results("triangle multiplicative update (bf16, c_z = c_hidden = 128, mask): foldcompile vs eager, "
                  "torch.compile, cuEquivariance", COLUMNS)
    cueq = _cueq_fn()
    res.notes.append("cuEquivariance: " + ("imported" if cueq is not None else "not importable here; skipped"))
    res.notes.append("module: models/pairformer.py TriangleMultiplication with randomized parameters, in bf16; "
                     "mask = s_i s_j with the last 5% of residues padded. peak_extra = peak allocated during the "
                     "call minus its output (and gradient buffers for fwd+bwd). rel_err_vs_fp32: output vs the "
                     "same module in fp32 on the same inputs.")
    res.notes.append("targets (H200): N=1024 fwd <= 1.1 ms; N=256 fwd+bwd <= 1.6 ms; peak extra <= cuEquivariance's "
                     "(1.03 GiB at N=1024 fwd).")
    plan = [(256, True, "fwd"), (256, True, "fwd_bwd"), (1024, True, "fwd")]
    if not quick:
        plan += [(256, False, "fwd"), (256, False, "fwd_bwd"), (1024, False, "fwd")]
    reps = 5 if quick else 20
    breakdowns: list[tuple[str, Callable]] = []
    for n, outgoing, pass_name in plan:
        torch.cuda.empty_cache()
        base = randomize_parameters(TriangleMultiplication(C_Z, C_HIDDEN, outgoing=outgoing), 0).to(dev)
        module = copy.deepcopy(base).to(dtype)
        z, mask = _inputs(n, dtype, dev)
        z.requires_grad_(pass_name == "fwd_bwd")
        with torch.no_grad():
            ref32 = base(z.float(), mask.float())
        compiled = torch.compile(module, dynamic=False)
        impls: list[tuple[str, Callable]] = [
            ("foldcompile", lambda z, m, module=module: triangle_multiplication_module(module, z, m)),
            ("foldcompile_triton_bmm",
             lambda z, m, module=module: triangle_multiplication_module(module, z, m, product="triton")),
            ("eager", module), ("torch.compile", compiled)]
        if cueq is not None:
            impls.append(("cuequivariance", _cueq_call(cueq, module)))
        if only:                                      # --impls: e.g. skip torch.compile's compile time
            impls = [(name, fn) for name, fn in impls if name in only]
        times: dict[str, float] = {}
        rows = []
        for impl, fn in impls:
            row = dict(N=n, direction="outgoing" if outgoing else "incoming", impl=impl, note="")
            row["pass"] = pass_name
            try:
                with torch.no_grad():
                    out = fn(z, mask)
                row["rel_err_vs_fp32"] = ((out.float() - ref32).norm() / ref32.norm()).item()
                del out
                ms, extra, host_ms = _measure(fn, module, z, mask, pass_name == "fwd_bwd", reps)
                row["ms"], row["peak_extra_MiB"], row["host_ms"] = ms, extra, host_ms
                times[impl] = ms
            except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking
                row["note"] = row_error(exc)
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
                torch.cuda.empty_cache()
            rows.append(row)
        for row in rows:
            add_speedups(row, times)
            res.add(**row)
        if "foldcompile" in times and (n, pass_name) in ((1024, "fwd"), (256, "fwd_bwd")):
            breakdowns.append((f"N={n} {'outgoing' if outgoing else 'incoming'} {pass_name} foldcompile kernels",
                               _ours_call(module, z, mask, pass_name == "fwd_bwd")))
        del impls, compiled, module, base, z, mask, ref32
        torch._dynamo.reset()  # each case is a new graph: don't run into Dynamo's recompile limit
    # The profiler runs only after every timing: a torch.profiler session (CUPTI) left per-launch
    # host overhead behind in the 2026-12-01 run, whose incoming rows (all timed after the outgoing
    # rows' profiles) lost ~0.4 ms of host time for ours and for eager alike.
    import importlib
    tm = importlib.import_module("foldcompile.kernels.triangle_multiplication")
    res.notes.append("foldcompile tuner's choices (kernel, M bucket, C, H, dtype, mask -> BLOCK_M, BLOCK_H, warps, "
                     "stages, CTAS, ROWS): " + "; ".join(f"{k[0]} M<={k[1]} -> {tuple(v.values())}"
                                                        for k, v in tm._TUNED.items()))
    add_breakdown_notes(res, breakdowns, top=10, width=48)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--impls", default="", help="comma-separated subset of foldcompile, foldcompile_triton_bmm, "
                        "eager, torch.compile, cuequivariance (default: all)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = parser.parse_args()
    res = run(quick=args.quick, only=tuple(x for x in args.impls.split(",") if x))
    print(res.markdown())
    print("saved", res.save(os.path.abspath(args.out), "kernels_triangle"))


if __name__ == "__main__":
    main()
