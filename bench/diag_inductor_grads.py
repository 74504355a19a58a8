"""Which parameter gradients does the Inductor executor get wrong on CUDA, and under which setting?

On an H200 (2026-12-02) ``optimize(block, executor="inductor")`` trained with parameter gradients
1.3 off (relative) in both Inductor modes, while the same executor on CPU matches eager. This
script names the wrong gradients and reruns the same program under settings that isolate a cause:
``aot_eager`` (AOTAutograd without Inductor's code generation), Inductor with comprehensive
padding off (Inductor pads strides on CUDA), and Inductor with the library ops' inputs forced
contiguous. One command on the GPU:

    python -m bench.diag_inductor_grads [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import foldcompile
from foldcompile.executors.inductor import InductorExecutor
from foldcompile.models import zoo
from foldcompile.models.alphafold2.evoformer import EvoformerBlock


def _loss(out) -> torch.Tensor:
    total = 0.0
    for o in torch.utils._pytree.tree_leaves(out):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            g = torch.Generator(device=o.device).manual_seed(o.numel())
            total = total + (o.double() * torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float64)).sum()
    return total


def _grads(model, fn, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _loss(fn(*inputs)).backward()
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import torch._inductor.config as ic

    torch.manual_seed(0)
    _, inputs = zoo.get("evoformer_block", n_seq=7, n_res=19)
    kw = zoo._evoformer_kwargs("tiny")
    kw.update(c_hidden_msa_att=8, c_hidden_pair_att=8)  # head dim 8: every attention fuses (the GPU test's block)
    model = EvoformerBlock(**kw).cuda().eval()
    inputs = tuple(x.cuda() for x in inputs)
    eager = foldcompile.optimize(model, *inputs, executor="eager")
    variant = eager.variant_for(*inputs)
    rows = []
    settings = [("inductor", {}), ("aot_eager", {}), ("inductor", {"comprehensive_padding": False}),
                ("inductor", {"comprehensive_padding": False, "pad_outputs": False})]
    for backend, patch in settings:
        torch._dynamo.reset()
        with ic.patch(patch):
            run = InductorExecutor(variant.graph, requested="inductor", reason="diagnostic", mode=None,
                                   backend=backend)
            for step in range(3):  # new feature values each step, masks kept (the GPU test's sequence)
                g = torch.Generator(device="cuda").manual_seed(step)
                b = tuple(torch.randn(x.shape, generator=g, device="cuda", dtype=x.dtype) if i < 2 else x
                          for i, x in enumerate(inputs))
                want = _grads(model, eager, b)
                try:
                    got = _grads(model, lambda *a: run(a, {}), b)
                except Exception as e:  # noqa: BLE001 - a setting that does not compile is a finding too
                    rows.append({"backend": backend, "patch": patch, "step": step,
                                 "error": f"{type(e).__name__}: {e}"[:300]})
                    break
                bad = {n: round(_rel(got[n], want[n]), 4) for n in want if _rel(got[n], want[n]) > 1e-4}
                rows.append({"backend": backend, "patch": patch, "step": step, "fell_back": run.fallback, "wrong": bad})
                print(backend, patch, "step", step, "fallback" if run.fallback else "", len(bad), "wrong:",
                      dict(list(bad.items())[:12]), flush=True)
    with open(os.path.join(args.out, "diag_inductor_grads.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
