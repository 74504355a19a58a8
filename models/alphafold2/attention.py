"""AlphaFold 2 attention modules (supplementary information, sections 1.6.1-1.6.6).

Every attention here is AlphaFold 2's gated multi-head attention: queries, keys and
values are projected without bias, the per-head result is multiplied by a sigmoid
gate computed from the query input (gating Linear with bias, "gating" init), and an
output Linear with bias ("final" init) maps the heads back.

Masks are applied as AlphaFold 2's released code applies them (the supplement's
pseudo-code leaves them out): a mask of 0/1 floats over the *keys* becomes an
additive logit bias ``1e9 * (mask - 1)``, so masked keys get a weight of exactly
zero wherever at least one key is unmasked. In float16, which cannot hold 1e9,
the factor is 3e4 (``primitives.mask_inf``), so a row whose keys are all masked
(a padded query) stays finite instead of turning into NaN. Queries are not
masked; masked query positions produce outputs that no unmasked position ever
reads. Masks may be bool or any float dtype: each module casts them to its
activations' dtype on entry.

Shapes use ``*`` for optional leading batch dims.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from foldcompile.models.alphafold2.primitives import LayerNorm, Linear, cast_mask, mask_inf


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """Additive attention bias from a float 0/1 key mask: ``1e9 * (mask - 1)`` (AF2 code),
    3e4 instead of 1e9 for a float16 mask (see ``primitives.mask_inf``)."""
    return mask_inf(mask.dtype) * (mask - 1.0)


def chunk_rows(fn: Callable[..., torch.Tensor], sliced: Sequence[tuple[torch.Tensor, int]],
               whole: Sequence[torch.Tensor], chunk_size: int | None, out_dim: int) -> torch.Tensor:
    """Run ``fn(*sliced_pieces, *whole)`` over chunks of one batch-like dimension.

    ``sliced`` lists ``(tensor, dim)`` pairs that are cut into pieces of
    ``chunk_size`` along ``dim`` (every such dim has the same length); ``whole``
    tensors (shared biases) are passed unchanged. The pieces of the result are
    concatenated along ``out_dim``. ``chunk_size=None`` runs in one piece, so both
    paths compute the same function: this only bounds the size of intermediates
    (the attention logits) at inference time.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    lengths = {t.shape[d] for t, d in sliced}
    if len(lengths) != 1:
        raise ValueError(f"chunked tensors disagree on the chunked dim length: {sorted(lengths)}")
    length = lengths.pop()
    if chunk_size is None or chunk_size >= length:
        return fn(*(t for t, _ in sliced), *whole)
    pieces = []
    for start in range(0, length, chunk_size):
        size = min(chunk_size, length - start)
        pieces.append(fn(*(t.narrow(d, start, size) for t, d in sliced), *whole))
    return torch.cat(pieces, dim=out_dim)


class Attention(nn.Module):
    """Gated multi-head attention, as AlphaFold 2's ``Attention`` module.

    ``q = Linear(q_x)`` (no bias), ``k, v = Linear(kv_x)`` (no bias),
    ``o = softmax(q k^T / sqrt(c_hidden) + sum(biases)) v``, then (with gating)
    ``o = sigmoid(Linear(q_x)) * o`` and ``Linear(o)`` back to ``c_q`` channels.
    """

    def __init__(self, c_q: int, c_kv: int, c_hidden: int, n_heads: int, gating: bool = True):
        super().__init__()
        self.c_hidden = c_hidden
        self.n_heads = n_heads
        self.gating = gating
        self.linear_q = Linear(c_q, c_hidden * n_heads, bias=False, init="glorot")
        self.linear_k = Linear(c_kv, c_hidden * n_heads, bias=False, init="glorot")
        self.linear_v = Linear(c_kv, c_hidden * n_heads, bias=False, init="glorot")
        self.linear_g = Linear(c_q, c_hidden * n_heads, init="gating") if gating else None
        self.linear_o = Linear(c_hidden * n_heads, c_q, init="final")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [..., L, H*c] -> [..., H, L, c]
        return x.view(*x.shape[:-1], self.n_heads, self.c_hidden).transpose(-2, -3)

    def forward(self, q_x: torch.Tensor, kv_x: torch.Tensor,
                biases: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``q_x [..., Q, c_q]``, ``kv_x [..., K, c_kv]``, each bias broadcastable to
        ``[..., H, Q, K]``; returns ``[..., Q, c_q]``."""
        q = self._heads(self.linear_q(q_x)) * (self.c_hidden ** -0.5)
        k = self._heads(self.linear_k(kv_x))
        v = self._heads(self.linear_v(kv_x))
        logits = torch.matmul(q, k.transpose(-1, -2))
        for bias in biases:
            logits = logits + bias
        weights = torch.softmax(logits, dim=-1)
        o = torch.matmul(weights, v).transpose(-2, -3)  # [..., Q, H, c]
        o = o.reshape(*o.shape[:-2], self.n_heads * self.c_hidden)
        if self.linear_g is not None:
            o = torch.sigmoid(self.linear_g(q_x)) * o
        return self.linear_o(o)


class GlobalAttention(nn.Module):
    """Global gated attention of the extra MSA stack (Alg. 19, lines 2-8).

    One query per column, the masked mean of the column's rows
    (``sum(mask * x) / (sum(mask) + 1e-10)``, AF2's ``mask_mean``, computed in at
    least float32: in float16 the 1e-10 would round to 0 and a fully masked
    column would give 0/0), with
    ``n_heads`` heads; keys and values are single-headed (``c_hidden`` channels,
    shared by the heads). Every row gets its own sigmoid gate.
    Mask: key mask bias ``1e9 * (mask - 1)`` and the masked mean of the query.
    """

    def __init__(self, c_in: int, c_hidden: int, n_heads: int):
        super().__init__()
        self.c_hidden = c_hidden
        self.n_heads = n_heads
        self.linear_q = Linear(c_in, c_hidden * n_heads, bias=False, init="glorot")
        self.linear_k = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.linear_v = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.linear_g = Linear(c_in, c_hidden * n_heads, init="gating")
        self.linear_o = Linear(c_hidden * n_heads, c_in, init="final")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [..., K, c_in]`` attended along ``K``; ``mask [..., K]`` (bool or float); returns ``[..., K, c_in]``."""
        mask = cast_mask(mask, x)
        mean_dtype = torch.promote_types(x.dtype, torch.float32)
        mask_wide = mask.to(mean_dtype)
        q_avg = (mask_wide.unsqueeze(-1) * x.to(mean_dtype)).sum(dim=-2) / (mask_wide.sum(dim=-1, keepdim=True) + 1e-10)
        q_avg = q_avg.to(x.dtype)
        q = self.linear_q(q_avg) * (self.c_hidden ** -0.5)
        q = q.view(*q.shape[:-1], self.n_heads, self.c_hidden)  # [..., H, c]
        k = self.linear_k(x)  # [..., K, c]
        v = self.linear_v(x)
        logits = torch.matmul(q, k.transpose(-1, -2)) + mask_bias(mask).unsqueeze(-2)  # [..., H, K]
        weights = torch.softmax(logits, dim=-1)
        o = torch.matmul(weights, v)  # [..., H, c]
        g = torch.sigmoid(self.linear_g(x)).view(*x.shape[:-1], self.n_heads, self.c_hidden)
        o = g * o.unsqueeze(-3)  # [..., K, H, c]
        return self.linear_o(o.reshape(*o.shape[:-2], self.n_heads * self.c_hidden))


class MSARowAttentionWithPairBias(nn.Module):
    """MSA row-wise gated self-attention with pair bias (Alg. 7).

    ``m [*, N_seq, N_res, c_m]`` attends along residues within each sequence, with
    the bias ``b_ij = Linear(LayerNorm(z_ij))`` (one per head, no bias term).
    Mask: ``msa_mask [*, N_seq, N_res]`` as a key mask (``1e9 * (mask - 1)``).
    ``chunk_size`` chunks over the sequences. Returns the update for ``m``.
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int, n_heads: int):
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m)
        self.layer_norm_z = LayerNorm(c_z)
        self.linear_z = Linear(c_z, n_heads, bias=False)
        self.mha = Attention(c_m, c_m, c_hidden, n_heads)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        msa_mask = cast_mask(msa_mask, m)
        m = self.layer_norm_m(m)
        # [*, N_res, N_res, H] -> [*, 1, H, N_res, N_res]: shared by every sequence
        pair_bias = self.linear_z(self.layer_norm_z(z)).permute(*range(z.dim() - 3), -1, -3, -2).unsqueeze(-4)
        key_bias = mask_bias(msa_mask)[..., None, None, :]  # [*, N_seq, 1, 1, N_res]

        def attend(m_rows, key_rows, bias):
            return self.mha(m_rows, m_rows, (key_rows, bias))

        return chunk_rows(attend, [(m, -3), (key_bias, -4)], [pair_bias], chunk_size, out_dim=-3)


class MSAColumnAttention(nn.Module):
    """MSA column-wise gated self-attention (Alg. 8).

    Each residue column of ``m [*, N_seq, N_res, c_m]`` attends along sequences.
    Mask: ``msa_mask [*, N_seq, N_res]`` as a key mask over sequences.
    ``chunk_size`` chunks over the residue columns. Returns the update for ``m``.
    """

    def __init__(self, c_m: int, c_hidden: int, n_heads: int):
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m)
        self.mha = Attention(c_m, c_m, c_hidden, n_heads)

    def forward(self, m: torch.Tensor, msa_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        msa_mask = cast_mask(msa_mask, m)
        # As AF2's code: swap the axes and run row attention over the columns.
        m = self.layer_norm_m(m.transpose(-2, -3))  # [*, N_res, N_seq, c_m]
        key_bias = mask_bias(msa_mask.transpose(-1, -2))[..., None, None, :]  # [*, N_res, 1, 1, N_seq]

        def attend(m_cols, key_cols):
            return self.mha(m_cols, m_cols, (key_cols,))

        out = chunk_rows(attend, [(m, -3), (key_bias, -4)], [], chunk_size, out_dim=-3)
        return out.transpose(-2, -3)


class MSAColumnGlobalAttention(nn.Module):
    """MSA column-wise global attention of the extra MSA stack (Alg. 19).

    Mask: ``msa_mask [*, N_seq, N_res]`` as key mask over sequences and in the masked
    mean that forms each column's query. ``chunk_size`` chunks over the residue
    columns. Returns the update for ``m``.
    """

    def __init__(self, c_in: int, c_hidden: int, n_heads: int):
        super().__init__()
        self.layer_norm_m = LayerNorm(c_in)
        self.global_attention = GlobalAttention(c_in, c_hidden, n_heads)

    def forward(self, m: torch.Tensor, msa_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        msa_mask = cast_mask(msa_mask, m)
        m = self.layer_norm_m(m.transpose(-2, -3))  # [*, N_res, N_seq, c]
        mask = msa_mask.transpose(-1, -2)  # [*, N_res, N_seq]
        out = chunk_rows(self.global_attention, [(m, -3), (mask, -2)], [], chunk_size, out_dim=-3)
        return out.transpose(-2, -3)


class TriangleAttention(nn.Module):
    """Triangular gated self-attention around the starting (Alg. 13) or ending (Alg. 14) node.

    Starting node: ``z_ij`` attends to ``z_ik`` (over k) with the bias
    ``b_jk = Linear(LayerNorm(z_jk))``, one per head. Ending node: ``z_ij`` attends
    to ``z_kj`` with the bias ``b_ki``; as in AF2's code it is the starting-node
    computation on ``z`` with its two residue axes swapped, swapped back after.
    Mask: ``pair_mask [*, N_res, N_res]`` as a key mask (``mask_ik``, resp. ``mask_kj``).
    ``chunk_size`` chunks over the rows i (resp. columns j). Returns the update for ``z``.
    """

    def __init__(self, c_z: int, c_hidden: int, n_heads: int, starting: bool = True):
        super().__init__()
        self.starting = starting
        self.layer_norm = LayerNorm(c_z)
        self.linear_bias = Linear(c_z, n_heads, bias=False)
        self.mha = Attention(c_z, c_z, c_hidden, n_heads)

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        pair_mask = cast_mask(pair_mask, z)
        if not self.starting:
            z = z.transpose(-2, -3)
            pair_mask = pair_mask.transpose(-1, -2)
        z = self.layer_norm(z)
        # [*, I, J, H] -> [*, 1, H, J, K]: the bias b_jk shared by every row i
        tri_bias = self.linear_bias(z).permute(*range(z.dim() - 3), -1, -3, -2).unsqueeze(-4)
        key_bias = mask_bias(pair_mask)[..., None, None, :]  # [*, I, 1, 1, K]

        def attend(z_rows, key_rows, bias):
            return self.mha(z_rows, z_rows, (key_rows, bias))

        out = chunk_rows(attend, [(z, -3), (key_bias, -4)], [tri_bias], chunk_size, out_dim=-3)
        if not self.starting:
            out = out.transpose(-2, -3)
        return out


class TriangleAttentionStartingNode(TriangleAttention):
    """Triangular gated self-attention around the starting node (Alg. 13)."""

    def __init__(self, c_z: int, c_hidden: int, n_heads: int):
        super().__init__(c_z, c_hidden, n_heads, starting=True)


class TriangleAttentionEndingNode(TriangleAttention):
    """Triangular gated self-attention around the ending node (Alg. 14)."""

    def __init__(self, c_z: int, c_hidden: int, n_heads: int):
        super().__init__(c_z, c_hidden, n_heads, starting=False)
