"""AlphaFold 2 extra MSA stack (Alg. 18, 19), template pair stack (Alg. 16) and
template point-wise attention (Alg. 17)."""
import pytest
import torch

from foldcompile.models.alphafold2.extra_msa import ExtraMSABlock, ExtraMSAStack
from foldcompile.models.alphafold2.template import TemplatePairBlock, TemplatePairStack, TemplatePointwiseAttention

EXTRA = dict(c_e=6, c_z=10, c_hidden_msa_att=2, n_heads_msa=3, c_hidden_opm=5, c_hidden_mul=6,
             c_hidden_pair_att=3, n_heads_pair=2, transition_n=2)
TEMPL = dict(c_t=8, c_hidden_tri_att=3, n_heads_tri=2, c_hidden_tri_mul=5, transition_n=2)
N_EXTRA, N_TEMPL, N_RES = 6, 3, 7


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded non-zero parameters (AF2's zero "final"/"gating" inits would hide every update)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.shape[-1] ** -0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
                p.mul_(torch.where(torch.rand(p.shape, generator=gen) < 0.3, -1.0, 1.0).to(p.dtype))
    return module.double().eval()


def rand(*shape, seed=1, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- parameter counts at AF2 dims (AF2 config: extra_msa_channel 64, template 64) ----------------

def test_extra_msa_block_parameter_count_at_af2_dims():
    with torch.device("meta"):
        block = ExtraMSABlock()
    row = 2 * 64 + 2 * 128 + 128 * 8 + 3 * 64 * 64 + 2 * (64 * 64 + 64)
    col_global = 2 * 64 + 64 * 64 + 2 * 64 * 8 + 2 * (64 * 64 + 64)
    transition = 2 * 64 + (64 * 256 + 256) + (256 * 64 + 64)
    opm = 2 * 64 + 2 * (64 * 32 + 32) + 32 * 32 * 128 + 128
    pair_track = 1_829_952 - 1_332_928  # the Evoformer block's pair track, unchanged
    assert n_params(block) == row + col_global + transition + opm + pair_track == 701_312


def test_template_modules_parameter_counts_at_af2_dims():
    with torch.device("meta"):
        stack = TemplatePairStack()
        pointwise = TemplatePointwiseAttention()
    tri_att = 2 * 64 + 64 * 4 + 3 * 64 * 64 + 2 * (64 * 64 + 64)
    tri_mul = 2 * 64 + 4 * (64 * 64 + 64) + (64 * 64 + 64) + 2 * 64 + (64 * 64 + 64)
    transition = 2 * 64 + (64 * 128 + 128) + (128 * 64 + 64)
    assert n_params(stack) == 2 * (2 * tri_att + 2 * tri_mul + transition) + 2 * 64
    # queries from z (c_z 128), keys/values from t (c_t 64), 4 heads x 16, no gating
    assert n_params(pointwise) == 128 * 64 + 2 * 64 * 64 + 64 * 128 + 128


# ---- extra MSA stack -------------------------------------------------------------------------

def extra_inputs(n_res=N_RES):
    e, z = rand(N_EXTRA, n_res, 6, seed=1), rand(n_res, n_res, 10, seed=2)
    msa_mask = (torch.rand(N_EXTRA, n_res, generator=torch.Generator().manual_seed(3)) > 0.3).double()
    return e, z, msa_mask, torch.ones(n_res, n_res, dtype=torch.float64)


def test_extra_msa_stack_shapes_chunking_and_batch():
    stack = randomize(ExtraMSAStack(2, **EXTRA))
    e, z, msa_mask, pair_mask = extra_inputs()
    out = stack(e, z, msa_mask, pair_mask)
    assert out.shape == z.shape and not torch.allclose(out, z)
    torch.testing.assert_close(stack(e, z, msa_mask, pair_mask, chunk_size=2), out, rtol=1e-9, atol=1e-9)
    batched = stack(torch.stack([e, e.flip(0)]), torch.stack([z, z]), torch.stack([msa_mask, msa_mask.flip(0)]),
                    torch.stack([pair_mask, pair_mask]))
    torch.testing.assert_close(batched[0], out, rtol=1e-9, atol=1e-9)
    # the extra MSA's row order does not matter at all (no single representation)
    torch.testing.assert_close(batched[1], out, rtol=1e-9, atol=1e-9)


def test_extra_msa_stack_padding_with_masked_residues_changes_nothing():
    stack = randomize(ExtraMSAStack(2, **EXTRA))
    e, z, msa_mask, pair_mask = extra_inputs()
    ref = stack(e, z, msa_mask, pair_mask)
    n = N_RES + 3
    e_p, z_p = rand(N_EXTRA, n, 6, seed=8, scale=3.0), rand(n, n, 10, seed=9, scale=3.0)
    e_p[:, :N_RES], z_p[:N_RES, :N_RES] = e, z
    msa_mask_p, pair_mask_p = torch.zeros(N_EXTRA, n, dtype=e.dtype), torch.zeros(n, n, dtype=e.dtype)
    msa_mask_p[:, :N_RES], pair_mask_p[:N_RES, :N_RES] = msa_mask, pair_mask
    out = stack(e_p, z_p, msa_mask_p, pair_mask_p)
    torch.testing.assert_close(out[:N_RES, :N_RES], ref, rtol=1e-9, atol=1e-9)
    leak = stack(e_p, z_p)  # unmasked padding does reach the real residues: the check above is not vacuous
    assert (leak[:N_RES, :N_RES] - ref).abs().max() > 1e-3


def test_extra_msa_stack_checkpointing_same_outputs_and_gradients():
    e, z, msa_mask, pair_mask = extra_inputs()
    runs = []
    for checkpoint in (False, True):
        stack = randomize(ExtraMSAStack(2, **EXTRA, checkpoint=checkpoint)).train()
        z_in = z.clone().requires_grad_()
        torch.manual_seed(5)
        out = stack(e, z_in, msa_mask, pair_mask)
        (out ** 2).sum().backward()
        runs.append([out, z_in.grad] + [p.grad for p in stack.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---- template pair stack ---------------------------------------------------------------------

def test_template_pair_stack_shapes_chunking_and_independent_templates():
    stack = randomize(TemplatePairStack(2, **TEMPL))
    t = rand(N_TEMPL, N_RES, N_RES, 8)
    pair_mask = (torch.rand(N_TEMPL, N_RES, N_RES, generator=torch.Generator().manual_seed(4)) > 0.2).double()
    out = stack(t, pair_mask)
    assert out.shape == t.shape and not torch.allclose(out, t)
    # the final LayerNorm: undoing its affine map leaves zero mean, unit variance per position
    normed = (out - stack.layer_norm.bias) / stack.layer_norm.weight
    torch.testing.assert_close(normed.mean(-1), torch.zeros(out.shape[:-1], dtype=out.dtype), rtol=0, atol=1e-9)
    torch.testing.assert_close(normed.var(-1, unbiased=False), torch.ones(out.shape[:-1], dtype=out.dtype),
                               rtol=0, atol=1e-3)
    torch.testing.assert_close(stack(t, pair_mask, chunk_size=3), out, rtol=1e-9, atol=1e-9)
    for k in range(N_TEMPL):
        torch.testing.assert_close(stack(t[k:k + 1], pair_mask[k:k + 1])[0], out[k], rtol=1e-9, atol=1e-9)
    with_batch = stack(t[None], pair_mask[None])
    torch.testing.assert_close(with_batch[0], out, rtol=1e-9, atol=1e-9)


def test_template_pair_stack_padding_with_masked_residues_changes_nothing():
    stack = randomize(TemplatePairStack(2, **TEMPL))
    t = rand(N_TEMPL, N_RES, N_RES, 8)
    ref = stack(t, torch.ones(N_TEMPL, N_RES, N_RES, dtype=t.dtype))
    n = N_RES + 4
    t_p = rand(N_TEMPL, n, n, 8, seed=5, scale=3.0)
    t_p[:, :N_RES, :N_RES] = t
    pair_mask = torch.zeros(N_TEMPL, n, n, dtype=t.dtype)
    pair_mask[:, :N_RES, :N_RES] = 1.0
    out = stack(t_p, pair_mask)
    torch.testing.assert_close(out[:, :N_RES, :N_RES], ref, rtol=1e-9, atol=1e-9)
    assert (stack(t_p)[:, :N_RES, :N_RES] - ref).abs().max() > 1e-3  # unmasked padding leaks: not vacuous
    # a mask of size 1 over templates broadcasts
    torch.testing.assert_close(stack(t_p, pair_mask[:1]), out, rtol=1e-12, atol=1e-12)


def test_template_pair_stack_checkpointing_and_bad_mask():
    t = rand(N_TEMPL, N_RES, N_RES, 8)
    runs = []
    for checkpoint in (False, True):
        stack = randomize(TemplatePairStack(2, **TEMPL, checkpoint=checkpoint)).train()
        t_in = t.clone().requires_grad_()
        torch.manual_seed(6)
        out = stack(t_in)
        (out ** 3).sum().backward()
        runs.append([out, t_in.grad] + [p.grad for p in stack.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="pair_mask"):
        stack(t, torch.ones(N_RES, 1, dtype=t.dtype))


def test_template_pair_block_dropout_only_in_training():
    block = randomize(TemplatePairBlock(**TEMPL))
    t = rand(N_TEMPL, N_RES, N_RES, 8)
    ref = block(t)
    block.train()
    torch.manual_seed(0)
    assert not torch.allclose(block(t), ref)


# ---- template point-wise attention ------------------------------------------------------------

def test_template_pointwise_attention_definition():
    att = randomize(TemplatePointwiseAttention(c_t=8, c_z=10, c_hidden=3, n_heads=2))
    t, z = rand(N_TEMPL, N_RES, N_RES, 8, seed=1), rand(N_RES, N_RES, 10, seed=2)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    mha = att.mha
    out = att(t, z, mask)
    for i, j in [(0, 0), (2, 5), (6, 1)]:
        q = mha.linear_q(z[i, j]).view(2, 3) / 3 ** 0.5
        keys = t[mask > 0, i, j]  # masked templates simply absent
        k, v = mha.linear_k(keys).view(-1, 2, 3), mha.linear_v(keys).view(-1, 2, 3)
        w = torch.softmax(torch.einsum("hc,thc->ht", q, k), dim=-1)
        expected = mha.linear_o(torch.einsum("ht,thc->hc", w, v).reshape(6))
        torch.testing.assert_close(out[i, j], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(att(t, z, mask, chunk_size=2), out, rtol=1e-9, atol=1e-9)
    # batch dim
    batched = att(torch.stack([t, t]), torch.stack([z, z]), torch.stack([mask, torch.zeros_like(mask)]))
    torch.testing.assert_close(batched[0], out, rtol=1e-9, atol=1e-9)
    assert torch.equal(batched[1], torch.zeros_like(out))  # no templates: no update


def test_template_pointwise_attention_masked_template_is_ignored_and_bad_mask_raises():
    att = randomize(TemplatePointwiseAttention(c_t=8, c_z=10, c_hidden=3, n_heads=2))
    t, z = rand(N_TEMPL, N_RES, N_RES, 8, seed=1), rand(N_RES, N_RES, 10, seed=2)
    ref = att(t, z)
    junk = torch.cat([t, rand(2, N_RES, N_RES, 8, seed=7, scale=5.0)])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(att(junk, z, mask), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="template_mask"):
        att(t, z, torch.ones(N_TEMPL + 1, dtype=t.dtype))
