"""The per-call fast path of the guards (foldcompile.state_watch) is as sound as the full check.

The soundness tests of test_guards_soundness.py again, on a stack of 48 blocks with the change made
to its LAST block (a full check walks every block; the fast path must still see the last one), plus
the ways of writing state that no ``setattr`` sees (``vars(m)[k] = v``, ``ModuleList.insert``,
``m._parameters[k] = p``, a replaced ``__dict__``). Repeated calls must stay on the fast path.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch
import torch.nn as nn

from foldcompile import state_watch
from foldcompile.capture import trace
from foldcompile.guards import GuardError

sys.path.insert(0, os.path.dirname(__file__))
from guard_modules import HOOK_REGISTRATIONS, Configured, Mode  # noqa: E402  (the block test_guards_soundness.py uses)

pytestmark = pytest.mark.usefixtures("one_thread")  # 48 blocks of tiny ops (tests/compiler/conftest.py)

N_BLOCKS = 48
X = torch.randn(3, 4)


class Stack(nn.Module):
    def __init__(self, block_cls: type, n: int = N_BLOCKS):
        super().__init__()
        self.blocks = nn.ModuleList(block_cls() for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x) * 0.5
        return x


def _stack() -> tuple[Stack, torch.fx.GraphModule]:
    cls = type("Configured", (Configured,), {"table": {"k": [1, 2]}})  # fresh class: class attrs are mutated
    model = Stack(cls)
    gm = trace(model, X)
    _same(gm, model)
    _same(gm, model)  # repeated calls pass
    return model, gm


def _same(gm, model):
    assert torch.allclose(gm(X), model(X))


LAST = "blocks.47"


@pytest.mark.parametrize("change, guard", [
    (lambda b: setattr(type(b), "gate", False), "class attribute 'blocks.0.gate'"),  # shared class: the first says
    (lambda b: setattr(b, "gate", False), f"module '{LAST}' attributes ['gate'] added"),
    (lambda b: type(b).table["k"].append(3), "class attribute 'blocks.0.table'"),
    (lambda b: setattr(b, "mode", Mode.B), f"module attribute '{LAST}.mode'"),
    (lambda b: b.sizes.append(3), f"module attribute '{LAST}.sizes'"),
    (lambda b: setattr(b.cfg, "scale", 3.0), f"module attribute '{LAST}.cfg'"),
    (lambda b: setattr(b.cfg, "flags", (False,)), f"module attribute '{LAST}.cfg'"),
    (lambda b: setattr(b.ns, "shift", 2.0), f"module attribute '{LAST}.ns'"),
    (lambda b: setattr(b, "act", torch.tanh), f"module attribute '{LAST}.act'"),
    (lambda b: setattr(b, "lin", nn.Linear(4, 4)), f"submodule '{LAST}.lin'"),
    (lambda b: b.train(False), f"module '{LAST}' training=False"),
    # writes no setattr sees
    (lambda b: vars(b).__setitem__("mode", Mode.B), f"module attribute '{LAST}.mode'"),
    (lambda b: object.__setattr__(b, "sizes", [1, 2, 3]), f"module attribute '{LAST}.sizes'"),
    (lambda b: vars(b).__setitem__("extra", 1), f"module '{LAST}' attributes ['extra'] added"),
    (lambda b: object.__setattr__(b, "__dict__", {**vars(b), "mode": Mode.B}), f"'{LAST}.mode'"),
    (lambda b: b.lin._parameters.__setitem__("weight", nn.Parameter(torch.randn(4, 4))), f"'{LAST}.lin.weight'"),
    (lambda b: b.lin._parameters.pop("bias"), f"parameters/buffers of module '{LAST}.lin' changed"),
    (lambda b: b.lin.register_buffer("extra", torch.zeros(1)), f"parameters/buffers of module '{LAST}.lin'"),
])
def test_a_change_to_the_last_of_48_blocks_is_refused(change, guard):
    model, gm = _stack()
    model.train()  # the capture ran in training mode (a fresh module's default)
    change(model.blocks[-1])
    with pytest.raises(GuardError, match=re.escape(guard)):
        gm(X)


@pytest.mark.parametrize("change, guard", [
    (lambda b: setattr(b.lin, "weight", nn.Parameter(torch.randn(4, 4))), f"'{LAST}.lin.weight'"),
    (lambda b: b.lin.weight.requires_grad_(False), f"'{LAST}.lin.weight': requires_grad"),
    (lambda b: b.lin.double(), f"'{LAST}.lin.weight': dtype torch.float64"),
    (lambda b: setattr(b.lin.weight, "data", torch.randn(2, 8)), "shape (2, 8) != captured (4, 4)"),
    (lambda b: b.lin.load_state_dict({k: torch.randn_like(v) for k, v in b.lin.state_dict().items()}, assign=True),
     "parameter/buffer"),
])
def test_a_parameter_change_in_the_last_of_48_blocks_is_refused(change, guard):
    model, gm = _stack()
    change(model.blocks[-1])
    with pytest.raises(GuardError, match=re.escape(guard)):
        gm(X)


@pytest.mark.parametrize("register", HOOK_REGISTRATIONS)
def test_a_hook_on_the_last_of_48_blocks_is_refused_and_its_removal_accepted(register):
    model, gm = _stack()
    handle = register(model.blocks[-1].lin)
    with pytest.raises(GuardError, match=f"hooks of module '{LAST}.lin'"):
        gm(X)
    handle.remove()
    _same(gm, model)


def test_a_hook_present_at_capture_and_removed_later_is_refused():
    cls = type("Configured", (Configured,), {"table": {"k": [1, 2]}})
    model = Stack(cls)
    handle = model.blocks[-1].lin.register_forward_hook(lambda _m, _i, out: out * 2)
    gm = trace(model, X)
    _same(gm, model)
    _same(gm, model)
    handle.remove()
    with pytest.raises(GuardError, match=f"hooks of module '{LAST}.lin'"):
        gm(X)


def test_children_inserted_or_removed_are_refused():
    model, gm = _stack()
    model.blocks.insert(0, type(model.blocks[0])())  # ModuleList.insert writes _modules directly
    with pytest.raises(GuardError, match="submodule 'blocks"):
        gm(X)
    model, gm = _stack()
    del model.blocks[-1]
    with pytest.raises(GuardError, match="blocks"):
        gm(X)


def test_a_parameter_where_the_capture_saw_none_is_refused():
    model = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(N_BLOCKS)])
    gm = trace(model, X)
    assert torch.allclose(gm(X), model(X))
    model[-1].bias = nn.Parameter(torch.randn(4))  # eager now adds a bias; the graph has none
    with pytest.raises(GuardError, match=f"parameters/buffers of module '{N_BLOCKS - 1}'"):
        gm(X)


def test_repeated_calls_stay_on_the_fast_path_and_a_reverted_change_passes_again():
    if not state_watch.available():
        pytest.skip("this torch build has no dict version tags: every call runs the full check")
    model, gm = _stack()
    fast = gm.guards.fast
    assert fast is not None
    before = fast.watch.full_checks
    for _ in range(5):
        _same(gm, model)
    assert fast.watch.full_checks == before  # no tag moved: no full check
    model.blocks[-1].mode = Mode.B
    with pytest.raises(GuardError):
        gm(X)
    model.blocks[-1].mode = Mode.A
    _same(gm, model)                       # the full check ran once more and passed
    assert fast.watch.full_checks == before + 1
    _same(gm, model)
    assert fast.watch.full_checks == before + 1
    with torch.no_grad():                  # in-place updates (an optimizer step) move no tag
        for p in model.parameters():
            p.add_(0.01)
    _same(gm, model)
    assert fast.watch.full_checks == before + 1


def test_without_dict_version_tags_every_call_runs_the_full_check(monkeypatch):
    monkeypatch.setattr(state_watch, "_dict_version", None)
    model, gm = _stack()
    assert gm.guards.fast is None
    model.blocks[-1].sizes.append(3)
    with pytest.raises(GuardError, match=f"module attribute '{LAST}.sizes'"):
        gm(X)


def test_without_the_cpp_tensor_check_the_tuple_fallback_sees_tensor_changes(monkeypatch):
    monkeypatch.setattr(state_watch, "_tensor_check_builder", None)
    model, gm = _stack()
    model.blocks[-1].lin.weight.requires_grad_(False)
    with pytest.raises(GuardError, match=re.escape(f"'{LAST}.lin.weight': requires_grad")):
        gm(X)
    model.blocks[-1].lin.weight.requires_grad_(True)
    _same(gm, model)


def test_a_forward_that_builds_modules_is_captured_while_registrations_are_counted():
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for b in self.blocks[:2]:  # a new ModuleList: registers its modules while traced
                x = b(x)
            return x

    state_watch._install_registration_hooks()
    model = Sliced()
    gm = trace(model, X)
    assert torch.allclose(gm(X), model(X))
    assert torch.allclose(gm(X), model(X))
