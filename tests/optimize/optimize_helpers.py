"""Shared checks for the optimize tests: optimized == eager on outputs and every gradient."""
from __future__ import annotations

from typing import Any

import torch

import foldcompile
from foldcompile.verify import same_masks


def flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in flat(v)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in flat(x[k])]
    return []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 over the finite entries; NaN positions must agree exactly."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN positions differ"
    keep = ~torch.isnan(b)
    a, b = a[keep], b[keep]
    denom = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / denom if denom else num


def outputs_and_grads(module: torch.nn.Module, params: list[torch.nn.Parameter], inputs: tuple,
                      seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and the gradients of a fixed random projection of them w.r.t. ``params`` and float inputs."""
    torch.manual_seed(seed)  # the same torch dropout masks for both runs (unfused dropouts)
    outs = flat(module(*inputs))
    gen = torch.Generator().manual_seed(1234)
    loss = sum((o.nan_to_num() * torch.randn(o.shape, generator=gen)).sum() for o in outs if o.is_floating_point())
    leaves = params + [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    return [o.detach() for o in outs], [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]


def kernel_draws_masks(fast: Any, inputs: tuple) -> bool:
    """Whether the variant ``fast`` runs for ``inputs`` has a generated kernel drawing dropout masks."""
    if not hasattr(fast, "variant_for"):  # not an OptimizedModule (torch.compile's): compared as it is
        return False
    graph = fast.variant_for(*inputs).graph
    return any(n.meta.get("dropout_masks") for sub in graph.modules() if isinstance(sub, torch.fx.GraphModule)
               for n in sub.graph.nodes)


def assert_same_function(model: torch.nn.Module, inputs: tuple, fast: torch.nn.Module | None = None,
                         tol: float = 1e-5, grads: bool = True) -> float:
    """optimized(model) == model on ``inputs``: every output and every gradient (parameters and
    inputs that require grad) within ``tol`` of eager fp32, relative to ``‖ref‖ + floor`` where the
    floor is the model's RMS gradient magnitude times ``sqrt(numel)``: a gradient that is zero in
    exact arithmetic (a bias feeding only logits along a softmax axis: softmax is shift invariant)
    is pure rounding noise in fp32, and a plain relative error of noise says nothing. Training mode
    is compared exactly: unfused dropouts run on torch's generator, seeded alike for both runs; when
    kernels draw dropout masks themselves, the reference is the traced graph with the kernels' masks
    (``foldcompile.verify.same_masks``) against the optimized graph.
    Returns the worst plain relative error over outputs and the gradients above the floor."""
    fast = fast if fast is not None else foldcompile.optimize(model, *inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    reference, optimized = model, fast
    if model.training and kernel_draws_masks(fast, inputs):
        fast(*inputs)  # the optimized module's own call runs too
        reference, optimized = same_masks(fast, *inputs)
    if grads and torch.is_grad_enabled():
        o_ref, g_ref = outputs_and_grads(reference, params, inputs)
        o_got, g_got = outputs_and_grads(optimized, params, inputs)
    else:
        torch.manual_seed(0)
        o_ref = flat(model(*inputs))
        torch.manual_seed(0)
        o_got = flat(fast(*inputs))
        g_ref = g_got = []
    assert len(o_ref) == len(o_got)
    worst = 0.0
    for i, (a, b) in enumerate(zip(o_got, o_ref)):
        e = rel(a, b)
        assert e <= tol, f"output {i}: relative error {e:.3g} > {tol}"
        worst = max(worst, e)
    if g_ref:
        total = sum(g.double().square().sum().item() for g in g_ref)
        rms = (total / max(1, sum(g.numel() for g in g_ref))) ** 0.5
    for i, (a, b) in enumerate(zip(g_got, g_ref)):
        diff = torch.linalg.vector_norm((a - b).double()).item()
        ref = torch.linalg.vector_norm(b.double()).item()
        floor = rms * b.numel() ** 0.5
        assert diff <= tol * (ref + floor), (f"gradient {i}: error {diff:.3g} > {tol} x (|ref| {ref:.3g} + "
                                            f"floor {floor:.3g})")
        if ref > floor:
            worst = max(worst, diff / ref)
    return worst
