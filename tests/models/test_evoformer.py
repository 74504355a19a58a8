"""AlphaFold 2 Evoformer: architecture (parameters, FLOPs), masks, symmetries, chunking, checkpointing."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from foldcompile.models.alphafold2.attention import (
    GlobalAttention,
    MSAColumnAttention,
    MSARowAttentionWithPairBias,
    TriangleAttention,
)
from foldcompile.models.alphafold2.evoformer import EvoformerBlock, EvoformerStack
from foldcompile.models.alphafold2.outer_product_mean import OuterProductMean
from foldcompile.models.alphafold2.triangle import TriangleMultiplicativeUpdate

# Tiny dims: every head count and hidden size distinct from the others, so a
# mixed-up dimension fails loudly.
TINY = dict(c_m=12, c_z=10, c_hidden_msa_att=4, n_heads_msa=3, c_hidden_opm=5, c_hidden_mul=6,
            c_hidden_pair_att=3, n_heads_pair=2, transition_n=2)
TINY_STACK = dict(TINY, c_s=7)
N_SEQ, N_RES = 5, 7


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter seeded, non-zero random values.

    AF2's "final" and "gating" inits zero the last layer of every update, which
    would make every residual update vanish and every comparison pass vacuously.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                scale = p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
            else:
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
                p.mul_(torch.where(torch.rand(p.shape, generator=gen) < 0.3, -1.0, 1.0).to(p.dtype))
    return module


def make_inputs(n_seq=N_SEQ, n_res=N_RES, batch=(), seed=1, dtype=torch.float64, c_m=12, c_z=10):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(*batch, n_seq, n_res, c_m, generator=gen, dtype=dtype)
    z = torch.randn(*batch, n_res, n_res, c_z, generator=gen, dtype=dtype)
    msa_mask = (torch.rand(*batch, n_seq, n_res, generator=gen) > 0.2).to(dtype)
    pair_mask = (torch.rand(*batch, n_res, n_res, generator=gen) > 0.2).to(dtype)
    return m, z, msa_mask, pair_mask


def tiny_stack(n_blocks=2, seed=0, **kw):
    return randomize(EvoformerStack(n_blocks, **TINY_STACK, **kw), seed).double().eval()


# ---- architecture -------------------------------------------------------------------

def test_block_parameter_count_at_af2_dims():
    with torch.device("meta"):
        block = EvoformerBlock()
    assert sum(p.numel() for p in block.parameters()) == 1_829_952


def test_stack_adds_only_the_single_projection():
    with torch.device("meta"):
        stack = EvoformerStack(2)
    assert sum(p.numel() for p in stack.parameters()) == 2 * 1_829_952 + 256 * 384 + 384


@pytest.mark.parametrize("n_seq,n_res,gflop", [(128, 256, 216.09), (128, 1024, 3702.26)])
def test_block_gemm_flops_at_af2_dims(n_seq, n_res, gflop):
    with torch.device("meta"):
        block = EvoformerBlock().eval()
        m = torch.empty(n_seq, n_res, 256)
        z = torch.empty(n_res, n_res, 128)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        block(m, z)
    # The outer product mean's normalisation is itself a contraction over the MSA
    # (AF2's code: einsum('abc,adc->bdc', mask, mask)), 2 * N_seq * N_res^2 FLOPs on
    # the 0/1 mask. The architecture's figure counts the feature GEMMs only.
    mask_norm = 2 * n_seq * n_res * n_res
    assert round((counter.get_total_flops() - mask_norm) / 1e9, 2) == gflop


# ---- shapes, determinism, batching ---------------------------------------------------

def test_stack_shapes_and_eval_determinism():
    stack = tiny_stack()
    m, z, msa_mask, pair_mask = make_inputs()
    m1, z1, s1 = stack(m, z, msa_mask, pair_mask)
    m2, z2, s2 = stack(m, z, msa_mask, pair_mask)
    assert m1.shape == m.shape and z1.shape == z.shape and s1.shape == (N_RES, 7)
    assert torch.equal(m1, m2) and torch.equal(z1, z2) and torch.equal(s1, s2)
    assert not torch.allclose(z1, z)  # the updates are not vacuous


def test_leading_batch_dim_matches_per_item():
    stack = tiny_stack()
    m, z, msa_mask, pair_mask = make_inputs(batch=(2,))
    mb, zb, sb = stack(m, z, msa_mask, pair_mask)
    for i in range(2):
        mi, zi, si = stack(m[i], z[i], msa_mask[i], pair_mask[i])
        torch.testing.assert_close(mb[i], mi, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(zb[i], zi, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(sb[i], si, rtol=1e-9, atol=1e-9)


def test_missing_masks_mean_all_ones():
    stack = tiny_stack(1)
    m, z, _, _ = make_inputs()
    ones = stack(m, z, torch.ones(N_SEQ, N_RES, dtype=m.dtype), torch.ones(N_RES, N_RES, dtype=m.dtype))
    for a, b in zip(stack(m, z), ones):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunking_matches_unchunked(chunk_size):
    stack = tiny_stack()
    m, z, msa_mask, pair_mask = make_inputs()
    ref = stack(m, z, msa_mask, pair_mask)
    out = stack(m, z, msa_mask, pair_mask, chunk_size=chunk_size)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_bad_chunk_size_and_depth_raise():
    stack = tiny_stack(1)
    m, z, _, _ = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        stack(m, z, chunk_size=0)
    with pytest.raises(ValueError, match="n_blocks"):
        EvoformerStack(0)


# ---- training: dropout and checkpointing ----------------------------------------------

def test_dropout_only_in_training():
    stack = tiny_stack(1)
    m, z, msa_mask, pair_mask = make_inputs()
    eval_out = stack(m, z, msa_mask, pair_mask)
    stack.train()
    torch.manual_seed(3)
    train_a = stack(m, z, msa_mask, pair_mask)
    torch.manual_seed(3)
    train_b = stack(m, z, msa_mask, pair_mask)
    torch.manual_seed(4)
    train_c = stack(m, z, msa_mask, pair_mask)
    assert torch.equal(train_a[1], train_b[1])
    assert not torch.allclose(train_a[1], eval_out[1])
    assert not torch.allclose(train_a[1], train_c[1])
    no_dropout = randomize(EvoformerStack(1, **TINY_STACK, msa_dropout=0.0, pair_dropout=0.0)).double().train()
    for a, b in zip(no_dropout(m, z, msa_mask, pair_mask), no_dropout.eval()(m, z, msa_mask, pair_mask)):
        assert torch.equal(a, b)


def test_checkpointing_gives_same_outputs_and_gradients():
    m, z, msa_mask, pair_mask = make_inputs()
    results = []
    for checkpoint in (False, True):
        stack = randomize(EvoformerStack(2, **TINY_STACK, checkpoint=checkpoint)).double().train()
        m_in = m.clone().requires_grad_()
        z_in = z.clone().requires_grad_()
        torch.manual_seed(7)  # same dropout masks in both runs (checkpoint restores the RNG state)
        m_out, z_out, s_out = stack(m_in, z_in, msa_mask, pair_mask)
        loss = (m_out ** 2).sum() + (z_out ** 2).sum() + (s_out ** 2).sum()
        loss.backward()
        grads = [m_in.grad, z_in.grad] + [p.grad for p in stack.parameters()]
        results.append(([m_out, z_out, s_out], grads))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_a, grads_b):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in grads_a)


# ---- masks and symmetries -------------------------------------------------------------

def pad_residues(m, z, msa_mask, pair_mask, n_pad, seed=11):
    """Append ``n_pad`` junk residues (random features, masks 0)."""
    gen = torch.Generator().manual_seed(seed)
    n_seq, n_res = m.shape[-3], m.shape[-2]
    m_p = torch.randn(n_seq, n_res + n_pad, m.shape[-1], generator=gen, dtype=m.dtype) * 3
    z_p = torch.randn(n_res + n_pad, n_res + n_pad, z.shape[-1], generator=gen, dtype=z.dtype) * 3
    m_p[:, :n_res] = m
    z_p[:n_res, :n_res] = z
    msa_mask_p = torch.zeros(n_seq, n_res + n_pad, dtype=m.dtype)
    pair_mask_p = torch.zeros(n_res + n_pad, n_res + n_pad, dtype=m.dtype)
    msa_mask_p[:, :n_res] = msa_mask
    pair_mask_p[:n_res, :n_res] = pair_mask
    return m_p, z_p, msa_mask_p, pair_mask_p


def test_padding_with_masked_residues_changes_nothing():
    stack = tiny_stack()
    m, z, _, _ = make_inputs()
    msa_mask = torch.ones(N_SEQ, N_RES, dtype=m.dtype)
    msa_mask[3:, 5] = 0.0  # a gap in some sequences
    pair_mask = torch.ones(N_RES, N_RES, dtype=m.dtype)
    m_ref, z_ref, s_ref = stack(m, z, msa_mask, pair_mask)
    padded = pad_residues(m, z, msa_mask, pair_mask, n_pad=4)
    m_pad, z_pad, s_pad = stack(*padded)
    torch.testing.assert_close(m_pad[:, :N_RES], m_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z_pad[:N_RES, :N_RES], z_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s_pad[:N_RES], s_ref, rtol=1e-9, atol=1e-9)
    # not vacuous: with the padding unmasked, the padded residues do leak into the real ones
    m_leak, z_leak, _ = stack(padded[0], padded[1])
    assert (z_leak[:N_RES, :N_RES] - z_ref).abs().max() > 1e-3
    assert (m_leak[:, :N_RES] - m_ref).abs().max() > 1e-3


def test_msa_row_permutation_equivariance():
    stack = tiny_stack()
    m, z, msa_mask, pair_mask = make_inputs()
    perm = torch.cat([torch.tensor([0]), 1 + torch.randperm(N_SEQ - 1, generator=torch.Generator().manual_seed(5))])
    assert not torch.equal(perm, torch.arange(N_SEQ))
    m_ref, z_ref, s_ref = stack(m, z, msa_mask, pair_mask)
    m_perm, z_perm, s_perm = stack(m[perm], z, msa_mask[perm], pair_mask)
    torch.testing.assert_close(m_perm, m_ref[perm], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z_perm, z_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s_perm, s_ref, rtol=1e-9, atol=1e-9)


def test_incoming_triangle_multiplication_is_outgoing_on_transpose():
    outgoing = randomize(TriangleMultiplicativeUpdate(10, 6, outgoing=True)).double()
    incoming = TriangleMultiplicativeUpdate(10, 6, outgoing=False).double()
    incoming.load_state_dict(outgoing.state_dict())
    _, z, _, pair_mask = make_inputs()
    expected = outgoing(z.transpose(-2, -3), pair_mask.transpose(-1, -2)).transpose(-2, -3)
    torch.testing.assert_close(incoming(z, pair_mask), expected, rtol=1e-10, atol=1e-10)
    # ...and it is a different function from the outgoing one on z itself
    assert not torch.allclose(incoming(z, pair_mask), outgoing(z, pair_mask))


def test_outgoing_triangle_multiplication_definition():
    tri = randomize(TriangleMultiplicativeUpdate(10, 6, outgoing=True)).double()
    _, z, _, pair_mask = make_inputs()
    zn = tri.layer_norm_in(z)
    a = pair_mask[..., None] * torch.sigmoid(tri.linear_a_g(zn)) * tri.linear_a_p(zn)
    b = pair_mask[..., None] * torch.sigmoid(tri.linear_b_g(zn)) * tri.linear_b_p(zn)
    x = torch.zeros(N_RES, N_RES, 6, dtype=z.dtype)
    for i in range(N_RES):
        for j in range(N_RES):
            x[i, j] = (a[i] * b[j]).sum(0)  # sum_k a_ik * b_jk
    expected = torch.sigmoid(tri.linear_g(zn)) * tri.linear_z(tri.layer_norm_out(x))
    torch.testing.assert_close(tri(z, pair_mask), expected, rtol=1e-10, atol=1e-10)


def test_ending_node_attention_is_starting_node_on_transpose():
    start = randomize(TriangleAttention(10, 3, 2, starting=True)).double()
    end = TriangleAttention(10, 3, 2, starting=False).double()
    end.load_state_dict(start.state_dict())
    _, z, _, pair_mask = make_inputs()
    expected = start(z.transpose(-2, -3), pair_mask.transpose(-1, -2)).transpose(-2, -3)
    torch.testing.assert_close(end(z, pair_mask), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(end(z, pair_mask), start(z, pair_mask))


def reference_gated_attention(mha, q_x, kv_x, bias):
    """Explicit per-head loop: softmax(q k^T / sqrt(c) + bias) v, gated, projected."""
    c, heads = mha.c_hidden, mha.n_heads
    q, k, v = mha.linear_q(q_x), mha.linear_k(kv_x), mha.linear_v(kv_x)
    outs = []
    for h in range(heads):
        sl = slice(h * c, (h + 1) * c)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / c ** 0.5 + bias[..., h, :, :], dim=-1)
        outs.append(w @ v[..., sl])
    o = torch.cat(outs, dim=-1)
    return mha.linear_o(torch.sigmoid(mha.linear_g(q_x)) * o)


def test_starting_node_attention_definition():
    # Alg. 13: z_ij attends to z_ik with bias b_jk; key mask mask_ik.
    att = randomize(TriangleAttention(10, 3, 2, starting=True)).double()
    _, z, _, pair_mask = make_inputs()
    zn = att.layer_norm(z)
    b = att.linear_bias(zn)  # [j, k, h]
    expected = torch.stack([
        reference_gated_attention(att.mha, zn[i], zn[i],
                                  b.permute(2, 0, 1) + 1e9 * (pair_mask[i] - 1.0)[None, None, :])
        for i in range(N_RES)
    ])
    torch.testing.assert_close(att(z, pair_mask), expected, rtol=1e-10, atol=1e-10)


def test_msa_row_attention_definition():
    # Alg. 7: m_si attends to m_sj with bias b_ij from z; key mask msa_mask_sj.
    att = randomize(MSARowAttentionWithPairBias(12, 10, 4, 3)).double()
    m, z, msa_mask, _ = make_inputs()
    mn = att.layer_norm_m(m)
    b = att.linear_z(att.layer_norm_z(z)).permute(2, 0, 1)
    expected = torch.stack([
        reference_gated_attention(att.mha, mn[s], mn[s], b + 1e9 * (msa_mask[s] - 1.0)[None, None, :])
        for s in range(N_SEQ)
    ])
    torch.testing.assert_close(att(m, z, msa_mask), expected, rtol=1e-10, atol=1e-10)


def test_msa_column_attention_definition():
    # Alg. 8: m_si attends to m_ti over sequences t; key mask msa_mask_ti.
    att = randomize(MSAColumnAttention(12, 4, 3)).double()
    m, _, msa_mask, _ = make_inputs()
    mn = att.layer_norm_m(m)
    zero = torch.zeros(3, N_SEQ, N_SEQ, dtype=m.dtype)
    expected = torch.stack([
        reference_gated_attention(att.mha, mn[:, i], mn[:, i], zero + 1e9 * (msa_mask[:, i] - 1.0)[None, None, :])
        for i in range(N_RES)
    ], dim=1)
    out = att(m, msa_mask, chunk_size=2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_global_attention_definition():
    # Alg. 19 for one column: query = masked mean of the rows, single-headed k/v.
    att = randomize(GlobalAttention(12, 4, 3)).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N_SEQ, 12, generator=gen, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    q = att.linear_q((x[mask > 0]).mean(0)).view(3, 4) / 2.0  # / sqrt(c_hidden=4)
    k, v = att.linear_k(x[mask > 0]), att.linear_v(x[mask > 0])  # masked keys simply absent
    o = torch.softmax(q @ k.T, dim=-1) @ v  # [h, c]
    g = torch.sigmoid(att.linear_g(x)).view(N_SEQ, 3, 4)
    expected = att.linear_o((g * o).reshape(N_SEQ, 12))
    torch.testing.assert_close(att(x, mask), expected, rtol=1e-10, atol=1e-10)


def test_outer_product_mean_matches_einsum_definition():
    opm = randomize(OuterProductMean(12, 10, 5)).double()
    m, _, msa_mask, _ = make_inputs()
    mn = opm.layer_norm(m)
    a = opm.linear_a(mn) * msa_mask[..., None]
    b = opm.linear_b(mn) * msa_mask[..., None]
    outer = torch.einsum("sic,sje->ijce", a, b).reshape(N_RES, N_RES, 25)
    n_pairs = torch.einsum("si,sj->ij", msa_mask, msa_mask)[..., None]
    expected = (outer @ opm.linear_out.weight.T + opm.linear_out.bias) / (1e-3 + n_pairs)
    torch.testing.assert_close(opm(m, msa_mask), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(opm(m, msa_mask, chunk_size=3), expected, rtol=1e-10, atol=1e-10)
    # with no mask it is the plain mean over the N_seq sequences (up to eps); the
    # output Linear's bias is divided too, as in AF2's code
    a1, b1 = opm.linear_a(mn), opm.linear_b(mn)
    mean = torch.einsum("sic,sje->ijce", a1, b1).reshape(N_RES, N_RES, 25) / (N_SEQ + 1e-3)
    expected_unmasked = mean @ opm.linear_out.weight.T + opm.linear_out.bias / (N_SEQ + 1e-3)
    torch.testing.assert_close(opm(m), expected_unmasked, rtol=1e-10, atol=1e-10)
