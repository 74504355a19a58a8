"""The extra MSA stack (AlphaFold 2 supplement, Alg. 18)."""
from __future__ import annotations

import torch
from torch import nn

from foldcompile.models.alphafold2.evoformer import EvoformerBlock, run_blocks


class ExtraMSABlock(EvoformerBlock):
    """One extra MSA block (Alg. 18, lines 2-11): an Evoformer block on the extra MSA
    ``e [*, N_extra, N_res, c_e]`` whose column attention is the global one (Alg. 19).

    AF2 dims: c_e = 64, row attention and global column attention 8 heads x 8,
    outer product mean hidden 32, the pair track as in the Evoformer.
    Masks as in :class:`EvoformerBlock`.
    """

    def __init__(self, c_e: int = 64, c_z: int = 128, c_hidden_msa_att: int = 8, n_heads_msa: int = 8,
                 c_hidden_opm: int = 32, c_hidden_mul: int = 128, c_hidden_pair_att: int = 32,
                 n_heads_pair: int = 4, transition_n: int = 4, msa_dropout: float = 0.15,
                 pair_dropout: float = 0.25):
        super().__init__(c_e, c_z, c_hidden_msa_att, n_heads_msa, c_hidden_opm, c_hidden_mul,
                         c_hidden_pair_att, n_heads_pair, transition_n, msa_dropout, pair_dropout,
                         is_extra_msa=True)


class ExtraMSAStack(nn.Module):
    """The extra MSA stack (Alg. 18): ``n_blocks`` extra MSA blocks (4 in AF2); only
    the pair representation leaves it.

    ``checkpoint=True`` wraps each block in ``torch.utils.checkpoint.checkpoint``
    (non-reentrant) during training.
    """

    def __init__(self, n_blocks: int, c_e: int = 64, c_z: int = 128, c_hidden_msa_att: int = 8,
                 n_heads_msa: int = 8, c_hidden_opm: int = 32, c_hidden_mul: int = 128,
                 c_hidden_pair_att: int = 32, n_heads_pair: int = 4, transition_n: int = 4,
                 msa_dropout: float = 0.15, pair_dropout: float = 0.25, checkpoint: bool = False):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"ExtraMSAStack needs n_blocks >= 1, got {n_blocks}")
        self.checkpoint = checkpoint
        self.blocks = nn.ModuleList(
            ExtraMSABlock(c_e, c_z, c_hidden_msa_att, n_heads_msa, c_hidden_opm, c_hidden_mul,
                          c_hidden_pair_att, n_heads_pair, transition_n, msa_dropout, pair_dropout)
            for _ in range(n_blocks)
        )

    def forward(self, e: torch.Tensor, z: torch.Tensor, msa_mask: torch.Tensor | None = None,
                pair_mask: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
        """``e [*, N_extra, N_res, c_e]``, ``z [*, N_res, N_res, c_z]`` -> updated ``z``."""
        _, z = run_blocks(self.blocks, e, z, msa_mask, pair_mask, chunk_size, self.checkpoint, self.training)
        return z
