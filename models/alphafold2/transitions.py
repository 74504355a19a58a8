"""MSA and pair transitions (AlphaFold 2 supplement, Alg. 9 and 15)."""
from __future__ import annotations

import torch
from torch import nn

from foldcompile.models.alphafold2.attention import chunk_rows
from foldcompile.models.alphafold2.primitives import LayerNorm, Linear


class Transition(nn.Module):
    """Two-layer position-wise MLP: ``Linear(relu(Linear(LayerNorm(x))))``, hidden ``n * c``.

    Unmasked: AF2's released code takes the mask but never applies it (a
    position-wise update cannot leak information between positions anyway).
    ``chunk_size`` chunks over dim -3 (sequences, resp. the first residue index).
    Returns the update for ``x``.
    """

    def __init__(self, c: int, n: int):
        super().__init__()
        self.layer_norm = LayerNorm(c)
        self.linear_1 = Linear(c, n * c, init="relu")
        self.linear_2 = Linear(n * c, c, init="final")

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(torch.relu(self.linear_1(x)))

    def forward(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """``x [*, N, N_res, c]``; returns ``[*, N, N_res, c]``."""
        x = self.layer_norm(x)
        return chunk_rows(self._mlp, [(x, -3)], [], chunk_size, out_dim=-3)


class MSATransition(Transition):
    """MSA transition (Alg. 9) on ``m [*, N_seq, N_res, c_m]``."""


class PairTransition(Transition):
    """Pair transition (Alg. 15) on ``z [*, N_res, N_res, c_z]``."""
