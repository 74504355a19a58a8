"""AlphaFold 2 embedders: inputs, relative positions, recycling, extra MSA, templates.

The model takes feature tensors, not raw sequences (featurisation is out of scope):

- ``target_feat [N_res, 22]``: "between segment residues" flag + one-hot of 21 amino
  acid types (20 + unknown), as AlphaFold 2 builds it.
- ``msa_feat [N_seq, N_res, 49]``, ``extra_msa_feat [N_extra, N_res, 25]``.
- ``template_pair_feat [N_templ, N_res, N_res, 88]``, ``template_angle_feat [N_templ, N_res, 57]``:
  the latter in AlphaFold 2's layout, aatype one-hot (22, channels 0-21), sin/cos of
  the 7 torsion angles (14, 22-35), of the alternative angles (14, 36-49) and the 7
  torsion-angle masks (50-56); psi's mask (torsion 2) is channel 52.
"""
from __future__ import annotations

import torch
from torch import nn

from foldcompile.models.alphafold2.primitives import LayerNorm, Linear


class RelativePosition(nn.Module):
    """Relative position encoding (Alg. 4): one-hot of ``clip(r_i - r_j, -32, 32)`` (65 bins) -> ``c_z``.

    The offsets are taken on the integer residue index (a float index is rounded
    first), and only the one-hot is cast to the weights' dtype: bfloat16 holds
    integers exactly only up to 256, so differencing a bfloat16 index would give
    wrong offsets in any longer protein.
    """

    def __init__(self, c_z: int = 128, max_relative_idx: int = 32):
        super().__init__()
        self.max_relative_idx = max_relative_idx
        self.linear = Linear(2 * max_relative_idx + 1, c_z)

    def forward(self, residue_index: torch.Tensor) -> torch.Tensor:
        """``residue_index [N_res]`` (int or float) -> ``[N_res, N_res, c_z]``."""
        r = residue_index
        if r.is_floating_point():
            r = torch.round(r)
        r = r.long()
        d = r.unsqueeze(-1) - r.unsqueeze(-2)
        k = self.max_relative_idx
        # Alg. 4 lines 2-3: the nearest of the bins -32..32 is the clipped offset itself.
        rel = nn.functional.one_hot(torch.clamp(d, -k, k) + k, 2 * k + 1)
        return self.linear(rel.to(self.linear.weight.dtype))


class InputEmbedder(nn.Module):
    """Input embedder (Alg. 3): initial MSA ``m [N_seq, N_res, c_m]`` and pair ``z [N_res, N_res, c_z]``.

    ``z_ij = a_i + b_j + relpos(i, j)`` with ``a, b`` linear in ``target_feat``;
    ``m_si = Linear(msa_feat_si) + Linear(target_feat_i)``.
    """

    def __init__(self, tf_dim: int = 22, msa_dim: int = 49, c_m: int = 256, c_z: int = 128, max_relative_idx: int = 32):
        super().__init__()
        self.tf_dim, self.msa_dim = tf_dim, msa_dim
        self.linear_tf_z_i = Linear(tf_dim, c_z)
        self.linear_tf_z_j = Linear(tf_dim, c_z)
        self.linear_tf_m = Linear(tf_dim, c_m)
        self.linear_msa_m = Linear(msa_dim, c_m)
        self.relpos = RelativePosition(c_z, max_relative_idx)

    def forward(self, target_feat: torch.Tensor, residue_index: torch.Tensor,
                msa_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if target_feat.shape[-1] != self.tf_dim or msa_feat.shape[-1] != self.msa_dim:
            raise ValueError(
                f"InputEmbedder expects target_feat [..., {self.tf_dim}] and msa_feat [..., {self.msa_dim}], "
                f"got {tuple(target_feat.shape)} and {tuple(msa_feat.shape)}")
        a = self.linear_tf_z_i(target_feat)
        b = self.linear_tf_z_j(target_feat)
        z = a.unsqueeze(-2) + b.unsqueeze(-3)
        z = z + self.relpos(residue_index)
        m = self.linear_msa_m(msa_feat) + self.linear_tf_m(target_feat).unsqueeze(-3)
        return m, z


class RecyclingEmbedder(nn.Module):
    """Recycling embedder (Alg. 32): the previous iteration's outputs as updates to ``m[0]`` and ``z``.

    Returns ``(m_first_row_update [N_res, c_m], z_update [N_res, N_res, c_z])`` =
    ``(LayerNorm(m_prev[0]), LayerNorm(z_prev) + Linear(distogram(x_prev)))``.
    The distogram of the previous pseudo-beta positions has 15 bins with lower
    edges 3.25 .. 20.75 Å, the last one open-ended, and is all-zero below 3.25 Å
    (so the zero positions of the first iteration contribute nothing), as in
    AlphaFold 2's released code. As there, the bins are compared on squared
    distances, with the open upper edge 1e8 (Å²) on the squared distance, and
    this is computed in float32 whatever ``x_prev``'s dtype (squared distances of
    a large protein are far beyond what bfloat16/float16 resolve); only the
    one-hot is cast to the weights' dtype.
    """

    def __init__(self, c_m: int = 256, c_z: int = 128, min_bin: float = 3.25, max_bin: float = 20.75,
                 n_bins: int = 15, inf: float = 1e8):
        super().__init__()
        self.min_bin, self.max_bin, self.n_bins, self.inf = min_bin, max_bin, n_bins, inf
        self.linear = Linear(n_bins, c_z)
        self.layer_norm_m = LayerNorm(c_m)
        self.layer_norm_z = LayerNorm(c_z)

    def forward(self, m_prev_first_row: torch.Tensor, z_prev: torch.Tensor,
                x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``m_prev_first_row [N_res, c_m]``, ``z_prev [N_res, N_res, c_z]``, ``x_prev [N_res, 3]`` (Å)."""
        x = x_prev.to(torch.promote_types(x_prev.dtype, torch.float32))
        lower = torch.linspace(self.min_bin, self.max_bin, self.n_bins, dtype=x.dtype, device=x.device) ** 2
        upper = torch.cat([lower[1:], lower.new_tensor([self.inf])])
        diff = x.unsqueeze(-2) - x.unsqueeze(-3)
        d2 = (diff * diff).sum(-1, keepdim=True)
        dgram = ((d2 > lower) & (d2 < upper)).to(self.linear.weight.dtype)
        z_update = self.linear(dgram) + self.layer_norm_z(z_prev)
        return self.layer_norm_m(m_prev_first_row), z_update


class ExtraMSAEmbedder(nn.Module):
    """Extra MSA embedding (Alg. 2 line 14): ``Linear(extra_msa_feat)`` 25 -> ``c_e``."""

    def __init__(self, extra_msa_dim: int = 25, c_e: int = 64):
        super().__init__()
        self.linear = Linear(extra_msa_dim, c_e)

    def forward(self, extra_msa_feat: torch.Tensor) -> torch.Tensor:
        return self.linear(extra_msa_feat)


class TemplatePairEmbedder(nn.Module):
    """Template pair embedding (Alg. 2 line 9): ``Linear(template_pair_feat)`` 88 -> ``c_t``."""

    def __init__(self, template_pair_dim: int = 88, c_t: int = 64):
        super().__init__()
        self.linear = Linear(template_pair_dim, c_t, init="relu")

    def forward(self, template_pair_feat: torch.Tensor) -> torch.Tensor:
        return self.linear(template_pair_feat)


class TemplateAngleEmbedder(nn.Module):
    """Template single (torsion angle) embedding (Alg. 2 line 7): ``Linear, ReLU, Linear`` 57 -> ``c_m``.

    The result is concatenated to the MSA representation as extra rows.
    """

    def __init__(self, template_angle_dim: int = 57, c_m: int = 256):
        super().__init__()
        self.linear_1 = Linear(template_angle_dim, c_m, init="relu")
        self.linear_2 = Linear(c_m, c_m, init="relu")

    def forward(self, template_angle_feat: torch.Tensor) -> torch.Tensor:
        return self.linear_2(torch.relu(self.linear_1(template_angle_feat)))
