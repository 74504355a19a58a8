"""Evoformer modules written the way OpenFold (aqlaboratory/openfold) writes them.

Written for this corpus from reading OpenFold's public ``openfold/model`` and
``openfold/utils`` code: the same math and the same *spelling habits*, in our own
code and names. What is characteristic of that code base and kept here:

- one generic ``Attention`` with ``_prep_qkv`` (``view`` to heads, ``transpose(-2, -3)``,
  the scale applied to ``q`` IN PLACE: ``q /= math.sqrt(c)``) and ``_wrap_up`` (gate
  ``sigmoid(linear_g(q_x))`` viewed to heads, ``flatten_final_dims``, output linear);
  biases passed as a Python list and added IN PLACE (``a += b``);
- masks turned into additive biases ``self.inf * (mask - 1)`` with ``inf = 1e9``,
  indexed ``[..., :, None, None, :]``;
- ``permute_final_dims`` / ``flatten_final_dims`` helpers that read ``len(t.shape)``;
- a ``LayerNorm`` module of its own that calls ``F.layer_norm`` on its parameters, with a
  bfloat16 branch under ``autocast(enabled=False)``;
- chunking in inference: a query-chunked attention loop that slices every bias whose
  chunked dim is not 1 (``_attention_chunked_trainable``-like), and a generic
  ``chunk_layer``-like helper that flattens the batch dims, preallocates the output with
  ``new_zeros`` and writes each chunk into it by slice assignment;
- ``TriangleAttention`` with ``starting`` (the ending node transposes the pair and mask
  first and back after), ``TriangleMultiplicativeUpdate`` with ``permute_final_dims`` +
  ``matmul`` instead of ``einsum``, ``OuterProductMean`` with its ``einsum``, a ReLU
  ``PairTransition``, and dropout that drops a ``new_ones`` mask shared along a dim.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OFLayerNorm", "OFAttention", "OFAttentionEarly", "OFGlobalAttention", "OFMSARowAttentionWithPairBias",
    "OFMSAColumnAttention", "OFMSAColumnGlobalAttention", "OFTriangleAttention",
    "OFTriangleMultiplicativeUpdate", "OFOuterProductMean", "OFPairTransition", "OFPairCore",
]


# ----------------------------------------------------------------------------- helpers


def permute_final_dims(t: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Permute the last ``len(order)`` dims of ``t`` (leading dims kept, counted with ``len(t.shape)``)."""
    n = len(order)
    lead = list(range(len(t.shape) - n))
    return t.permute(lead + [len(lead) + i for i in order])


def flatten_final_dims(t: torch.Tensor, n: int) -> torch.Tensor:
    """Merge the last ``n`` dims of ``t`` into one."""
    return t.reshape(t.shape[:-n] + (-1,))


def softmax_keep_dtype(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax that does not let autocast move a bfloat16 input to float32."""
    if t.dtype is torch.bfloat16:
        with torch.autocast(device_type=t.device.type, enabled=False):
            return F.softmax(t, dim=dim)
    return F.softmax(t, dim=dim)


def chunked_apply(fn, inputs: dict, chunk_size: int, n_batch_dims: int) -> torch.Tensor:
    """Run ``fn(**inputs)`` on chunks of the flattened leading ``n_batch_dims`` dims.

    Every input is broadcast to the common batch shape and flattened to one batch dim;
    inputs with a batch size of 1 are passed whole. The output is preallocated with
    ``new_zeros`` on the first chunk and filled by slice assignment.
    """
    batch = [t.shape[:n_batch_dims] for t in inputs.values()]
    batch_shape = tuple(max(s) for s in zip(*batch))
    flat = {}
    for name, t in inputs.items():
        if sum(t.shape[:n_batch_dims]) != n_batch_dims:  # not all ones: expand to the whole batch
            t = t.expand(batch_shape + t.shape[n_batch_dims:])
        flat[name] = t.reshape(-1, *t.shape[n_batch_dims:])
    total = 1
    for d in batch_shape:
        total *= d
    out = None
    for start in range(0, total, chunk_size):
        piece = {k: (v[start:start + chunk_size] if v.shape[0] != 1 else v) for k, v in flat.items()}
        res = fn(**piece)
        if out is None:
            out = res.new_zeros((total,) + res.shape[1:])
        out[start:start + chunk_size] = res
    return out.view(batch_shape + out.shape[1:])


class OFLayerNorm(nn.Module):
    """Layer norm over the last dim with its own parameters, through ``F.layer_norm``."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        self.c = (c,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.bfloat16:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.layer_norm(x, self.c, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return F.layer_norm(x, self.c, self.weight, self.bias, self.eps)


class SharedDropout(nn.Module):
    """Dropout whose mask is shared along ``shared_dim``: ``nn.Dropout`` applied to a ``new_ones`` mask."""

    def __init__(self, p: float, shared_dim: int):
        super().__init__()
        self.shared_dim = shared_dim
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        shape[self.shared_dim] = 1
        keep = self.dropout(x.new_ones(shape))
        return x * keep


# ----------------------------------------------------------------------------- attention


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases: list) -> torch.Tensor:
    # q, k, v: [*, H, L, C]; every bias broadcasts to [*, H, Q, K]
    a = torch.matmul(q, permute_final_dims(k, (1, 0)))
    for b in biases:
        a += b
    a = softmax_keep_dtype(a, -1)
    return torch.matmul(a, v)


def _attend_query_chunks(q, k, v, biases: list, chunk_size: int, chunk_dim: int) -> torch.Tensor:
    """Attention over chunks of ``chunk_dim``; each bias is sliced unless it is 1 along it."""
    pieces = []
    n = q.shape[chunk_dim]
    for start in range(0, n, chunk_size):
        idx = [slice(None)] * len(q.shape)
        idx[chunk_dim] = slice(start, start + chunk_size)
        sel = tuple(idx)

        def cut(b):
            j = [slice(None)] * len(b.shape)
            j[chunk_dim] = slice(start, start + chunk_size) if b.shape[chunk_dim] != 1 else slice(None)
            return b[tuple(j)]

        pieces.append(_attend(q[sel], k[sel], v[sel], [cut(b) for b in biases]).transpose(-2, -3))
    return torch.cat(pieces, dim=chunk_dim)


class OFAttention(nn.Module):
    """Gated multi-head attention with a list of additive biases (OpenFold's ``Attention`` shape)."""

    def __init__(self, c_q: int, c_kv: int, c_hidden: int, n_heads: int, gating: bool = True):
        super().__init__()
        self.c_hidden = c_hidden
        self.n_heads = n_heads
        self.linear_q = nn.Linear(c_q, c_hidden * n_heads, bias=False)
        self.linear_k = nn.Linear(c_kv, c_hidden * n_heads, bias=False)
        self.linear_v = nn.Linear(c_kv, c_hidden * n_heads, bias=False)
        self.linear_o = nn.Linear(c_hidden * n_heads, c_q)
        self.linear_g = nn.Linear(c_q, c_hidden * n_heads) if gating else None
        self.sigmoid = nn.Sigmoid()

    def _prep_qkv(self, q_x, kv_x):
        q = self.linear_q(q_x)
        k = self.linear_k(kv_x)
        v = self.linear_v(kv_x)
        q = q.view(q.shape[:-1] + (self.n_heads, -1)).transpose(-2, -3)
        k = k.view(k.shape[:-1] + (self.n_heads, -1)).transpose(-2, -3)
        v = v.view(v.shape[:-1] + (self.n_heads, -1)).transpose(-2, -3)
        q /= math.sqrt(self.c_hidden)
        return q, k, v

    def _wrap_up(self, o, q_x):
        if self.linear_g is not None:
            g = self.sigmoid(self.linear_g(q_x))
            g = g.view(g.shape[:-1] + (self.n_heads, -1))
            o = o * g
        return self.linear_o(flatten_final_dims(o, 2))

    def forward(self, q_x: torch.Tensor, kv_x: torch.Tensor, biases: Optional[list] = None,
                chunk_size: Optional[int] = None, chunk_dim: int = -4) -> torch.Tensor:
        if biases is None:
            biases = []
        q, k, v = self._prep_qkv(q_x, kv_x)
        if chunk_size is not None:
            o = _attend_query_chunks(q, k, v, biases, chunk_size, chunk_dim)
        else:
            o = _attend(q, k, v, biases).transpose(-2, -3)
        return self._wrap_up(o, q_x)


class OFAttentionEarly(nn.Module):
    """The earlier OpenFold ``Attention.forward`` spelling (before ``_prep_qkv`` existed).

    Heads stay ``[*, L, H, C]`` after the ``view``; the logits are
    ``matmul(permute_final_dims(q, (0, 2, 1, 3)), permute_final_dims(k, (0, 2, 3, 1)))``; the
    scale is MULTIPLIED ON THE LOGITS (``a = a * (1 / sqrt(c))``, not in place); biases are
    added out of place; the softmax is an ``nn.Softmax(dim=-1)`` module.
    """

    def __init__(self, c_q: int, c_kv: int, c_hidden: int, n_heads: int):
        super().__init__()
        self.c_hidden = c_hidden
        self.n_heads = n_heads
        self.linear_q = nn.Linear(c_q, c_hidden * n_heads, bias=False)
        self.linear_k = nn.Linear(c_kv, c_hidden * n_heads, bias=False)
        self.linear_v = nn.Linear(c_kv, c_hidden * n_heads, bias=False)
        self.linear_o = nn.Linear(c_hidden * n_heads, c_q)
        self.linear_g = nn.Linear(c_q, c_hidden * n_heads)
        self.sigmoid = nn.Sigmoid()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q_x: torch.Tensor, kv_x: torch.Tensor, biases: Optional[list] = None) -> torch.Tensor:
        q = self.linear_q(q_x)
        k = self.linear_k(kv_x)
        v = self.linear_v(kv_x)
        q = q.view(q.shape[:-1] + (self.n_heads, -1))
        k = k.view(k.shape[:-1] + (self.n_heads, -1))
        v = v.view(v.shape[:-1] + (self.n_heads, -1))
        a = torch.matmul(permute_final_dims(q, (0, 2, 1, 3)), permute_final_dims(k, (0, 2, 3, 1)))
        norm = 1 / math.sqrt(self.c_hidden)
        a = a * norm
        if biases is not None:
            for b in biases:
                a = a + b
        a = self.softmax(a)
        o = torch.matmul(a, permute_final_dims(v, (0, 2, 1, 3)))
        o = o.transpose(-2, -3)
        g = self.sigmoid(self.linear_g(q_x))
        o = o * g.view(g.shape[:-1] + (self.n_heads, -1))
        return self.linear_o(flatten_final_dims(o, 2))


class OFGlobalAttention(nn.Module):
    """Global attention: one query per column (masked mean), single-headed K and V."""

    def __init__(self, c_in: int, c_hidden: int, n_heads: int, inf: float = 1e9, eps: float = 1e-10):
        super().__init__()
        self.c_hidden = c_hidden
        self.n_heads = n_heads
        self.inf = inf
        self.eps = eps
        self.linear_q = nn.Linear(c_in, c_hidden * n_heads, bias=False)
        self.linear_k = nn.Linear(c_in, c_hidden, bias=False)
        self.linear_v = nn.Linear(c_in, c_hidden, bias=False)
        self.linear_g = nn.Linear(c_in, c_hidden * n_heads)
        self.linear_o = nn.Linear(c_hidden * n_heads, c_in)
        self.sigmoid = nn.Sigmoid()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # m [*, N_res, N_seq, C], mask [*, N_res, N_seq]
        q = torch.sum(m * mask.unsqueeze(-1), dim=-2) / (torch.sum(mask, dim=-1)[..., None] + self.eps)
        q = self.linear_q(q) * (self.c_hidden ** (-0.5))
        q = q.view(q.shape[:-1] + (self.n_heads, -1))  # [*, N_res, H, C]
        k = self.linear_k(m)  # [*, N_res, N_seq, C]: no head dim
        v = self.linear_v(m)
        a = torch.matmul(q, k.transpose(-1, -2))  # [*, N_res, H, N_seq]
        a = a + (self.inf * (mask - 1))[..., :, None, :]
        a = self.softmax(a)
        o = torch.matmul(a, v)  # [*, N_res, H, C]
        g = self.sigmoid(self.linear_g(m))
        g = g.view(g.shape[:-1] + (self.n_heads, -1))  # [*, N_res, N_seq, H, C]
        o = o.unsqueeze(-3) * g
        return self.linear_o(o.reshape(o.shape[:-2] + (-1,)))


class OFMSARowAttentionWithPairBias(nn.Module):
    """OpenFold-style MSA row attention with pair bias.

    Style: OpenFold ``MSARowAttentionWithPairBias``. Spelling: ``OFLayerNorm`` (F.layer_norm)
    on m and z; pair bias ``permute_final_dims(linear_z(z), (2, 0, 1)).unsqueeze(-4)``; mask
    bias ``inf * (mask - 1)`` indexed ``[..., :, None, None, :]``; both passed in a ``biases``
    list and added in place; scale ``q /= sqrt(c)`` in place; gate ``sigmoid(linear_g)``. In eval
    with ``chunk_size`` the attention loops over chunks of MSA rows (dim -4 of q), slicing the
    mask bias and leaving the broadcast pair bias whole, and concatenates.
    """

    def __init__(self, c_m: int = 16, c_z: int = 16, c_hidden: int = 8, n_heads: int = 2, inf: float = 1e9,
                 chunk_size: Optional[int] = 2):
        super().__init__()
        self.inf = inf
        self.chunk_size = chunk_size
        self.layer_norm_m = OFLayerNorm(c_m)
        self.layer_norm_z = OFLayerNorm(c_z)
        self.linear_z = nn.Linear(c_z, n_heads, bias=False)
        self.mha = OFAttention(c_m, c_m, c_hidden, n_heads)

    def forward(self, m: torch.Tensor, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = m.new_ones(m.shape[:-1])
        mask_bias = (self.inf * (mask - 1))[..., :, None, None, :]
        m = self.layer_norm_m(m)
        z = self.layer_norm_z(z)
        z = permute_final_dims(self.linear_z(z), (2, 0, 1)).unsqueeze(-4)  # [*, 1, H, N_res, N_res]
        chunk = None if self.training else self.chunk_size
        return self.mha(m, m, biases=[mask_bias, z], chunk_size=chunk, chunk_dim=-4)


class OFMSAColumnAttention(nn.Module):
    """OpenFold-style MSA column attention.

    Style: OpenFold ``MSAColumnAttention``: transpose m and the mask, run the row attention
    (here without pair bias) and transpose back, with the attention spelled as OpenFold's
    earlier ``Attention`` (``OFAttentionEarly``). Spelling: ``m.transpose(-2, -3)``, mask bias
    ``inf * (mask - 1)``, one-element ``biases`` list; ``permute_final_dims`` inside the two
    ``matmul`` s, the scale multiplied on the logits, ``nn.Softmax(dim=-1)``.
    """

    def __init__(self, c_m: int = 16, c_hidden: int = 8, n_heads: int = 2, inf: float = 1e9):
        super().__init__()
        self.inf = inf
        self.layer_norm_m = OFLayerNorm(c_m)
        self.mha = OFAttentionEarly(c_m, c_m, c_hidden, n_heads)

    def forward(self, m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = m.transpose(-2, -3)
        mask = mask.transpose(-1, -2)
        mask_bias = (self.inf * (mask - 1))[..., :, None, None, :]
        m = self.layer_norm_m(m)
        m = self.mha(m, m, biases=[mask_bias])
        return m.transpose(-2, -3)


class OFMSAColumnGlobalAttention(nn.Module):
    """OpenFold-style extra-MSA column global attention.

    Style: OpenFold ``MSAColumnGlobalAttention`` / ``GlobalAttention``. Spelling: K and V have
    NO head dim (one key/value per row shared by the heads), the query is the masked mean
    ``sum(m * mask) / (sum(mask) + eps)``, ``q * c ** -0.5`` on the projected query,
    ``matmul(q, k.transpose(-1, -2))``, mask bias ``inf * (mask - 1)`` indexed
    ``[..., :, None, :]``, ``nn.Softmax(dim=-1)`` module, per-row gate broadcast with
    ``o.unsqueeze(-3) * g``.
    """

    def __init__(self, c_in: int = 16, c_hidden: int = 8, n_heads: int = 2):
        super().__init__()
        self.layer_norm_m = nn.LayerNorm(c_in)
        self.global_attention = OFGlobalAttention(c_in, c_hidden, n_heads)

    def forward(self, m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = m.transpose(-2, -3)
        mask = mask.transpose(-1, -2)
        m = self.layer_norm_m(m)
        m = self.global_attention(m, mask)
        return m.transpose(-2, -3)


class OFTriangleAttention(nn.Module):
    """OpenFold-style triangle attention around the starting or ending node.

    Style: OpenFold ``TriangleAttention(starting=...)``: the ending node transposes the pair
    and the mask, runs the starting-node math and transposes back. Spelling: mask bias
    ``inf * (mask - 1)`` as ``[..., :, None, None, :]``, triangle bias
    ``permute_final_dims(linear(x), (2, 0, 1)).unsqueeze(-4)``, ``biases=[mask_bias, tri_bias]``;
    in eval with ``chunk_size`` the generic chunking helper flattens the batch dims,
    preallocates the output (``new_zeros``) and slice-assigns each chunk.
    """

    def __init__(self, c_in: int = 16, c_hidden: int = 8, n_heads: int = 2, starting: bool = True,
                 inf: float = 1e9, chunk_size: Optional[int] = 4):
        super().__init__()
        self.starting = starting
        self.inf = inf
        self.chunk_size = chunk_size
        self.layer_norm = OFLayerNorm(c_in)
        self.linear = nn.Linear(c_in, n_heads, bias=False)
        self.mha = OFAttention(c_in, c_in, c_hidden, n_heads)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = x.new_ones(x.shape[:-1])
        if not self.starting:
            x = x.transpose(-2, -3)
            mask = mask.transpose(-1, -2)
        x = self.layer_norm(x)
        mask_bias = (self.inf * (mask - 1))[..., :, None, None, :]  # [*, I, 1, 1, J]
        tri_bias = permute_final_dims(self.linear(x), (2, 0, 1)).unsqueeze(-4)  # [*, 1, H, I, J]
        biases = [mask_bias, tri_bias]
        if self.chunk_size is not None and not self.training:
            x = chunked_apply(lambda q_x, kv_x, b0, b1: self.mha(q_x, kv_x, biases=[b0, b1]),
                              {"q_x": x, "kv_x": x, "b0": mask_bias, "b1": tri_bias},
                              self.chunk_size, n_batch_dims=len(x.shape[:-2]))
        else:
            x = self.mha(x, x, biases=biases)
        if not self.starting:
            x = x.transpose(-2, -3)
        return x


# ----------------------------------------------------------------------------- pair updates


class OFTriangleMultiplicativeUpdate(nn.Module):
    """OpenFold-style triangle multiplicative update, outgoing or incoming.

    Style: OpenFold ``TriangleMultiplicativeUpdate``. Spelling: ``a = mask; a = a *
    sigmoid(linear_a_g(z)); a = a * linear_a_p(z)`` (gating with an ``nn.Sigmoid`` module);
    the triangle product as ``permute_final_dims`` + ``torch.matmul`` (outgoing:
    ``a (2, 0, 1) @ b (2, 1, 0)``, incoming: the other pair), permuted back with
    ``(1, 2, 0)``; output ``g * linear_z(layer_norm_out(x))``.
    """

    def __init__(self, c_z: int = 16, c_hidden: int = 8, outgoing: bool = True):
        super().__init__()
        self.outgoing = outgoing
        self.linear_a_p = nn.Linear(c_z, c_hidden)
        self.linear_a_g = nn.Linear(c_z, c_hidden)
        self.linear_b_p = nn.Linear(c_z, c_hidden)
        self.linear_b_g = nn.Linear(c_z, c_hidden)
        self.linear_g = nn.Linear(c_z, c_z)
        self.linear_z = nn.Linear(c_hidden, c_z)
        self.layer_norm_in = OFLayerNorm(c_z)
        self.layer_norm_out = OFLayerNorm(c_hidden)
        self.sigmoid = nn.Sigmoid()

    def _combine(self, a, b):
        if self.outgoing:
            a = permute_final_dims(a, (2, 0, 1))
            b = permute_final_dims(b, (2, 1, 0))
        else:
            a = permute_final_dims(a, (2, 1, 0))
            b = permute_final_dims(b, (2, 0, 1))
        return permute_final_dims(torch.matmul(a, b), (1, 2, 0))

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = z.new_ones(z.shape[:-1])
        mask = mask.unsqueeze(-1)
        z = self.layer_norm_in(z)
        a = mask
        a = a * self.sigmoid(self.linear_a_g(z))
        a = a * self.linear_a_p(z)
        b = mask
        b = b * self.sigmoid(self.linear_b_g(z))
        b = b * self.linear_b_p(z)
        x = self._combine(a, b)
        x = self.layer_norm_out(x)
        x = self.linear_z(x)
        g = self.sigmoid(self.linear_g(z))
        return x * g


class OFOuterProductMean(nn.Module):
    """OpenFold-style outer product mean.

    Style: OpenFold ``OuterProductMean``. Spelling: masked projections, ``transpose(-2, -3)``,
    ``einsum("...bac,...dae->...bdce")`` then ``flatten_final_dims`` and a linear, the
    normaliser ``einsum("...abc,...adc->...bdc", mask, mask)`` and ``outer / (eps + norm)``;
    in eval with ``chunk_size`` the rows of ``a`` are chunked in a loop and concatenated.
    """

    def __init__(self, c_m: int = 16, c_z: int = 16, c_hidden: int = 8, eps: float = 1e-3,
                 chunk_size: Optional[int] = 4):
        super().__init__()
        self.eps = eps
        self.chunk_size = chunk_size
        self.layer_norm = nn.LayerNorm(c_m)
        self.linear_1 = nn.Linear(c_m, c_hidden)
        self.linear_2 = nn.Linear(c_m, c_hidden)
        self.linear_out = nn.Linear(c_hidden ** 2, c_z)

    def _opm(self, a, b):
        outer = torch.einsum("...bac,...dae->...bdce", a, b)
        return self.linear_out(flatten_final_dims(outer, 2))

    def forward(self, m: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = m.new_ones(m.shape[:-1])
        ln = self.layer_norm(m)
        mask = mask.unsqueeze(-1)
        a = self.linear_1(ln) * mask
        b = self.linear_2(ln) * mask
        a = a.transpose(-2, -3)
        b = b.transpose(-2, -3)
        if self.chunk_size is not None and not self.training:
            outer = torch.cat([self._opm(a[..., i:i + self.chunk_size, :, :], b)
                               for i in range(0, a.shape[-3], self.chunk_size)], dim=-3)
        else:
            outer = self._opm(a, b)
        norm = torch.einsum("...abc,...adc->...bdc", mask, mask)
        return outer / (self.eps + norm)


class OFPairTransition(nn.Module):
    """OpenFold-style pair transition.

    Style: OpenFold ``PairTransition``. Spelling: ``nn.LayerNorm``, ``linear_1`` (n x wider),
    ``nn.ReLU`` module, ``linear_2``, then ``* mask`` (mask unsqueezed to the channel dim).
    """

    def __init__(self, c_z: int = 16, n: int = 2):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_z)
        self.linear_1 = nn.Linear(c_z, n * c_z)
        self.relu = nn.ReLU()
        self.linear_2 = nn.Linear(n * c_z, c_z)

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = z.new_ones(z.shape[:-1])
        mask = mask.unsqueeze(-1)
        z = self.layer_norm(z)
        z = self.linear_2(self.relu(self.linear_1(z))) * mask
        return z


class OFPairCore(nn.Module):
    """OpenFold-style pair stack core: updates, shared-mask dropout and residual adds.

    Style: OpenFold ``PairStack`` / ``EvoformerBlock`` pair half. Spelling:
    ``z = z + self.dropout_row(self.tri_mul_out(z, mask=pair_mask))`` where the row-wise
    dropout drops an ``x.new_ones`` mask shared along dim -3 through ``nn.Dropout``; the
    ending-node attention uses a column-wise dropout (shared along dim -2); the transition
    residual has no dropout. These are the element-wise chains (update * dropout mask +
    residual) a compiler should fuse.
    """

    def __init__(self, c_z: int = 16, c_hidden: int = 8, n_heads: int = 2, p: float = 0.25):
        super().__init__()
        self.tri_mul_out = OFTriangleMultiplicativeUpdate(c_z, c_hidden, outgoing=True)
        self.tri_att_start = OFTriangleAttention(c_z, c_hidden, n_heads, starting=True)
        self.tri_att_end = OFTriangleAttention(c_z, c_hidden, n_heads, starting=False)
        self.pair_transition = OFPairTransition(c_z, 2)
        self.dropout_row = SharedDropout(p, shared_dim=-3)
        self.dropout_col = SharedDropout(p, shared_dim=-2)

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        z = z + self.dropout_row(self.tri_mul_out(z, mask=pair_mask))
        z = z + self.dropout_row(self.tri_att_start(z, mask=pair_mask))
        z = z + self.dropout_col(self.tri_att_end(z, mask=pair_mask))
        z = z + self.pair_transition(z, mask=pair_mask)
        return z
