"""Modules the guard tests share (test_guards_soundness.py, test_guards_fastpath.py,
test_capture_side_effects.py): a block whose forward reads every kind of state the guards
cover, and a forward with a side effect on its own module."""
from __future__ import annotations

import dataclasses
import enum
import types

import torch
import torch.nn as nn


class Mode(enum.Enum):
    A = 1
    B = 2


@dataclasses.dataclass
class Cfg:
    scale: float = 2.0
    flags: tuple = (True,)


class Configured(nn.Module):
    """Reads a class attribute, class-level plain data, an enum, a list, a dataclass, a namespace and a
    function attribute. Tests that mutate class attributes subclass it first (``type("Configured",
    (Configured,), {"table": {"k": [1, 2]}})``) so the others keep theirs."""

    gate = True                 # class attribute the forward branches on
    table = {"k": [1, 2]}       # class-level plain data, mutated in place by tests

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = torch.relu
        self.mode = Mode.A
        self.sizes = [1, 2]
        self.cfg = Cfg()
        self.ns = types.SimpleNamespace(shift=1.0)

    def forward(self, x):
        y = self.lin(x) * self.cfg.scale + self.ns.shift + self.table["k"][1]
        if self.gate and self.mode is Mode.A and self.cfg.flags[0] and len(self.sizes) == 2:
            y = self.act(y)
        return y


class Caching(nn.Module):
    """Writes a module attribute in forward: a side effect the capture refuses."""

    def __init__(self):
        super().__init__()
        self.last = None

    def forward(self, x):
        self.last = x.detach()
        return x + 1


# the hook kinds a capture must see added or removed: each registers one on ``mod`` and returns its handle
HOOK_REGISTRATIONS = [
    lambda mod: mod.register_forward_hook(lambda _m, _i, out: out * 2),
    lambda mod: mod.register_forward_pre_hook(lambda _m, inp: (inp[0] * 2,)),
    lambda mod: mod.register_full_backward_hook(lambda *_: None),
]
