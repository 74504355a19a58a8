"""The Evoformer stack (AlphaFold 2 supplement, Alg. 6).

Dropout as in the paper (suppl. 1.11.6), training only: 0.15 on the MSA row
attention (mask shared row-wise, i.e. by every sequence), 0.25 on both triangle
multiplications and the triangle attention around the starting node (shared
row-wise) and around the ending node (shared column-wise); none elsewhere.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from foldcompile.models.alphafold2.attention import (
    MSAColumnAttention,
    MSAColumnGlobalAttention,
    MSARowAttentionWithPairBias,
    TriangleAttentionEndingNode,
    TriangleAttentionStartingNode,
)
from foldcompile.models.alphafold2.outer_product_mean import OuterProductMean
from foldcompile.models.alphafold2.primitives import Linear, cast_mask, dropout_columnwise, dropout_rowwise
from foldcompile.models.alphafold2.transitions import MSATransition, PairTransition
from foldcompile.models.alphafold2.triangle import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing


class EvoformerBlock(nn.Module):
    """One Evoformer block (Alg. 6, lines 2-11), AF2's ``EvoformerIteration``.

    MSA track: row attention with pair bias (Alg. 7), column attention (Alg. 8)
    -- or, with ``is_extra_msa=True``, column-wise global attention (Alg. 19) as
    the extra MSA stack uses -- and the MSA transition (Alg. 9). Communication:
    outer product mean (Alg. 10). Pair track: triangle multiplications outgoing
    and incoming (Alg. 11, 12), triangle attention around the starting and the
    ending node (Alg. 13, 14), pair transition (Alg. 15). Every update is added
    residually.

    Masks (as AF2's code): ``msa_mask [*, N_seq, N_res]`` is a key mask in the row
    and column attentions and masks the outer product mean (projections and the
    normalisation); ``pair_mask [*, N_res, N_res]`` masks the triangle
    multiplications' projections and is the key mask of both triangle attentions.
    Transitions are unmasked. Missing masks mean "all ones"; masks may be bool or
    float and are cast to the activations' dtype.
    """

    def __init__(self, c_m: int = 256, c_z: int = 128, c_hidden_msa_att: int = 32, n_heads_msa: int = 8,
                 c_hidden_opm: int = 32, c_hidden_mul: int = 128, c_hidden_pair_att: int = 32,
                 n_heads_pair: int = 4, transition_n: int = 4, msa_dropout: float = 0.15,
                 pair_dropout: float = 0.25, *, is_extra_msa: bool = False):
        super().__init__()
        self.msa_dropout = msa_dropout
        self.pair_dropout = pair_dropout
        self.msa_att_row = MSARowAttentionWithPairBias(c_m, c_z, c_hidden_msa_att, n_heads_msa)
        if is_extra_msa:
            self.msa_att_col = MSAColumnGlobalAttention(c_m, c_hidden_msa_att, n_heads_msa)
        else:
            self.msa_att_col = MSAColumnAttention(c_m, c_hidden_msa_att, n_heads_msa)
        self.msa_transition = MSATransition(c_m, transition_n)
        self.outer_product_mean = OuterProductMean(c_m, c_z, c_hidden_opm)
        self.tri_mul_out = TriangleMultiplicationOutgoing(c_z, c_hidden_mul)
        self.tri_mul_in = TriangleMultiplicationIncoming(c_z, c_hidden_mul)
        self.tri_att_start = TriangleAttentionStartingNode(c_z, c_hidden_pair_att, n_heads_pair)
        self.tri_att_end = TriangleAttentionEndingNode(c_z, c_hidden_pair_att, n_heads_pair)
        self.pair_transition = PairTransition(c_z, transition_n)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: torch.Tensor | None = None,
                pair_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``m [*, N_seq, N_res, c_m]``, ``z [*, N_res, N_res, c_z]`` -> updated ``(m, z)``."""
        msa_mask = cast_mask(msa_mask, m)
        pair_mask = cast_mask(pair_mask, z)
        m = m + dropout_rowwise(self.msa_att_row(m, z, msa_mask, chunk_size), self.msa_dropout, self.training)
        m = m + self.msa_att_col(m, msa_mask, chunk_size)
        m = m + self.msa_transition(m, chunk_size)

        z = z + self.outer_product_mean(m, msa_mask, chunk_size)
        z = z + dropout_rowwise(self.tri_mul_out(z, pair_mask), self.pair_dropout, self.training)
        z = z + dropout_rowwise(self.tri_mul_in(z, pair_mask), self.pair_dropout, self.training)
        z = z + dropout_rowwise(self.tri_att_start(z, pair_mask, chunk_size), self.pair_dropout, self.training)
        z = z + dropout_columnwise(self.tri_att_end(z, pair_mask, chunk_size), self.pair_dropout, self.training)
        z = z + self.pair_transition(z, chunk_size)
        return m, z


def run_blocks(blocks: nn.ModuleList, m: torch.Tensor, z: torch.Tensor, msa_mask: torch.Tensor | None,
               pair_mask: torch.Tensor | None, chunk_size: int | None,
               checkpoint: bool, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply MSA/pair blocks in order, each under activation checkpointing when asked.

    Checkpointing only applies while training with gradients on: it trades a
    second forward pass for not storing each block's activations.
    Non-reentrant checkpointing restores the RNG state, so the recomputed dropout
    masks are the ones of the first pass.
    """
    use_checkpoint = checkpoint and training and torch.is_grad_enabled()
    for block in blocks:
        if use_checkpoint:
            m, z = torch.utils.checkpoint.checkpoint(block, m, z, msa_mask, pair_mask, chunk_size,
                                                     use_reentrant=False)
        else:
            m, z = block(m, z, msa_mask, pair_mask, chunk_size)
    return m, z


class EvoformerStack(nn.Module):
    """The Evoformer stack (Alg. 6): ``n_blocks`` Evoformer blocks, then the single
    representation ``s = Linear(m_1)`` from the first MSA row (c_s = 384 in AF2).

    ``checkpoint=True`` wraps each block in ``torch.utils.checkpoint.checkpoint``
    (non-reentrant) during training.
    """

    def __init__(self, n_blocks: int, c_m: int = 256, c_z: int = 128, c_s: int = 384,
                 c_hidden_msa_att: int = 32, n_heads_msa: int = 8, c_hidden_opm: int = 32,
                 c_hidden_mul: int = 128, c_hidden_pair_att: int = 32, n_heads_pair: int = 4,
                 transition_n: int = 4, msa_dropout: float = 0.15, pair_dropout: float = 0.25,
                 checkpoint: bool = False):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"EvoformerStack needs n_blocks >= 1, got {n_blocks}")
        self.checkpoint = checkpoint
        self.blocks = nn.ModuleList(
            EvoformerBlock(c_m, c_z, c_hidden_msa_att, n_heads_msa, c_hidden_opm, c_hidden_mul,
                           c_hidden_pair_att, n_heads_pair, transition_n, msa_dropout, pair_dropout)
            for _ in range(n_blocks)
        )
        self.linear_s = Linear(c_m, c_s)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: torch.Tensor | None = None,
                pair_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``m [*, N_seq, N_res, c_m]``, ``z [*, N_res, N_res, c_z]`` -> ``(m, z, s [*, N_res, c_s])``."""
        m, z = run_blocks(self.blocks, m, z, msa_mask, pair_mask, chunk_size, self.checkpoint, self.training)
        s = self.linear_s(m[..., 0, :, :])
        return m, z, s
