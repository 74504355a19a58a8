"""GPU benchmark: layer norm and fused softmax kernels against eager PyTorch and torch.compile.

Shapes are AlphaFold's: the training crop (N_seq=128, N_res=256) and inference
(N_res=1024, 2048; the softmax there is one chunk of triangle attention's logits, as
AlphaFold's inference code computes it, sized to be ≥ 256 MiB). Every case runs in
bf16 and fp32, forward alone and forward+backward (gradients from
``torch.autograd.grad``, so nothing accumulates between repetitions).

Bytes counted (issue 4): one read of each input and one write of each output.
- layer norm forward: x, weight, bias read; y written. Backward: x, dy read; dx,
  dweight, dbias written (the saved fp32 mean/rstd are ignored: 8 bytes a row).
- softmax forward: x, bias, mask read at their own (broadcast) sizes; y written.
  Backward: y, dy read; dx, dbias written.
"%copy" is GB/s over the card's measured device-to-device copy bandwidth; "×eager" and
"×compile" are their time over ours (> 1: ours is faster). "err" / "eager err" are
the forwards' relative errors against the same function computed in fp32 (float64 for
fp32 inputs): ours should be no worse than 3× eager's.

Run: ``python -m bench.kernels.norm_softmax [--quick]`` from the repository root;
writes a markdown table and JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import math

import torch

from bench.common import Results, add_memory_bound_rows, compiled_or_none, copy_bandwidth_gbs
from foldcompile.kernels.layer_norm import layer_norm
from foldcompile.kernels.softmax import softmax

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"


# ----------------------------------------------------------------------------- the functions compared


def _eager_layer_norm(x, w, b):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b)


def _eager_softmax(x, bias, mask, scale):
    # The same function written plainly: fp32 scale + bias + mask, softmax, back to x's dtype.
    z = x.float() * scale + bias.float()
    return torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1).to(x.dtype)


def _ours_softmax(x, bias, mask, scale):
    return softmax(x, scale=scale, bias=bias, mask=mask)


# ----------------------------------------------------------------------------- cases


def _layer_norm_case(shape, dtype):
    c = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=True)
    el = x.element_size()
    fwd_bytes = 2 * x.numel() * el + 2 * c * el
    bwd_bytes = 3 * x.numel() * el + 2 * c * el
    inputs = (x, w, b)
    return inputs, fwd_bytes, bwd_bytes, layer_norm, _eager_layer_norm, (x, w, b)


def _softmax_case(shape, bias_shape, mask_shape, dtype):
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(bias_shape, device=DEVICE, dtype=dtype, requires_grad=True)
    mask = torch.rand(mask_shape, device=DEVICE) > 0.1
    scale = 1.0 / math.sqrt(32)
    el = x.element_size()
    fwd_bytes = 2 * x.numel() * el + bias.numel() * el + mask.numel()
    # backward: y, dy read, dx written, the bias gradient, and the mask read again (it zeroes
    # dx where masked, so a NaN row passes no gradient to masked-out entries)
    bwd_bytes = 3 * x.numel() * el + bias.numel() * el + mask.numel()
    inputs = (x, bias, mask, scale)
    return inputs, fwd_bytes, bwd_bytes, _ours_softmax, _eager_softmax, (x, bias)


def _shapes(quick: bool):
    """(kernel, label, builder(dtype)) for every benchmarked shape."""
    ln = [
        ("layer_norm", "msa [128,256,256] c=256 (train)", lambda dt: _layer_norm_case((128, 256, 256), dt)),
        ("layer_norm", "pair [256,256,128] c=128 (train)", lambda dt: _layer_norm_case((256, 256, 128), dt)),
    ]
    sm = [
        ("softmax", "msa row [128,8,256,256] bias [8,256,256] mask [128,1,1,256] (train)",
         lambda dt: _softmax_case((128, 8, 256, 256), (8, 256, 256), (128, 1, 1, 256), dt)),
        ("softmax", "tri att [256,4,256,256] bias [4,256,256] mask [256,1,1,256] (train)",
         lambda dt: _softmax_case((256, 4, 256, 256), (4, 256, 256), (256, 1, 1, 256), dt)),
    ]
    if not quick:
        ln += [
            ("layer_norm", "pair [1024,1024,128] (infer)", lambda dt: _layer_norm_case((1024, 1024, 128), dt)),
            ("layer_norm", "pair [2048,2048,128] (infer)", lambda dt: _layer_norm_case((2048, 2048, 128), dt)),
        ]
        sm += [
            ("softmax", "tri att chunk [64,4,1024,1024] bias [4,1024,1024] mask [64,1,1,1024] (infer)",
             lambda dt: _softmax_case((64, 4, 1024, 1024), (4, 1024, 1024), (64, 1, 1, 1024), dt)),
            ("softmax", "tri att chunk [16,4,2048,2048] bias [4,2048,2048] mask [16,1,1,2048] (infer)",
             lambda dt: _softmax_case((16, 4, 2048, 2048), (4, 2048, 2048), (16, 1, 1, 2048), dt)),
        ]
    return ln + sm


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _reference_output(kernel: str, inputs) -> torch.Tensor:
    """The function in fp32 (float64 for fp32 inputs), from the same inputs."""
    if kernel == "layer_norm":
        x, w, b = inputs
        ct = torch.float64 if x.dtype == torch.float32 else torch.float32
        return torch.nn.functional.layer_norm(x.detach().to(ct), (x.shape[-1],), w.detach().to(ct), b.detach().to(ct))
    x, bias, mask, scale = inputs
    ct = torch.float64 if x.dtype == torch.float32 else torch.float32
    z = x.detach().to(ct) * scale + bias.detach().to(ct)
    return torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1)


# ----------------------------------------------------------------------------- driver


def run(quick: bool = False) -> Results:
    """Benchmark both kernels at AlphaFold shapes; quick=True: training shapes in bf16 only."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench.kernels.norm_softmax needs a CUDA GPU")
    bw = copy_bandwidth_gbs()
    res = Results(
        title="Layer norm and fused softmax (scale + bias + mask) vs eager and torch.compile",
        columns=["kernel", "shape", "dtype", "pass", "ours ms", "eager ms", "compile ms", "ours GB/s",
                 "%copy", "×eager", "×compile", "ours peak MiB", "eager peak MiB", "err", "eager err"])
    res.notes.append(f"device-to-device copy bandwidth measured: {bw:.0f} GB/s")
    res.notes.append("bytes: one read of each input + one write of each output; fwd+bwd counts both passes")
    res.notes.append("×eager / ×compile: their time over ours (> 1 means ours is faster)")
    dtypes = ["bf16"] if quick else ["bf16", "fp32"]
    for kernel, label, build in _shapes(quick):
        for dname in dtypes:
            torch.cuda.empty_cache()
            inputs, fwd_bytes, bwd_bytes, ours, eager, grad_of = build(_DTYPES[dname])
            compiled = compiled_or_none(eager)
            with torch.no_grad():
                ref = _reference_output(kernel, inputs)
                err = _rel_err(ours(*inputs), ref)
                eager_err = _rel_err(eager(*inputs), ref)
                del ref
            out_example = ours(*inputs)
            dy = torch.randn_like(out_example)
            del out_example

            def fwd(fn):
                return lambda: fn(*inputs)

            def fwd_bwd(fn):
                return lambda: torch.autograd.grad(fn(*inputs), grad_of, dy)

            passes = (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, fwd_bytes + bwd_bytes))
            add_memory_bound_rows(res, {"kernel": kernel, "shape": label, "dtype": dname}, passes, ours, eager,
                                  compiled, bw, {"err": err, "eager err": eager_err})
            del inputs, dy, grad_of, compiled
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="training shapes, bf16 only (< 1 minute)")
    parser.add_argument("--out", default="bench/results", help="directory for the markdown/JSON tables")
    args = parser.parse_args()
    res = run(quick=args.quick)
    print(res.markdown())
    print("saved", res.save(args.out, "norm_softmax"))


if __name__ == "__main__":
    main()
