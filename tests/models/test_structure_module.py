"""Rigid-frame utilities and the AlphaFold 2 structure module (Alg. 20-23)."""

import pytest
import torch

from foldcompile.models.zoo import randomize_parameters
from foldcompile.models.alphafold2 import rigid
from foldcompile.models.alphafold2.structure_module import (
    IDEAL_BACKBONE, InvariantPointAttention, StructureModule, pseudo_beta)

TINY = dict(c_s=16, c_z=8, c_ipa=4, n_heads_ipa=3, n_query_points=2, n_value_points=3,
            c_resnet=8, n_layers=3)


def random_frames(n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rot = rigid.quat_to_rot(torch.randn(n, 4, generator=gen, dtype=dtype))
    trans = torch.randn(n, 3, generator=gen, dtype=dtype) * 3.0
    return rot, trans


# ---------------------------------------------------------------- rigid utilities

def test_quat_to_rot_is_a_proper_rotation():
    rot, _ = random_frames(50)
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(50, dtype=torch.float64), atol=1e-12, rtol=0)


def test_quat_to_rot_known_rotation_and_scale_invariance():
    # (1, 0, 0, 1) unnormalised is a 90 degree rotation about z.
    r = rigid.quat_to_rot(torch.tensor([2.0, 0.0, 0.0, 2.0], dtype=torch.float64))
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(r, expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"\[\*, 4\]"):
        rigid.quat_to_rot(torch.ones(3))


def test_compose_invert_round_trip():
    r1, t1 = random_frames(7, seed=1)
    r2, t2 = random_frames(7, seed=2)
    x = torch.randn(7, 3, dtype=torch.float64)
    # T ∘ T⁻¹ is the identity
    r, t = rigid.compose(r1, t1, *rigid.invert(r1, t1))
    torch.testing.assert_close(r, torch.eye(3, dtype=torch.float64).expand(7, 3, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(t, torch.zeros(7, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    # invert_apply undoes apply
    torch.testing.assert_close(rigid.invert_apply(r1, t1, rigid.apply(r1, t1, x)), x)
    # composition acts as applying T2 then T1
    torch.testing.assert_close(rigid.apply(*rigid.compose(r1, t1, r2, t2), x),
                               rigid.apply(r1, t1, rigid.apply(r2, t2, x)))


def test_rigid_from_3_points_recovers_the_frame_of_ideal_backbone():
    rot, trans = random_frames(6, seed=3)
    ideal = torch.tensor(IDEAL_BACKBONE, dtype=torch.float64)
    atoms = rigid.apply(rot[:, None], trans[:, None], ideal)  # [6, 3 atoms, 3]
    r, t = rigid.rigid_from_3_points(atoms[:, 0], atoms[:, 1], atoms[:, 2])
    torch.testing.assert_close(r, rot, atol=1e-7, rtol=0)
    torch.testing.assert_close(t, trans)


# ---------------------------------------------------------------- IPA

def test_ipa_is_invariant_to_global_rigid_motion():
    torch.manual_seed(0)
    n = 9
    ipa = InvariantPointAttention(c_s=16, c_z=8, c_hidden=4, n_heads=3, n_query_points=2, n_value_points=3).double()
    randomize_parameters(ipa)
    s = torch.randn(n, 16, dtype=torch.float64)
    z = torch.randn(n, n, 8, dtype=torch.float64)
    rot, trans = random_frames(n, seed=4)
    mask = torch.ones(n, dtype=torch.float64)
    mask[-2:] = 0.0
    out = ipa(s, z, rot, trans, mask)
    g_rot, g_trans = random_frames(1, seed=5)
    rot2, trans2 = rigid.compose(g_rot, g_trans, rot, trans)
    out2 = ipa(s, z, rot2, trans2, mask)
    assert out.abs().max() > 1e-3  # the check below must not pass vacuously
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=0)
    # and it does depend on the frames: a per-residue (non-global) change moves the output
    out3 = ipa(s, z, rot, trans + torch.randn(n, 3, dtype=torch.float64), mask)
    assert (out3 - out).abs().max() > 1e-3


# ---------------------------------------------------------------- structure module

def _inputs(n, c_s=16, c_z=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c_s, generator=gen, dtype=dtype), torch.randn(n, n, c_z, generator=gen, dtype=dtype)


def test_structure_module_shapes_and_geometry():
    sm = StructureModule(**TINY)
    randomize_parameters(sm)
    sm.eval()
    n = 6
    out = sm(*_inputs(n))
    rots, trans = out["frames"]
    assert rots.shape == (3, n, 3, 3) and trans.shape == (3, n, 3)
    assert out["angles"].shape == (3, n, 7, 2) and out["unnormalized_angles"].shape == (3, n, 7, 2)
    assert out["single"].shape == (n, 16)
    assert out["positions"].shape == (n, 3, 3)
    eye = torch.eye(3).expand(3, n, 3, 3)
    torch.testing.assert_close(rots @ rots.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["angles"].norm(dim=-1), torch.ones(3, n, 7), atol=1e-5, rtol=0)
    # CA sits at the frame origin; N-CA and CA-C have the literature bond lengths
    pos = out["positions"]
    torch.testing.assert_close(pos[:, 1], trans[-1])
    torch.testing.assert_close((pos[:, 0] - pos[:, 1]).norm(dim=-1), torch.full((n,), 1.4606), atol=1e-4, rtol=0)
    torch.testing.assert_close((pos[:, 2] - pos[:, 1]).norm(dim=-1), torch.full((n,), 1.526), atol=1e-4, rtol=0)
    # the frames actually move away from the identity
    assert trans.abs().max() > 1e-2


def test_structure_module_eval_is_deterministic_and_train_uses_dropout():
    sm = StructureModule(**TINY)
    randomize_parameters(sm)
    s, z = _inputs(5)
    sm.eval()
    a, b = sm(s, z), sm(s, z)
    torch.testing.assert_close(a["positions"], b["positions"], atol=0, rtol=0)
    torch.testing.assert_close(a["angles"], b["angles"], atol=0, rtol=0)
    sm.train()
    torch.manual_seed(1)
    c = sm(s, z)
    assert (c["single"] - a["single"]).abs().max() > 1e-4


def test_structure_module_padding_leaves_real_residues_unchanged():
    sm = StructureModule(**TINY).double()
    randomize_parameters(sm)
    sm.eval()
    n, pad = 5, 3
    s, z = _inputs(n, dtype=torch.float64)
    s_pad, z_pad = _inputs(n + pad, dtype=torch.float64, seed=1)
    s_pad[:n] = s
    z_pad[:n, :n] = z
    mask = torch.cat([torch.ones(n), torch.zeros(pad)]).double()
    ref = sm(s, z)
    out = sm(s_pad, z_pad, mask)
    torch.testing.assert_close(out["single"][:n], ref["single"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["positions"][:n], ref["positions"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["angles"][:, :n], ref["angles"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["frames"][0][:, :n], ref["frames"][0], atol=1e-5, rtol=0)
    # without the mask the padding does leak into the real residues
    leak = sm(s_pad, z_pad)
    assert (leak["single"][:n] - ref["single"]).abs().max() > 1e-3


def test_structure_module_gradients_reach_every_parameter():
    sm = StructureModule(**TINY)
    randomize_parameters(sm)
    s, z = _inputs(6)
    s.requires_grad_(True)
    out = sm(s, z)
    loss = (out["positions"].square().mean() + out["angles"].sum() + out["unnormalized_angles"].square().mean()
            + out["single"].square().mean() + out["frames"][0].sum() + out["frames"][1].square().mean())
    loss.backward()
    for name, p in sm.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient for {name}"
    assert s.grad.abs().max() > 0


def test_pseudo_beta_uses_ca_for_glycine():
    rot, trans = random_frames(4, seed=6)
    gly = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    pb = pseudo_beta(rot, trans, gly)
    torch.testing.assert_close(pb[1], trans[1])
    torch.testing.assert_close(pb[3], trans[3])
    # CB is 1.53 Å from CA (the literature C-C bond)
    torch.testing.assert_close((pb[0] - trans[0]).norm(), torch.tensor(1.5267, dtype=torch.float64), atol=1e-3, rtol=0)
