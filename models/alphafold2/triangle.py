"""Triangular multiplicative updates (AlphaFold 2 supplement, Alg. 11 and 12)."""
from __future__ import annotations

import torch
from torch import nn

from foldcompile.models.alphafold2.primitives import LayerNorm, Linear, cast_mask


class TriangleMultiplicativeUpdate(nn.Module):
    """Triangular multiplicative update using "outgoing" (Alg. 11) or "incoming" (Alg. 12) edges.

    ``z <- LayerNorm(z)``; ``a = mask * sigmoid(Linear(z)) * Linear(z)``, ``b`` alike;
    ``g = sigmoid(Linear(z))``; the update is ``g * Linear(LayerNorm(x))`` with

      outgoing: ``x_ij = sum_k a_ik * b_jk``   (AF2 code: ``'ikc,jkc->ijc'``)
      incoming: ``x_ij = sum_k a_kj * b_ki``   (AF2 code: ``'kjc,kic->ijc'``)

    The incoming form follows AF2's released code, whose first (``a``) operand sits
    at ``kj`` (the supplement writes ``a_ki * b_kj``, the same function with the
    roles of the two projections swapped). With this convention "incoming" on ``z``
    is exactly "outgoing" on ``z`` with its residue axes swapped, transposed back.

    Mask: ``pair_mask [*, N_res, N_res]`` multiplies both projections ``a`` and
    ``b`` (so masked pairs never enter the sum over k), as AF2's code does; the
    gate and the output are not masked. The mask may be bool or float; it is cast to
    ``z``'s dtype. Returns the update for ``z``.
    """

    def __init__(self, c_z: int, c_hidden: int, outgoing: bool = True):
        super().__init__()
        self.outgoing = outgoing
        self.layer_norm_in = LayerNorm(c_z)
        self.linear_a_p = Linear(c_z, c_hidden)
        self.linear_a_g = Linear(c_z, c_hidden, init="gating")
        self.linear_b_p = Linear(c_z, c_hidden)
        self.linear_b_g = Linear(c_z, c_hidden, init="gating")
        self.linear_g = Linear(c_z, c_z, init="gating")
        self.layer_norm_out = LayerNorm(c_hidden)
        self.linear_z = Linear(c_hidden, c_z, init="final")

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``z [*, N_res, N_res, c_z]``, ``pair_mask [*, N_res, N_res]``; returns ``[*, N_res, N_res, c_z]``."""
        mask = cast_mask(pair_mask, z).unsqueeze(-1)
        z = self.layer_norm_in(z)
        a = mask * torch.sigmoid(self.linear_a_g(z)) * self.linear_a_p(z)
        b = mask * torch.sigmoid(self.linear_b_g(z)) * self.linear_b_p(z)
        if self.outgoing:
            x = torch.einsum("...ikc,...jkc->...ijc", a, b)
        else:
            x = torch.einsum("...kjc,...kic->...ijc", a, b)
        return torch.sigmoid(self.linear_g(z)) * self.linear_z(self.layer_norm_out(x))


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """Triangular multiplicative update using "outgoing" edges (Alg. 11)."""

    def __init__(self, c_z: int, c_hidden: int):
        super().__init__(c_z, c_hidden, outgoing=True)


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """Triangular multiplicative update using "incoming" edges (Alg. 12)."""

    def __init__(self, c_z: int, c_hidden: int):
        super().__init__(c_z, c_hidden, outgoing=False)
