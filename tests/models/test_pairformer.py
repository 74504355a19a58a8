"""Tests for AlphaFold 3's Pairformer (foldcompile.models.pairformer).

Every comparison runs on re-randomised parameters: the model's AlphaFold-style
initialisation zeroes the final layer of every residual update, which would make
most comparisons pass on an empty function.
"""
import math

import pytest
import torch

from foldcompile.models.pairformer import (
    AttentionPairBias,
    PairformerBlock,
    PairformerStack,
    TriangleAttentionEndingNode,
    TriangleAttentionStartingNode,
    TriangleMultiplicationIncoming,
    TriangleMultiplicationOutgoing,
    dropout_columnwise,
    dropout_rowwise,
)

TINY = dict(c_s=12, c_z=8, n_heads_single=3, c_hidden_single=4, n_heads_pair=2, c_hidden_pair=4,
            c_hidden_mul=6, transition_n=2)


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a seeded random, non-zero value of a sensible scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return module


def inputs(n: int, batch=(2,), seed: int = 0, dtype=torch.float32, c_s: int = TINY["c_s"], c_z: int = TINY["c_z"]):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*batch, n, c_s, generator=gen, dtype=torch.float64).to(dtype)
    z = torch.randn(*batch, n, n, c_z, generator=gen, dtype=torch.float64).to(dtype)
    return s, z


def random_masks(n: int, batch=(2,), seed: int = 1, dtype=torch.float32):
    """A single mask with a few zeros and a non-symmetric pair mask with a few zeros."""
    gen = torch.Generator().manual_seed(seed)
    single = (torch.rand(*batch, n, generator=gen) > 0.25).to(dtype)
    single[..., 0] = 1.0
    pair = (torch.rand(*batch, n, n, generator=gen) > 0.25).to(dtype)
    return single, pair


def tiny_stack(n_blocks: int = 2, seed: int = 0, dtype=torch.float32, **overrides) -> PairformerStack:
    cfg = dict(TINY, **overrides)
    stack = PairformerStack(n_blocks=n_blocks, **cfg)
    return randomise_(stack, seed).to(dtype)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("batch", [(), (2,), (2, 1)])
def test_shapes(batch):
    stack = tiny_stack().eval()
    s, z = inputs(5, batch)
    s_out, z_out = stack(s, z)
    assert s_out.shape == s.shape and z_out.shape == z.shape
    block = stack.blocks[0]
    s_out, z_out = block(s, z)
    assert s_out.shape == s.shape and z_out.shape == z.shape
    assert torch.isfinite(s_out).all() and torch.isfinite(z_out).all()


def test_eval_determinism():
    stack = tiny_stack().eval()
    s, z = inputs(6)
    single, pair = random_masks(6)
    first = stack(s, z, single, pair)
    second = stack(s, z, single, pair)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_default_masks_are_ones():
    stack = tiny_stack().eval()
    s, z = inputs(5)
    plain = stack(s, z)
    ones = stack(s, z, torch.ones(2, 5), torch.ones(2, 5, 5))
    torch.testing.assert_close(plain, ones, rtol=0, atol=0)


# --------------------------------------------------------------------------- parameter count

def test_parameter_count_af3_dims():
    block = PairformerBlock(c_s=384, c_z=128, n_heads_single=16, c_hidden_single=24, n_heads_pair=4,
                            c_hidden_pair=32, c_hidden_mul=128, transition_n=4)
    assert n_params(block) == 3_070_848
    # The breakdown written in the module docstring: a wrong layer shows up by name.
    assert n_params(block.tri_mul_out) == n_params(block.tri_mul_in) == 98_816
    assert n_params(block.tri_att_start) == n_params(block.tri_att_end) == 82_688
    assert n_params(block.pair_transition) == 196_864
    assert n_params(block.attention_pair_bias) == 740_736
    assert n_params(block.single_transition) == 1_770_240
    # Alg. 24: the query projection is the only Linear with a bias.
    biased = [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biased == ["attention_pair_bias.linear_q"]


def test_stack_parameter_count_is_blocks_times_block():
    stack = PairformerStack(n_blocks=3, **TINY)
    assert n_params(stack) == 3 * n_params(PairformerBlock(**TINY))
    # unshared weights
    assert len({id(b.tri_mul_out.linear_a.weight) for b in stack.blocks}) == 3


# --------------------------------------------------------------------------- chunking and checkpointing

@pytest.mark.parametrize("chunk_size", [1, 2, 4])
def test_chunking_equals_unchunked(chunk_size):
    stack = tiny_stack(dtype=torch.float64).eval()
    s, z = inputs(5, dtype=torch.float64)
    single, pair = random_masks(5, dtype=torch.float64)
    ref = stack(s, z, single, pair)
    block = stack.blocks[0]
    counted = {"pair transition": block.pair_transition.layer_norm,
               "single transition": block.single_transition.layer_norm,
               "pair bias of single attention": block.attention_pair_bias.layer_norm_z}
    calls = dict.fromkeys(counted, 0)
    handles = [m.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
               for key, m in counted.items()]
    out = stack(s, z, single, pair, chunk_size=chunk_size)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # The work really ran in ceil(5 / chunk_size) pieces.
    assert calls == dict.fromkeys(counted, math.ceil(5 / chunk_size))


def test_checkpoint_equals_plain_outputs_and_grads():
    plain = tiny_stack(dropout_pair=0.25).train()
    ckpt = tiny_stack(dropout_pair=0.25, checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    s0, z0 = inputs(5)
    single, pair = random_masks(5)
    weights = inputs(5, seed=7)

    calls = {}

    def run(model, tag):
        calls[tag] = 0

        def hook(*_):
            calls[tag] += 1

        handle = model.blocks[0].register_forward_pre_hook(hook)
        s, z = s0.clone().requires_grad_(), z0.clone().requires_grad_()
        torch.manual_seed(123)  # same dropout masks for both models
        out = model(s, z, single, pair)
        loss = (out[0] * weights[0]).sum() + (out[1] * weights[1]).sum()
        loss.backward()
        handle.remove()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return out, s.grad, z.grad, grads

    out_p, gs_p, gz_p, grads_p = run(plain, "plain")
    out_c, gs_c, gz_c, grads_c = run(ckpt, "ckpt")
    # Dropout really acted (training mode), so the equality covers the RNG replay.
    assert not torch.allclose(plain.eval()(s0, z0, single, pair)[1], out_p[1].detach())
    torch.testing.assert_close(out_c, out_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gs_c, gs_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gz_c, gz_p, rtol=1e-6, atol=1e-6)
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)
    # The checkpointed block started its forward again during backward (recomputation;
    # non-reentrant checkpointing stops early, so a post-forward hook would not fire).
    assert calls == {"plain": 1, "ckpt": 2}


# --------------------------------------------------------------------------- masking

def test_padding_tokens_leave_real_tokens_unchanged():
    n_real, n_pad = 5, 3
    n = n_real + n_pad
    stack = tiny_stack().eval()
    s, z = inputs(n, seed=3)
    real_s, real_z = s[:, :n_real], z[:, :n_real, :n_real]
    ref_s, ref_z = stack(real_s, real_z)

    single = torch.zeros(2, n)
    single[:, :n_real] = 1.0
    pair = single[:, :, None] * single[:, None, :]
    for chunk_size in (None, 3):
        out_s, out_z = stack(s, z, single, pair, chunk_size=chunk_size)
        torch.testing.assert_close(out_s[:, :n_real], ref_s, rtol=0, atol=1e-5)
        torch.testing.assert_close(out_z[:, :n_real, :n_real], ref_z, rtol=0, atol=1e-5)
        assert torch.isfinite(out_s).all() and torch.isfinite(out_z).all()

    # Without the masks the padding does change the real tokens: the test above is not vacuous.
    unmasked_s, unmasked_z = stack(s, z)
    assert (unmasked_s[:, :n_real] - ref_s).abs().max() > 1e-3
    assert (unmasked_z[:, :n_real, :n_real] - ref_z).abs().max() > 1e-3


# --------------------------------------------------------------------------- orientation

def _swap_a_b(state: dict) -> dict:
    """Exchange the ``a`` and ``b`` projections (and their gates) of a triangle multiplication."""
    rename = {"linear_a.": "linear_b.", "linear_b.": "linear_a.",
              "linear_a_gate.": "linear_b_gate.", "linear_b_gate.": "linear_a_gate."}
    swapped = {}
    for name, value in state.items():
        prefix = next((p for p in rename if name.startswith(p)), None)
        swapped[rename[prefix] + name[len(prefix):] if prefix else name] = value
    return swapped


def test_incoming_multiplication_is_outgoing_of_transpose():
    # Outgoing on z^T, transposed back, is sum_k a_kj * b_ki: Alg. 13's sum_k a_ki * b_kj with the
    # roles of the a and b projections exchanged. So the identity holds with a <-> b swapped, and
    # (for generic weights) fails with the weights copied as they are: this pins Alg. 13 exactly.
    out_mod = randomise_(TriangleMultiplicationOutgoing(c_z=8, c_hidden=6), seed=11).double()
    in_mod = TriangleMultiplicationIncoming(c_z=8, c_hidden=6).double()
    _, z = inputs(5, dtype=torch.float64)
    _, pair = random_masks(5, dtype=torch.float64)
    via_outgoing = out_mod(z.transpose(-2, -3), pair.transpose(-1, -2)).transpose(-2, -3)

    in_mod.load_state_dict(_swap_a_b(out_mod.state_dict()))
    torch.testing.assert_close(in_mod(z, pair), via_outgoing, rtol=1e-12, atol=1e-12)

    in_mod.load_state_dict(out_mod.state_dict())
    assert not torch.allclose(in_mod(z, pair), via_outgoing, atol=1e-3)
    assert not torch.allclose(in_mod(z, pair), out_mod(z, pair), atol=1e-3)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_ending_attention_is_starting_of_transpose(chunk_size):
    start_mod = randomise_(TriangleAttentionStartingNode(c_z=8, c_hidden=4, n_heads=2), seed=12).double()
    end_mod = TriangleAttentionEndingNode(c_z=8, c_hidden=4, n_heads=2).double()
    end_mod.load_state_dict(start_mod.state_dict())
    _, z = inputs(5, dtype=torch.float64)
    _, pair = random_masks(5, dtype=torch.float64)
    ending = end_mod(z, pair, chunk_size)
    via_starting = start_mod(z.transpose(-2, -3), pair.transpose(-1, -2), chunk_size).transpose(-2, -3)
    torch.testing.assert_close(ending, via_starting, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ending, start_mod(z, pair), atol=1e-3)


# --------------------------------------------------------------------------- against the paper, element by element

def test_triangle_multiplication_outgoing_matches_loops():
    mod = randomise_(TriangleMultiplicationOutgoing(c_z=4, c_hidden=3), seed=13).double()
    _, z = inputs(4, batch=(), dtype=torch.float64, c_z=4)
    _, pair = random_masks(4, batch=(), dtype=torch.float64)
    zn = mod.layer_norm_in(z)
    a = torch.sigmoid(mod.linear_a_gate(zn)) * mod.linear_a(zn) * pair[..., None]
    b = torch.sigmoid(mod.linear_b_gate(zn)) * mod.linear_b(zn) * pair[..., None]
    x = torch.zeros(4, 4, 3, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            for k in range(4):
                x[i, j] += a[i, k] * b[j, k]  # Alg. 12 line 4: sum_k a_ik * b_jk
    expected = torch.sigmoid(mod.linear_g(zn)) * mod.linear_out(mod.layer_norm_out(x))
    torch.testing.assert_close(mod(z, pair), expected, rtol=1e-12, atol=1e-12)


def test_triangle_attention_starting_matches_loops():
    n, h, c = 4, 2, 3
    mod = randomise_(TriangleAttentionStartingNode(c_z=5, c_hidden=c, n_heads=h), seed=14).double()
    _, z = inputs(n, batch=(), dtype=torch.float64, c_z=5)
    _, pair = random_masks(n, batch=(), dtype=torch.float64)
    zn = mod.layer_norm(z)
    q, k, v = (lin(zn).reshape(n, n, h, c) for lin in (mod.linear_q, mod.linear_k, mod.linear_v))
    b = mod.linear_bias(zn)
    g = torch.sigmoid(mod.linear_g(zn)).reshape(n, n, h, c)
    o = torch.zeros(n, n, h, c, dtype=torch.float64)
    for hh in range(h):
        for i in range(n):
            for j in range(n):
                # Alg. 14 line 5: softmax_k(q_ij . k_ik / sqrt(c) + b_jk), key mask m_ik
                logits = torch.stack([q[i, j, hh] @ k[i, kk, hh] / math.sqrt(c) + b[j, kk, hh]
                                      - 1e9 * (1 - pair[i, kk]) for kk in range(n)])
                weights = torch.softmax(logits, dim=0)
                o[i, j, hh] = g[i, j, hh] * sum(weights[kk] * v[i, kk, hh] for kk in range(n))
    expected = mod.linear_out(o.reshape(n, n, h * c))
    torch.testing.assert_close(mod(z, pair), expected, rtol=1e-10, atol=1e-10)


def test_attention_pair_bias_matches_loops():
    n, h, c = 4, 2, 3
    mod = randomise_(AttentionPairBias(c_s=6, c_z=5, n_heads=h, c_hidden=c), seed=15).double()
    s, z = inputs(n, batch=(), dtype=torch.float64, c_s=6, c_z=5)
    single, _ = random_masks(n, batch=(), dtype=torch.float64)
    a = mod.layer_norm(s)
    q, k, v = (lin(a).reshape(n, h, c) for lin in (mod.linear_q, mod.linear_k, mod.linear_v))
    b = mod.linear_bias(mod.layer_norm_z(z))
    g = torch.sigmoid(mod.linear_g(a)).reshape(n, h, c)
    o = torch.zeros(n, h, c, dtype=torch.float64)
    for hh in range(h):
        for i in range(n):
            # Alg. 24 line 7: softmax_j(q_i . k_j / sqrt(c) + b_ij), key mask m_j
            logits = torch.stack([q[i, hh] @ k[j, hh] / math.sqrt(c) + b[i, j, hh] - 1e9 * (1 - single[j])
                                  for j in range(n)])
            weights = torch.softmax(logits, dim=0)
            o[i, hh] = g[i, hh] * sum(weights[j] * v[j, hh] for j in range(n))
    expected = mod.linear_out(o.reshape(n, h * c))
    torch.testing.assert_close(mod(s, z, single), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mod(s, z, single, chunk_size=3), expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- gradients and dropout

def test_every_parameter_gets_a_nonzero_gradient():
    stack = tiny_stack(dropout_pair=0.25).train()
    s, z = inputs(5)
    single, pair = random_masks(5)
    weights = inputs(5, seed=9)
    torch.manual_seed(0)
    out_s, out_z = stack(s, z, single, pair)
    ((out_s * weights[0]).sum() + (out_z * weights[1]).sum()).backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_dropout_masks_are_shared_along_rows_and_columns():
    x = torch.rand(2, 6, 7, 5) + 0.5
    torch.manual_seed(0)
    ratio = dropout_rowwise(x, 0.5, training=True) / x
    assert torch.equal(ratio, ratio[:, :1].expand_as(ratio))  # same mask for every row i
    assert (ratio == 0).any() and (ratio == 2).any()
    ratio = dropout_columnwise(x, 0.5, training=True) / x
    assert torch.equal(ratio, ratio[:, :, :1].expand_as(ratio))  # same mask for every column j
    assert torch.equal(dropout_rowwise(x, 0.5, training=False), x)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_rowwise(x, 1.0, training=True)


def test_dropout_acts_on_pair_only_in_training():
    block = randomise_(PairformerBlock(**TINY, dropout_pair=0.25), seed=5)
    s, z = inputs(5)
    block.eval()
    eval_out = block(s, z)
    block.train()
    torch.manual_seed(1)
    train_out = block(s, z)
    assert not torch.allclose(train_out[1], eval_out[1])
    no_dropout = randomise_(PairformerBlock(**TINY, dropout_pair=0.0), seed=5).train()
    torch.testing.assert_close(no_dropout(s, z), eval_out, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    stack = tiny_stack()
    s, z = inputs(5)
    with pytest.raises(ValueError, match="c_s=12"):
        stack(torch.randn(2, 5, 7), z)
    with pytest.raises(ValueError, match="c_z=8"):
        stack(s, torch.randn(2, 5, 5, 3))
    with pytest.raises(ValueError, match="does not match"):
        stack(s, torch.randn(2, 4, 4, 8))
    with pytest.raises(ValueError, match="expected s"):
        stack(s, z[0])
    with pytest.raises(ValueError, match="single_mask"):
        stack(s, z, single_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="pair_mask"):
        stack(s, z, pair_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        stack(s, z, chunk_size=0)
    with pytest.raises(ValueError, match="n_blocks"):
        PairformerStack(n_blocks=0, **TINY)
