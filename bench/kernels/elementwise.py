"""GPU benchmark: generated element-wise fusions against eager PyTorch and torch.compile.

Two AlphaFold fragments, each fused into one generated kernel by
``foldcompile.kernels.elementwise.fuse_elementwise``:

- bias + row-wise dropout + residual: ``r + dropout(x + b, p=0.15, shared over dim -3)``,
  as every Evoformer sub-block ends (bias of the output projection, DropoutRowwise,
  residual add). Eager writes it as AlphaFold code does: a dropout of a ones tensor of
  the mask's shape, multiplied in (``r + (x + b) * F.dropout(ones(mask_shape), p)``).
- sigmoid gating: ``torch.sigmoid(g) * x`` (triangle multiplication, attention gates).

Shapes: the training crop's MSA [N_seq=128, N_res=256, c_m=256] and pair
[N_res=256, 256, c_z=128], and the inference pair [1024, 1024, 128] (full runs only).
Every case runs in bf16 and fp32 (quick: bf16, the MSA shape for bias+dropout+residual and
the pair shape for gating), forward alone and
forward+backward (``torch.autograd.grad``, so nothing accumulates between repetitions).

Bytes counted: one read of each input and one write of each output, at their own sizes
(the dropout mask is generated in registers, not read). Forward, bias+dropout+residual:
x, r, b read, out written; backward: dy read, dx, dr, db written. Sigmoid gating
forward: g, x read, out written; backward: g, x, dy read, dg, dx written.
"%copy" is GB/s over the card's measured device-to-device copy bandwidth; "×eager" and
"×compile" are their time over ours (> 1: ours is faster). "err" is our forward's
relative error against the same fragment in float64 (identical dropout mask).

Run: ``python -m bench.kernels.elementwise [--quick]`` from the repository root;
writes a markdown table and JSON to bench/results/.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import Results, add_memory_bound_rows, compiled_or_none, copy_bandwidth_gbs
from foldcompile.kernels.elementwise import FusedElementwise, dropout, fuse_elementwise

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"
P_DROP = 0.15


# ----------------------------------------------------------------------------- the functions compared


def _bias_dropout_residual(x, b, r):
    return r + dropout(x + b, P_DROP, shared_dims=(-3,))


def _eager_bias_dropout_residual(x, b, r):
    # AlphaFold's DropoutRowwise: one mask of shape [1, N, c], broadcast over the rows.
    mask = F.dropout(x.new_ones((1,) + tuple(x.shape[1:])), P_DROP, training=True)
    return r + (x + b) * mask


def _gating(g, x):
    return torch.sigmoid(g) * x


# ----------------------------------------------------------------------------- cases


def _bdr_case(shape, dtype):
    c = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=True)
    r = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    el = x.element_size()
    fwd_bytes = 3 * x.numel() * el + c * el
    bwd_bytes = 3 * x.numel() * el + c * el
    return (x, b, r), fwd_bytes, bwd_bytes, _bias_dropout_residual, _eager_bias_dropout_residual


def _gating_case(shape, dtype):
    g = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    el = x.element_size()
    return (g, x), 3 * x.numel() * el, 5 * x.numel() * el, _gating, _gating


def _shapes(quick: bool):
    """(fragment, label, builder(dtype)) for every benchmarked shape."""
    train = [
        ("msa [128,256,256] (train)", (128, 256, 256)),
        ("pair [256,256,128] (train)", (256, 256, 128)),
    ]
    infer = [("pair [1024,1024,128] (infer)", (1024, 1024, 128))]
    # quick: one shape a fragment, so only two torch.compile builds run (each takes seconds).
    bdr_shapes = train[:1] if quick else train + infer
    gate_shapes = train[1:] if quick else train + infer
    cases = [("bias+dropout+residual", label, (lambda s: lambda dt: _bdr_case(s, dt))(s)) for label, s in bdr_shapes]
    cases += [("sigmoid gating", label, (lambda s: lambda dt: _gating_case(s, dt))(s)) for label, s in gate_shapes]
    return cases


def _rel_err(fused: FusedElementwise, inputs, seed: int) -> float:
    with torch.no_grad():
        out = fused(*inputs, seed=seed, offset=0).double()
        ref = fused.reference(*[t.detach().double() for t in inputs], seed=seed, offset=0)
    return ((out - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------- driver


def run(quick: bool = False) -> Results:
    """Benchmark both fragments at AlphaFold shapes; quick=True: one training shape each, bf16 only."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench.kernels.elementwise needs a CUDA GPU")
    bw = copy_bandwidth_gbs()
    res = Results(
        title="Generated element-wise fusions (bias+dropout+residual, sigmoid gating) vs eager and torch.compile",
        columns=["fragment", "shape", "dtype", "pass", "ours ms", "eager ms", "compile ms", "ours GB/s",
                 "%copy", "×eager", "×compile", "ours peak MiB", "eager peak MiB", "err"])
    res.notes.append(f"device-to-device copy bandwidth measured: {bw:.0f} GB/s")
    res.notes.append("bytes: one read of each input + one write of each output; fwd+bwd counts both passes; "
                     "the dropout mask is generated in the kernel and not counted")
    res.notes.append("×eager / ×compile: their time over ours (> 1 means ours is faster)")
    res.notes.append("our backward writes a broadcast input's gradient (the bias) at full size in fp32 and "
                     "sums it with torch.sum: that extra traffic is inside 'ours ms' but not in the byte count")
    dtypes = ["bf16"] if quick else ["bf16", "fp32"]
    fused_cache: dict[str, FusedElementwise] = {}
    for fragment, label, build in _shapes(quick):
        for dname in dtypes:
            torch.cuda.empty_cache()
            inputs, fwd_bytes, bwd_bytes, fn, eager = build(_DTYPES[dname])
            if fragment not in fused_cache:
                fused_cache[fragment] = fuse_elementwise(fn, name=fragment.replace("+", "_").replace(" ", "_"))
            fused = fused_cache[fragment]
            compiled = compiled_or_none(eager)
            err = _rel_err(fused, inputs, seed=17)
            dy = torch.randn_like(fused(*inputs, seed=17))

            def ours(*args):
                return fused(*args, seed=17, offset=0)

            def fwd(f):
                return lambda: f(*inputs)

            def fwd_bwd(f):
                return lambda: torch.autograd.grad(f(*inputs), inputs, dy)

            passes = (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, fwd_bytes + bwd_bytes))
            add_memory_bound_rows(res, {"fragment": fragment, "shape": label, "dtype": dname}, passes, ours, eager,
                                  compiled, bw, {"err": err})
            del inputs, dy, compiled
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one training shape a fragment, bf16 only (< 1 minute)")
    parser.add_argument("--out", default="bench/results", help="directory for the markdown/JSON tables")
    args = parser.parse_args()
    res = run(quick=args.quick)
    print(res.markdown())
    print("saved", res.save(args.out, "elementwise"))


if __name__ == "__main__":
    main()
