"""The op registry, tested from its own table (OpInfo style): every entry, every callable it is
keyed by, every sample call — shape rule and class against the op run on real and on fake
tensors, FLOPs against FlopCounterMode (GEMMs) or the entry's stated count per element."""
from __future__ import annotations

import operator

import pytest
import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from foldcompile.passes.classify import classify_pass
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.registry import (ELEMENTWISE, GEMM, LAYOUT, REDUCTION, entries, entry_of, lookup,
                                         op_name, register_op)
from foldcompile.passes.shape_prop import shape_prop_pass

ENTRIES = list(entries())
DIMS = {"N_a": 5, "N_b": 7}  # op_samples' sizes: literal 5 and 7 are these dims


def _graph_of(target, args, kwargs) -> tuple[fx.GraphModule, list]:
    """One call of ``target`` with every tensor argument (also inside lists) a placeholder."""
    g = fx.Graph()
    values: list = []

    def lift(a):
        if isinstance(a, torch.Tensor):
            values.append(a)
            return g.placeholder(f"x{len(values)}")
        if isinstance(a, list):
            return [lift(x) for x in a]
        return a

    node = g.call_function(target, tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()})
    entry = lookup(target)
    if entry is not None and entry.op_class == "COMM" and entry.name != "wait_tensor":
        node = g.call_function(torch.ops._c10d_functional.wait_tensor.default, (node,))  # awaited, as it must be
    g.output(node)
    return fx.GraphModule(torch.nn.Module(), g), values


def _cases():
    # the quick tier runs each entry through its first callable; the full tier through every one
    for e in ENTRIES:
        for i, t in enumerate(e.targets):
            yield pytest.param(e, t, id=f"{e.name}-{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}",
                               marks=() if i == 0 else (pytest.mark.full,))


@pytest.fixture(scope="module")
def one_process_group():
    """A one-process gloo group, so the collectives' entries run for real too."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run(target, args, kwargs):
    out = target(*args, **kwargs)
    entry = lookup(target)
    if entry is not None and entry.op_class == "COMM" and isinstance(out, torch.Tensor):
        out = torch.ops._c10d_functional.wait_tensor(out)  # a functional collective's result is awaited
    return out


def _call_fits(target, args, kwargs) -> bool:
    # not every callable of a name takes every sample (a Tensor method takes the tensor first,
    # Tensor.where(cond, other) orders its arguments otherwise): a sample a callable cannot take is
    # left to the others of its entry, and each callable must take at least one (asserted below)
    try:
        _run(target, [a.clone() if isinstance(a, torch.Tensor) else a for a in args], kwargs)
        return True
    except (TypeError, RuntimeError):
        return False


@pytest.mark.parametrize("entry,target", list(_cases()))
def test_every_registry_entry_against_the_op(entry, target, one_process_group):
    calls = entry.samples() if entry.samples is not None else []
    assert calls, f"entry {entry.name!r} has no sample inputs"
    ran = 0
    for args, kwargs in calls:
        if not _call_fits(target, args, kwargs):
            continue
        ran += 1
        gm, values = _graph_of(target, args, kwargs)
        gm = normalize_pass(gm).graph_module
        res = shape_prop_pass(gm, [v.clone() for v in values], dims=DIMS)
        assert res.record["fallback"] == [], f"{entry.name}: the shape rule did not apply: {res.record['fallback']}"
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        assert entry_of(node) is entry and op_name(node) == entry.name
        real_sym = node.meta["sym_shape"]
        # the same on fake tensors: no data, same symbolic sizes
        fake_gm, fake_values = _graph_of(target, args, kwargs)
        fake_gm = normalize_pass(fake_gm).graph_module
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [mode.from_tensor(v) for v in fake_values]
        shape_prop_pass(fake_gm, fakes, dims=DIMS, fake=True)
        fake_node = next(n for n in fake_gm.graph.nodes if n.op == "call_function")
        assert fake_node.meta["sym_shape"] == real_sym and fake_node.meta["shape"] == node.meta["shape"]
        classify_pass(gm)
        cls = node.meta["op_class"]
        if node.meta["shape"] is None:
            assert cls == LAYOUT  # sizes and Python numbers: no tensor work
            continue
        assert cls == entry.class_of(node), f"{entry.name}: classed {cls}"
        subs = {sympy.Symbol(k, positive=True, integer=True): v for k, v in DIMS.items()}
        flops = int(sympy.sympify(node.meta["cost"]["flops"]).subs(subs))
        if cls == GEMM:
            with FlopCounterMode(display=False) as fc:
                if entry.name == "foldcompile.attention":  # opaque to the counter: count its two products
                    q, k, v = args[:3]
                    torch.matmul(torch.matmul(q, k.transpose(-1, -2)).softmax(-1), v)
                elif entry.name == "foldcompile.outer_product_mean":  # the same: its two products
                    a, b, w = args[:3]
                    o = torch.einsum("...sic,...sje->...ijce", a, b)
                    torch.nn.functional.linear(o.flatten(-2), w.flatten(1))
                else:
                    target(*args, **kwargs)
            if not (entry.name == "matmul" and values[1].dim() == 1):  # FlopCounterMode does not count aten.mv
                assert flops == fc.get_total_flops(), f"{entry.name}: {flops} vs FlopCounterMode {fc.get_total_flops()}"
        elif cls in (REDUCTION, ELEMENTWISE):
            out = _run(gm, values, {})
            out_numel = out.numel() if isinstance(out, torch.Tensor) else sum(o.numel() for o in out)
            if cls == REDUCTION:
                assert flops == entry.flops_per_element * values[0].numel()
            else:
                per = entry.flops_per_element if entry.op_class == ELEMENTWISE else 1
                assert flops == per * out_numel
        else:
            assert flops == 0  # LAYOUT and COMM move bytes only
    assert ran, f"no sample of {entry.name!r} fits {target!r}"


class _SeededOps(TorchDispatchMode):
    """Records the ATen ops a call dispatches that torch tags as drawing from its generator."""

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.op_class != "COMM"], ids=lambda e: e.name)
def test_random_says_whether_the_op_draws_from_the_generator(entry):
    """``random`` against torch's own fact: an entry is random iff one of its sample calls dispatches
    an ATen op tagged ``nondeterministic_seeded`` (fuse, verify, the CUDA-graph executor and the DAP
    lowering all read ``random``: a random op without it would be erased as dead code or redrawn)."""
    drew = []
    for target in entry.targets:
        for args, kwargs in entry.samples():
            if not _call_fits(target, args, kwargs):
                continue
            with _SeededOps() as mode:
                _run(target, [a.clone() if isinstance(a, torch.Tensor) else a for a in args], kwargs)
            drew += mode.seen
    assert entry.random == bool(drew), f"{entry.name}: random={entry.random}, dispatched {set(drew)}"


def test_draws_random_reads_the_registry_then_torchs_tag():
    from foldcompile.passes.registry import draws_random

    g = fx.Graph()
    x = g.placeholder("x")
    nodes = [g.call_method("uniform_", (x,)), g.call_function(torch.randint, (3, (2, 2))),
             g.call_function(torch.ops.aten.native_dropout.default, (x, 0.1, True)),
             g.call_function(torch.native_dropout, (x, 0.1, True)),
             g.call_function(torch.nn.functional.dropout, (x,), {"training": False}),
             g.call_function(torch.sin, (x,)), g.call_function(torch.ops.aten.add.Tensor, (x, x))]
    assert [draws_random(n) for n in nodes] == [True, True, True, True, True, False, False]


def test_the_registry_is_keyed_by_callables_not_names():
    assert lookup(torch.permute) is lookup(torch.Tensor.permute) is not None
    assert lookup(operator.add) is lookup(torch.add) is lookup(torch.Tensor.add)
    assert lookup("permute") is None
    assert all(not isinstance(t, str) for e in ENTRIES for t in e.targets)


@pytest.mark.full  # three captures
def test_every_op_the_zoo_produces_has_an_entry():
    from foldcompile.explain import explain
    from foldcompile.models import zoo

    for name in ("evoformer_block", "pairformer_block", "structure_module"):
        module, inputs = zoo.get(name, size="tiny")
        report = explain(module.eval(), *inputs)
        missing = {op_name(n) for n in report.graph_module.graph.nodes
                   if n.op == "call_function" and entry_of(n) is None
                   and n.target is not torch._C._set_grad_enabled}
        assert missing == set(), f"{name}: ops without a registry entry: {missing}"
        assert report.passes["classify"]["record"]["uncosted"] == []


def my_gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """An op no table knew: ``x * sigmoid(g)``."""
    return x * torch.sigmoid(g)


@register_op(my_gate, op_class=ELEMENTWISE, flops_per_element=2,
             samples=lambda: [((torch.randn(5, 7), torch.randn(5, 7)), {})])
def _rule_my_gate(ctx):
    return ctx.tshape(0)[1]


def test_a_new_op_registered_with_one_decorator_flows_through_every_pass():
    from foldcompile.explain import explain_graph

    g = fx.Graph()
    m, gate = g.placeholder("m"), g.placeholder("gate")
    g.output(g.call_method("sum", (g.call_function(my_gate, (m, gate)), -1)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    x = (torch.randn(11, 13, 4), torch.randn(11, 13, 4))
    report = explain_graph(gm, x)
    node = next(n for n in report.graph_module.graph.nodes if n.target is my_gate)
    S, R = (sympy.Symbol(d, positive=True, integer=True) for d in ("N_seq", "N_res"))
    assert node.meta["sym_shape"] == (S, R, 4) and report.passes["shape_prop"]["record"]["fallback"] == []
    assert node.meta["op_class"] == "ELEMENTWISE" and node.meta["cost"]["flops"] == 2 * S * R * 4
    assert report.passes["classify"]["record"]["uncosted"] == []
    assert report.to_dict()["classes"]["ELEMENTWISE"]["flops"] == 2 * 11 * 13 * 4
    assert "ELEMENTWISE" in str(report)


def test_fusible_says_what_the_element_wise_generator_lowers():
    """``fusible="pointwise"`` on an entry iff the generator (kernels/elementwise_codegen.py, whose
    lowering tables stay in kernels/) takes one of its callables or its method name."""
    from foldcompile.kernels import elementwise_codegen as codegen

    for e in ENTRIES:
        takes = any(t in codegen._FUNCTIONS for t in e.targets) or e.name in codegen._METHODS
        assert (e.fusible == "pointwise") == takes, e.name
