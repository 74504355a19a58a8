"""The CUDA-graph executor's bookkeeping on CPU, with a simulated capture.

A real capture needs CUDA (tests/executors/test_executors_gpu.py runs these cases on the GPU).
Here the executor gets a capture (``CudaGraphCapture`` seam) whose "graph" is the captured
function itself: a replay runs it again on the static inputs and copies its results into the
captured output tensors, and the backward replay differentiates the *latest* forward replay of its
slot, as a real backward graph reads whatever the last forward replay left in the slot's pool.
So everything but the CUDA mechanics is exercised: static input buffers, outputs and gradients
cloned out (a missing clone shows as an output overwritten by the next call), one slot per
pending forward (a forward replayed over a pending one shows as wrong gradients: the negative
control below proves the simulation catches it), gradient accumulation, recycling, optimizer
steps, memory moves, and the refusals.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

import foldcompile
from foldcompile.executors import cuda_graph as cg
from foldcompile.executors.cuda_graph import CudaGraphExecutor

sys.path.insert(0, os.path.dirname(__file__))
import executor_scenarios as S  # noqa: E402

TOL = 1e-6
RULES = None  # every fusion rule: the kernels' own autograd runs inside the replayed function
_optimize_module = importlib.import_module("foldcompile.optimize")  # the attribute is the function


class _SimulatedGraph:
    def __init__(self, fn, result, grad_mode: bool):
        self.fn, self.result, self.grad_mode = fn, result, grad_mode

    def replay(self) -> None:
        with torch.set_grad_enabled(self.grad_mode):
            new = self.fn()
        # a real replay writes memory without dispatch: static outputs made under inference_mode
        # (inference tensors) take the write too
        with torch.inference_mode():
            for static, fresh in zip(S.tensors_of(self.result), S.tensors_of(new)):
                static.copy_(fresh)


class SimulatedCapture(cg.CudaGraphCapture):
    """Captures a closure instead of a CUDA graph (module docstring)."""

    def device_of(self, devices):
        assert len(devices) == 1
        return next(iter(devices))

    def on(self, device):
        return contextlib.nullcontext()

    def warm_up(self, fn):
        fn()

    def new_pool(self):
        return None

    def capture(self, fn, pool):
        result = fn()
        return _SimulatedGraph(fn, result, torch.is_grad_enabled()), result

    def finish(self):
        pass


class _Block(torch.nn.Module):
    """A small residual block: layer norm, projections, a gated softmax mixing, element-wise glue."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.norm = torch.nn.LayerNorm(c)
        self.proj = torch.nn.Linear(c, 3 * c)
        self.out = torch.nn.Linear(c, c)

    def forward(self, x, y):
        a, b, g = self.proj(self.norm(x)).chunk(3, -1)
        w = torch.softmax(a @ b.transpose(-1, -2) * 0.3, -1)
        return x + torch.sigmoid(g) * self.out(w @ y), y * 0.5 + 1.0


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = _Block()
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    return model, (x, y)


def _fresh(inputs, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g) for t in inputs)


_loss = S.projection_loss
_grads = S.grads_of


def _close(got, want, what):
    got, want = list(got), list(want)
    assert len(got) == len(want), f"{what}: {len(got)} tensors, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, rtol=TOL, atol=TOL), f"{what} {i}: max diff {(a - b).abs().max():.3g}"


def _simulated(graph, requested="cuda_graph", leaves=None) -> CudaGraphExecutor:
    return CudaGraphExecutor(graph, requested=requested, reason="simulated capture", capture=SimulatedCapture())


@pytest.fixture(scope="module")
def built():
    """One model optimized twice, built once for the module (the builds are what costs): an eager
    OptimizedModule, and one whose variants (built on demand too) run simulated CUDA-graph executors."""
    model, inputs = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = foldcompile.optimize(model, *inputs, executor="eager", rules=RULES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_optimize_module, "select_executor", _simulated)
        graphed = foldcompile.optimize(model, *inputs, executor="cuda_graph", rules=RULES)
        yield model, inputs, eager, graphed, state


@pytest.fixture
def pair(built):
    """The shared build with the model's parameters reset and fresh (unobserved) executors."""
    model, inputs, eager, graphed, state = built
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    for v in graphed.variants.entries.values():
        v.executor = _simulated(v.graph)
    return model, inputs, eager, graphed


def _executor(graphed, *inputs) -> CudaGraphExecutor:
    return graphed.variant_for(*inputs).executor


def _warm(graphed, model, inputs):
    for _ in range(2):
        torch.autograd.grad(_loss(graphed(*inputs)), list(model.parameters()))


def test_gradient_accumulation_and_outputs_not_overwritten(pair):
    model, inputs, eager, graphed = pair
    _warm(graphed, model, inputs)
    batches = [_fresh(inputs, s) for s in range(3)]
    out_e, grad_e = S.accumulate(eager, model, batches, _loss)
    out_g, grad_g = S.accumulate(graphed, model, batches, _loss)
    ex = _executor(graphed, *inputs)
    assert ex.captures == 1 and ex.describe()["replays"] == 4
    _close(out_g, out_e, "output")
    _close(grad_g, grad_e, "gradient")


@pytest.mark.parametrize("order", S.TWO_FORWARD_ORDERS)
def test_two_forwards_before_one_backward(pair, order):
    model, inputs, eager, graphed = pair
    _warm(graphed, model, inputs)
    b1, b2 = _fresh(inputs, 1), _fresh(inputs, 2)
    want = S.two_forwards_one_backward(eager, model, b1, b2, order, _loss)
    for _ in range(2):
        got = S.two_forwards_one_backward(graphed, model, b1, b2, order, _loss)
        _close(got[0], want[0], "output")
        _close(got[1], want[1], "gradient")
    ex = _executor(graphed, *inputs)
    assert ex.captures == 2 and ex.describe()["graphs"] == 2


def test_negative_control_the_simulation_sees_a_replay_over_a_pending_forward(pair, monkeypatch):
    """The hazard the slots exist for, made by hand: the pending forward's slot replayed with other
    inputs before its backward. The simulation then gives wrong gradients (as a real pool would), so
    the tests above would see an executor that let it happen; and the executor itself refuses a slot
    that was handed to another forward."""
    model, inputs, eager, graphed = pair
    _warm(graphed, model, inputs)
    b1, b2 = _fresh(inputs, 1), _fresh(inputs, 2)
    model.zero_grad(set_to_none=True)
    _loss(eager(*b1)).backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    o1 = graphed(*b1)
    slot = _executor(graphed, *inputs)._slots[0]
    slot.load(list(b2))
    slot.fwd.replay()
    _loss(o1).backward()
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(_grads(model), want))
    monkeypatch.setattr(cg._Slot, "busy", lambda self: False)  # every slot claimed free
    o1, o2 = graphed(*b1), graphed(*b2)  # the second forward takes the first's slot
    with pytest.raises(RuntimeError, match="internal error"):
        _loss(o1).backward()


def test_all_slots_pending_runs_eagerly(pair):
    model, inputs, eager, graphed = pair
    _warm(graphed, model, inputs)
    outs = [graphed(*_fresh(inputs, s)) for s in range(5)]  # five pending forwards, three slots
    ex = _executor(graphed, *inputs)
    assert ex.describe()["graphs"] == 3 and ex.eager_calls == 2
    model.zero_grad(set_to_none=True)
    sum(_loss(o) for o in outs).backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    sum(_loss(eager(*_fresh(inputs, s))) for s in range(5)).backward()
    _close(got, _grads(model), "gradient")


def test_recycling_feeds_outputs_back_in(pair):
    model, inputs, eager, graphed = pair
    for grad_through in (False, True):
        want = S.recycle(eager, model, inputs, grad_through, _loss)
        for _ in range(3):
            got = S.recycle(graphed, model, inputs, grad_through, _loss)
            _close(got[0], want[0], "recycled output")
            _close(got[1], want[1], "gradient")
    made = [v.executor for v in graphed.variants.entries.values()]
    assert len(made) == 3  # no_grad; grad; grad with inputs that require grad
    assert all(ex.name == "cuda_graph" and ex.describe()["replays"] > 0 for ex in made)
    assert sorted(ex.describe()["backward_graphs"] for ex in made) == [0, 1, 2]


def test_optimizer_steps_between_calls(pair, built):
    model, inputs, eager, graphed = pair
    state = built[-1]

    def train(fast):
        model.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        for step in range(5):
            opt.zero_grad(set_to_none=True)
            _loss(fast(*_fresh(inputs, step))).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    want = train(eager)
    _close(train(graphed), want, "parameter")
    assert graphed.report.executor == "cuda_graph" and graphed.report.execution["replays"] == 4


def test_memory_moved_captures_again(pair):
    model, inputs, eager, graphed = pair
    _warm(graphed, model, inputs)
    pending = graphed(*inputs)  # its backward still to run, on the graphs of the old memory
    with torch.no_grad():
        model.out.weight.data = model.out.weight.data * 1.5
    _close(list(graphed(*inputs)), list(eager(*inputs)), "output")
    ex = _executor(graphed, *inputs)
    assert ex.captures == 2 and ex.recaptures == 1
    with pytest.raises(RuntimeError, match="'out.weight' was modified between this forward and its backward"):
        _loss(pending).backward()
    for step in range(2):  # the old slot is never replayed again
        b = _fresh(inputs, step)
        _close(S.step_grads(graphed, model, b, _loss), S.step_grads(eager, model, b, _loss), "gradient")
    assert ex.captures == 2 and ex.describe()["graphs"] == 1


def test_second_backward_and_changed_parameter_are_refused(pair):
    model, inputs, eager, graphed = pair
    _warm(graphed, model, inputs)
    loss = _loss(graphed(*inputs))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through one forward"):
        loss.backward()
    loss = _loss(graphed(*inputs))
    with torch.no_grad():
        model.norm.weight.add_(0.1)
    with pytest.raises(RuntimeError, match="'norm.weight' was modified between this forward and its backward"):
        loss.backward()
    got = S.step_grads(graphed, model, inputs, _loss)
    _close(got, S.step_grads(eager, model, inputs, _loss), "gradient after the refusals")


def test_inference_replays(pair):
    model, inputs, eager, graphed = pair
    with torch.no_grad():
        b1, b2 = _fresh(inputs, 1), _fresh(inputs, 2)
        graphed(*b1), graphed(*b2)
        first, second, third = graphed(*b1), graphed(*b2), graphed(*b1)
        _close(first, eager(*b1), "output")
        _close(second, eager(*b2), "output")
        assert all(torch.equal(a, b) for a, b in zip(first, third))
    with torch.no_grad():
        ex = _executor(graphed, *inputs)
    assert ex.describe()["backward_graphs"] == 0 and ex.describe()["replays"] == 4


def test_inference_mode_then_no_grad(pair):
    """Inference tensors have no version counter (the watched call looks at the graph instead) and the
    static buffers stay plain tensors, so a later call outside inference_mode (the same variant: grad
    mode off) still copies into them."""
    model, inputs, eager, graphed = pair
    with torch.no_grad():
        want = eager(*inputs)
    with torch.inference_mode():
        x, y = (t.clone() for t in inputs)
        for _ in range(3):
            got = graphed(x, y)
        _close(got, want, "output")
    with torch.no_grad():
        _close(graphed(*inputs), want, "output")
        ex = _executor(graphed, *inputs)
    assert ex.name == "cuda_graph" and ex.describe()["replays"] == 3
