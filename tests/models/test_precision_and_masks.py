"""Reduced precision and mask handling of the reference models (review findings of issue 2).

bf16/fp16 must not change what the models compute beyond rounding: relative positions
are exact integers, masks of any dtype (float32, bool) work with low-precision weights,
fp16 padding gives no NaN, the recycling distogram is binned in fp32. Also the
AF2-faithful masks of the template rows and the zoo's target_feat layout.
"""
import pytest
import torch

from foldcompile.models import zoo
from foldcompile.models.alphafold2.embedders import RecyclingEmbedder, RelativePosition
from foldcompile.models.alphafold2.model import GLYCINE_CHANNEL, PSI_MASK_CHANNEL

# Positions of the mask arguments in each zoo model's example inputs.
MASK_ARGS = {
    "alphafold2": (6, 7, 8, 9),  # msa_mask, seq_mask, extra_msa_mask, template_mask
    "evoformer_block": (2, 3),
    "evoformer_stack": (2, 3),
    "extra_msa_stack": (2, 3),
    "pairformer_block": (2, 3),
    "pairformer_stack": (2, 3),
    "structure_module": (2,),
    "template_pair_stack": (1,),
}


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat(o)]


def _capture_input(module: torch.nn.Module, store: list):
    """Record the first positional input of every call of ``module``."""
    return module.register_forward_pre_hook(lambda mod, args: store.append(args[0].detach().clone()))


# ------------------------------------------------------------- 1. relative positions

def test_relative_position_one_hot_is_exact_in_bf16_for_long_proteins():
    n = 600
    # a chain break after residue 300 (AF2 adds 200 to the index there)
    index = torch.arange(n) + torch.where(torch.arange(n) >= 300, 200, 0)
    ref_mod = RelativePosition(c_z=4)
    bf16_mod = RelativePosition(c_z=4).to(torch.bfloat16)
    seen_ref, seen_bf16 = [], []
    _capture_input(ref_mod.linear, seen_ref)
    _capture_input(bf16_mod.linear, seen_bf16)
    with torch.no_grad():
        ref_mod(index)
        bf16_mod(index)
        bf16_mod(index.float() + 0.2)  # a float index is rounded, not truncated by bf16
    expected = torch.clamp(index[:, None] - index[None, :], -32, 32) + 32
    ref = seen_ref[0]
    assert ref.dtype == torch.float32 and ref.shape == (n, n, 65)
    assert torch.equal(ref.argmax(-1), expected) and torch.equal(ref.sum(-1), torch.ones(n, n))
    for got in seen_bf16:
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.float(), ref)


# ------------------------------------------------------------- 2. mask dtypes

def test_mask_args_cover_the_zoo():
    assert set(MASK_ARGS) == set(zoo.names())


@pytest.mark.parametrize("name", zoo.names())
def test_bf16_models_accept_float32_and_bool_masks(name):
    module, inputs = zoo.get(name, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = _flat(module(*inputs))
        assert all(torch.isfinite(t).all() for t in ref if t.is_floating_point())
        for convert in (lambda mask: mask.float(), lambda mask: mask > 0.5):
            args = list(inputs)
            for i in MASK_ARGS[name]:
                assert set(args[i].unique().tolist()) <= {0.0, 1.0}, (name, i)
                args[i] = convert(args[i])
            out = _flat(module(*args))
            assert len(out) == len(ref)
            for a, b in zip(out, ref):
                assert a.dtype == b.dtype and torch.equal(a, b), name
        # and the masks do act in bf16: masking one more real residue changes the outputs
        args = list(inputs)
        first = MASK_ARGS[name][0]
        args[first] = args[first].clone()
        args[first].view(-1)[0] = 0
        changed = _flat(module(*args))
        assert any(not torch.equal(a, b) for a, b in zip(changed, ref)), name


# ------------------------------------------------------------- 3. fp16 with padding

def _real_parts(name, out):
    """The outputs at real residues (the zoo's examples pad the last residue)."""
    if name == "structure_module":
        rot, trans = out["frames"]
        per_layer = [rot, trans, out["angles"], out["unnormalized_angles"]]  # [L, N, ...]
        return [t[:, :-1] for t in per_layer] + [out["single"][:-1], out["positions"][:-1]]
    first, z = out  # evoformer_block: (m [S, N, c], z); pairformer_block: (s [N, c], z)
    first = first[:, :-1] if name == "evoformer_block" else first[:-1]
    return [first, z[:-1, :-1]]


@pytest.mark.parametrize("name", ["evoformer_block", "pairformer_block", "structure_module"])
def test_fp16_with_padding_is_finite_and_close_to_fp32(name):
    module32, inputs32 = zoo.get(name)
    module16, inputs16 = zoo.get(name, dtype=torch.float16)
    assert any((inputs16[i] == 0).any() for i in MASK_ARGS[name])  # the example really pads
    with torch.no_grad():
        out16 = module16(*inputs16)
        out32 = module32(*inputs32)
    assert all(torch.isfinite(t).all() for t in _flat(out16)), name
    for a, b in zip(_real_parts(name, out16), _real_parts(name, out32)):
        assert a.dtype == torch.float16
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 5e-3, (name, tuple(b.shape), rel.item())  # measured 6e-4..2e-3; ignored masks give > 5e-2


# ------------------------------------------------------------- 4, 5. template masks in AlphaFold2

def test_template_rows_are_masked_by_psi_mask_and_pair_stack_gets_the_pair_mask():
    module, inputs = zoo.get("alphafold2")
    taf, msa_mask, seq_mask = inputs[5], inputs[6], inputs[7]
    n_templ = taf.shape[0]
    psi = taf[..., PSI_MASK_CHANNEL]
    assert PSI_MASK_CHANNEL == 22 + 14 + 14 + 2
    assert ((psi == 0) & (seq_mask == 1)).any() and ((psi == 1) & (seq_mask == 1)).any()
    evo_masks, templ_masks = [], []
    module.evoformer.register_forward_pre_hook(lambda mod, args: evo_masks.append(args[2]))
    module.template_pair_stack.register_forward_pre_hook(lambda mod, args: templ_masks.append(args[1]))
    template_mask = torch.tensor([1.0, 0.0, 1.0])  # a masked template changes neither mask
    with torch.no_grad():
        module(*inputs[:9], template_mask)
    assert len(evo_masks) == module.n_recycle + 1 and len(templ_masks) == module.n_recycle + 1
    for got in evo_masks:
        torch.testing.assert_close(got[:-n_templ], msa_mask * seq_mask, rtol=0, atol=0)
        torch.testing.assert_close(got[-n_templ:], psi * seq_mask, rtol=0, atol=0)
    pair_mask = seq_mask[:, None] * seq_mask[None, :]
    for got in templ_masks:
        torch.testing.assert_close(got.expand(n_templ, -1, -1), pair_mask.expand(n_templ, -1, -1),
                                   rtol=0, atol=0)


def test_template_row_residue_with_psi_mask_zero_does_not_influence_the_outputs():
    module, inputs = zoo.get("alphafold2")
    taf, seq_mask = inputs[5], inputs[7]
    psi = taf[..., PSI_MASK_CHANNEL]
    masked = ((psi == 0) & (seq_mask == 1)).nonzero()[0].tolist()
    unmasked = ((psi == 1) & (seq_mask == 1)).nonzero()[0].tolist()

    def run_with_changed_row(t, r):
        args = list(inputs)
        changed = taf.clone()
        changed[t, r, :50] += torch.randn(50, generator=torch.Generator().manual_seed(5))
        args[5] = changed
        return _flat(module(*args))

    with torch.no_grad():
        ref = _flat(module(*inputs))
        same = run_with_changed_row(*masked)
        other = run_with_changed_row(*unmasked)
    for a, b in zip(same, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the check has teeth: the same change at a residue whose psi mask is 1 does change them
    assert max((a - b).abs().max().item() for a, b in zip(other, ref)) > 1e-4


# ------------------------------------------------------------- 6. recycling distogram

def test_recycling_distogram_is_binned_in_fp32_with_the_open_edge_on_squared_distance():
    emb = RecyclingEmbedder(c_m=4, c_z=3).to(torch.bfloat16)
    seen = []
    _capture_input(emb.linear, seen)
    gen = torch.Generator().manual_seed(0)
    x = (25.0 * torch.rand(150, 3, generator=gen)).to(torch.bfloat16)
    far = torch.tensor([[0.0, 0.0, 0.0], [5e3, 0.0, 0.0], [2e4, 0.0, 0.0]], dtype=torch.bfloat16)
    with torch.no_grad():
        for coords in (x, far):
            emb(torch.zeros(coords.shape[0], 4, dtype=torch.bfloat16),
                torch.zeros(coords.shape[0], coords.shape[0], 3, dtype=torch.bfloat16), coords)
    # reference in float64 from the same (bf16-valued) coordinates, AF2's breaks
    xd = x.double()
    d2 = ((xd[:, None] - xd[None, :]) ** 2).sum(-1, keepdim=True)
    lower = torch.linspace(3.25, 20.75, 15, dtype=torch.float64) ** 2
    upper = torch.cat([lower[1:], torch.tensor([1e8], dtype=torch.float64)])
    expected = ((d2 > lower) & (d2 < upper)).double()
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0].double(), expected)
    # 5000 Å (d² = 2.5e7 < 1e8) lands in the last bin; 20000 Å (d² = 4e8) in none, as in AF2
    assert seen[1][0, 1].tolist() == [0.0] * 14 + [1.0]
    assert seen[1][0, 2].sum() == 0


# ------------------------------------------------------------- 7. zoo target_feat layout

@pytest.mark.parametrize("seed", [0, 1])
def test_zoo_target_feat_has_af2_layout(seed):
    _, inputs = zoo.get("alphafold2", n_res=40, seed=seed)
    target_feat = inputs[0]
    assert target_feat.shape == (40, 22)
    assert GLYCINE_CHANNEL == 1 + "ARNDCQEGHILKMFPSTWYV".index("G")
    assert torch.equal(target_feat[:, 0], torch.zeros(40))  # between_segment_residues
    assert torch.equal(target_feat[:, 21], torch.zeros(40))  # no unknown residues
    assert torch.equal(target_feat[:, 1:].sum(-1), torch.ones(40))  # one-hot of the 21 types
    assert target_feat[:, GLYCINE_CHANNEL].sum() > 0  # some glycines: pseudo-beta = CA there
