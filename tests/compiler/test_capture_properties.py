"""Property tests of the capture's first promise, on generated AF-style modules.

The oracle: **the captured graph equals eager over three successive calls on deep copies of the
arguments (outputs, the arguments after the call, the model's buffers), and the caller's arguments
are deep-equal (and the very same objects) after the capture — or the capture refuses with a
CaptureError**, and then the caller's arguments, the model, its class and the globals are as they
were. Then one change of state between calls (a flag, a chunk size, a deque the forward reads, a
global read by a helper, a re-assigned buffer, ``model.double()``, a module hook, a global module
hook, the training mode), made to the model and its eager twin alike: the graph refuses the call
(GuardError) or still equals eager. Refusal is not a free pass: a generated module is refused exactly when its forward has a
Python side effect the graph cannot repeat (``af.REFUSED_EFFECTS``), so a capture that refused
everything, or took everything, fails here.

The modules come from ``af_style_modules.Generated``: stacks of linear / layer norm / attention
with an optional additive mask / gating behind a flag / a chunk loop over rows / in-place updates
of intermediates / a buffer, inputs and outputs packed bare or in dicts, lists and tuples, and at
most one side effect (writes into the argument containers, a global list, a class attribute, a
deque, a module attribute — refused; in-place buffer and input updates, reads of globals and
deques, writes into containers made in forward — captured and repeated).

The second property is ``report.cost`` at other sizes for size branches that change only a
non-tensor argument (an einsum equation, a dim, a flag, an op): it must refuse, or agree with a
fresh capture at those sizes.

Profiles (tests/conftest.py): ``ci`` (default, derandomized, 25 examples); the ``slow`` sweeps run
with ``-m slow`` (and FOLDCOMPILE_HYPOTHESIS=large for more examples everywhere).
"""
from __future__ import annotations

import copy
import functools
import os
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

from foldcompile.capture import CaptureError, trace
from foldcompile.guards import GuardError
from foldcompile.passes.base import PassError

sys.path.insert(0, os.path.dirname(__file__))
import af_style_modules as af  # noqa: E402


# ---------------------------------------------------------------- strategies

def specs() -> st.SearchStrategy[af.GenSpec]:
    return st.builds(
        af.GenSpec,
        blocks=st.lists(st.sampled_from(af.BLOCKS), min_size=1, max_size=4).map(tuple),
        container=st.sampled_from(af.CONTAINERS),
        output=st.sampled_from(("tensor", "tuple", "dict", "list")),
        effect=st.sampled_from(af.EFFECTS),
        masked=st.booleans(),
        gated=st.booleans(),
        chunk=st.integers(1, 4),
        c=st.sampled_from((4, 8)),
        n=st.tuples(st.integers(1, 5), st.integers(1, 6)),
        dtype=st.sampled_from((torch.float32, torch.float64)),
        training=st.booleans(),
    )


# ---------------------------------------------------------------- comparisons


def _objects(tree, path="args") -> list[tuple[str, int, type]]:
    """Every container and tensor of an argument tree with its identity (to tell a replaced object)."""
    out = [(path, id(tree), type(tree))]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _objects(v, f"{path}[{k!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out += _objects(v, f"{path}[{i}]")
    return out


def _assert_same(a, b, where: str, exact: bool) -> None:
    """Same structure and types, tensors equal (bitwise when ``exact``, else within fp32 rounding)."""
    if isinstance(a, torch.Tensor):
        assert type(a) is torch.Tensor and type(b) is torch.Tensor, f"{where}: {type(a)} vs {type(b)}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if exact:
            assert torch.equal(a, b), f"{where}: values differ"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]", exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", exact)
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _model_state(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "attrs": sorted(vars(model)),
        "history": list(model.history),
        "calls": type(model).calls,
        "log": list(af.GEN_LOG),
    }


def _assert_untouched(spec, args, kwargs, pristine, identities, model, state_before) -> None:
    _assert_same((args, kwargs), pristine, "caller's arguments after the capture", exact=True)
    assert _objects(args, "args") + _objects(kwargs, "kwargs") == identities, "the capture replaced an object inside the caller's arguments"
    now = _model_state(model)
    assert now["attrs"] == state_before["attrs"], f"model attributes {now['attrs']} vs {state_before['attrs']}"
    assert now["history"] == state_before["history"] and now["calls"] == state_before["calls"]
    assert now["log"] == state_before["log"], "a global list was changed by the capture"
    _assert_same(now["tensors"], state_before["tensors"], "model parameters and buffers", exact=True)


# ---------------------------------------------------------------- property 1: capture == eager, or refuse


def _check_capture(spec: af.GenSpec, change: str = "none") -> None:
    torch.manual_seed(0)
    cls = type("Generated", (af.Generated,), {"calls": 0})  # class attributes of its own
    model = cls(spec)
    eager = copy.deepcopy(model)  # its own buffers: the graph updates the captured model's in place
    args, kwargs = af.generated_inputs(spec, torch.Generator().manual_seed(1))
    pristine = copy.deepcopy((args, kwargs))
    identities = _objects(args, "args") + _objects(kwargs, "kwargs")
    state_before = _model_state(model)
    refused = spec.effect in af.REFUSED_EFFECTS
    try:
        gm = trace(model, *args, **kwargs)
    except CaptureError as e:
        assert refused, f"refused a module it can capture ({spec}): {e}"
        _assert_untouched(spec, args, kwargs, pristine, identities, model, state_before)
        return
    assert not refused, f"captured a forward whose side effect ({spec.effect}) the graph cannot repeat: {spec}"
    _assert_untouched(spec, args, kwargs, pristine, identities, model, state_before)
    for call in range(3):
        # the first call on copies of the example itself, the others on fresh values of its structure
        example = pristine if call == 0 else af.generated_inputs(spec, torch.Generator().manual_seed(10 + call))
        a_eager, a_graph = copy.deepcopy(example), copy.deepcopy(example)
        torch.manual_seed(100 + call)  # dropout: the graph draws the same random numbers as eager
        ref = eager(*a_eager[0], **a_eager[1])
        torch.manual_seed(100 + call)
        out = gm(*a_graph[0], **a_graph[1])
        _assert_same(out, ref, f"call {call}: output", exact=False)
        _assert_same(a_graph, a_eager, f"call {call}: arguments after the call", exact=False)
        _assert_same(dict(model.named_buffers()), dict(eager.named_buffers()), f"call {call}: buffers", exact=False)
    _check_after_change(spec, model, eager, gm, pristine, change)


# what a user may change between calls; each is applied to the captured model and its eager twin alike
CHANGES = ("none", "flip_flag", "chunk_size", "history", "global_value", "reassign_parameter", "to_double",
           "module_hook", "global_hook", "train_mode")


def _check_after_change(spec, model, eager, gm, example, change) -> None:
    """After a change of state, the graph refuses the call (GuardError) or still equals eager."""
    undo = []
    for m in (model, eager):
        if change == "flip_flag":
            m.gated = not m.gated
        elif change == "chunk_size":
            m.chunk_size += 1
        elif change == "history":
            m.history.append(1)
        elif change == "reassign_parameter":
            m.offset = torch.full_like(m.offset, 0.25)  # a new buffer object, the same for both
        elif change == "to_double":
            m.double()
        elif change == "module_hook":
            m.layers[0].register_forward_hook(lambda _m, _i, out: out * 2 if isinstance(out, torch.Tensor) else out)
        elif change == "train_mode":
            m.train(not m.training)
    if change == "global_value":
        old = af.GEN_SCALE
        af.GEN_SCALE = 0.75
        undo.append(lambda: setattr(af, "GEN_SCALE", old))
    elif change == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(
            lambda _m, _i, out: out + 1 if isinstance(out, torch.Tensor) else out)
        undo.append(handle.remove)
    try:
        a_eager, a_graph = copy.deepcopy(example), copy.deepcopy(example)
        torch.manual_seed(7)
        try:
            ref = eager(*a_eager[0], **a_eager[1])
        except (RuntimeError, TypeError):  # the change breaks eager itself (a dtype mismatch): nothing to compare
            return
        torch.manual_seed(7)
        try:
            out = gm(*a_graph[0], **a_graph[1])
        except GuardError:
            return
        _assert_same(out, ref, f"after {change}: output", exact=False)
    finally:
        for f in undo:
            f()


# three times the profile's default in CI (about 20 s here): these examples are cheap and this is the
# property that matters most; the large profile and the slow sweep below draw more
@settings(max_examples=max(75, settings.default.max_examples))
@given(spec=specs(), change=st.sampled_from(CHANGES))
def test_generated_modules_capture_equals_eager_or_refuses(spec, change):
    _check_capture(spec, change)


@pytest.mark.slow
@settings(max_examples=300)
@given(spec=specs(), change=st.sampled_from(CHANGES))
def test_generated_modules_capture_equals_eager_or_refuses_large(spec, change):
    _check_capture(spec, change)


# ---------------------------------------------------------------- property 2: cost at other sizes

# size branches that change only a non-tensor argument (or the op), picked by ``z.shape[0] <= threshold``
BRANCHES = ("equation", "equation_same_cost", "reduce_letters", "softmax_dim", "keepdim", "sum_or_mean",
            "extra_cast", "flag_argument")


class _SizeBranch(nn.Module):
    def __init__(self, kind: str, threshold: int):
        super().__init__()
        self.kind, self.threshold = kind, threshold
        self.lin = nn.Linear(6, 6)

    def forward(self, z):
        a = self.lin(z)
        small = z.shape[0] <= self.threshold
        kind = self.kind
        if kind == "equation":              # a contraction (2·N³·c) or an element-wise product (N²·c)
            return torch.einsum("ijc,kjc->ikc" if small else "ijc,ijc->ijc", a, z)
        if kind == "equation_same_cost":    # same cost, other function
            return torch.einsum("ijc,kjc->ikc" if small else "ijc,kjc->kic", a, z)
        if kind == "reduce_letters":
            # (two operands: the one-operand form "ijc->ic" breaks shape_prop's einsum rule, reported)
            return torch.einsum("ijc,ijc->ic" if small else "ijc,ijc->jc", a, z)
        if kind == "softmax_dim":
            return torch.softmax(a, dim=-1 if small else 0)
        if kind == "keepdim":
            return a.sum(-1, keepdim=small) * 2.0
        if kind == "sum_or_mean":
            return a.sum(-1) if small else a.mean(-1)
        if kind == "extra_cast":
            return (a.double() if small else a) * 2.0
        return torch.nn.functional.gelu(a, approximate="tanh" if small else "none")  # flag_argument


@functools.lru_cache(maxsize=None)
def _report(kind: str, threshold: int, n: int):
    from foldcompile.explain import explain

    torch.manual_seed(0)
    return explain(_SizeBranch(kind, threshold), torch.randn(n, n, 6))


def _check_cost(kind: str, threshold: int, n: int, m: int) -> None:
    report = _report(kind, threshold, n)
    try:
        got = report.cost(N_res=m)["classes"]
    except PassError:  # SizeGuardError is one: refusing is always allowed
        return
    assert got == _report(kind, threshold, m).cost()["classes"], \
        f"cost at N_res={m} from a capture at {n} differs from a capture at {m} ({kind}, threshold {threshold})"


def size_cases(lo: int, hi: int) -> st.SearchStrategy[tuple[int, int, int]]:
    """``(threshold, n, m)``: capture at ``n``, cost at ``m != n``; the threshold mostly between them (the
    branch flips), sometimes outside (it does not, and the cost must be given, equal to a fresh one)."""
    def with_threshold(nm):
        n, m = nm
        return st.integers(min(n, m) - 1, max(n, m)).map(lambda t: (t, n, m))
    return st.tuples(st.integers(lo, hi), st.integers(lo, hi)).filter(lambda nm: nm[0] != nm[1]) \
        .flatmap(with_threshold)


@settings(max_examples=10)
@given(kind=st.sampled_from(BRANCHES), case=size_cases(9, 14))
def test_size_branch_on_arguments_refuses_or_agrees_with_a_fresh_capture(kind, case):
    _check_cost(kind, *case)


@pytest.mark.slow
@settings(max_examples=120)
@given(kind=st.sampled_from(BRANCHES), case=size_cases(9, 18))
def test_size_branch_on_arguments_refuses_or_agrees_with_a_fresh_capture_large(kind, case):
    _check_cost(kind, *case)


def test_every_size_branch_kind_across_its_threshold_refuses_or_agrees():
    """Each branch kind once on each side of its threshold, whatever the draw above."""
    for kind in BRANCHES:
        _check_cost(kind, 11, 11, 12)
        _check_cost(kind, 11, 12, 11)
