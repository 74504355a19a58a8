"""Tensors made from Python data inside a CUDA-graph variant (``x.new_tensor([1e8])``).

On a GPU such a node copies host memory to the device, which a capture refuses ("Cannot copy
between CPU and CUDA tensors during CUDA graph capture", seen on an H200 with the zoo's
AlphaFold 2, whose distogram bins end in ``lower.new_tensor([inf])``). The executor makes them
once before the capture (``hoist_host_literals``). On CPU the capture is simulated and a torch
function mode stands in for CUDA's refusal: it raises when such a tensor is built while a
"capture" runs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.overrides

import foldcompile
from foldcompile.executors import cuda_graph as cg
from foldcompile.executors.cuda_graph import CudaGraphExecutor, hoist_host_literals


class _RefuseHostData(torch.overrides.TorchFunctionMode):
    """Raises on a tensor built from Python data, as a real capture does on CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor):
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
        return func(*args, **(kwargs or {}))


class _Graph:
    def __init__(self, fn, result):
        self.fn, self.result = fn, result

    def replay(self) -> None:
        with _RefuseHostData(), torch.no_grad():
            new = self.fn()
        for static, fresh in zip(_tensors(self.result), _tensors(new)):
            static.copy_(fresh)


def _tensors(x):
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


class _Capture(cg.CudaGraphCapture):
    def device_of(self, devices):
        return next(iter(devices))

    def on(self, device):
        return contextlib.nullcontext()

    def warm_up(self, fn):
        fn()  # before the capture: host data allowed

    def new_pool(self):
        return None

    def capture(self, fn, pool):
        with _RefuseHostData():
            result = fn()
        return _Graph(fn, result), result

    def finish(self):
        pass


class Distogram(torch.nn.Module):
    """One-hot distance bins the way AlphaFold 2's recycling embedder writes them."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 4)

    def forward(self, x):
        lower = torch.linspace(2.0, 20.0, 5, dtype=x.dtype, device=x.device) ** 2
        upper = torch.cat([lower[1:], lower.new_tensor([1e8])])
        d = (x[:, None] - x[None, :]).pow(2).sum(-1, keepdim=True)
        return self.lin(((d > lower) & (d < upper)).to(x.dtype))


def _executor(hoist: bool, monkeypatch) -> tuple[CudaGraphExecutor, torch.nn.Module]:
    torch.manual_seed(0)
    model = Distogram().eval()
    with torch.no_grad():  # the graph's variant: inference
        gm = foldcompile.trace(model, torch.randn(6, 3) * 5)
    if not hoist:
        monkeypatch.setattr(cg, "hoist_host_literals", lambda gm: 0)
    return CudaGraphExecutor(gm, requested="cuda_graph", reason="test", capture=_Capture()), model


def test_host_data_is_made_before_the_capture_and_cloned_per_call(monkeypatch):
    run, model = _executor(True, monkeypatch)
    assert run.host_literals == 1
    outs = []
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(6, 3, generator=torch.Generator().manual_seed(step)) * 5
            out = run((x,), {})
            assert torch.equal(out, model(x)), f"call {step}"
            outs.append(out)
    d = run.describe()
    assert d["executor"] == "cuda_graph" and d["captures"] == 1 and d["replays"] == 3, d  # observed, captured, replayed


def test_the_made_tensor_is_fresh_at_every_call():
    gm = torch.fx.symbolic_trace(lambda x: x.new_tensor([1.0, 2.0]))
    assert hoist_host_literals(gm) == 1
    a = gm(torch.zeros(1))
    a.mul_(10)  # a caller writing its result must not change the next call's
    assert gm(torch.zeros(1)).tolist() == [1.0, 2.0]
    assert gm(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64  # one per dtype


def test_data_from_a_tensor_or_requiring_grad_is_left_alone():
    assert hoist_host_literals(torch.fx.symbolic_trace(lambda x, y: x.new_tensor(y))) == 0
    assert hoist_host_literals(torch.fx.symbolic_trace(
        lambda x: x * torch.tensor([1.0], requires_grad=True))) == 0


def test_negative_control_without_hoisting_the_capture_fails_and_runs_eagerly(monkeypatch):
    run, model = _executor(False, monkeypatch)
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(6, 3, generator=torch.Generator().manual_seed(step)) * 5
            assert torch.equal(run((x,), {}), model(x))
    d = run.describe()
    assert d["executor"] == "eager" and "Cannot copy between CPU and CUDA" in d["reason"], d
