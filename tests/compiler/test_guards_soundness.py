"""The captured graph computes what the model computes, or refuses with a GuardError naming the guard.

Each test changes something the capture specialised on (module state, parameters, hooks, input
layout, globals, training mode of inlined modules) and requires a refusal, never a silent
divergence; legitimate repeated calls and in-place updates must keep working.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch
import torch.nn as nn

from foldcompile.capture import CaptureError, trace
from foldcompile.explain import explain_graph
from foldcompile.guards import GuardError
from foldcompile.passes.base import PassError

sys.path.insert(0, os.path.dirname(__file__))
from guard_modules import HOOK_REGISTRATIONS, Caching, Configured, Mode  # noqa: E402

X = torch.randn(3, 4)


def _same(gm, model, *args):
    out, ref = gm(*args), model(*args)
    assert torch.allclose(out, ref)


# ---------------------------------------------------------------- 1. module state (guard_modules.Configured)


@pytest.mark.parametrize("change, guard", [
    (lambda m: setattr(type(m), "gate", False), "class attribute 'gate'"),
    (lambda m: setattr(m, "gate", False), "attributes ['gate'] added"),
    (lambda m: type(m).table["k"].append(3), "class attribute 'table'"),
    (lambda m: setattr(m, "mode", Mode.B), "module attribute 'mode'"),
    (lambda m: m.sizes.append(3), "module attribute 'sizes'"),
    (lambda m: setattr(m.cfg, "scale", 3.0), "module attribute 'cfg'"),
    (lambda m: setattr(m.cfg, "flags", (False,)), "module attribute 'cfg'"),
    (lambda m: setattr(m.ns, "shift", 2.0), "module attribute 'ns'"),
    (lambda m: setattr(m, "act", torch.tanh), "module attribute 'act'"),
    (lambda m: setattr(m, "lin", nn.Linear(4, 4)), "submodule 'lin'"),
])
def test_module_state_changes_are_refused(change, guard):
    cls = type("Configured", (Configured,), {"table": {"k": [1, 2]}})  # fresh class: class attrs are mutated
    m = cls()
    gm = trace(m, X)
    _same(gm, m, X)
    _same(gm, m, X)  # repeated calls pass the guards
    change(m)
    with pytest.raises(GuardError, match=re.escape(guard)):
        gm(X)


def test_swapped_activation_submodule_is_refused():
    class Act(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x)

    m = Act()
    gm = trace(m, X)
    m.act = nn.GELU()
    with pytest.raises(GuardError, match="submodule 'act'"):
        gm(X)


def test_parametrization_after_capture_is_refused():
    m = nn.Sequential(nn.Linear(4, 4))
    gm = trace(m, X)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(m[0], "weight", Double())
    with pytest.raises(GuardError, match="module '0'"):
        gm(X)


# ---------------------------------------------------------------- 2. parameters and buffers


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("offset", torch.randn(4))

    def forward(self, x):
        return self.lin(x) + self.offset


def test_reassigned_parameter_is_refused():
    m = Lin()
    gm = trace(m, X)
    m.lin.weight = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(GuardError, match="'lin.weight'"):
        gm(X)


def test_load_state_dict_assign_is_refused_but_copy_works():
    m = Lin()
    gm = trace(m, X)
    sd = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)            # copies in place: the graph sees the new values
    _same(gm, m, X)
    with torch.no_grad():
        m.offset.add_(1.0)
    _same(gm, m, X)
    m.load_state_dict(sd, assign=True)
    with pytest.raises(GuardError, match="parameter/buffer"):
        gm(X)


def test_dtype_and_requires_grad_changes_are_refused():
    m = Lin()
    gm = trace(m, X)
    m.lin.weight.requires_grad_(False)
    with pytest.raises(GuardError, match="'lin.weight': requires_grad"):
        gm(X)
    m = Lin()
    gm = trace(m, X)
    m.double()
    with pytest.raises(GuardError, match="dtype torch.float64"):
        gm(X)


# ---------------------------------------------------------------- 3. hooks


@pytest.mark.parametrize("register", HOOK_REGISTRATIONS)
def test_hooks_added_after_capture_are_refused(register):
    m = Lin()
    gm = trace(m, X)
    handle = register(m.lin)
    with pytest.raises(GuardError, match="hooks of module 'lin'"):
        gm(X)
    handle.remove()
    _same(gm, m, X)


def test_hook_removed_after_capture_is_refused():
    m = Lin()
    handle = m.lin.register_forward_hook(lambda _m, _i, out: out * 2)
    gm = trace(m, X)
    _same(gm, m, X)
    handle.remove()
    with pytest.raises(GuardError, match="hooks of module 'lin'"):
        gm(X)


# ---------------------------------------------------------------- 4. input tensors


def test_input_requires_grad_and_layout_are_guarded():
    m = Lin()
    gm = trace(m, X)
    with pytest.raises(GuardError, match="requires_grad True"):
        gm(X.clone().requires_grad_())
    with pytest.raises(GuardError, match="strides"):
        gm(torch.randn(4, 3).t())
    _same(gm, m, torch.randn(3, 4))                 # a fresh contiguous tensor is fine
    _same(gm, m, torch.randn(1, 3, 4)[0])           # so is a view with the same layout


def test_noncontiguous_capture_refuses_other_layouts():
    class Alias(nn.Module):
        def forward(self, x):
            return x.reshape(-1) * 2

    xt = torch.randn(4, 3).t()
    m = Alias()
    gm = trace(m, xt)
    assert torch.equal(gm(xt), m(xt))
    with pytest.raises(GuardError, match="strides"):
        gm(xt.contiguous())


# ---------------------------------------------------------------- 5. side effects during capture


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = 0

    def forward(self, x):
        self.n += 1
        return x + self.n


class Logging(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(1)
        return x + 1


@pytest.mark.parametrize("cls, attr, initial", [
    (Caching, "last", None), (Counting, "n", 0), (Logging, "calls", []),
])
def test_forward_side_effects_refuse_capture_and_restore_state(cls, attr, initial):
    m = cls()
    with pytest.raises(CaptureError, match=f"forward (assigns|mutates) module attribute '{attr}'.*side effects"):
        trace(m, X)
    assert getattr(m, attr) == initial and type(getattr(m, attr)) is type(initial)
    assert "_is_torch_compile" not in vars(m)


def test_capture_leaves_a_clean_model_repeatable():
    m = Lin()
    keys = set(vars(m))
    gm = trace(m, X)
    assert set(vars(m)) == keys
    for _ in range(3):
        _same(gm, m, X)


# ---------------------------------------------------------------- 6. explain_graph at moved sizes


class SizeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, m):
        y = self.lin(m)
        if m.shape[1] > 12:          # a size branch that leaves no trace in the graph
            y = self.lin(y)
        return y


def test_explain_graph_checks_structure_with_the_captured_model():
    mod, m = SizeBranch(), torch.randn(5, 11, 8)
    report = explain_graph(trace(mod, m), (m,))
    assert report.model is mod
    assert report.cost(N_res=12)["classes"]["GEMM"]["count"] == 1
    with pytest.raises(PassError, match="structure depends on the sizes"):
        report.cost(N_res=13)


def test_explain_graph_without_a_model_refuses_moved_sizes():
    m = torch.randn(5, 11, 8)
    gm = torch.fx.symbolic_trace(lambda m: torch.nn.functional.relu(m) * 2)
    report = explain_graph(gm, (m,))
    assert report.model is None
    report.cost(N_res=11)  # the captured sizes need no check
    with pytest.raises(PassError, match="no model"):
        report.cost(N_res=13)


# ---------------------------------------------------------------- 8. globals read by forward

SCALE = 2.0
OPTS = {"gate": True}


class UsesGlobals(nn.Module):
    def forward(self, x):
        return x * SCALE if OPTS["gate"] else x


def test_plain_data_globals_are_guarded():
    global SCALE
    m = UsesGlobals()
    gm = trace(m, X)
    _same(gm, m, X)
    try:
        SCALE = 3.0
        with pytest.raises(GuardError, match="global .*SCALE"):
            gm(X)
    finally:
        SCALE = 2.0
    try:
        OPTS["gate"] = False
        with pytest.raises(GuardError, match="global .*OPTS"):
            gm(X)
    finally:
        OPTS["gate"] = True
    _same(gm, m, X)


def test_deep_copied_graph_module_keeps_working():
    import copy

    m = Configured()
    gm = copy.deepcopy(trace(m, X))
    _same(gm, m, X)
    m.sizes.append(3)
    with pytest.raises(GuardError, match="module attribute 'sizes'"):
        gm(X)


# ---------------------------------------------------------------- 9. globals read outside forward's own code

sys.path.insert(0, os.path.dirname(__file__))
import af_style_modules as af_mod  # noqa: E402  (another module, imported at module level as real code does)

HELPER_GAIN = 2.0


def _gain(x):
    return x * HELPER_GAIN  # a helper function reads the global, forward's code never names it


class UsesHelperGlobal(nn.Module):
    def forward(self, x):
        return _gain(x) + 1


def test_globals_read_in_helper_functions_are_guarded_from_dynamos_record():
    global HELPER_GAIN
    m = UsesHelperGlobal()
    gm = trace(m, X)
    _same(gm, m, X)
    try:
        HELPER_GAIN = 3.0
        with pytest.raises(GuardError, match="global .*HELPER_GAIN = 3.0 != captured 2.0") as e:
            gm(X)
        assert e.value.guard == "globals"
    finally:
        HELPER_GAIN = 2.0
    _same(gm, m, X)


def test_globals_of_other_modules_read_by_forward_are_guarded():
    class ReadsOtherModule(nn.Module):
        def forward(self, x):
            return af_mod.GEN_SCALE * x

    m = ReadsOtherModule()
    gm = trace(m, X)
    old = af_mod.GEN_SCALE
    try:
        af_mod.GEN_SCALE = 4.0
        with pytest.raises(GuardError, match="GEN_SCALE"):
            gm(X)
    finally:
        af_mod.GEN_SCALE = old
    _same(gm, m, X)
