"""The UNMODIFIED Boltz-2 ``PairformerModule`` from PyPI (``boltz==2.2.1``), captured as one graph.

Install (what ``./run test`` must do; boltz's declared dependencies - rdkit, pytorch-lightning,
wandb, hydra, numba, gemmi, ... - are not needed to import the Pairformer, so they are skipped
with ``--no-deps``; the import needs exactly ``einops`` (``Rearrange`` in the attention layers)
and ``scipy`` (``scipy.stats.truncnorm`` in ``boltz.model.layers.initialize``), plus numpy and
torch, which foldcompile already has)::

    python -c "import boltz.model.layers.pairformer" 2>/dev/null \
      || { pip_q "einops==0.8.0" "scipy>=1.11" && pip_q --no-deps "boltz==2.2.1"; }

(in that order: installing einops/scipy after boltz makes pip print boltz's unmet declared
dependencies; scipy is the one sizeable package, ~35 MB, CPU-only, needed at import time
for one ``truncnorm`` initialiser; boltz pins scipy==1.13.1 and numpy<2, which need not be
honoured for the Pairformer and would downgrade numpy).

Where it lives in 2.2.1: ``boltz.model.layers.pairformer.PairformerModule`` (``PairformerLayer``
next to it); ``boltz.model.models.boltz2`` builds it with ``v2=True`` (the Boltz-2
``AttentionPairBias`` of ``layers/attentionv2``). ``boltz.model.modules.trunkv2`` imports too,
with the same two packages.

What runs: a small module (2 blocks, token dims 16, single attention with 2 heads of 8,
triangle attention with 2 heads of width 8, N = 13 tokens with padding), in train mode with
its activation checkpointing on and dropout active, and in eval mode, where it chooses its
triangle-attention chunk size itself (512 below 384 tokens, so OpenFold's ``chunk_layer``
runs with one chunk); and one ``PairformerLayer`` called with ``chunk_size_tri_attn=5`` in
eval, so the chunk loop really cuts the 13 rows in three. Each is captured by
``foldcompile.trace`` and must be one graph with no leaves, equal to eager on fresh inputs,
forward and backward (parameters and the ``s``/``z`` inputs).

Without boltz installed this file skips with the install lines, except under ``CI=true``,
where a missing boltz FAILS: CI must test the real thing.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import math
import os

import pytest
import torch
from torch.utils import _pytree as pytree

from foldcompile.capture import trace

INSTALL = 'pip install "einops==0.8.0" "scipy>=1.11" && pip install --no-deps "boltz==2.2.1"'
N_TOK, C_S, C_Z = 13, 16, 16


def _pairformer():
    try:
        module = importlib.import_module("boltz.model.layers.pairformer")
        version = importlib.metadata.version("boltz")
        if version != "2.2.1":
            raise ImportError(f"boltz {version} is installed, these tests are written against 2.2.1")
        return module
    except ImportError as e:
        msg = f"boltz 2.2.1 is not importable ({e}); install it with: {INSTALL}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true and " + msg)
        pytest.skip(msg)


def _redraw(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Boltz zero-initialises its output and gate layers; redraw every parameter so every path shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def _inputs(seed: int, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, N_TOK, C_S, generator=g)
    z = torch.randn(1, N_TOK, N_TOK, C_Z, generator=g)
    mask = torch.ones(1, N_TOK)
    mask[:, -3:] = 0.0  # padded tokens
    pair_mask = mask[:, :, None] * mask[:, None, :]
    # s and z are trunk activations: they require grad, as in Boltz (its reentrant checkpoint needs it)
    return s.requires_grad_(requires_grad), z.requires_grad_(requires_grad), mask, pair_mask


def _rel_err(a, b) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _forward_backward(fn, model, args, seed: int):
    """Outputs and the gradients of parameters and grad-requiring inputs, through ``.backward()``
    (Boltz's checkpoint is the reentrant one, which refuses ``torch.autograd.grad``)."""
    leaves = list(model.parameters()) + [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    for t in leaves:
        t.grad = None
    torch.manual_seed(seed)
    out = pytree.tree_leaves(fn(*args))
    g = torch.Generator().manual_seed(5)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in out).backward()
    grads = [None if t.grad is None else t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return [o.detach() for o in out], grads


def _check_equal_to_eager(model, gm, args_fn):
    assert gm.meta["capture"] == {"graphs": 1, "leaves": 0, "tracer": "dynamo"}
    ref, g_ref = _forward_backward(model, model, args_fn(), seed=31)
    out, g_out = _forward_backward(gm, model, args_fn(), seed=31)
    assert len(out) == len(ref) == 2
    for o, r in zip(out, ref):
        assert torch.isfinite(r).all()
        assert _rel_err(o, r) <= 1e-6
    names = [n for n, _ in model.named_parameters()] + ["s", "z"]
    assert len(g_ref) == len(names)
    assert sum(g is not None for g in g_ref) == len(g_ref), [n for n, g in zip(names, g_ref) if g is None]
    for name, a, b in zip(names, g_out, g_ref):
        assert a is not None, name
        assert _rel_err(a, b) <= 1e-5, name


def _calls(gm) -> list[str]:
    out = []
    for _, mod in gm.named_modules():
        if isinstance(mod, torch.fx.GraphModule):
            for n in mod.graph.nodes:
                if n.op in ("call_function", "call_method"):
                    out.append(n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
    return out


def _module(pf, training: bool, checkpointing: bool):
    torch.manual_seed(0)
    model = pf.PairformerModule(C_S, C_Z, num_blocks=2, num_heads=2, dropout=0.25, pairwise_head_width=8,
                                pairwise_num_heads=2, activation_checkpointing=checkpointing, v2=True)
    return _redraw(model, seed=1).train(training)


def test_pairformer_module_train_with_checkpointing_and_dropout():
    pf = _pairformer()
    model = _module(pf, training=True, checkpointing=True)
    gm = trace(model, *_inputs(0))
    calls = _calls(gm)
    assert calls.count("checkpoint") == 2  # one per block, still a checkpoint in the graph
    assert "rand" in calls  # Boltz's dropout masks
    _check_equal_to_eager(model, gm, lambda: _inputs(7))
    # dropout acts: two seeds give two outputs
    s, z, mask, pair_mask = _inputs(7)  # as captured: inputs requiring grad, grad mode on
    torch.manual_seed(1)
    a = gm(s, z, mask, pair_mask)[1].detach()
    torch.manual_seed(2)
    b = gm(s, z, mask, pair_mask)[1].detach()
    assert not torch.equal(a, b)


def test_pairformer_module_eval_with_its_own_chunking():
    pf = _pairformer()
    model = _module(pf, training=False, checkpointing=True)
    gm = trace(model, *_inputs(0))
    calls = _calls(gm)
    assert "checkpoint" not in calls  # Boltz checkpoints in training only
    # eval picks chunk_size_tri_attn=512: OpenFold's chunk_layer runs and slice-assigns into its output
    assert calls.count("setitem") == 2 * 2  # two triangle attentions per block
    _check_equal_to_eager(model, gm, lambda: _inputs(8))
    with torch.no_grad():
        s, z, mask, pair_mask = _inputs(8, requires_grad=False)
        first = model(s, z, mask, pair_mask)
        torch.manual_seed(123)
        second = model(s, z, mask, pair_mask)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_pairformer_layer_eval_chunked_triangle_attention():
    pf = _pairformer()
    torch.manual_seed(0)
    layer = _redraw(pf.PairformerLayer(C_S, C_Z, num_heads=2, dropout=0.25, pairwise_head_width=8,
                                       pairwise_num_heads=2, v2=True), seed=2).eval()

    def args(seed):
        s, z, mask, pair_mask = _inputs(seed)
        return s, z, mask, pair_mask, 5  # chunk_size_tri_attn=5: rows 0-4, 5-9, 10-12

    gm = trace(layer, *args(0))
    assert _calls(gm).count("setitem") == 2 * 3  # three chunks in each of the two triangle attentions
    _check_equal_to_eager(layer, gm, lambda: args(9))
    with torch.no_grad():  # the chunked path is the unchunked function
        s, z, mask, pair_mask, _ = args(9)
        chunked = layer(s, z, mask, pair_mask, 5)
        whole = layer(s, z, mask, pair_mask, None)
    for a, b in zip(chunked, whole):
        assert _rel_err(a, b) <= 1e-6


# ----------------------------------------------------------------------------- foldcompile.optimize

def _check_optimized_equals_eager(model, fast, args_fn):
    """Outputs within 1e-5; every gradient within 1e-5 of its own size or the model's typical
    gradient size, whichever is larger (a gradient that is zero in exact arithmetic — the pair-bias
    layer norm's bias shifts every logit of a row equally — is rounding noise in both)."""
    ref, g_ref = _forward_backward(model, model, args_fn(), seed=31)
    out, g_out = _forward_backward(fast, model, args_fn(), seed=31)
    for o, r in zip(out, ref):
        assert _rel_err(o, r) <= 1e-5
    sizes = [float(b.double().norm()) for b in g_ref if b is not None]
    typical = (sum(x * x for x in sizes) / len(sizes)) ** 0.5
    names = [n for n, _ in model.named_parameters()] + ["s", "z"]
    for name, a, b in zip(names, g_out, g_ref):
        assert (a is None) == (b is None), name
        if b is not None:
            err = float((a.double() - b.double()).norm()) / max(float(b.double().norm()), typical)
            assert err <= 1e-5, name


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_optimize_fuses_every_attention_of_the_unmodified_pairformer(training):
    """Boltz-2's own PairformerModule (2 blocks: the single attention with pair bias, two triangle
    attentions and two triangle multiplications each): all 6 attentions, all 4 triangle multiplications
    (with their 8 layer norms) and the other 12 layer norms go into the fused kernels, and the optimized
    module equals eager, forward and backward, in eval (Boltz's chunk_layer path) and in train (dropout
    on, checkpointing off: see the next test)."""
    import foldcompile

    pf = _pairformer()
    model = _module(pf, training=training, checkpointing=False)
    fast = foldcompile.optimize(model, *_inputs(0))
    counts = fast.report.counts()
    assert counts["attention"] == {"matched": 6, "rejected": 0}, fast.report
    assert counts["triangle_multiplication"] == {"matched": 4, "rejected": 0}, fast.report
    # the other layer norms alone or with the projections they feed (ln_linear: one layer norm a match)
    assert counts["layer_norm"]["matched"] + counts["ln_linear"]["matched"] == 12
    _check_optimized_equals_eager(model, fast, lambda: _inputs(7))


def test_optimize_with_activation_checkpointing_fuses_inside_the_checkpoints():
    """With Boltz's activation checkpointing on (train), every block's ops sit in a checkpoint body:
    shape propagation annotates the bodies, so the same 6 attentions, 4 triangle multiplications and
    12 other layer norms are fused there, each block stays a checkpoint (recomputed in backward), and the
    module equals eager."""
    import foldcompile

    pf = _pairformer()
    model = _module(pf, training=True, checkpointing=True)
    fast = foldcompile.optimize(model, *_inputs(0))
    counts = fast.report.counts()
    assert counts["attention"] == {"matched": 6, "rejected": 0}, fast.report
    assert counts["triangle_multiplication"] == {"matched": 4, "rejected": 0}, fast.report
    assert counts["layer_norm"]["matched"] + counts["ln_linear"]["matched"] == 12, fast.report
    assert counts["layer_norm"]["rejected"] == counts["ln_linear"]["rejected"] == 0, fast.report
    assert "without a known shape" not in str(fast.report)
    assert _calls(fast.graph_module).count("checkpoint") == 2
    _check_optimized_equals_eager(model, fast, lambda: _inputs(7))


@pytest.mark.full
def test_optimize_merges_the_chunked_triangle_attentions_of_an_unmodified_pairformer_layer():
    """Boltz's own ``chunk_layer`` really cutting the rows (chunk_size_tri_attn=5: rows 0-4, 5-9,
    10-12, each chunk's projections, attention, gate and output linear slice-assigned into a
    preallocated output): each triangle attention's loop is merged back into one layer
    (passes/merge_chunk_loops.py) and its attention fused ONCE, as without chunking."""
    import foldcompile

    pf = _pairformer()
    torch.manual_seed(0)
    layer = _redraw(pf.PairformerLayer(C_S, C_Z, num_heads=2, dropout=0.25, pairwise_head_width=8,
                                       pairwise_num_heads=2, v2=True), seed=2).eval()

    def args(seed):
        s, z, mask, pair_mask = _inputs(seed)
        return s, z, mask, pair_mask, 5

    fast = foldcompile.optimize(layer, *args(0))
    counts = fast.report.counts()
    assert counts["chunk_loop"] == {"matched": 2, "rejected": 0}, fast.report
    assert counts["attention"] == {"matched": 3, "rejected": 0}, fast.report  # 2 triangle + the single one
    assert fast.code.count("fused_attention(") == 3 and "setitem" not in fast.code
    _check_optimized_equals_eager(layer, fast, lambda: args(7))
