"""The executors on the GPU (``-m gpu``; skipped without CUDA): CUDA-graph training safety, bf16
fidelity of every executor, and ``torch.compile(backend="foldcompile")``.

CUDA-graph training safety: each case runs the same model through ``executor="eager"`` and
``executor="cuda_graph"`` (the same parameters, one after the other) and compares outputs and
gradients. Models in eval mode (no dropout) and fp32, where both executors run the same kernels
on the same inputs: they must agree to rounding (1e-5 relative), and they do exactly unless a
GEMM picks another algorithm on the capture stream. Every case first runs two calls (the watched
eager call and the capture), so what it checks runs on replays; each asserts that replays ran.

- gradient accumulation over micro-batches, outputs of earlier calls not overwritten;
- two forwards before one backward (a second graph pair), backwards in either order;
- AlphaFold-style recycling: outputs fed back in as inputs under no_grad, the last iteration with
  grad; and with grad through every iteration;
- an optimizer step between calls (a training loop), parameters replaced in memory (``.data =``);
- dropout: each replay draws new masks (the generator advances) and the backward replay uses the
  forward replay's mask;
- refusals: a second backward through one forward, a parameter changed between forward and backward.

bf16 fidelity: for each zoo model and executor, the optimized bf16 error against float64 (same
parameters, same inputs) is at most 3x eager bf16's own error (+1e-3), outputs and gradients.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import foldcompile
from foldcompile.models import zoo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "optimize"))
sys.path.insert(0, os.path.dirname(__file__))
import executor_scenarios as S  # noqa: E402
from optimize_helpers import flat, rel  # noqa: E402
from test_zoo_optimize import _h8  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = 1e-5


def _to_cuda(model: torch.nn.Module, inputs: tuple, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple]:
    model = model.to("cuda", dtype)
    return model, tuple(x.to("cuda", dtype) if x.is_floating_point() else x.to("cuda") for x in inputs)


def _block(name: str = "evoformer_block", dtype: torch.dtype = torch.float32, **sizes):
    model, inputs = _h8(name, **({"n_seq": 7, "n_res": 19} if name == "evoformer_block" else {"n_res": 19}) | sizes)
    return _to_cuda(model.eval(), inputs, dtype)


def _fresh(inputs: tuple, seed: int) -> tuple:
    """The same call with new values in the first two (feature) inputs; masks kept."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g, device="cuda", dtype=x.dtype) if i < 2 else x
                 for i, x in enumerate(inputs))


def _loss(out) -> torch.Tensor:
    """A fixed random projection of every output (the same weights for the same shape), in float64."""
    return S.projection_loss(out, device="cuda", dtype=torch.float64)


def _pair(model: torch.nn.Module, inputs: tuple):
    """The model optimized twice: eager and CUDA-graph executors, both warmed (watched call, capture)."""
    eager = foldcompile.optimize(model, *inputs, executor="eager")
    graphed = foldcompile.optimize(model, *inputs, executor="cuda_graph")
    for _ in range(2):
        torch.autograd.grad(_loss(graphed(*inputs)), list(model.parameters()), allow_unused=True)
    assert graphed.report.executor == "cuda_graph", graphed.report.executor_reason
    assert graphed.report.execution["captures"] == 1
    return eager, graphed


_grads = S.grads_of


def _close(got: list[torch.Tensor], want: list[torch.Tensor], what: str, tol: float = TOL) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        e = rel(a, b)
        assert e <= tol, f"{what} {i}: relative error {e:.3g}"


def _replays(fast) -> int:
    return fast.report.execution["replays"]


# ------------------------------------------------------------------------------------------ training safety


def test_gradient_accumulation_over_micro_batches():
    model, inputs = _block()
    eager, graphed = _pair(model, inputs)
    batches = [_fresh(inputs, s) for s in range(3)]
    out_e, grad_e = S.accumulate(eager, model, batches, _loss)
    before = _replays(graphed)
    out_g, grad_g = S.accumulate(graphed, model, batches, _loss)
    assert _replays(graphed) - before == 3 and graphed.report.execution["captures"] == 1
    _close(out_g, out_e, "output")
    _close(grad_g, grad_e, "accumulated gradient")


@pytest.mark.parametrize("order", S.TWO_FORWARD_ORDERS)
def test_two_forwards_before_one_backward(order):
    model, inputs = _block()
    eager, graphed = _pair(model, inputs)
    b1, b2 = _fresh(inputs, 1), _fresh(inputs, 2)

    def run(fast):
        return S.two_forwards_one_backward(fast, model, b1, b2, order, _loss)

    out_e, grad_e = run(eager)
    out_g, grad_g = run(graphed)
    _close(out_g, out_e, "output")
    _close(grad_g, grad_e, "gradient")
    assert graphed.report.execution["graphs"] == 2  # the second forward got its own graph pair
    out_g2, grad_g2 = run(graphed)  # both slots free again: replays only
    assert graphed.report.execution["captures"] == 2
    _close(out_g2, out_e, "output (again)")
    _close(grad_g2, grad_e, "gradient (again)")


def test_recycling_feeds_outputs_back_in():
    model, inputs = _block()

    def recycle(fast, grad_through: bool):  # m, z fed back in; the masks kept
        return S.recycle(fast, model, inputs, grad_through, _loss)

    eager = foldcompile.optimize(model, *inputs, executor="eager")
    graphed = foldcompile.optimize(model, *inputs, executor="cuda_graph")
    for grad_through in (False, True):
        out_e, grad_e = recycle(eager, grad_through)
        for _ in range(3):  # watched calls and captures on the first round; replays after
            out_g, grad_g = recycle(graphed, grad_through)
            _close(out_g, out_e, f"recycled output (grad through: {grad_through})")
            _close(grad_g, grad_e, f"gradient (grad through: {grad_through})")
    executors = [v.executor.describe() for v in graphed.variants.entries.values()]
    assert all(d["executor"] == "cuda_graph" for d in executors), executors
    assert sum(d["replays"] for d in executors) > 0


def test_optimizer_steps_between_calls():
    model, inputs = _block()
    twin = copy.deepcopy(model)
    eager = foldcompile.optimize(twin, *inputs, executor="eager")
    graphed = foldcompile.optimize(model, *inputs, executor="cuda_graph")
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (twin, model)]
    for step in range(5):
        b = _fresh(inputs, step)
        for fast, opt in zip((eager, graphed), opts):
            opt.zero_grad(set_to_none=True)
            _loss(fast(*b)).backward()
            opt.step()
    assert _replays(graphed) >= 3
    _close([p.detach() for p in model.parameters()], [p.detach() for p in twin.parameters()], "parameter")


def test_parameter_moved_in_memory_captures_again():
    model, inputs = _block()
    eager, graphed = _pair(model, inputs)
    with torch.no_grad():
        for p in list(model.parameters())[:3]:
            p.data = p.data * 1.5  # new storage: the captured graphs read the old addresses
    out_e = eager(*inputs)
    out_g = graphed(*inputs)
    _close([t.detach() for t in flat(out_g)], [t.detach() for t in flat(out_e)], "output")
    d = graphed.report.execution
    assert d["executor"] == "cuda_graph" and d["captures"] == 2


def test_inference_replays_return_their_own_outputs():
    model, inputs = _block()
    with torch.no_grad():
        eager = foldcompile.optimize(model, *inputs, executor="eager")
        graphed = foldcompile.optimize(model, *inputs, executor="cuda_graph")
        b1, b2 = _fresh(inputs, 1), _fresh(inputs, 2)
        graphed(*b1), graphed(*b2)  # watched call, capture
        first, second, third = graphed(*b1), graphed(*b2), graphed(*b1)
        _close(flat(first), flat(eager(*b1)), "output")
        _close(flat(second), flat(eager(*b2)), "output")
        assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(third)))
        # the capture call replayed once, then three more
        assert graphed.report.execution["backward_graphs"] == 0 and _replays(graphed) == 4


class _Dropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 64)

    def forward(self, x):
        return F.dropout(self.lin(x), p=0.5, training=self.training)


def test_dropout_draws_new_masks_on_each_replay_and_backward_uses_the_forward_mask():
    model = _Dropout().cuda().train()
    x = torch.randn(64, 32, device="cuda")
    graphed = foldcompile.optimize(model, x, executor="cuda_graph")
    graphed(x), graphed(x)  # watched call, capture
    g = torch.randn(64, 64, device="cuda")
    masks = []
    for _ in range(3):
        state = torch.cuda.get_rng_state()
        model.zero_grad(set_to_none=True)
        out = graphed(x)
        assert not torch.equal(torch.cuda.get_rng_state(), state)  # the generator advanced
        (out * g).sum().backward()
        with torch.no_grad():
            keep = out != 0
            # d loss / d lin(x) is 2·g where kept, 0 where dropped: the weight's gradient follows
            want = ((keep * 2.0 * g).t() @ x)
        torch.testing.assert_close(model.lin.weight.grad, want, rtol=1e-4, atol=1e-4)
        masks.append(keep)
        assert 0.35 < keep.float().mean().item() < 0.65
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert graphed.report.executor == "cuda_graph" and _replays(graphed) >= 3


def test_a_second_backward_through_one_forward_is_refused():
    model, inputs = _block()
    _, graphed = _pair(model, inputs)
    loss = _loss(graphed(*inputs))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through one forward"):
        loss.backward()


def test_a_parameter_changed_between_forward_and_backward_is_refused():
    model, inputs = _block()
    _, graphed = _pair(model, inputs)
    loss = _loss(graphed(*inputs))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="was modified between this forward and its backward"):
        loss.backward()
    _loss(graphed(*inputs)).backward()  # the executor goes on


def test_auto_picks_cuda_graphs_on_cuda():
    model, inputs = _block()
    fast = foldcompile.optimize(model, *inputs)
    for _ in range(3):
        fast(*inputs)
    assert fast.report.executor == "cuda_graph", fast.report.executor_reason
    # call 1 eager (watched), call 2 captured and replayed, call 3 replayed
    assert fast.report.execution["requested"] == "auto" and _replays(fast) == 2


class _PairBiasByMultiplicity(torch.nn.Module):
    """Boltz-2's attention pair bias (layers/attentionv2.py): ``bias.repeat_interleave(multiplicity, 0)``."""

    def __init__(self):
        super().__init__()
        self.proj_z = torch.nn.Linear(16, 4, bias=False)
        self.proj_q = torch.nn.Linear(16, 16)

    def forward(self, s, z, multiplicity: int = 2):
        bias = self.proj_z(z).permute(0, 3, 1, 2).repeat_interleave(multiplicity, 0)   # [B*m, H, N, N]
        q = self.proj_q(s).repeat_interleave(multiplicity, 0).view(s.shape[0] * multiplicity, -1, 4, 4)
        return torch.softmax(torch.einsum("bihd,bjhd->bhij", q, q) + bias, dim=-1)


def test_repeat_interleave_by_an_int_replays_as_a_cuda_graph():
    # issue 12: the Boltz-2 Pairformer ran eagerly, its int repeat_interleave taken for a host read
    model = _PairBiasByMultiplicity().cuda().eval()
    s, z = torch.randn(2, 11, 16, device="cuda"), torch.randn(2, 11, 11, 16, device="cuda")
    with torch.no_grad():
        want = model(s, z)
        fast = foldcompile.optimize(model, s, z, executor="cuda_graph")
        for _ in range(3):
            got = fast(s, z)
    assert fast.report.executor == "cuda_graph", fast.report.executor_reason
    assert _replays(fast) == 2
    _close([got], [want], "output")


def test_inductor_under_grad_on_cuda_is_refused_and_runs_eagerly():
    # its parameter gradients were 1.32 (relative) off eager's here on an H200 (2026-12-02; bench/results/
    # gpu_tests_executors_NVIDIA_H200_2026-12-02b.txt): refused until the cause is found
    model, inputs = _block()
    fast = foldcompile.optimize(model, *inputs, executor="inductor")
    eager = foldcompile.optimize(model, *inputs, executor="eager")
    b = _fresh(inputs, 0)
    grad_e = S.step_grads(eager, model, b, _loss)
    _close(S.step_grads(fast, model, b, _loss), grad_e, "gradient")
    d = fast.report.execution
    assert d["executor"] == "eager" and "not used under grad on CUDA" in d["reason"], d


def test_inductor_reduce_overhead_inference_equals_eager():
    model, inputs = _block()
    with torch.no_grad():
        eager = foldcompile.optimize(model, *inputs, executor="eager")
        compiled = foldcompile.optimize(model, *inputs, executor="inductor")
        for step in range(4):
            b = _fresh(inputs, step)
            want = [t.clone() for t in flat(eager(*b))]
            got = [t.clone() for t in flat(compiled(*b))]
            _close(got, want, "output", tol=1e-4)
    d = compiled.report.execution
    assert d["executor"] == "inductor" and d["mode"] == "reduce-overhead", d


# ------------------------------------------------------------------------------------------ bf16 fidelity

_H8 = {"evoformer_block", "pairformer_block", "extra_msa_stack", "template_pair_stack", "alphafold2"}
_FIDELITY = [(name, executor) for name in zoo.names() for executor in ("eager", "cuda_graph", "inductor")
             if executor != "inductor" or name in ("evoformer_block", "pairformer_block")]


def _zoo(name: str, dtype: torch.dtype):
    if name in _H8:
        model, inputs = _h8(name, n_res=37, **({"n_seq": 11} if name in ("evoformer_block", "alphafold2") else {}))
    else:
        model, inputs = zoo.get(name, n_res=37)
    return _to_cuda(model.eval(), inputs, dtype)


def _outputs_and_grads(fn, model, inputs, calls: int):
    for _ in range(calls - 1):  # the executors' first calls (watched call, capture, compile)
        torch.autograd.grad(_loss(fn(*inputs)), [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    model.zero_grad(set_to_none=True)
    out = fn(*inputs)
    _loss(out).backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                       for p in model.parameters()])
    return [o.detach().double() for o in flat(out) if o.is_floating_point()], grads


@pytest.mark.parametrize("name,executor", _FIDELITY, ids=[f"{n}-{e}" for n, e in _FIDELITY])
def test_bf16_error_against_float64_within_3x_eager(name, executor):
    truth_model, inputs64 = _zoo(name, torch.float64)
    model, inputs = _zoo(name, torch.bfloat16)
    with torch.no_grad():  # the same parameters, rounded
        for p64, p in zip(truth_model.parameters(), model.parameters()):
            p64.copy_(p.double())
    inputs64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    ref, ref_g = _outputs_and_grads(truth_model, truth_model, inputs64, 1)
    base, base_g = _outputs_and_grads(model, model, inputs, 1)
    fast = foldcompile.optimize(model, *inputs, executor=executor)
    got, got_g = _outputs_and_grads(fast, model, inputs, 3)
    # the Inductor executor is refused under grad on CUDA (its training gradients failed here): this
    # case checks the refusal runs the eager executor and still meets the bound
    expected = "eager" if executor == "inductor" else executor
    assert fast.report.executor == expected, fast.report.executor_reason
    for i, (a, b, r) in enumerate(zip(got, base, ref, strict=True)):
        e_opt, e_eager = rel(a, r), rel(b, r)
        assert e_opt <= 3 * e_eager + 1e-3, f"output {i}: optimized {e_opt:.3g} vs eager bf16 {e_eager:.3g}"
    e_opt, e_eager = rel(got_g, ref_g), rel(base_g, ref_g)
    assert e_opt <= 3 * e_eager + 1e-3, f"gradients: optimized {e_opt:.3g} vs eager bf16 {e_eager:.3g}"


# ------------------------------------------------------------------------------------------ the backend


def test_backend_on_cuda_replays_cuda_graphs_and_equals_eager():
    from foldcompile.dynamo_backend import Backend

    torch._dynamo.reset()
    model, inputs = _block()
    backend = Backend()
    compiled = torch.compile(model, backend=backend)
    eager = foldcompile.optimize(model, *inputs, executor="eager")
    for step in range(4):
        b = _fresh(inputs, step)
        model.zero_grad(set_to_none=True)
        out_e = [t.detach() for t in flat(eager(*b))]
        _loss(eager(*b)).backward()
        grad_e = _grads(model)
        model.zero_grad(set_to_none=True)
        out = compiled(*b)
        _loss(out).backward()
        _close([t.detach() for t in flat(out)], out_e, "output")
        _close(_grads(model), grad_e, "gradient")
    (graph,) = backend.graphs
    d = graph.report.execution
    assert d["executor"] == "cuda_graph" and d["replays"] == 3, d  # call 1 watched, 2 captured
    assert graph.report.counts()["attention"]["matched"] == 4
    torch._dynamo.reset()
