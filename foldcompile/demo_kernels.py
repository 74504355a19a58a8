"""The demo's kernel section: each fused kernel on an AlphaFold-shaped input against its reference.

On a GPU the Triton kernels run (fp32 and bf16); on a CPU they run through Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before start-up, else the plain-PyTorch
references run and the section says so. Every line reports which path ran (from the
kernels' launch record, not from a guess) and the error against the float64 reference.
"""
from __future__ import annotations

from typing import Callable

import torch

from foldcompile.kernels import (attention, attention_reference, fuse_elementwise, layer_norm, layer_norm_reference,
                                 record_launches, softmax, softmax_reference)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _cases(device: str, dtype: torch.dtype, n: int) -> list[tuple[str, Callable, Callable]]:
    """(name, kernel call, float64 reference call) on inputs shaped like an Evoformer block's."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    c_z, heads, d = 16, 4, 8
    z, w, b = rand(n, n, c_z), rand(c_z), rand(c_z)
    logits, pair_bias = rand(n, heads, n, n), rand(heads, n, n)
    key_mask = torch.rand(n, 1, 1, n, generator=g).to(device) > 0.2
    q, k, v, gate = rand(n, heads, n, d), rand(n, heads, n, d), rand(n, heads, n, d), rand(n, heads, n, d)
    tri_bias = rand(1, heads, n, n)
    update, bias_vec, residual = rand(n, n, c_z), rand(c_z), rand(n, n, c_z)
    gated_residual = fuse_elementwise(lambda x, bias, r: r + torch.sigmoid(x + bias) * x,
                                      [update, bias_vec, residual], name="gated_bias_residual")

    def d64(*ts):
        return [t.double() if t.is_floating_point() else t for t in ts]

    return [
        ("layer_norm       z [N,N,c_z]", lambda: layer_norm(z, w, b),
         lambda: layer_norm_reference(*d64(z, w, b))),
        ("softmax + bias + key mask", lambda: softmax(logits, bias=pair_bias, mask=key_mask, scale=0.35),
         lambda: softmax_reference(*d64(logits), bias=pair_bias.double(), mask=key_mask, scale=0.35)),
        ("triangle attention (bias, mask, gate)",
         lambda: attention(q, k, v, bias=tri_bias, mask=key_mask, gate=gate),
         lambda: attention_reference(*d64(q, k, v), bias=tri_bias.double(), mask=key_mask, gate=gate.double())),
        ("fused r + sigmoid(x + b) * x", lambda: gated_residual(update, bias_vec, residual),
         lambda: gated_residual.reference(*d64(update, bias_vec, residual))),
    ]


def demo_kernels(device: str, n: int = 13) -> bool:
    """Print one line per kernel: the path that ran and its error; True when all are within bounds."""
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    bounds = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # tf32 products on the GPU; bf16 rounding
    print(f"\n== kernels on {device} (N={n}), against a float64 reference:")
    ok, any_reference = True, False
    with torch.no_grad():
        for dtype in dtypes:
            for name, run, ref in _cases(device, dtype, n):
                with record_launches() as launched:
                    got = run()
                path = ("triton " + ("(cuda)" if device == "cuda" else "(interpreter)")) if launched \
                    else "reference"
                any_reference |= not launched
                err = _rel_err(got, ref())
                good = err <= bounds[dtype]
                ok &= good
                print(f"   {name:40s} {str(dtype).replace('torch.', ''):9s} {path:20s} rel err {err:.1e}"
                      f"{'' if good else '  TOO LARGE'}")
    if any_reference:
        print("   (no GPU: 'reference' means the plain-PyTorch path; run with TRITON_INTERPRET=1 to execute"
              " the Triton kernels through Triton's interpreter)")
    return ok
