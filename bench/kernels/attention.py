"""GPU benchmark: flash-style attention with pair bias, mask and gate.

Compares ``foldcompile.kernels.attention`` with eager PyTorch (the AlphaFold way:
materialised logits), ``torch.compile`` of that eager code, PyTorch SDPA with a
float bias, and ``trifast`` (triangle attention only, when importable), in bf16
and fp32, at AlphaFold shapes:

- triangle attention, 4 heads x 32: ``q/k/v [N_res, 4, N_res, 32]``, pair bias
  ``[1, 4, N_res, N_res]`` (in the input dtype, as a bf16 model makes it), key mask
  ``[N_res, 1, 1, N_res]``, ungated, at the training crop N_res=256 and inference
  N_res=1024, 2048 (fp32 at the training crop only);
- MSA row attention at the training crop (N_seq=128, N_res=256), 8 heads x 32,
  pair bias ``[1, 8, 256, 256]``, key mask, gate;
- MSA column attention at the training crop, 8 heads x 32, ``[256, 8, 128, 32]``,
  key mask, gate, no bias.

Each row gives forward and forward+backward time (backward = every input gradient:
dq, dk, dv, dbias, dgate), TFLOP/s (forward 4·B·H·Q·K·D FLOPs, forward+backward
3.5x that, the flash-attention convention), peak extra memory (peak allocated
during the call minus its outputs and gradient buffers), and speed-ups against
eager. SDPA gets the pair bias as a float ``attn_mask`` but not the key mask
(adding it would materialise a [B, H, Q, K] mask): a lower bound on its cost, as
the issue's peer numbers were taken.

fp16 rows (triangle attention at the training crop and at N_res=1024) also time
``foldcompile_ds_fp16``: the same kernels with the backward's dS rounded to fp16 before the
dq / dk products, as before the fix that keeps it in fp32 (``kernels/attention.py``,
``_FP16_DS_IN_FP32``), so the two rows give the cost of that fix.

Run from the repository root: ``python -m bench.kernels.attention [--quick | --fp16-ds]``
(``--fp16-ds``: only the fp16 rows).
"""
from __future__ import annotations

import argparse
import os
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

import contextlib
import importlib

from bench.common import Results, kernel_breakdown, measure_call
from foldcompile.kernels.attention import attention

_attn_mod = importlib.import_module("foldcompile.kernels.attention")  # the module, not the function


@contextlib.contextmanager
def _fp16_ds(in_fp32: bool):
    """Run the fp16 backward with dS in fp32 (the default) or rounded to fp16 (the old path)."""
    before = _attn_mod._FP16_DS_IN_FP32
    _attn_mod._FP16_DS_IN_FP32 = in_fp32
    try:
        yield
    finally:
        _attn_mod._FP16_DS_IN_FP32 = before

COLUMNS = ["case", "dtype", "impl", "fwd_ms", "fwd_host_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
           "peak_extra_MiB",
           "fwd_speedup_vs_eager", "fwd_bwd_speedup_vs_eager", "note"]


def _eager(q, k, v, bias, mask, gate):
    """AlphaFold-style attention in the input dtype: materialised logits, softmax, gate."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, -1e9)
    o = torch.matmul(torch.softmax(s, dim=-1), v)
    return o * torch.sigmoid(gate) if gate is not None else o


def _sdpa(q, k, v, bias, mask, gate):
    """SDPA with the pair bias as a float attn_mask (key mask only when there is no bias)."""
    if bias is not None:
        attn_mask = bias.to(q.dtype).expand(q.shape[:-1] + (k.shape[-2],))
    else:
        attn_mask = mask
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return o * torch.sigmoid(gate) if gate is not None else o


def _ours(q, k, v, bias, mask, gate):
    return attention(q, k, v, bias=bias, mask=mask, gate=gate)


_compiled: dict = {}


def _compiled_eager(q, k, v, bias, mask, gate):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_eager, dynamic=False)
    return _compiled["fn"](q, k, v, bias, mask, gate)


def _trifast_fn():
    """trifast's triangle_attention, or None when the package is absent."""
    try:
        from trifast import triangle_attention  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return triangle_attention


def _make_case(name: str, dtype: torch.dtype, dev: str):
    """Inputs for one benchmark case, all requiring grad except the mask."""
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dt=dtype: torch.randn(*s, device=dev, dtype=dt, generator=g).requires_grad_()  # noqa: E731
    if name.startswith("triangle"):
        n = int(name.split("_")[1])
        B, H, Q, K, D = n, 4, n, n, 32
        q, k, v = rnd(B, H, Q, D), rnd(B, H, K, D), rnd(B, H, K, D)
        bias = rnd(1, H, Q, K)
        mask = torch.rand(B, 1, 1, K, device=dev, generator=g) > 0.1
        gate = None
    elif name == "msa_row_128x256":
        B, H, Q, K, D = 128, 8, 256, 256, 32
        q, k, v = rnd(B, H, Q, D), rnd(B, H, K, D), rnd(B, H, K, D)
        bias = rnd(1, H, Q, K)
        mask = torch.rand(B, 1, 1, K, device=dev, generator=g) > 0.1
        gate = rnd(B, H, Q, D)
    elif name == "msa_col_128x256":
        B, H, Q, K, D = 256, 8, 128, 128, 32
        q, k, v = rnd(B, H, Q, D), rnd(B, H, K, D), rnd(B, H, K, D)
        bias = None
        mask = torch.rand(B, 1, 1, K, device=dev, generator=g) > 0.1
        gate = rnd(B, H, Q, D)
    else:
        raise ValueError(f"unknown case {name}")
    return dict(q=q, k=k, v=v, bias=bias, mask=mask, gate=gate), (B, H, Q, K, D)


def _trifast_inputs(inputs: dict):
    """The same triangle attention in trifast's layout: q/k/v [1, H, N, N, D], bias [1, H, N, N],
    mask [1, N, N] with True = masked out."""
    q, k, v, bias, mask = (inputs[n] for n in ("q", "k", "v", "bias", "mask"))
    t = lambda x: x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_()  # noqa: E731
    tq, tk, tv = t(q), t(k), t(v)
    tb = bias.detach().to(q.dtype).contiguous().requires_grad_()
    tm = (~mask[:, 0, 0, :]).unsqueeze(0).expand(1, mask.shape[0], mask.shape[-1]).contiguous()
    return dict(q=tq, k=tk, v=tv, bias=tb, mask=tm)


def _leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for n, t in inputs.items() if n != "mask" and t is not None]


def _measure(fn: Callable, inputs: dict, backward: bool, reps: int) -> tuple[float, int, float]:
    """(median ms, peak extra bytes, host ms per call) of one forward (and backward) call.

    The output gradient is allocated before the measured call: peak extra memory is
    peak - inputs - output - gradient buffers, as the issue defines it. Host time: forward only
    (if it is close to the GPU time, launches dominate)."""
    return measure_call(lambda: fn(**inputs), _leaves(inputs), backward, reps, dout=torch.ones_like,
                        host=not backward)


def _fwd_bwd_call(fn: Callable, inputs: dict) -> Callable[[], None]:
    """One forward+backward call (the upstream gradient made once, outside the call)."""
    leaves = _leaves(inputs)
    with torch.no_grad():
        dout = torch.ones_like(fn(**inputs))

    def call():
        torch.autograd.grad(fn(**inputs), leaves, dout)
    return call


def _eager_fits(dims, dtype) -> bool:
    """Eager fwd+bwd keeps ~4 logits-sized tensors; skip where they cannot fit the card."""
    B, H, Q, K, _ = dims
    logits = B * H * Q * K * torch.tensor([], dtype=dtype).element_size()
    return 4 * logits < 0.6 * torch.cuda.get_device_properties(0).total_memory


def run(quick: bool = False, fp16_ds_only: bool = False) -> Results:
    """Benchmark every implementation on every case; returns the results table."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench.kernels.attention needs a CUDA GPU")
    dev = "cuda"
    res = Results("attention (pair bias, mask, gate): foldcompile vs eager, torch.compile, SDPA, trifast", COLUMNS)
    trifast = _trifast_fn()
    res.notes.append("trifast: " + ("imported" if trifast is not None else "not importable here; skipped"))
    res.notes.append("Biases are in the input dtype (bf16 in a bf16 model, as trifast and SDPA take them); the "
                     "kernel adds them in fp32. fwd_host_ms = host time per forward call (launch-bound when close "
                     "to fwd_ms).")
    res.notes.append("SDPA gets the pair bias as float attn_mask but not the key mask (a lower bound on its cost); "
                     "for MSA column attention (no bias) it gets the boolean key mask.")
    res.notes.append("fwd FLOPs = 4*B*H*Q*K*D; fwd+bwd FLOPs = 3.5x that. peak_extra = peak allocated during the call "
                     "minus its output and gradient buffers.")
    res.notes.append("targets (H100, triangle N_res=1024 bf16 ungated): fwd <= 3.5 ms, fwd+bwd <= 15 ms, peak extra < "
                     "256 MiB; MSA row/col at the training crop faster than SDPA and torch.compile.")
    # Measured on an H100 (2026-11-27) before trimming: the first full plan (adding fp32 at
    # N_res >= 1024) ran past 285 s and quick (4 bf16 cases) took ~80 s, about a third of
    # it compiling autotune candidates (3 flag combinations x 14 configs per dtype) on a
    # fresh machine; Triton's disk cache makes reruns faster.
    if quick:
        plan = [("triangle_1024", torch.bfloat16), ("msa_row_128x256", torch.bfloat16)]
        compile_cases = {"msa_row_128x256"}
    else:
        plan = [(c, torch.bfloat16) for c in ("triangle_256", "msa_row_128x256", "msa_col_128x256",
                                              "triangle_1024", "triangle_2048")]
        # fp32 at the training crop only: at N_res >= 1024 fp32 is a correctness mode (IEEE
        # dots unless TF32 is allowed), 40 ms forward / 260 ms forward+backward at 1024.
        plan += [(c, torch.float32) for c in ("triangle_256", "msa_row_128x256", "msa_col_128x256")]
    if not quick:
        # fp16: the cost of keeping dS in fp32 (row foldcompile vs foldcompile_ds_fp16).
        plan += [("triangle_256", torch.float16), ("triangle_1024", torch.float16)]
    if not quick:
        # torch.compile only where its compile time is worth it: at the training crop (at
        # N_res >= 1024 the eager graph it compiles needs tens of GB of logits anyway).
        compile_cases = {"triangle_256", "msa_row_128x256", "msa_col_128x256"}
    if fp16_ds_only:
        plan = [("triangle_256", torch.float16), ("triangle_1024", torch.float16)]
        compile_cases = set()
    reps = 5 if quick else 10
    for case, dtype in plan:
        torch.cuda.empty_cache()
        inputs, dims = _make_case(case, dtype, dev)
        B, H, Q, K, D = dims
        flops = 4 * B * H * Q * K * D
        impls: list[tuple[str, Callable, dict]] = [("foldcompile", _ours, inputs)]
        if dtype == torch.float16:
            impls.append(("foldcompile_ds_fp16", _ours, inputs))
        fits = _eager_fits(dims, dtype)
        if fits:
            impls.append(("eager", _eager, inputs))
            if case in compile_cases:
                impls.append(("torch.compile", _compiled_eager, inputs))
        impls.append(("sdpa_float_bias", _sdpa, inputs))
        if case.startswith("triangle") and trifast is not None:
            tf_in = _trifast_inputs(inputs)
            impls.append(("trifast", lambda q, k, v, bias, mask: trifast(q, k, v, bias, mask), tf_in))
        eager_ms: dict[str, float] = {}
        for impl, fn, args in impls:
            row = dict(case=case, dtype=str(dtype).replace("torch.", ""), impl=impl)
            notes = []
            for key, backward in (("fwd", False), ("fwd_bwd", True)):
                try:
                    with _fp16_ds(impl != "foldcompile_ds_fp16"):
                        ms, extra, host_ms = _measure(fn, args, backward, reps)
                except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking
                    notes.append(f"{key} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
                    torch.cuda.empty_cache()
                    continue
                row[f"{key}_ms"] = ms
                row[f"{key}_tflops"] = (flops * (3.5 if backward else 1.0)) / (ms * 1e-3) / 1e12
                if backward:
                    row["peak_extra_MiB"] = extra / 2**20
                else:
                    row["fwd_host_ms"] = host_ms
                if impl == "eager":
                    eager_ms[key] = ms
                if key in eager_ms:
                    row[f"{key}_speedup_vs_eager"] = eager_ms[key] / ms
            if impl == "foldcompile" and case == "triangle_1024":
                try:
                    breakdown = kernel_breakdown(_fwd_bwd_call(fn, args))
                    res.notes.append(f"{case} {row['dtype']} foldcompile kernels (fwd+bwd): {breakdown}")
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"profiler failed: {exc}")
            if impl == "foldcompile" and not fits:
                notes.append("eager/compile skipped: logits do not fit")
            row["note"] = "; ".join(notes)
            res.add(**row)
        # foldcompile was timed before eager: fill in its speed-up now.
        for row in res.rows:
            mine = row["case"] == case and row["dtype"] == str(dtype).replace("torch.", "")
            if mine and row["impl"] in ("foldcompile", "foldcompile_ds_fp16"):
                for key in ("fwd", "fwd_bwd"):
                    if key in eager_ms and f"{key}_ms" in row:
                        row[f"{key}_speedup_vs_eager"] = eager_ms[key] / row[f"{key}_ms"]
        del inputs, impls
        _compiled.clear()
        torch._dynamo.reset()  # each case is a new graph: don't run into Dynamo's recompile limit
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fp16-ds", action="store_true", help="only the fp16 rows: the cost of dS in fp32")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = parser.parse_args()
    res = run(quick=args.quick, fp16_ds_only=args.fp16_ds)
    print(res.markdown())
    print("saved", res.save(os.path.abspath(args.out), "attention"))


if __name__ == "__main__":
    main()
