"""Python side effects in ``forward``: the graph cannot repeat them, so the capture refuses them.

A capture runs ``forward`` once, symbolically. A write into an argument's container (AF2's
recycling ``prev`` dict), a global, a class attribute or a deque attribute would happen at most
once, at capture, and never again when the graph runs: the capture must refuse, name the
written object and the source line, and leave every object it was given exactly as it was.
Two layers find them: Dynamo's own side-effect tracking (replay switched off, so nothing is
written), and, where a torch build lacks those switches, a comparison of the arguments and the
model's state before and after the capture, made on private copies of the arguments. Both are
tested here (the second by switching the first off).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.modules import module as nn_module

import foldcompile.capture as capture
from foldcompile.capture import CaptureError, trace
from foldcompile.guards import GuardError

sys.path.insert(0, os.path.dirname(__file__))
from guard_modules import Caching  # noqa: E402

HERE = os.path.basename(__file__)


@pytest.fixture(params=["dynamo", "snapshot"])
def layer(request, monkeypatch):
    """``dynamo``: the default capture. ``snapshot``: Dynamo's side-effect switches off (as on a torch
    build without them), so only the before/after comparison on private copies can refuse."""
    if request.param == "snapshot":
        monkeypatch.setattr(capture, "_dynamo_side_effect_config", lambda: {})
    return request.param


def _at(layer: str, code: str) -> str:
    """The refusal names the line of the write (Dynamo's record); the comparison layer cannot know the
    line and names this file's ``forward`` instead."""
    return r"[\s\S]*" + HERE + r":\d+" + (r"[\s\S]*" + code if layer == "dynamo" else "")


def _deep_equal(a, b) -> bool:
    """Same structure, same types, same tensor objects holding the same values."""
    if isinstance(a, torch.Tensor):
        return type(a) is type(b) is torch.Tensor and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple, collections.deque)):
        return len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, types.SimpleNamespace):
        return _deep_equal(vars(a), vars(b))
    return a == b


# ---------------------------------------------------------------- 1. writes into arguments


class Recycle(nn.Module):
    """AF2's recycling: the previous iteration's pair representation lives in a dict argument."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, prev):
        h = self.lin(x) + prev["z"]
        prev["z"] = h.detach()
        return h


class Accumulate(nn.Module):
    def forward(self, x, acc):
        acc.append(x * 2)
        return x + 1


class NestedState(nn.Module):
    def forward(self, x, state):
        state[0]["m"] = x * 3
        return x + state[1]


class Batch:
    """A plain object passed as an argument (feature batches often are)."""

    def __init__(self, scale: float):
        self.scale = scale

    def __eq__(self, other):
        return type(other) is Batch and vars(other) == vars(self)


class FlagOnBatch(nn.Module):
    def forward(self, x, batch):
        batch.seen = True
        return x * batch.scale


def test_write_into_dict_argument_is_refused_and_the_example_left_alone(layer):
    z = torch.zeros(3)
    ex = {"z": z}
    before = copy.deepcopy(ex)
    with pytest.raises(CaptureError, match=r"argument 'prev'" + _at(layer, r"prev\[\"z\"\] = h.detach\(\)")):
        trace(Recycle(), torch.randn(3), ex)
    assert _deep_equal(ex, before) and ex["z"] is z  # not a FakeTensor, not another tensor


def test_append_to_list_argument_is_refused_and_the_list_left_empty(layer):
    acc = []
    with pytest.raises(CaptureError, match=r"argument 'acc'" + _at(layer, r"acc.append\(x \* 2\)")):
        trace(Accumulate(), torch.randn(3), acc)
    assert acc == []


def test_write_into_a_nested_container_argument_is_refused(layer):
    t = torch.randn(3)
    state = ({}, t)
    with pytest.raises(CaptureError, match=r"argument 'state'" + _at(layer, r"state\[0\]\[\"m\"\] = x \* 3")):
        trace(NestedState(), torch.randn(3), state)
    assert state[0] == {} and state[1] is t


def test_attribute_write_on_an_argument_object_is_refused():
    # (export takes no plain objects as inputs at all; Dynamo's side-effect check refuses first, by name)
    batch = Batch(scale=2.0)
    with pytest.raises(CaptureError, match=r"argument 'batch'" + _at("dynamo", r"batch.seen = True")):
        trace(FlagOnBatch(), torch.randn(3), batch)
    assert vars(batch) == {"scale": 2.0}


def test_reading_container_arguments_is_fine_and_repeatable():
    class Reads(nn.Module):
        def forward(self, x, prev, extra):
            local = dict(prev)          # a new dict built in forward may be written freely
            local["z"] = prev["z"] + x
            return local["z"] * extra[0]

    prev, extra = {"z": torch.randn(3)}, [torch.randn(3)]
    model = Reads()
    gm = trace(model, torch.randn(3), prev, extra)
    for _ in range(3):
        x = torch.randn(3)
        assert torch.equal(gm(x, prev, extra), model(x, prev, extra))
    assert type(prev["z"]) is torch.Tensor


# ---------------------------------------------------------------- 2. globals, class attributes, deques

LOG: list = []
CALLS = 0


class LogsToGlobal(nn.Module):
    def forward(self, x):
        LOG.append(1)
        return x + 1


class CountsGlobal(nn.Module):
    def forward(self, x):
        global CALLS
        CALLS += 1
        return x + 1


class CountsOnClass(nn.Module):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return x + 1


class History(nn.Module):
    def __init__(self):
        super().__init__()
        self.history = collections.deque(maxlen=3)

    def forward(self, x):
        self.history.append(1)
        return x + len(self.history)


def test_append_to_a_global_list_is_refused_and_undone(layer):
    with pytest.raises(CaptureError, match=r"global 'LOG'" + _at(layer, r"LOG.append\(1\)")):
        trace(LogsToGlobal(), torch.randn(3))
    assert LOG == []


def test_rebinding_a_global_is_refused_and_undone(layer):
    with pytest.raises(CaptureError, match=r"global 'CALLS'" + _at(layer, r"CALLS \+= 1")):
        trace(CountsGlobal(), torch.randn(3))
    assert CALLS == 0


def test_class_attribute_write_is_refused_and_undone(layer):
    cls = type("CountsOnClass", (CountsOnClass,), {"calls": 0})  # a fresh class: the test may not leak
    with pytest.raises(CaptureError, match=r"class attribute 'CountsOnClass.calls'" + _at(layer, r"type\(self\).calls \+= 1")):
        trace(cls(), torch.randn(3))
    assert cls.calls == 0


def test_append_to_a_deque_attribute_is_refused_and_undone(layer):
    m = History()
    hist = m.history
    with pytest.raises(CaptureError, match=r"module attribute 'history'" + _at(layer, r"self.history.append\(1\)")):
        trace(m, torch.randn(3))
    assert m.history is hist and list(hist) == [] and hist.maxlen == 3


def test_write_inside_the_standard_library_names_the_user_s_call():
    """``Counter.update`` is Python code in ``collections``: the write Dynamo records happens there, but
    the line to show is the user's call (it named collections/__init__.py)."""
    class Counts(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = collections.Counter()

        def forward(self, x):
            self.seen.update(["call"])
            return x + 1

    m = Counts()
    with pytest.raises(CaptureError, match=r"module attribute 'seen'.*" + HERE + r":\d+ in forward: "
                                           r"self.seen.update\(\[\"call\"\]\)") as e:
        trace(m, torch.randn(3))
    assert "collections" not in str(e.value) and m.seen == collections.Counter()


def test_module_attribute_write_still_refused_without_dynamo_tracking(layer):
    m = Caching()
    with pytest.raises(CaptureError, match=r"forward assigns module attribute 'last'"):
        trace(m, torch.randn(3))
    assert m.last is None and "_is_torch_compile" not in vars(m)


def test_deque_read_by_forward_is_guarded_by_value():
    """A deque has no ``__dict__``: it was compared by identity, so an append after capture that
    changes what ``forward`` computes (``len(self.history)``) went unseen."""
    class ReadsDeque(nn.Module):
        def __init__(self):
            super().__init__()
            self.history = collections.deque([1.0, 2.0], maxlen=4)

        def forward(self, x):
            return x * len(self.history) + self.history[-1]

    m, x = ReadsDeque(), torch.randn(3)
    gm = trace(m, x)
    assert torch.equal(gm(x), m(x))
    m.history.append(5.0)
    with pytest.raises(GuardError, match="module attribute 'history'"):
        gm(x)


# ---------------------------------------------------------------- 6. global module hooks


@pytest.mark.parametrize("register, name", [
    (lambda: nn_module.register_module_forward_hook(lambda m, i, o: o * 2 if isinstance(o, torch.Tensor) else o),
     "register_module_forward_hook"),
    (lambda: nn_module.register_module_forward_pre_hook(lambda m, i: i), "register_module_forward_pre_hook"),
    (lambda: nn_module.register_module_full_backward_hook(lambda m, gi, go: None),
     "register_module_full_backward_hook"),
    (lambda: nn_module.register_module_full_backward_pre_hook(lambda m, go: None),
     "register_module_full_backward_pre_hook"),
])
def test_global_module_hook_registered_after_capture_is_refused(register, name):
    m, x = nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(2, 3)
    gm = trace(m, x)
    handle = register()
    try:
        with pytest.raises(GuardError, match=f"global module hook.*{name}"):
            gm(x)
    finally:
        handle.remove()
    assert torch.equal(gm(x), m(x))


def test_global_module_hook_present_at_capture_is_refused_by_name():
    m, x = nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3)
    handle = nn_module.register_module_forward_hook(lambda mod, i, o: o * 2)
    try:
        with pytest.raises(CaptureError, match="global module hook.*register_module_forward_hook"):
            trace(m, x)
    finally:
        handle.remove()


# ---------------------------------------------------------------- 9. errors that name the line


class ReadsNumpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.arr = np.ones(3, dtype=np.float32)

    def forward(self, x):
        y = x * 2
        return y + torch.from_numpy(self.arr)


@dataclasses.dataclass
class Out:
    a: torch.Tensor


class ReturnsDataclass(nn.Module):
    def forward(self, x):
        y = x + 1
        return Out(y)


def test_numpy_attribute_read_names_the_line():
    with pytest.raises(CaptureError, match=r"(?s)self.arr.*" + HERE + r":\d+.*torch.from_numpy\(self.arr\)") as e:
        trace(ReadsNumpy(), torch.randn(3))
    assert "unknown source line" not in str(e.value)


def test_dataclass_output_names_the_line():
    with pytest.raises(CaptureError, match=r"(?s)Out.*" + HERE + r":\d+.*return Out\(y\)") as e:
        trace(ReturnsDataclass(), torch.randn(3))
    assert "unknown source line" not in str(e.value)


def test_explain_says_when_global_module_hooks_are_registered():
    from foldcompile.explain import explain_graph

    m, x = nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3)
    report = explain_graph(trace(m, x), (x,))
    assert "global module hooks" not in str(report)
    handle = nn_module.register_module_forward_hook(lambda mod, i, o: o)
    try:
        assert "note: global module hooks are registered (register_module_forward_hook (1))" in str(report)
    finally:
        handle.remove()


def test_reassigned_tensor_attribute_is_named_another_object():
    """Both tensors print alike (same shape and dtype): the message must say what differs."""
    class HoldsTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = torch.ones(3)

        def forward(self, x):
            return x + self.t

    m, x = HoldsTensor(), torch.randn(3)
    gm = trace(m, x)
    m.t = torch.ones(3)
    with pytest.raises(GuardError, match="module attribute 't' is another object than the one captured") as e:
        gm(x)
    assert "!= captured" not in str(e.value)
