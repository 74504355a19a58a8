"""GPU benchmark: the fused outer product mean.

Compares ``foldcompile.kernels.outer_product_mean`` with the same math written plainly (AlphaFold's
``einsum("...sic,...sje->...ijce") -> reshape -> linear -> / (eps + einsum(mask, mask))``, what
``models/alphafold2/outer_product_mean.py`` runs after its projections), run eagerly and under
``torch.compile``. bf16, c = 32, c_z = 128 (AlphaFold 2), N_seq = 128, an MSA mask with the last 5% of
residues padded and a, b multiplied by it (as the model's masked projections are), batch 1:

- N_res = 256 (training crop): forward, and forward+backward (gradients of a, b, the weight, the bias);
- N_res = 1024 (inference): forward.

Each row: median time (CUDA events), host time per call, peak extra memory (peak allocated during the
call minus its output and, for forward+backward, the gradient buffers), speed-ups against eager and
torch.compile, and the output's error relative to the fp32 reference on the same inputs. Then a sweep
of the kernels' block sizes (forward at N_res = 1024; backward at 256), each row naming its config, and
the per-kernel GPU times of our calls (torch.profiler, after every timing). Targets (issue 11, H200):
>= 2x torch.compile at N_res = 1024 with peak extra memory < 256 MiB.

Run from the repository root: ``python -m bench.kernels.outer_product_mean [--quick] [--no-sweep]``
(results to ``bench/results/kernels_outer_product_mean_<card>_<date>.{md,json}``).
``--smoke`` runs every code path at tiny sizes on the CPU (under ``TRITON_INTERPRET=1``) without timing
anything meaningful: a check that the script itself works.
"""
from __future__ import annotations

import argparse
import importlib
import os
import traceback
from typing import Callable

import torch

from bench.common import Clock, Results, add_breakdown_notes, add_speedups, measure_call, row_error

K = importlib.import_module("foldcompile.kernels.outer_product_mean")

COLUMNS = ["N_res", "N_seq", "pass", "impl", "ms", "host_ms", "peak_extra_MiB", "x_eager", "x_compile",
           "rel_err_vs_fp32", "config", "note"]
C_HIDDEN, C_Z, EPS = 32, 128, 1e-3

# Sweep candidates (block sizes for c = 32, c_z = 128; each keeps every tl.dot dim >= 16).
FWD_SWEEP = [dict(BI=8, BJ=8, CB=8, BS=32, num_warps=8, num_stages=2),
             dict(BI=4, BJ=8, CB=8, BS=32, num_warps=4, num_stages=2),
             dict(BI=8, BJ=8, CB=16, BS=32, num_warps=8, num_stages=2),
             dict(BI=8, BJ=16, CB=4, BS=32, num_warps=8, num_stages=2),
             dict(BI=16, BJ=8, CB=4, BS=64, num_warps=8, num_stages=3)]
DA_SWEEP = [dict(BI=8, BJ=8, CB=8, BS=64, num_warps=8, num_stages=2),
            dict(BI=8, BJ=8, CB=8, BS=128, num_warps=8, num_stages=2),
            dict(BI=4, BJ=8, CB=8, BS=64, num_warps=4, num_stages=2)]
DW_SWEEP = [dict(BI=8, BJ=8, CB=4, BS=32, num_warps=8, num_stages=2),
            dict(BI=8, BJ=8, CB=8, BS=32, num_warps=8, num_stages=2),
            dict(BI=4, BJ=8, CB=4, BS=32, num_warps=4, num_stages=2)]


def eager_opm(a, b, weight, bias, mask):
    """The plain PyTorch spelling (AF2's): o materialised, flattened, projected, divided by the count."""
    o = torch.einsum("...sic,...sje->...ijce", a, b)
    out = torch.nn.functional.linear(o.reshape(*o.shape[:-2], -1), weight, bias)
    return out / (EPS + torch.einsum("...si,...sj->...ij", mask, mask)[..., None])


def ours(a, b, weight, bias, mask):
    return K.outer_product_mean(a, b, weight, bias, mask_a=mask, mask_b=mask, eps=EPS)


def _inputs(n_res: int, n_seq: int, dtype: torch.dtype, dev: str):
    g = torch.Generator(device=dev).manual_seed(0)
    seq = torch.ones(n_res, device=dev)
    seq[n_res - max(1, n_res // 20):] = 0  # a padded crop: the last 5% of residues
    mask = seq.expand(n_seq, n_res).to(dtype).contiguous()
    a = (torch.randn(n_seq, n_res, C_HIDDEN, device=dev, generator=g) * mask[..., None]).to(dtype)
    b = (torch.randn(n_seq, n_res, C_HIDDEN, device=dev, generator=g) * mask[..., None]).to(dtype)
    w = (torch.randn(C_Z, C_HIDDEN * C_HIDDEN, device=dev, generator=g) / C_HIDDEN).to(dtype)
    bias = torch.randn(C_Z, device=dev, generator=g).to(dtype)
    return a, b, w, bias, mask


def _measure(clock: Clock, fn: Callable, leaves: list, backward: bool, reps: int):
    """(median ms, peak extra MiB, host ms) of one forward (and backward: the gradients of the leaves that
    require one) call."""
    ms, extra, host = measure_call(lambda: fn(*leaves), [t for t in leaves if t.requires_grad], backward, reps,
                                   clock=clock, host_reps=1 if clock.smoke else 5)
    return ms, extra / 2**20, host


def _ours_call(leaves: list, mask: torch.Tensor, backward: bool) -> Callable[[], object]:
    """One call of our kernel on these inputs (forward, or forward and backward), every value bound now:
    the profiler runs it after the loop has moved on."""
    def call():
        if backward:
            out = ours(*leaves, mask)
            return torch.autograd.grad(out, leaves, torch.ones_like(out))
        return ours(*[t.detach() for t in leaves], mask)
    return call


def _with_config(kind: str, override: dict | None):
    """Replace the block sizes ``K._config`` gives for ``kind`` (None: the module's own choice)."""
    original = K._config

    def patched(k, C, E, Z, S):
        cfg = original(k, C, E, Z, S)
        if override is not None and k == kind:
            cfg = {**cfg, **override}
        return cfg

    K._config = patched
    return original


def run(quick: bool = False, sweep: bool = True, smoke: bool = False) -> Results:
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("bench.kernels.outer_product_mean needs a CUDA GPU (or --smoke)")
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter's bf16 is wrong
    clock = Clock(smoke)
    res = Results(f"outer product mean ({str(dtype)[6:]}, c = {C_HIDDEN}, c_z = {C_Z}, MSA mask): foldcompile vs "
                  "eager, torch.compile", COLUMNS)
    res.notes.append("eager = einsum('...sic,...sje->...ijce') -> reshape -> linear -> / (eps + einsum(mask, mask)), "
                     "AF2's spelling after its projections; torch.compile = that function compiled (dynamic=False). "
                     "a, b multiplied by the mask (the last 5% of residues padded). peak_extra = peak allocated "
                     "during the call minus its output (and the gradient buffers for fwd+bwd). rel_err_vs_fp32: "
                     "output vs the fp32 reference on the same inputs.")
    res.notes.append("target (issue 11, H200): >= 2x torch.compile at N_res = 1024 forward, peak extra < 256 MiB.")
    n_seq = 8 if smoke else 128
    sizes = [(24, "fwd"), (24, "fwd_bwd"), (40, "fwd")] if smoke else [(256, "fwd"), (256, "fwd_bwd"), (1024, "fwd")]
    reps = 3 if (quick or smoke) else 20
    compiled = None if smoke else torch.compile(eager_opm, dynamic=False)
    breakdowns = []
    for n_res, pass_name in sizes:
        if not smoke:
            torch.cuda.empty_cache()
        a, b, w, bias, mask = _inputs(n_res, n_seq, dtype, dev)
        backward = pass_name == "fwd_bwd"
        leaves = [t.clone().requires_grad_(backward) for t in (a, b, w, bias)]
        with torch.no_grad():
            ref32 = K.outer_product_mean_reference(*(t.float() for t in (a, b, w, bias)), mask_a=mask.float(),
                                                   mask_b=mask.float(), eps=EPS)
        impls = [("foldcompile", lambda a, b, w, bias, mask=mask: ours(a, b, w, bias, mask)),
                 ("eager", lambda a, b, w, bias, mask=mask: eager_opm(a, b, w, bias, mask))]
        if compiled is not None:
            impls.append(("torch.compile", lambda a, b, w, bias, mask=mask: compiled(a, b, w, bias, mask)))
        times, rows = {}, []
        for impl, fn in impls:
            row = dict(N_res=n_res, N_seq=n_seq, impl=impl, note="", config="")
            row["pass"] = pass_name
            try:
                with torch.no_grad():
                    out = fn(*leaves)
                row["rel_err_vs_fp32"] = ((out.float() - ref32).norm() / ref32.norm()).item()
                del out
                row["ms"], row["peak_extra_MiB"], row["host_ms"] = _measure(clock, fn, leaves, backward, reps)
                times[impl] = row["ms"]
            except Exception as exc:  # noqa: BLE001 - OOM (torch.AcceleratorError too) or a compile failure: a result
                row["note"] = row_error(exc)
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
                if not smoke:
                    torch.cuda.empty_cache()
            rows.append(row)
        for row in rows:
            add_speedups(row, times)
            res.add(**row)
        if not smoke:
            breakdowns.append((f"N_res={n_res} {pass_name} foldcompile kernels", _ours_call(leaves, mask, backward)))
        # the block-size sweep: forward at the largest size, backward at the training crop
        plan = []
        if sweep and pass_name == "fwd" and n_res == sizes[-1][0]:
            plan = [("fwd", cfg) for cfg in FWD_SWEEP]
        if sweep and backward:
            plan = [("da", cfg) for cfg in DA_SWEEP] + [("dw", cfg) for cfg in DW_SWEEP]
        for kind, cfg in plan:
            row = dict(N_res=n_res, N_seq=n_seq, impl=f"foldcompile sweep {kind}", note="",
                       config=" ".join(f"{k}={v}" for k, v in cfg.items()))
            row["pass"] = pass_name
            original = _with_config(kind, cfg)
            try:
                with torch.no_grad():
                    out = ours(*[t.detach() for t in leaves], mask)
                row["rel_err_vs_fp32"] = ((out.float() - ref32).norm() / ref32.norm()).item()
                del out
                row["ms"], row["peak_extra_MiB"], row["host_ms"] = _measure(
                    clock, lambda a, b, w, bias, mask=mask: ours(a, b, w, bias, mask), leaves, backward, reps)
                add_speedups(row, times)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is a result
                row["note"] = row_error(exc)
            finally:
                K._config = original
            res.add(**row)
        del leaves, ref32, a, b, w, bias, mask
        if not smoke:
            torch._dynamo.reset()
    res.notes.append("module defaults (K._config) for c = 32, c_z = 128: " + "; ".join(
        f"{kind}: {K._config(kind, C_HIDDEN, C_HIDDEN, C_Z, n_seq)}" for kind in ("fwd", "da", "dw")))
    add_breakdown_notes(res, breakdowns)  # the profiler runs only after every timing (bench.common.kernel_breakdown)
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
        print("saved", res.save(os.path.abspath(args.out), "kernels_outer_product_mean"))


if __name__ == "__main__":
    main()
