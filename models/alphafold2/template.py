"""Template pair stack and template point-wise attention (AlphaFold 2 supplement, Alg. 16, 17)."""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from foldcompile.models.alphafold2.attention import (
    Attention,
    TriangleAttentionEndingNode,
    TriangleAttentionStartingNode,
    chunk_rows,
    mask_bias,
)
from foldcompile.models.alphafold2.primitives import LayerNorm, cast_mask, dropout_columnwise, dropout_rowwise
from foldcompile.models.alphafold2.transitions import PairTransition
from foldcompile.models.alphafold2.triangle import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing


def _template_pair_mask(t: torch.Tensor, pair_mask: torch.Tensor | None) -> torch.Tensor:
    """A pair mask of shape ``t.shape[:-1]`` (``[*, N_templ, N_res, N_res]``) in ``t``'s dtype
    (the given mask may be bool or float)."""
    if pair_mask is None:
        return t.new_ones(t.shape[:-1])
    if pair_mask.dim() != t.dim() - 1:
        raise ValueError(f"template pair_mask must have shape [*, N_templ, N_res, N_res] (dims of size 1 "
                         f"broadcast) for t of shape {tuple(t.shape)}; got {tuple(pair_mask.shape)}")
    return cast_mask(pair_mask, t).expand(t.shape[:-1])


class TemplatePairBlock(nn.Module):
    """One block of the template pair stack (Alg. 16, lines 2-6), on each template's
    pair representation ``t [*, N_templ, N_res, N_res, c_t]``.

    Triangle attention around the starting then the ending node (Alg. 13, 14),
    triangle multiplications outgoing then incoming (Alg. 11, 12), pair transition
    (Alg. 15). AF2 dims: c_t = 64, triangle attention 4 heads x 16, triangle
    multiplication hidden 64, transition x2; dropout 0.25 (row-wise, column-wise
    for the ending node) in training.
    Mask: ``pair_mask [*, N_templ, N_res, N_res]`` is the triangle attentions' key
    mask and masks the triangle multiplications' projections; transitions unmasked.
    """

    def __init__(self, c_t: int = 64, c_hidden_tri_att: int = 16, n_heads_tri: int = 4,
                 c_hidden_tri_mul: int = 64, transition_n: int = 2, dropout: float = 0.25):
        super().__init__()
        self.dropout = dropout
        self.tri_att_start = TriangleAttentionStartingNode(c_t, c_hidden_tri_att, n_heads_tri)
        self.tri_att_end = TriangleAttentionEndingNode(c_t, c_hidden_tri_att, n_heads_tri)
        self.tri_mul_out = TriangleMultiplicationOutgoing(c_t, c_hidden_tri_mul)
        self.tri_mul_in = TriangleMultiplicationIncoming(c_t, c_hidden_tri_mul)
        self.pair_transition = PairTransition(c_t, transition_n)

    def forward(self, t: torch.Tensor, pair_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``t [*, N_templ, N_res, N_res, c_t]`` -> updated ``t``."""
        pair_mask = _template_pair_mask(t, pair_mask)
        t = t + dropout_rowwise(self.tri_att_start(t, pair_mask, chunk_size), self.dropout, self.training)
        t = t + dropout_columnwise(self.tri_att_end(t, pair_mask, chunk_size), self.dropout, self.training)
        t = t + dropout_rowwise(self.tri_mul_out(t, pair_mask), self.dropout, self.training)
        t = t + dropout_rowwise(self.tri_mul_in(t, pair_mask), self.dropout, self.training)
        t = t + self.pair_transition(t, chunk_size)
        return t


class TemplatePairStack(nn.Module):
    """The template pair stack (Alg. 16): ``n_blocks`` template pair blocks and a final
    LayerNorm. ``checkpoint=True`` checkpoints each block during training."""

    def __init__(self, n_blocks: int = 2, c_t: int = 64, c_hidden_tri_att: int = 16, n_heads_tri: int = 4,
                 c_hidden_tri_mul: int = 64, transition_n: int = 2, dropout: float = 0.25,
                 checkpoint: bool = False):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"TemplatePairStack needs n_blocks >= 1, got {n_blocks}")
        self.checkpoint = checkpoint
        self.blocks = nn.ModuleList(
            TemplatePairBlock(c_t, c_hidden_tri_att, n_heads_tri, c_hidden_tri_mul, transition_n, dropout)
            for _ in range(n_blocks)
        )
        self.layer_norm = LayerNorm(c_t)

    def forward(self, t: torch.Tensor, pair_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``t [*, N_templ, N_res, N_res, c_t]``, ``pair_mask [*, N_templ, N_res, N_res]`` -> ``t``."""
        pair_mask = _template_pair_mask(t, pair_mask)
        use_checkpoint = self.checkpoint and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                t = torch.utils.checkpoint.checkpoint(block, t, pair_mask, chunk_size, use_reentrant=False)
            else:
                t = block(t, pair_mask, chunk_size)
        return self.layer_norm(t)


class TemplatePointwiseAttention(nn.Module):
    """Template point-wise attention (Alg. 17): each pair ``z_ij`` attends over the
    templates' ``t_ij``; returns the update for ``z`` ``[*, N_res, N_res, c_z]``.

    As AF2's code: ``n_heads`` x ``c_hidden`` (4 x 16), queries from ``z`` (c_z),
    keys and values from ``t`` (c_t), no gating, output Linear back to c_z.
    Mask: ``template_mask [*, N_templ]`` is the key mask; where every template is
    masked the update is zero (AF2 multiplies it by ``sum(template_mask) > 0``).
    ``chunk_size`` chunks over the rows i.
    """

    def __init__(self, c_t: int = 64, c_z: int = 128, c_hidden: int = 16, n_heads: int = 4):
        super().__init__()
        self.mha = Attention(c_z, c_t, c_hidden, n_heads, gating=False)

    def forward(self, t: torch.Tensor, z: torch.Tensor, template_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``t [*, N_templ, N_res, N_res, c_t]``, ``z [*, N_res, N_res, c_z]``, ``template_mask [*, N_templ]``."""
        if template_mask is None:
            template_mask = t.new_ones(t.shape[:-3])
        if template_mask.shape != t.shape[:-3]:
            raise ValueError(f"template_mask must have shape {tuple(t.shape[:-3])} ([*, N_templ]) for t of "
                             f"shape {tuple(t.shape)}; got {tuple(template_mask.shape)}")
        template_mask = template_mask.to(dtype=t.dtype)  # bool or float in, t's dtype out
        q_x = z.unsqueeze(-2)  # [*, N_res, N_res, 1, c_z]
        kv_x = t.movedim(-4, -2)  # [*, N_res, N_res, N_templ, c_t]
        # [*, 1, 1, 1, 1, N_templ]: broadcast over i, j, heads and the single query
        key_bias = mask_bias(template_mask)[..., None, None, None, None, :]

        def attend(q_rows, kv_rows, bias):
            return self.mha(q_rows, kv_rows, (bias,))

        out = chunk_rows(attend, [(q_x, -4), (kv_x, -4)], [key_bias], chunk_size, out_dim=-4).squeeze(-2)
        any_template = (template_mask.sum(dim=-1) > 0).to(out.dtype)[..., None, None, None]
        return out * any_template
