"""AlphaFold 2 structure module (suppl. 1.8, Alg. 20) with invariant point attention.

The module turns the single representation ``s [N_res, c_s]`` and the pair
representation ``z [N_res, N_res, c_z]`` into one rigid frame per residue (the
backbone), seven torsion angles per residue and the backbone atoms N, CA, C.

Conventions, as in AlphaFold 2's released code:
- Frames are iterated in "nanometre" units and multiplied by ``trans_scale``
  (10) on the way out, so every output (frames, positions) is in Å.
- Gradients through the rotations are stopped between layers (Alg. 20 line 20).
- The residue mask enters invariant point attention only, as an additive
  ``-1e5`` on the logits of every pair (i, j) with ``mask_i * mask_j == 0``; a
  padded residue therefore never influences a real one. In float16, which
  cannot hold 1e5, the constant is 1e4 (see ``ipa_mask_inf``). The mask may be
  bool or float; it is cast to the activations' dtype.
- The linear layers of IPA carry biases and the angle ResNet applies a ReLU to
  its two inputs, as the released code does (the pseudo-code omits both).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foldcompile.models.alphafold2 import rigid
from foldcompile.models.alphafold2.primitives import LayerNorm, Linear, cast_mask

# Idealised atom positions in the backbone frame (Å), from the literature values
# AlphaFold 2 uses (Engh & Huber 1991 via its residue_constants; alanine's).
BACKBONE_ATOMS = ("N", "CA", "C")
IDEAL_BACKBONE = ((-0.525, 1.363, 0.0), (0.0, 0.0, 0.0), (1.526, 0.0, 0.0))
IDEAL_CB = (-0.529, -0.774, -1.205)


def ipa_mask_inf(dtype: torch.dtype, inf: float = 1e5) -> float:
    """The constant IPA subtracts from the logits of masked pairs: AF2's 1e5, or 1e4 in float16.

    float16 tops out at 65504, so 1e5 is inf there and a padded residue's row,
    all of whose pairs are masked, would become NaN (which then reaches real
    residues through ``0 * NaN``). IPA's logits, unlike the other attentions',
    include ``-gamma * w_c / 2 * |q - k|^2``, which reaches thousands for distant
    residues; 1e4 leaves more than 5e4 of headroom for them before
    ``logit - 1e4`` could overflow, and is still far beyond what softmax can
    resolve (``exp(-1e4)`` is 0), so masked pairs get exactly zero weight
    whenever their logits lie within 1e4 of the unmasked ones.
    """
    return min(inf, 1e4) if dtype == torch.float16 else inf


def pseudo_beta(rot: torch.Tensor, trans: torch.Tensor, is_glycine: torch.Tensor | None = None) -> torch.Tensor:
    """Pseudo-beta positions ``[*, 3]`` from backbone frames in Å (input of Alg. 32).

    CB placed at its idealised position in each residue's frame; CA (the frame's
    origin) for glycine, as AlphaFold 2 does. ``is_glycine`` is a float/bool
    ``[*]`` mask, or None for "no glycines".
    """
    cb = rigid.apply(rot, trans, trans.new_tensor(IDEAL_CB))
    if is_glycine is None:
        return cb
    gly = is_glycine.to(trans.dtype).unsqueeze(-1)
    return gly * trans + (1.0 - gly) * cb


class InvariantPointAttention(nn.Module):
    """Invariant point attention (Alg. 22).

    Attention over residues whose logits combine a scalar query-key term, a pair
    bias from ``z`` and the squared distances between query and key points placed
    in 3-D by each residue's frame, weighted per head by ``softplus(γ_h)``. The
    output gathers scalar values, value points (brought back into the query
    residue's frame, with their norms) and the pair representation, so it is
    invariant to any global rotation and translation of the frames.

    Masks: ``mask [*, N_res]`` as ``-1e5`` (float16: ``-1e4``) on the logits of pairs with a padded end.
    """

    def __init__(self, c_s: int = 384, c_z: int = 128, c_hidden: int = 16, n_heads: int = 12,
                 n_query_points: int = 4, n_value_points: int = 8, inf: float = 1e5, eps: float = 1e-8):
        super().__init__()
        self.c_hidden, self.n_heads = c_hidden, n_heads
        self.n_query_points, self.n_value_points = n_query_points, n_value_points
        self.inf, self.eps = inf, eps
        h = n_heads
        self.linear_q = Linear(c_s, h * c_hidden)
        self.linear_k = Linear(c_s, h * c_hidden)
        self.linear_v = Linear(c_s, h * c_hidden)
        self.linear_q_points = Linear(c_s, h * n_query_points * 3)
        self.linear_k_points = Linear(c_s, h * n_query_points * 3)
        self.linear_v_points = Linear(c_s, h * n_value_points * 3)
        self.linear_b = Linear(c_z, h)
        # softplus(log(e - 1)) = 1: every head starts with unit point weight.
        self.head_weights = nn.Parameter(torch.full((h,), math.log(math.e - 1.0)))
        self.linear_out = Linear(h * (c_z + c_hidden + 4 * n_value_points), c_s, init="final")

    def _points(self, linear: Linear, s: torch.Tensor, n_points: int, rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        # local points [*, N, H, P, 3] -> global points T_i ∘ x (same shape)
        local = linear(s).reshape(*s.shape[:-1], self.n_heads, n_points, 3)
        return rigid.apply(rot[..., None, None, :, :], trans[..., None, None, :], local)

    def forward(self, s: torch.Tensor, z: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``s [*, N, c_s]``, ``z [*, N, N, c_z]``, frames ``rot [*, N, 3, 3]``, ``trans [*, N, 3]`` -> ``[*, N, c_s]``."""
        mask = cast_mask(mask, s)
        h, c = self.n_heads, self.c_hidden
        q = self.linear_q(s).reshape(*s.shape[:-1], h, c)
        k = self.linear_k(s).reshape(*s.shape[:-1], h, c)
        v = self.linear_v(s).reshape(*s.shape[:-1], h, c)
        q_pts = self._points(self.linear_q_points, s, self.n_query_points, rot, trans)
        k_pts = self._points(self.linear_k_points, s, self.n_query_points, rot, trans)
        v_pts = self._points(self.linear_v_points, s, self.n_value_points, rot, trans)

        w_c = math.sqrt(2.0 / (9.0 * self.n_query_points))
        w_l = math.sqrt(1.0 / 3.0)
        scalar = torch.einsum("...ihc,...jhc->...hij", q, k) / math.sqrt(c)
        bias = self.linear_b(z).movedim(-1, -3)  # [*, H, N, N]
        diff = q_pts.unsqueeze(-4) - k_pts.unsqueeze(-5)  # [*, N_i, N_j, H, P, 3]
        dist2 = (diff * diff).sum(dim=(-1, -2)).movedim(-1, -3)  # [*, H, N, N]
        gamma = F.softplus(self.head_weights).reshape(h, 1, 1)
        logits = w_l * (scalar + bias - gamma * (w_c / 2.0) * dist2)
        pair_mask = mask.unsqueeze(-1) * mask.unsqueeze(-2)
        logits = logits - ipa_mask_inf(logits.dtype, self.inf) * (1.0 - pair_mask.unsqueeze(-3))
        a = torch.softmax(logits, dim=-1)

        o = torch.einsum("...hij,...jhc->...ihc", a, v)
        o_pts_global = torch.einsum("...hij,...jhpx->...ihpx", a, v_pts)
        o_pts = rigid.invert_apply(rot[..., None, None, :, :], trans[..., None, None, :], o_pts_global)
        o_pts_norm = torch.sqrt((o_pts * o_pts).sum(-1) + self.eps)
        o_pair = torch.einsum("...hij,...ijc->...ihc", a, z)
        lead = s.shape[:-1]
        cat = torch.cat([
            o.reshape(*lead, -1),
            o_pts.movedim(-1, -3).reshape(*lead, -1),  # x, y, z coordinates as separate blocks
            o_pts_norm.reshape(*lead, -1),
            o_pair.reshape(*lead, -1),
        ], dim=-1)
        return self.linear_out(cat)


class BackboneUpdate(nn.Module):
    """Backbone update (Alg. 23): a frame update from ``s`` via a non-unit quaternion ``(1, b, c, d)``."""

    def __init__(self, c_s: int = 384):
        super().__init__()
        self.linear = Linear(c_s, 6, init="final")

    def forward(self, s: torch.Tensor) -> rigid.Frame:
        """``s [*, N, c_s]`` -> ``(R [*, N, 3, 3], t [*, N, 3])``."""
        bcd, t = self.linear(s).split([3, 3], dim=-1)
        quat = torch.cat([torch.ones_like(bcd[..., :1]), bcd], dim=-1)
        return rigid.quat_to_rot(quat, normalize=True), t


class StructureTransition(nn.Module):
    """Transition of the structure module (Alg. 20 lines 8-9): residual 3-layer MLP, dropout, LayerNorm."""

    def __init__(self, c_s: int = 384, n_layers: int = 3, dropout: float = 0.1):
        super().__init__()
        inits = ["relu"] * (n_layers - 1) + ["final"]
        self.layers = nn.ModuleList([Linear(c_s, c_s, init=init) for init in inits])
        self.dropout = dropout
        self.layer_norm = LayerNorm(c_s)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        x = s
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        s = s + x
        return self.layer_norm(F.dropout(s, p=self.dropout, training=self.training))


class AngleResnet(nn.Module):
    """Torsion-angle prediction (Alg. 20 lines 11-14): a small ResNet to 7 (sin, cos) pairs.

    Returns ``(unnormalised, normalised)`` angles, both ``[*, N, n_angles, 2]``;
    the normalised ones lie on the unit circle (the unnormalised ones feed AF2's
    angle-norm loss).
    """

    def __init__(self, c_s: int = 384, c_resnet: int = 128, n_blocks: int = 2, n_angles: int = 7, eps: float = 1e-12):
        super().__init__()
        self.n_angles, self.eps = n_angles, eps
        self.linear_in = Linear(c_s, c_resnet)
        self.linear_initial = Linear(c_s, c_resnet)
        self.blocks = nn.ModuleList([
            nn.ModuleList([Linear(c_resnet, c_resnet, init="relu"), Linear(c_resnet, c_resnet, init="final")])
            for _ in range(n_blocks)
        ])
        self.linear_out = Linear(c_resnet, 2 * n_angles)

    def forward(self, s: torch.Tensor, s_initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.linear_in(torch.relu(s)) + self.linear_initial(torch.relu(s_initial))
        for first, second in self.blocks:
            a = a + second(torch.relu(first(torch.relu(a))))
        raw = self.linear_out(torch.relu(a)).reshape(*s.shape[:-1], self.n_angles, 2)
        norm = torch.sqrt(torch.clamp((raw * raw).sum(-1, keepdim=True), min=self.eps))
        return raw, raw / norm


class StructureModule(nn.Module):
    """Structure module (Alg. 20): ``n_layers`` iterations of IPA, transition,
    backbone update and angle prediction, all sharing one set of weights.

    ``forward(s, z, mask=None)`` with ``s [N_res, c_s]``, ``z [N_res, N_res, c_z]``
    (a leading batch dim also works), ``mask [N_res]`` 0/1 (bool or float), returns a dict:

    - ``frames``: ``(rotations [L, *, N, 3, 3], translations [L, *, N, 3])`` in Å, one per layer
    - ``angles`` / ``unnormalized_angles``: ``[L, *, N, 7, 2]`` (sin, cos)
    - ``single``: ``s`` after the last layer ``[*, N, c_s]``
    - ``positions``: backbone atoms N, CA, C of the last layer ``[*, N, 3, 3]`` in Å
    """

    def __init__(self, c_s: int = 384, c_z: int = 128, c_ipa: int = 16, n_heads_ipa: int = 12,
                 n_query_points: int = 4, n_value_points: int = 8, c_resnet: int = 128,
                 n_resnet_blocks: int = 2, n_layers: int = 8, n_transition_layers: int = 3,
                 n_angles: int = 7, dropout: float = 0.1, trans_scale: float = 10.0):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"StructureModule needs n_layers >= 1, got {n_layers}")
        self.n_layers, self.dropout, self.trans_scale = n_layers, dropout, trans_scale
        self.layer_norm_s = LayerNorm(c_s)
        self.layer_norm_z = LayerNorm(c_z)
        self.linear_in = Linear(c_s, c_s)
        self.ipa = InvariantPointAttention(c_s, c_z, c_ipa, n_heads_ipa, n_query_points, n_value_points)
        self.layer_norm_ipa = LayerNorm(c_s)
        self.transition = StructureTransition(c_s, n_transition_layers, dropout)
        self.backbone_update = BackboneUpdate(c_s)
        self.angle_resnet = AngleResnet(c_s, c_resnet, n_resnet_blocks, n_angles)
        self.register_buffer("ideal_backbone", torch.tensor(IDEAL_BACKBONE), persistent=False)

    def forward(self, s: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        if s.shape[-2] != z.shape[-2] or z.shape[-3] != z.shape[-2]:
            raise ValueError(f"StructureModule: s {tuple(s.shape)} and z {tuple(z.shape)} disagree on N_res")
        mask = cast_mask(mask, s)
        s_initial = self.layer_norm_s(s)
        z = self.layer_norm_z(z)
        s = self.linear_in(s_initial)
        rot, trans = rigid.identity(tuple(s.shape[:-1]), dtype=s.dtype, device=s.device)

        rotations, translations, angles, raw_angles = [], [], [], []
        for layer in range(self.n_layers):
            s = s + self.ipa(s, z, rot, trans, mask)
            s = self.layer_norm_ipa(F.dropout(s, p=self.dropout, training=self.training))
            s = self.transition(s)
            rot_update, trans_update = self.backbone_update(s)
            rot, trans = rigid.compose(rot, trans, rot_update, trans_update)
            raw, normalised = self.angle_resnet(s, s_initial)
            rotations.append(rot)
            translations.append(trans * self.trans_scale)
            angles.append(normalised)
            raw_angles.append(raw)
            if layer < self.n_layers - 1:
                # AF2 stops the gradient through rotations between layers (Alg. 20 line 20).
                rot = rot.detach()

        final_rot, final_trans = rotations[-1], translations[-1]
        positions = rigid.apply(final_rot.unsqueeze(-3), final_trans.unsqueeze(-2), self.ideal_backbone)
        return {
            "frames": (torch.stack(rotations), torch.stack(translations)),
            "angles": torch.stack(angles),
            "unnormalized_angles": torch.stack(raw_angles),
            "single": s,
            "positions": positions,
        }
