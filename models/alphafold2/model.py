"""AlphaFold 2 (monomer) inference and training forward pass with recycling (Alg. 2).

One iteration embeds the inputs (Alg. 3-5), adds the previous iteration's
outputs (Alg. 32), embeds the templates (Alg. 16, 17 and the template angle rows),
runs the extra MSA stack (Alg. 18), the Evoformer (Alg. 6) and the structure
module (Alg. 20). ``n_recycle`` earlier iterations run without gradients, as in
AlphaFold 2's training; the last one runs with them.

Masks, as AlphaFold 2's code builds them: ``pair_mask = seq_mask ⊗ seq_mask``;
the MSA mask is also multiplied by ``seq_mask`` (so a caller that pads residues
only needs to pass ``seq_mask``); the template rows appended to the MSA get the
template's psi-angle mask (AF2: ``torsion_angles_mask[..., 2]``, channel 52 of
``template_angle_feat``) times ``seq_mask``; the template pair stack gets the
plain ``pair_mask`` (``template_mask`` acts in the point-wise attention only, as
its key mask); the structure module gets ``seq_mask``. Masks may be bool or
float; they are cast to the features' dtype on entry.
"""
from __future__ import annotations

import torch
from torch import nn

from foldcompile.models.alphafold2.embedders import (
    ExtraMSAEmbedder, InputEmbedder, RecyclingEmbedder, TemplateAngleEmbedder, TemplatePairEmbedder)
from foldcompile.models.alphafold2.evoformer import EvoformerStack
from foldcompile.models.alphafold2.extra_msa import ExtraMSAStack
from foldcompile.models.alphafold2.primitives import Linear, cast_mask
from foldcompile.models.alphafold2.structure_module import StructureModule, pseudo_beta
from foldcompile.models.alphafold2.template import TemplatePairStack, TemplatePointwiseAttention

# target_feat = [between_segment_residues (1), one-hot aatype (21)], residue types in
# AlphaFold's order "ARNDCQEGHILKMFPSTWYV" + X: glycine is type 7, channel 1 + 7.
GLYCINE_CHANNEL = 8
# template_angle_feat = [aatype one-hot (22), torsion sin/cos (14), alternative torsion
# sin/cos (14), torsion masks (7)]; the torsions are (omega, phi, psi, chi1..chi4), so
# psi's mask (AF2's torsion_angles_mask[..., 2]) is channel 22 + 14 + 14 + 2.
PSI_MASK_CHANNEL = 52


class AlphaFold2(nn.Module):
    """AlphaFold 2 with recycling (Alg. 2). Defaults are the paper's dimensions.

    Inputs have no leading batch dim: ``target_feat [N_res, 22]``, ``residue_index
    [N_res]``, ``msa_feat [N_seq, N_res, 49]``, ``extra_msa_feat [N_extra, N_res, 25]``,
    optional ``template_pair_feat [N_templ, N_res, N_res, 88]`` and
    ``template_angle_feat [N_templ, N_res, 57]`` (AF2's layout: its channel 52 is
    the psi mask of the template row's residues); masks are 0/1 (bool or float)
    and default to ones. ``forward`` returns a dict:

    - ``single [N_res, c_s]`` (Evoformer), ``pair [N_res, N_res, c_z]``,
      ``msa_first_row [N_res, c_m]``, ``sm_single [N_res, c_s]`` (structure module)
    - ``positions [N_res, 3, 3]``: backbone N, CA, C in Å
    - ``frames``: ``(rotations [8, N_res, 3, 3], translations [8, N_res, 3])`` (Å), per layer
    - ``angles`` / ``unnormalized_angles`` ``[8, N_res, 7, 2]``
    - ``distogram_logits [N_res, N_res, 64]`` (symmetric)
    """

    def __init__(self, n_evoformer_blocks: int = 48, n_extra_blocks: int = 4, n_template_blocks: int = 2,
                 c_m: int = 256, c_z: int = 128, c_s: int = 384, c_e: int = 64, c_t: int = 64,
                 n_recycle: int = 3,
                 c_hidden_msa_att: int = 32, n_heads_msa: int = 8, c_hidden_opm: int = 32,
                 c_hidden_mul: int = 128, c_hidden_pair_att: int = 32, n_heads_pair: int = 4,
                 transition_n: int = 4,
                 c_hidden_extra_msa_att: int = 8, n_heads_extra_msa: int = 8,
                 c_hidden_template_att: int = 16, n_heads_template: int = 4, c_hidden_template_mul: int = 64,
                 template_transition_n: int = 2, c_hidden_template_pointwise: int = 16,
                 n_heads_template_pointwise: int = 4,
                 c_ipa: int = 16, n_heads_ipa: int = 12, n_query_points: int = 4, n_value_points: int = 8,
                 c_resnet: int = 128, n_structure_layers: int = 8,
                 msa_dropout: float = 0.15, pair_dropout: float = 0.25, structure_dropout: float = 0.1,
                 n_distogram_bins: int = 64, templates: bool = True, checkpoint: bool = False,
                 tf_dim: int = 22, msa_dim: int = 49, extra_msa_dim: int = 25,
                 template_pair_dim: int = 88, template_angle_dim: int = 57):
        super().__init__()
        if n_recycle < 0:
            raise ValueError(f"n_recycle must be >= 0, got {n_recycle}")
        self.n_recycle = n_recycle
        self.c_m, self.c_z = c_m, c_z
        self.templates = templates

        self.input_embedder = InputEmbedder(tf_dim, msa_dim, c_m, c_z)
        self.recycling_embedder = RecyclingEmbedder(c_m, c_z)
        if templates:
            self.template_pair_embedder = TemplatePairEmbedder(template_pair_dim, c_t)
            self.template_pair_stack = TemplatePairStack(
                n_template_blocks, c_t, c_hidden_template_att, n_heads_template, c_hidden_template_mul,
                template_transition_n, pair_dropout, checkpoint=checkpoint)
            self.template_pointwise_attention = TemplatePointwiseAttention(
                c_t, c_z, c_hidden_template_pointwise, n_heads_template_pointwise)
            self.template_angle_embedder = TemplateAngleEmbedder(template_angle_dim, c_m)
        self.extra_msa_embedder = ExtraMSAEmbedder(extra_msa_dim, c_e)
        self.extra_msa_stack = ExtraMSAStack(
            n_extra_blocks, c_e, c_z, c_hidden_extra_msa_att, n_heads_extra_msa, c_hidden_opm, c_hidden_mul,
            c_hidden_pair_att, n_heads_pair, transition_n, msa_dropout, pair_dropout, checkpoint=checkpoint)
        self.evoformer = EvoformerStack(
            n_evoformer_blocks, c_m, c_z, c_s, c_hidden_msa_att, n_heads_msa, c_hidden_opm, c_hidden_mul,
            c_hidden_pair_att, n_heads_pair, transition_n, msa_dropout, pair_dropout, checkpoint=checkpoint)
        self.structure_module = StructureModule(
            c_s, c_z, c_ipa, n_heads_ipa, n_query_points, n_value_points, c_resnet,
            n_layers=n_structure_layers, dropout=structure_dropout)
        self.distogram_head = Linear(c_z, n_distogram_bins, init="final")

    def iteration(self, target_feat: torch.Tensor, residue_index: torch.Tensor, msa_feat: torch.Tensor,
                  extra_msa_feat: torch.Tensor, template_pair_feat: torch.Tensor | None,
                  template_angle_feat: torch.Tensor | None, msa_mask: torch.Tensor, seq_mask: torch.Tensor,
                  pair_mask: torch.Tensor, extra_msa_mask: torch.Tensor, template_mask: torch.Tensor | None,
                  m_prev: torch.Tensor, z_prev: torch.Tensor, x_prev: torch.Tensor,
                  chunk_size: int | None = None) -> dict:
        """One pass of Alg. 2 lines 5-18 given the previous iteration's ``m_1, z, x``."""
        # Alg. 3-5: input embedding and relative positions
        m, z = self.input_embedder(target_feat, residue_index, msa_feat)

        # Alg. 32: recycle the first MSA row, the pair representation and the pseudo-beta distogram
        m_first_update, z_update = self.recycling_embedder(m_prev, z_prev, x_prev)
        m = torch.cat([m[:1] + m_first_update.unsqueeze(0), m[1:]], dim=0)
        z = z + z_update

        # Alg. 2 lines 7-13: templates
        if self.templates and template_pair_feat is not None:
            t = self.template_pair_embedder(template_pair_feat)
            # As AF2's code: the plain pair mask (shared by every template). A masked
            # template is a masked key of the point-wise attention, which also zeroes
            # the update when no template is present, so it needs no mask here.
            t = self.template_pair_stack(t, pair_mask.unsqueeze(0), chunk_size=chunk_size)
            z = z + self.template_pointwise_attention(t, z, template_mask, chunk_size=chunk_size)
        if self.templates and template_angle_feat is not None:
            a = self.template_angle_embedder(template_angle_feat)
            m = torch.cat([m, a], dim=0)
            # AF2 masks each template row by the template's psi-angle mask
            # (torsion_angles_mask[:, :, 2]); times seq_mask for padded residues.
            psi_mask = template_angle_feat[..., PSI_MASK_CHANNEL]
            msa_mask = torch.cat([msa_mask, psi_mask * seq_mask.unsqueeze(0)], dim=0)

        # Alg. 2 lines 14-15: extra MSA stack
        e = self.extra_msa_embedder(extra_msa_feat)
        z = self.extra_msa_stack(e, z, extra_msa_mask, pair_mask, chunk_size=chunk_size)

        # Alg. 2 line 17: Evoformer
        m, z, s = self.evoformer(m, z, msa_mask, pair_mask, chunk_size=chunk_size)

        # Alg. 2 line 18: structure module
        sm = self.structure_module(s, z, seq_mask)

        logits = self.distogram_head(z)
        return {
            "single": s,
            "pair": z,
            "msa_first_row": m[0],
            "sm_single": sm["single"],
            "positions": sm["positions"],
            "frames": sm["frames"],
            "angles": sm["angles"],
            "unnormalized_angles": sm["unnormalized_angles"],
            "distogram_logits": logits + logits.transpose(0, 1),
        }

    def forward(self, target_feat: torch.Tensor, residue_index: torch.Tensor, msa_feat: torch.Tensor,
                extra_msa_feat: torch.Tensor, template_pair_feat: torch.Tensor | None = None,
                template_angle_feat: torch.Tensor | None = None, msa_mask: torch.Tensor | None = None,
                seq_mask: torch.Tensor | None = None, extra_msa_mask: torch.Tensor | None = None,
                template_mask: torch.Tensor | None = None, n_recycle: int | None = None,
                chunk_size: int | None = None) -> dict:
        """Run ``n_recycle + 1`` iterations (default ``self.n_recycle``); see the class docstring."""
        if target_feat.dim() != 2:
            raise ValueError(f"AlphaFold2 takes unbatched inputs: target_feat [N_res, 22], got {tuple(target_feat.shape)}")
        n_res = target_feat.shape[0]
        for name, x, dim in (("msa_feat", msa_feat, 1), ("extra_msa_feat", extra_msa_feat, 1),
                             ("residue_index", residue_index, 0)):
            if x.shape[dim] != n_res:
                raise ValueError(f"{name} has shape {tuple(x.shape)}; its residue dim {dim} should be N_res={n_res}")
        if n_recycle is None:
            n_recycle = self.n_recycle
        if n_recycle < 0:
            raise ValueError(f"n_recycle must be >= 0, got {n_recycle}")

        # Optional masks default to ones; given ones (bool or float) take the features' dtype.
        seq_mask = target_feat.new_ones(n_res) if seq_mask is None else seq_mask.to(target_feat.dtype)
        msa_mask = cast_mask(msa_mask, msa_feat)
        extra_msa_mask = cast_mask(extra_msa_mask, extra_msa_feat)
        msa_mask = msa_mask * seq_mask
        extra_msa_mask = extra_msa_mask * seq_mask
        pair_mask = seq_mask[:, None] * seq_mask[None, :]
        if template_mask is None:
            if template_pair_feat is not None:
                template_mask = template_pair_feat.new_ones(template_pair_feat.shape[0])
            elif template_angle_feat is not None:
                template_mask = template_angle_feat.new_ones(template_angle_feat.shape[0])
        else:
            template_mask = template_mask.to(msa_feat.dtype)

        # The first iteration sees zeros (Alg. 2 line 3).
        m_prev = msa_feat.new_zeros(n_res, self.c_m)
        z_prev = msa_feat.new_zeros(n_res, n_res, self.c_z)
        x_prev = msa_feat.new_zeros(n_res, 3)
        is_glycine = target_feat[:, GLYCINE_CHANNEL]

        outputs = {}
        for cycle in range(n_recycle + 1):
            args = (target_feat, residue_index, msa_feat, extra_msa_feat, template_pair_feat,
                    template_angle_feat, msa_mask, seq_mask, pair_mask, extra_msa_mask, template_mask,
                    m_prev, z_prev, x_prev)
            if cycle < n_recycle:
                # Earlier iterations only provide inputs to the next one: no gradients.
                with torch.no_grad():
                    outputs = self.iteration(*args, chunk_size=chunk_size)
            else:
                outputs = self.iteration(*args, chunk_size=chunk_size)
            m_prev = outputs["msa_first_row"].detach()
            z_prev = outputs["pair"].detach()
            rotations, translations = outputs["frames"]
            x_prev = pseudo_beta(rotations[-1], translations[-1], is_glycine).detach()
        return outputs
