"""GPU benchmark: the layer norm -> projections kernel in bf16-mixed precision (``product_dtype``), as Boltz-2 runs.

fp32 residual stream and fp32 parameters, ``torch.autocast("cuda", bfloat16)``: eager runs the layer norm in fp32
(``N²·c`` fp32 read and written), casts its output to bf16 (read fp32, write bf16), casts every weight and bias to
bf16 per call and runs cuBLAS bf16 linears. Ours: ``layer_norm_linear(z, ..., product_dtype=bfloat16)`` reads z
once in fp32 and the fp32 weights, writes the bf16 projections. Shapes: the pair ``[N, N, 128]`` at N = 256 and
768 -> the triangle attention's 5 projections (q, k, v, gate 4 x 128 and the 4-head pair bias) and the triangle
multiplication's 4 x 128 input projections. Forward, and forward + backward (z, every parameter). Prints one
line per row: eager-autocast ms, ours ms, speed-up, and our outputs' error relative to eager's.

Run from the repository root on a GPU: ``python -m bench.kernels.ln_linear_mixed``.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from bench.common import time_ms

L = importlib.import_module("foldcompile.kernels.ln_linear")


def _module(k: int, widths: tuple[int, ...]) -> nn.ModuleList:
    return nn.ModuleList([nn.LayerNorm(k), *(nn.Linear(k, n, bias=i == len(widths) - 1) for i, n in
                                             enumerate(widths))]).cuda()


def _eager(m: nn.ModuleList, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.autocast("cuda", torch.bfloat16):
        y = m[0](z)
        return tuple(lin(y) for lin in m[1:])


def _ours(m: nn.ModuleList, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return L.layer_norm_linear(z, m[0].weight, m[0].bias, [lin.weight for lin in m[1:]],
                               [lin.bias for lin in m[1:]], eps=m[0].eps, product_dtype=torch.bfloat16)


def main() -> None:
    torch.manual_seed(0)
    for n in (256, 768):
        for name, widths in (("tri_attn q,k,v,g,bias", (128, 128, 128, 128, 4)), ("tri_mult p_in,g_in", (256, 256))):
            m = _module(128, widths)
            z = torch.randn(1, n, n, 128, device="cuda").requires_grad_()
            params = list(m.parameters())
            ref, got = _eager(m, z), _ours(m, z)
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref))
            for backward in (False, True):
                def step(fn=None):
                    outs = fn(m, z)
                    if backward:
                        torch.autograd.grad(sum(o.float().sum() for o in outs), [z, *params])
                te = time_ms(lambda: step(_eager))
                to = time_ms(lambda: step(_ours))
                print(f"N={n} {name:24s} {'fwd+bwd' if backward else 'fwd':8s} eager-autocast {te:8.3f} ms  ours "
                      f"{to:8.3f} ms  x{te / to:5.2f}  rel err vs eager {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
