"""What the CUDA-graph executor refuses, checked on CPU (foldcompile/executors/cuda_graph.py).

Graphs whose replay would compute something else are refused before the first call
(``cuda_graph_unsafe_reason``): a host synchronisation, checkpointing around a random op, autocast
with its weight cache on. Torch's own dropout is graph-safe (the CUDA generator's Philox offset
advances per replay), and so are our kernels' dropouts (their seed is a device state, never read
on the host). The first call runs eagerly and is watched: a forward writing an input or a buffer in
place turns CUDA graphs off for the variant, with the reason. A capture that fails (here: no CUDA)
is caught: the call and every later one run eagerly, the reason in ``describe()``.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.utils.checkpoint

from foldcompile.executors.cuda_graph import CudaGraphExecutor, cuda_graph_unsafe_reason
from foldcompile.kernels import fuse_elementwise, shared_dropout
from foldcompile.kernels.philox import draw_dropout_seed
from foldcompile.passes.rules.elementwise import kernel_function


def _graph(fn):
    return torch.fx.symbolic_trace(fn)


def test_torch_dropout_and_bernoulli_are_graph_safe():
    assert cuda_graph_unsafe_reason(_graph(lambda x: torch.nn.functional.dropout(x, 0.25) + 1)) is None
    assert cuda_graph_unsafe_reason(_graph(lambda x: x * torch.bernoulli(torch.full_like(x, 0.75)))) is None


def test_our_kernels_dropouts_are_graph_safe_their_seed_is_a_device_state():
    # with or without a seed node in the graph: a missing seed is drawn on the device, never on the host
    fused = fuse_elementwise(lambda x: torch.nn.functional.dropout(x, 0.1) * 2.0)
    assert fused.has_dropout
    g = torch.fx.Graph()
    x = g.placeholder("x")
    seed = g.call_function(draw_dropout_seed, (x,))
    g.output(g.call_function(kernel_function(fused, "fused_elementwise_dropout_mul"), (x,), {"seed": seed}))
    assert cuda_graph_unsafe_reason(torch.fx.GraphModule({}, g)) is None
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(shared_dropout, (x, 0.25), {"shared_dims": (0,)}))
    assert cuda_graph_unsafe_reason(torch.fx.GraphModule({}, g)) is None


def test_host_synchronisation_is_refused():
    why = cuda_graph_unsafe_reason(_graph(lambda x: x * x.sum().item()))
    assert "reads a device value on the host" in why
    assert "nonzero" in cuda_graph_unsafe_reason(_graph(lambda x: x.nonzero()))


def test_checkpoint_around_dropout_is_refused_but_not_around_deterministic_ops():
    body_random = _graph(lambda x: torch.nn.functional.dropout(x, 0.5).relu())
    body_plain = _graph(lambda x: x.relu() * 2)
    for body, refused in ((body_random, True), (body_plain, False)):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        b = g.get_attr("body")
        g.output(g.call_function(torch.utils.checkpoint.checkpoint, (b, x), {"use_reentrant": False}))
        why = cuda_graph_unsafe_reason(torch.fx.GraphModule({"body": body}, g))
        assert (why is not None) == refused, why
        if refused:
            assert "checkpointing around a random op (dropout)" in why


def _one_call(target, *args) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(target, (x, *args)))
    return torch.fx.GraphModule({}, g)


def _checkpointed(body_fn) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.utils.checkpoint.checkpoint, (g.get_attr("body"), x), {"use_reentrant": False}))
    return torch.fx.GraphModule({"body": _graph(body_fn)}, g)


def test_host_syncs_and_random_ops_are_the_registry_s_ops_in_any_spelling_never_a_name():
    def item(x):  # a user's helper that happens to share Tensor.item's name
        return x * 2

    assert cuda_graph_unsafe_reason(_one_call(item)) is None
    assert "(nonzero) reads a device value" in cuda_graph_unsafe_reason(_one_call(torch.ops.aten.nonzero.default))
    assert "reads a device value" in cuda_graph_unsafe_reason(_one_call(torch.Tensor.tolist))
    for body in (lambda x: torch.nn.functional.dropout2d(x, 0.5), lambda x: x.clone().uniform_(),
                 lambda x: torch.ops.aten.native_dropout.default(x, 0.5, True)[0]):
        assert "checkpointing around a random op" in cuda_graph_unsafe_reason(_checkpointed(body))


def test_autocast_with_its_cache_is_refused():
    gm = _graph(lambda x: x @ x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "weight cache on" in cuda_graph_unsafe_reason(gm)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        assert cuda_graph_unsafe_reason(gm) is None


def test_autocast_made_explicit_is_graph_safe_and_a_node_left_under_autocast_is_not():
    # Boltz-2 runs under torch.autocast with its weight cache on: once the casts are explicit the graph runs
    # every op inside autocast(enabled=False), so nothing is cached; a node the pass refused stays under
    # autocast in a region of its own, and the executor names it
    import torch.nn.functional as F
    from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
    from foldcompile.passes.explicit_autocast import explicit_autocast_pass

    def f(x, w):
        return F.linear(x, w).softmax(-1) * x.sum()

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    explicit = normalize_pass(torch.fx.symbolic_trace(f)).graph_module
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "node 'linear' (linear) runs under autocast with its weight cache on" in cuda_graph_unsafe_reason(
            normalize_pass(torch.fx.symbolic_trace(f)).graph_module)
        shape_prop_pass(explicit, (x, w), dims={})
        classify_pass(explicit)
        assert explicit_autocast_pass(explicit).record["explicit"]
        assert cuda_graph_unsafe_reason(explicit) is None
        # a region that enables autocast again inside the explicit graph: its op is named
        first = next(n for n in explicit.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
        with explicit.graph.inserting_before(first):
            enter = explicit.graph.call_function(torch.amp.autocast_mode._enter_autocast,
                                                 ("cpu", torch.bfloat16, True, True))
        with explicit.graph.inserting_after(first):
            explicit.graph.call_function(torch.amp.autocast_mode._exit_autocast, (enter,))
        explicit.recompile()
        assert f"node {first.name!r}" in cuda_graph_unsafe_reason(explicit)


def test_first_call_is_eager_and_a_failed_capture_falls_back():
    gm = _graph(lambda x, w: torch.sigmoid(x) * w)
    run = CudaGraphExecutor(gm, requested="cuda_graph", reason="test")
    x, w = torch.randn(4, 3), torch.randn(3)
    assert torch.equal(run((x, w), {}), torch.sigmoid(x) * w)  # watched eager call
    assert run.observed and run.name == "cuda_graph"
    assert torch.equal(run((x, w), {}), torch.sigmoid(x) * w)  # capture fails on CPU: eager
    d = run.describe()
    assert d["executor"] == "eager" and "capture failed" in d["reason"] and "one CUDA device" in d["reason"]
    assert d["captures"] == 0
    assert torch.equal(run((x, w), {}), torch.sigmoid(x) * w)


def test_a_forward_writing_its_input_in_place_turns_graphs_off():
    class Writes(torch.nn.Module):
        def forward(self, x):
            x.add_(1)
            return x * 2

    gm = torch.fx.symbolic_trace(Writes())
    run = CudaGraphExecutor(gm, requested="auto", reason="test")
    x = torch.zeros(3)
    out = run((x,), {})
    assert torch.equal(x, torch.ones(3)) and torch.equal(out, torch.full((3,), 2.0))
    assert run.name == "eager" and "writes input 0 in place" in run.describe()["reason"]


def test_a_forward_writing_a_buffer_in_place_turns_graphs_off():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    calls = g.get_attr("calls")
    g.call_method("add_", (calls, 1))
    g.output(g.call_function(torch.add, (x, calls)))
    gm = torch.fx.GraphModule({"calls": torch.zeros(())}, g)
    run = CudaGraphExecutor(gm, requested="auto", reason="test")
    run((torch.zeros(2),), {})
    assert run.name == "eager" and "writes calls in place" in run.describe()["reason"]
    assert float(gm.calls) == 1.0  # applied once, by the call itself


def _shape_propped(fn, *inputs) -> torch.fx.GraphModule:
    from foldcompile.passes.shape_prop import shape_prop_pass
    gm = _graph(fn)
    shape_prop_pass(gm, inputs)
    return gm


def test_repeat_interleave_by_an_int_is_graph_safe_by_a_tensor_it_reads_the_device():
    # issue 12: Boltz-2's `bias.repeat_interleave(multiplicity, 0)` with an int multiplicity is an
    # expand and a copy; only a tensor of repeats (whose sum sizes the output) is read on the host
    x = torch.randn(3, 4)
    assert cuda_graph_unsafe_reason(_graph(lambda x: x.repeat_interleave(2, 0))) is None
    assert cuda_graph_unsafe_reason(_graph(lambda x: torch.repeat_interleave(x, 2, dim=0))) is None
    # the int as a graph input, known to be an int from shape_prop's meta
    assert cuda_graph_unsafe_reason(_shape_propped(lambda bias, m: bias.repeat_interleave(m, 0), x, 3)) is None
    counts = torch.tensor([1, 0, 2])
    for gm in (_graph(lambda x, counts: x.repeat_interleave(counts, dim=0)),
               _shape_propped(lambda x, counts: x.repeat_interleave(counts, dim=0), x, counts),
               _graph(lambda counts: torch.repeat_interleave(counts)),
               _one_call(torch.ops.aten.repeat_interleave.Tensor)):
        why = cuda_graph_unsafe_reason(gm)
        assert why is not None and "(repeat_interleave) reads a device value on the host" in why, why
        node = next(n for n in gm.graph.nodes if "repeat_interleave" in str(n.target))
        assert why.startswith(f"node {node.name!r} "), why
    # with its output size given, a tensor of repeats is not read on the host
    assert cuda_graph_unsafe_reason(_graph(lambda x, counts: x.repeat_interleave(counts, dim=0, output_size=3))) is None


def test_boltz2_attention_pair_bias_is_not_refused_for_its_repeat_interleave():
    # the unmodified Boltz-2 layer, captured as foldcompile captures it (Dynamo): multiplicity=1 is an int
    # boltz 2.2.1 as tests/third_party/test_boltz.py installs it (no skip: a missing boltz fails here)
    import boltz.model.layers.attentionv2 as attention
    from foldcompile.capture import trace
    layer = attention.AttentionPairBias(c_s=16, c_z=8, num_heads=2).eval()
    s, z, mask = torch.randn(1, 5, 16), torch.randn(1, 5, 5, 8), torch.ones(1, 5)
    gm = trace(layer, s, z, mask, s)
    assert any(n.op in ("call_function", "call_method") and "repeat_interleave" in str(n.target)
               for n in gm.graph.nodes), gm.code
    assert cuda_graph_unsafe_reason(gm) is None
