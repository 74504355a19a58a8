"""The third-party corpus (catalog.py) runs, is deterministic, and is captured as one graph equal to eager.

For every case: eager train and eval forward/backward run and are finite, eval is
bit-for-bit repeatable; ``foldcompile.trace`` captures it, in train and in eval, as ONE
graph with no leaf modules whose outputs and parameter gradients equal eager's on fresh
inputs (train mode with the same RNG seed, so dropout draws the same masks). The catalog
is checked against the captured graphs where it can be (layer-norm and softmax calls) and
every near miss is checked to be a real one: the function its look-alike rule would
compute (``misread``) differs from the module's.

Each (case, mode) is captured once and shared by the tests that need it; eval mode is
captured where it runs other code than train (``Case.eval_differs``).
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.utils import _pytree as pytree

from foldcompile.capture import trace

from .catalog import FAMILIES, case, cases

CASES = list(cases())
NAMES = [c.name for c in CASES]
NEAR_MISSES = [c.name for c in CASES if c.style == "near_miss"]
# every case is captured in train mode, and in eval mode where eval runs other code (the eager
# test runs both modes for every case); capture is the expensive part of this file
MODES = [(c.name, "train") for c in CASES if c.train] + [(c.name, "eval") for c in CASES if c.eval and c.eval_differs]
STYLE_WORDS = {"openfold": "OpenFold", "boltz": "Boltz", "protenix": "Protenix"}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _loss(out) -> torch.Tensor:
    """A weighted sum of every output, with fixed random weights (no symmetric cancellation)."""
    g = torch.Generator().manual_seed(99)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in pytree.tree_leaves(out))


def _run(fn, params, args, kwargs, seed: int):
    torch.manual_seed(seed)
    out = fn(*args, **kwargs)
    grads = torch.autograd.grad(_loss(out), params, allow_unused=True)
    return out, grads


@functools.lru_cache(maxsize=None)
def _captured(name: str, mode: str):
    c = case(name)
    model = c.build()
    model.train(mode == "train")
    args, kwargs = c.inputs(seed=0)
    return c, model, trace(model, *args, **kwargs)


def _call_names(gm: torch.fx.GraphModule) -> list[str]:
    names = []
    for _, mod in gm.named_modules():
        if isinstance(mod, torch.fx.GraphModule):
            for n in mod.graph.nodes:
                if n.op in ("call_function", "call_method"):
                    names.append(n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
    return names


# ----------------------------------------------------------------------------- the catalog itself


def test_catalog_docstring_example():
    import doctest

    from . import catalog

    result = doctest.testmod(catalog, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_hand_written_layer_norm_is_a_layer_norm():
    """The hand-written positive equals F.layer_norm (the near-miss test shows the RMS and unbiased ones do not)."""
    model = case("px_layer_norm_by_hand").build()
    (x,), _ = case("px_layer_norm_by_hand").inputs(seed=0)
    with torch.no_grad():
        ref = model.linear_no_bias(torch.nn.functional.layer_norm(x, x.shape[-1:], model.weight, model.bias, model.eps))
        assert _rel_err(model(x), ref) <= 1e-6


def test_catalog_is_well_formed():
    assert len(NAMES) == len(set(NAMES))
    styles = {c.style for c in CASES}
    assert styles == {"openfold", "boltz", "protenix", "near_miss"}
    refused = set()
    for c in CASES:
        assert set(c.expected) <= set(FAMILIES) and set(c.at_least) <= set(FAMILIES), c.name
        assert all(isinstance(v, int) and v >= 0 for v in {**c.expected, **c.at_least}.values()), c.name
        assert c.train or c.eval, c.name
        if c.style == "near_miss":
            assert c.refuse in FAMILIES and c.why, c.name
            refused.add(c.refuse)
        else:
            assert c.refuse is None and {"attention", "layer_norm", "softmax"} <= set(c.expected), c.name
        assert c.seq_dims, c.name
        for n in c.seq_dims:
            assert n <= 24 and n % 8 != 0, (c.name, n)
        if c.expected.get("attention", 0) > 0 or c.refuse == "attention":
            assert c.head_dim is not None and c.head_dim >= 8, c.name
    assert refused == set(FAMILIES), "every rule family needs at least one near miss"
    # the spellings the corpus promises, each exercised by at least one positive case
    positives = {c.name for c in CASES if c.style != "near_miss"}
    for needed in ("px_attention_pair_bias_sdpa", "px_bmm_attention", "bz_attention_pair_bias",
                   "of_msa_column_global_attention", "px_bool_mask_where", "px_bool_mask_masked_fill_finfo",
                   "px_bool_mask_masked_fill_inf", "px_bool_mask_sdpa_bool", "px_attention_local_window_chunked"):
        assert needed in positives


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs_have_the_declared_sizes(name):
    c = case(name)
    args, kwargs = c.inputs(seed=0)
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    dims = {d for t in tensors for d in t.shape}
    assert set(c.seq_dims) <= dims
    for t in tensors:
        if t.is_floating_point() and t.dim() >= 2 and t.shape[-1] not in c.seq_dims:
            assert t.shape[-1] >= 8, (name, tuple(t.shape))  # channels
    # fresh inputs: same shapes, other values
    args2, kwargs2 = c.inputs(seed=1)
    again = [t for t in pytree.tree_leaves((args2, kwargs2)) if isinstance(t, torch.Tensor)]
    assert [t.shape for t in again] == [t.shape for t in tensors]
    assert any(not torch.equal(a, b) for a, b in zip(again, tensors) if a.is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_docstring_names_style_and_spelling(name):
    c = case(name)
    doc = c.module.__doc__ or ""
    assert "Style:" in doc and "Spelling:" in doc, name
    if c.style == "near_miss":
        assert doc.startswith(f"Near miss ({c.refuse}"), name
    else:
        assert STYLE_WORDS[c.style] in doc.split("Spelling:")[0], name


# ----------------------------------------------------------------------------- eager


@pytest.mark.parametrize("name", NAMES)
def test_eager_train_and_eval_run_and_eval_is_deterministic(name):
    c = case(name)
    model = c.build()
    args, kwargs = c.inputs(seed=0)
    params = [p for p in model.parameters()]
    shapes = []
    for training in (True, False):
        model.train(training)
        out, grads = _run(model, params, args, kwargs, seed=5)
        for o in pytree.tree_leaves(out):
            assert torch.isfinite(o).all(), (name, training)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= len(params) // 2, name
        shapes.append([o.shape for o in pytree.tree_leaves(out)])
    assert shapes[0] == shapes[1]
    model.eval()
    first = pytree.tree_leaves(model(*args, **kwargs))
    torch.manual_seed(12345)  # a different RNG state changes nothing in eval
    second = pytree.tree_leaves(model(*args, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(first, second)), name


# ----------------------------------------------------------------------------- capture


@pytest.mark.parametrize("name,mode", MODES, ids=[f"{n}-{m}" for n, m in MODES])
def test_captured_as_one_graph_equal_to_eager_forward_and_gradients(name, mode):
    c, model, gm = _captured(name, mode)
    assert gm.meta["capture"] == {"graphs": 1, "leaves": 0, "tracer": "dynamo"}
    assert gm.training == (mode == "train")
    args, kwargs = c.inputs(seed=3)  # fresh inputs, not the ones captured on
    params = list(model.parameters())
    ref, g_ref = _run(model, params, args, kwargs, seed=777)
    out, g_out = _run(gm, params, args, kwargs, seed=777)
    refs, outs = pytree.tree_leaves(ref), pytree.tree_leaves(out)
    assert len(refs) == len(outs)
    for o, r in zip(outs, refs):
        assert _rel_err(o, r) <= 1e-6, (name, mode)
    assert any(g is not None for g in g_ref)
    for (pname, _), a, b in zip(model.named_parameters(), g_out, g_ref):
        assert (a is None) == (b is None), (name, mode, pname)
        if b is not None:
            assert _rel_err(a, b) <= 1e-5, (name, mode, pname)


@pytest.mark.parametrize("name,mode", MODES, ids=[f"{n}-{m}" for n, m in MODES])
def test_catalog_counts_agree_with_the_captured_graph(name, mode):
    """Where the graph alone decides a count, the catalog agrees with it.

    Layer norms written as ``nn.LayerNorm`` / ``F.layer_norm`` appear as ``layer_norm`` calls,
    so their number is the expected one less the hand-written ones (``Case.handwritten``), plus
    the two inside each expected triangle multiplication. Every expected attention or softmax needs at least
    one ``softmax`` or SDPA call (chunk loops repeat them), and a case expecting neither has
    no softmax-like call unless it is a near miss.
    """
    c, _, gm = _captured(name, mode)
    expected = c.expected_for(mode == "train")
    calls = _call_names(gm)
    if "layer_norm" in expected:
        written_as_calls = (expected["layer_norm"] - c.handwritten.get("layer_norm", 0)
                            + 2 * expected.get("triangle_multiplication", 0))
        assert calls.count("layer_norm") == written_as_calls, (name, mode, calls.count("layer_norm"))
    softmaxes = sum(calls.count(k) for k in ("softmax", "scaled_dot_product_attention"))
    wanted = expected.get("attention", 0) + expected.get("softmax", 0)
    assert softmaxes >= wanted, (name, mode)
    if wanted == 0 and c.style != "near_miss":
        assert softmaxes == 0, (name, mode)


# ----------------------------------------------------------------------------- near misses


@pytest.mark.parametrize("name", [n for n in NEAR_MISSES if case(n).build().misread is not None])
def test_near_miss_differs_from_what_its_lookalike_rule_computes(name):
    c = case(name)
    model = c.build().train()
    args, kwargs = c.inputs(seed=2)
    with torch.no_grad():
        torch.manual_seed(4)
        real = model(*args, **kwargs)
        torch.manual_seed(4)
        misread = model.misread(*args, **kwargs)
    assert torch.isfinite(misread).all()
    assert _rel_err(misread, real) > 1e-2, name


def test_chain_through_linear_is_a_convexity_trap():
    """The bias add feeds both the linear and the gate product: a group of both would be a cycle."""
    _, _, gm = _captured("nm_chain_through_linear", "train")
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "add"]
    assert len(adds) == 1
    users = {getattr(u.target, "__name__", str(u.target)) for u in adds[0].users}
    assert users == {"linear", "mul"}
    mul = next(u for u in adds[0].users if getattr(u.target, "__name__", "") == "mul")
    # the product's other operand depends on the add only through the linear
    other = next(a for a in mul.args if a is not adds[0])
    seen, stack = set(), [other]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, torch.fx.Node):
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes)
    assert adds[0] in seen and any(getattr(n.target, "__name__", "") == "linear" for n in seen)


def test_bool_mask_spellings_compute_the_same_attention():
    """The four boolean-mask spellings of one Protenix-skeleton attention are one function."""
    outs = []
    for style in ("masked_fill_inf", "masked_fill_finfo", "where", "sdpa_bool"):
        c = case(f"px_bool_mask_{style}")
        model = c.build().eval()
        args, kwargs = c.inputs(seed=0)
        with torch.no_grad():
            outs.append(model(*args, **kwargs))
    for o in outs[1:]:
        assert _rel_err(o, outs[0]) <= 1e-6


def test_eval_chunking_equals_the_unchunked_path():
    """The eval-time chunk loops are the same function as the train-time (unchunked) path."""
    for name in ("of_msa_row_attention_pair_bias", "of_triangle_attention_start", "of_triangle_attention_end",
                 "of_outer_product_mean", "bz_transition_chunked", "px_transition",
                 "px_attention_local_window_chunked"):
        c = case(name)
        model = c.build()
        args, kwargs = c.inputs(seed=0)
        with torch.no_grad():
            chunked = model.eval()(*args, **kwargs)
            whole = model.train()(*args, **kwargs)  # no dropout in these modules
        assert _rel_err(chunked, whole) <= 1e-6, name
    c = case("bz_triangle_attention_start")
    model = c.build().eval()
    args, kwargs = c.inputs(seed=0)
    with torch.no_grad():
        assert _rel_err(model(*args, **kwargs), model(*args, **{**kwargs, "chunk_size": None})) <= 1e-6

