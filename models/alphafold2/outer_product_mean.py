"""Outer product mean (AlphaFold 2 supplement, Alg. 10)."""
from __future__ import annotations

import torch
from torch import nn

from foldcompile.models.alphafold2.attention import chunk_rows
from foldcompile.models.alphafold2.primitives import LayerNorm, Linear, cast_mask

# AF2's code adds this to the count of unmasked sequence pairs before dividing.
OPM_EPS = 1e-3


class OuterProductMean(nn.Module):
    """Outer product mean (Alg. 10): the MSA's update to the pair representation.

    ``m <- LayerNorm(m)``; ``a = mask * Linear(m)``, ``b = mask * Linear(m)``
    (``c_hidden`` channels each);
    ``z_ij = Linear(flatten(sum_s a_si (x) b_sj)) / (eps + sum_s mask_si mask_sj)``
    with ``eps = 1e-3``.

    Mask, as AF2's code applies it: ``msa_mask [*, N_seq, N_res]`` zeroes ``a`` and
    ``b`` at masked positions, and the sum over sequences is divided by the number
    of sequences where both residues are unmasked (plus eps) instead of ``N_seq``.
    As in that code the division comes after the output Linear, so it scales the
    Linear's bias too. ``chunk_size`` chunks over the first residue index i.
    Returns the update for ``z`` ``[*, N_res, N_res, c_z]``.
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int):
        super().__init__()
        self.c_hidden = c_hidden
        self.layer_norm = LayerNorm(c_m)
        self.linear_a = Linear(c_m, c_hidden)
        self.linear_b = Linear(c_m, c_hidden)
        self.linear_out = Linear(c_hidden * c_hidden, c_z, init="final")

    def _outer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a [*, S, I, c], b [*, S, J, e] -> [*, I, J, c*e] summed over sequences s
        outer = torch.einsum("...sic,...sje->...ijce", a, b)
        return self.linear_out(outer.reshape(*outer.shape[:-2], self.c_hidden * self.c_hidden))

    def forward(self, m: torch.Tensor, msa_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """``m [*, N_seq, N_res, c_m]``, ``msa_mask [*, N_seq, N_res]`` (bool or float)."""
        msa_mask = cast_mask(msa_mask, m)
        mask = msa_mask.unsqueeze(-1)
        m = self.layer_norm(m)
        a = mask * self.linear_a(m)
        b = mask * self.linear_b(m)
        out = chunk_rows(self._outer, [(a, -2)], [b], chunk_size, out_dim=-3)
        norm = torch.einsum("...si,...sj->...ij", msa_mask, msa_mask).unsqueeze(-1)
        return out / (OPM_EPS + norm)
