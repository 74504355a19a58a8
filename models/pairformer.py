"""AlphaFold 3's Pairformer stack, written plainly from the AlphaFold 3 supplement.

Algorithm numbers refer to the AlphaFold 3 supplementary information
(Abramson et al., Nature 2024):

  Alg. 11  Transition (SwiGLU)                          -> ``Transition``
  Alg. 12  TriangleMultiplicationOutgoing               -> ``TriangleMultiplicationOutgoing``
  Alg. 13  TriangleMultiplicationIncoming               -> ``TriangleMultiplicationIncoming``
  Alg. 14  TriangleAttentionStartingNode                -> ``TriangleAttentionStartingNode``
  Alg. 15  TriangleAttentionEndingNode                  -> ``TriangleAttentionEndingNode``
  Alg. 17  PairformerStack                              -> ``PairformerBlock``, ``PairformerStack``
  Alg. 24  AttentionPairBias (no conditioning branch)   -> ``AttentionPairBias``

This file imports torch only and shares no code with ``foldcompile.models.alphafold2``
on purpose: it is a second, independently written code base for the compiler to face.

Layers follow the paper's ``LinearNoBias`` / ``Linear`` choice one by one; the only
projection with a bias in a Pairformer block is the query of Alg. 24 (line 3). Every
LayerNorm has a learned scale and offset. With these choices one block at AF3 sizes
(c_s=384, c_z=128, 16 x 24 single heads, 4 x 32 pair heads, c_hidden_mul=128,
transitions x4) has 3,070,848 parameters:

  triangle multiplication, each of 2:  2 LayerNorms (2*128 + 2*128) + 6 weights 128x128  =  98,816
  triangle attention, each of 2:       LayerNorm 256 + q,k,v,g,out 5 x 128x128 + bias 128x4 = 82,688
  pair transition:                     LayerNorm 256 + 3 x 128x512                         = 196,864
  single attention with pair bias:     LayerNorm 768 + q,k,v,g,out 5 x 384x384 + q bias 384
                                       + LayerNorm(z) 256 + bias 128x16                    = 740,736
  single transition:                   LayerNorm 768 + 3 x 384x1536                        = 1,770,240

Masks (1 = real, 0 = padding; bool or float, cast to the activations' dtype) are
applied as the released AlphaFold code does (the pseudo-code leaves them out):
  * every attention adds ``1e9 * (mask - 1)`` (float16: ``3e4 * (mask - 1)``) to the
    logits of masked *keys*
    (triangle attention: ``pair_mask[i, k]`` starting node, ``pair_mask[k, j]`` ending
    node; single attention: ``single_mask[j]``);
  * the triangle multiplications multiply the ``a`` and ``b`` projections by
    ``pair_mask`` so padded edges never enter the sum over ``k``.
So the outputs at real tokens do not depend on padded tokens.

Initialisation: the supplement leaves it open (except Alg. 24's adaLN gate, unused
here). The layers use AlphaFold's usual schemes, named per layer: ``default``
(LeCun truncated normal), ``relu`` (He truncated normal, SwiGLU inputs), ``gating``
(weights 0: sigmoid gates start at 0.5) and ``final`` (weights 0: every residual
update starts at zero). Comparisons between implementations should re-randomise
all parameters, or the zero-initialised layers hide every path behind them.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = [
    "Linear",
    "Transition",
    "TriangleMultiplication",
    "TriangleMultiplicationOutgoing",
    "TriangleMultiplicationIncoming",
    "TriangleAttention",
    "TriangleAttentionStartingNode",
    "TriangleAttentionEndingNode",
    "AttentionPairBias",
    "PairformerBlock",
    "PairformerStack",
    "dropout_rowwise",
    "dropout_columnwise",
]

# Additive logit for a masked key, as in AlphaFold's released code.
MASK_INF = 1e9


def _mask_inf(dtype: torch.dtype) -> float:
    """``MASK_INF`` for ``dtype``: 1e9, but 3e4 in float16 (as Uni-Fold), whose largest
    finite value is 65504. With 1e9 a padded token's query row, all of whose keys are
    masked, would be all -inf in float16 and give NaN, which reaches real tokens
    through ``0 * NaN``; 3e4 stays finite and ``exp(-3e4)`` is still exactly 0."""
    return 3e4 if dtype == torch.float16 else MASK_INF


class Linear(nn.Linear):
    """A linear layer that names its initialisation scheme.

    ``Linear(c_in, c_out, bias=False)`` is the paper's ``LinearNoBias``.
    Schemes: ``default`` (LeCun fan-in truncated normal), ``relu`` (He truncated
    normal), ``gating`` (weights 0, bias 1), ``final`` (weights 0, bias 0).
    """

    _SCHEMES = ("default", "relu", "gating", "final")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, init: str = "default"):
        if init not in self._SCHEMES:
            raise ValueError(f"unknown init scheme {init!r}; use one of {', '.join(self._SCHEMES)}")
        self.init_scheme = init
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        """Initialise the weights (and bias) by the layer's scheme."""
        init = getattr(self, "init_scheme", "default")
        with torch.no_grad():
            if init in ("default", "relu"):
                scale = 1.0 if init == "default" else 2.0
                # 0.8796... is the std of a unit normal truncated to [-2, 2]; dividing by it
                # gives the truncated draw the intended variance scale / fan_in.
                std = math.sqrt(scale / max(1, self.in_features)) / 0.87962566103423978
                nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
            else:
                self.weight.zero_()
            if self.bias is not None:
                self.bias.fill_(1.0 if init == "gating" else 0.0)


def _shared_dropout(x: torch.Tensor, p: float, training: bool, shared_dim: int) -> torch.Tensor:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shape[shared_dim] = 1
    keep = torch.bernoulli(torch.full(shape, 1.0 - p, dtype=x.dtype, device=x.device))
    return x * keep / (1.0 - p)


def dropout_rowwise(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``DropoutRowwise`` (Alg. 17): one mask for every row ``i`` of a pair update.

    For ``x`` of shape ``[*, N_i, N_j, c]`` the mask is drawn per ``(j, c)`` and shared
    along dim -3. Identity when not training or ``p == 0``.
    """
    return _shared_dropout(x, p, training, shared_dim=-3)


def dropout_columnwise(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``DropoutColumnwise`` (Alg. 17): one mask for every column ``j``, shared along dim -2."""
    return _shared_dropout(x, p, training, shared_dim=-2)


def _check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _chunk_loop(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int,
                chunk_size: Optional[int]) -> torch.Tensor:
    """Run ``fn`` over chunks of ``x`` along ``dim`` and concatenate the results.

    Equals ``fn(x)`` when ``fn`` treats positions along ``dim`` independently.
    """
    _check_chunk_size(chunk_size)
    length = x.shape[dim]
    if chunk_size is None or chunk_size >= length:
        return fn(x)
    pieces = [fn(x.narrow(dim, start, min(chunk_size, length - start))) for start in range(0, length, chunk_size)]
    return torch.cat(pieces, dim=dim)


class Transition(nn.Module):
    """SwiGLU transition, Alg. 11.

    ``x <- LayerNorm(x); a = LinearNoBias(x); b = LinearNoBias(x);
    x <- LinearNoBias(swish(a) * b)`` with hidden width ``n * c``.
    ``forward(x, chunk_size, chunk_dim)`` runs in chunks of ``chunk_dim`` (pointwise,
    so chunked equals unchunked).
    """

    def __init__(self, c: int, n: int = 4):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c)
        self.linear_a = Linear(c, n * c, init="relu")
        self.linear_b = Linear(c, n * c, init="relu")
        self.linear_out = Linear(n * c, c, init="final")

    def _transition(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(x)
        return self.linear_out(nn.functional.silu(self.linear_a(x)) * self.linear_b(x))

    def forward(self, x: torch.Tensor, chunk_size: Optional[int] = None, chunk_dim: int = -2) -> torch.Tensor:
        """Return the update for ``x`` ``[*, c]`` (the caller adds the residual)."""
        return _chunk_loop(self._transition, x, chunk_dim, chunk_size)


class TriangleMultiplication(nn.Module):
    """Triangular multiplicative update, Alg. 12 (outgoing) and Alg. 13 (incoming).

    ``z <- LayerNorm(z); a = sigmoid(LinearNoBias(z)) * LinearNoBias(z)`` (same for ``b``),
    both multiplied by the pair mask; ``g = sigmoid(LinearNoBias(z))``;

      outgoing (Alg. 12): ``x_ij = sum_k a_ik * b_jk``
      incoming (Alg. 13): ``x_ij = sum_k a_ki * b_kj``

    and the update is ``g * LinearNoBias(LayerNorm(x))``.
    """

    def __init__(self, c_z: int = 128, c_hidden: int = 128, outgoing: bool = True):
        super().__init__()
        self.outgoing = outgoing
        self.layer_norm_in = nn.LayerNorm(c_z)
        self.linear_a_gate = Linear(c_z, c_hidden, init="gating")
        self.linear_a = Linear(c_z, c_hidden)
        self.linear_b_gate = Linear(c_z, c_hidden, init="gating")
        self.linear_b = Linear(c_z, c_hidden)
        self.linear_g = Linear(c_z, c_z, init="gating")
        self.layer_norm_out = nn.LayerNorm(c_hidden)
        self.linear_out = Linear(c_hidden, c_z, init="final")

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """Return the update for ``z`` ``[*, N, N, c_z]``; ``pair_mask`` is ``[*, N, N]``."""
        z = self.layer_norm_in(z)
        mask = pair_mask.unsqueeze(-1)
        a = torch.sigmoid(self.linear_a_gate(z)) * self.linear_a(z) * mask
        b = torch.sigmoid(self.linear_b_gate(z)) * self.linear_b(z) * mask
        if self.outgoing:
            x = torch.einsum("...ikc,...jkc->...ijc", a, b)
        else:
            x = torch.einsum("...kic,...kjc->...ijc", a, b)
        g = torch.sigmoid(self.linear_g(z))
        return g * self.linear_out(self.layer_norm_out(x))


class TriangleMultiplicationOutgoing(TriangleMultiplication):
    """Triangular multiplicative update using "outgoing" edges, Alg. 12."""

    def __init__(self, c_z: int = 128, c_hidden: int = 128):
        super().__init__(c_z, c_hidden, outgoing=True)


class TriangleMultiplicationIncoming(TriangleMultiplication):
    """Triangular multiplicative update using "incoming" edges, Alg. 13."""

    def __init__(self, c_z: int = 128, c_hidden: int = 128):
        super().__init__(c_z, c_hidden, outgoing=False)


class TriangleAttention(nn.Module):
    """Triangular gated self-attention, Alg. 14 (starting node) and Alg. 15 (ending node).

    ``z <- LayerNorm(z); q, k, v = LinearNoBias(z); b = LinearNoBias(z);
    g = sigmoid(LinearNoBias(z))``, per head ``h``:

      starting (Alg. 14): ``a_ijk = softmax_k(q_ij . k_ik / sqrt(c) + b_jk)``,
                          ``o_ij = g_ij * sum_k a_ijk v_ik``; key mask ``pair_mask[i, k]``
      ending (Alg. 15):   ``a_ijk = softmax_k(q_ij . k_kj / sqrt(c) + b_ki)``,
                          ``o_ij = g_ij * sum_k a_ijk v_kj``; key mask ``pair_mask[k, j]``

    and the update is ``LinearNoBias(concat_h o_ij)``. Both orientations are written
    out as the paper states them (no transposition trick). ``chunk_size`` loops over
    chunks of the query rows ``i``.
    """

    def __init__(self, c_z: int = 128, c_hidden: int = 32, n_heads: int = 4, starting: bool = True):
        super().__init__()
        self.starting = starting
        self.c_hidden = c_hidden
        self.n_heads = n_heads
        self.layer_norm = nn.LayerNorm(c_z)
        self.linear_q = Linear(c_z, n_heads * c_hidden)
        self.linear_k = Linear(c_z, n_heads * c_hidden)
        self.linear_v = Linear(c_z, n_heads * c_hidden)
        self.linear_bias = Linear(c_z, n_heads)
        self.linear_g = Linear(c_z, n_heads * c_hidden, init="gating")
        self.linear_out = Linear(n_heads * c_hidden, c_z, init="final")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.n_heads, self.c_hidden)

    def _attend_starting(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         bias: torch.Tensor) -> torch.Tensor:
        # q, k, v: [*, I, N, H, c] for a chunk of rows I; mask [*, I, N]; bias [*, H, N, N] (b_jk).
        logits = torch.einsum("...ijhc,...ikhc->...hijk", q, k) / math.sqrt(self.c_hidden)
        logits = logits + bias.unsqueeze(-3)
        logits = logits + (_mask_inf(mask.dtype) * (mask - 1.0))[..., None, :, None, :]
        weights = torch.softmax(logits, dim=-1)
        return torch.einsum("...hijk,...ikhc->...ijhc", weights, v)

    def _attend_ending(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
        # q: [*, I, N, H, c] for a chunk of rows I; k, v: [*, N, N, H, c] whole;
        # mask [*, N, N] whole (m_kj); bias [*, H, N, I] (b_ki for the chunk's i).
        logits = torch.einsum("...ijhc,...kjhc->...hijk", q, k) / math.sqrt(self.c_hidden)
        logits = logits + bias.transpose(-1, -2).unsqueeze(-2)
        logits = logits + (_mask_inf(mask.dtype) * (mask - 1.0)).transpose(-1, -2)[..., None, None, :, :]
        weights = torch.softmax(logits, dim=-1)
        return torch.einsum("...hijk,...kjhc->...ijhc", weights, v)

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Return the update for ``z`` ``[*, N, N, c_z]``; ``pair_mask`` is ``[*, N, N]``."""
        z = self.layer_norm(z)
        q = self._heads(self.linear_q(z))
        k = self._heads(self.linear_k(z))
        v = self._heads(self.linear_v(z))
        bias = self.linear_bias(z).movedim(-1, -3)  # [*, H, N, N]: bias[h, x, y] = b^h_xy
        _check_chunk_size(chunk_size)
        n_rows = q.shape[-4]
        step = n_rows if chunk_size is None else chunk_size
        pieces = []
        for start in range(0, n_rows, step):
            size = min(step, n_rows - start)
            q_rows = q.narrow(-4, start, size)
            if self.starting:
                # Row i only sees its own keys k_ik, values v_ik and mask m_ik.
                pieces.append(self._attend_starting(q_rows, k.narrow(-4, start, size), v.narrow(-4, start, size),
                                                    pair_mask.narrow(-2, start, size), bias))
            else:
                # Row i sees every k_kj, v_kj, m_kj, and the bias column b_ki.
                pieces.append(self._attend_ending(q_rows, k, v, pair_mask, bias.narrow(-1, start, size)))
        o = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-4)
        g = torch.sigmoid(self.linear_g(z))
        o = g * o.reshape(*o.shape[:-2], self.n_heads * self.c_hidden)
        return self.linear_out(o)


class TriangleAttentionStartingNode(TriangleAttention):
    """Triangular gated self-attention around the starting node, Alg. 14."""

    def __init__(self, c_z: int = 128, c_hidden: int = 32, n_heads: int = 4):
        super().__init__(c_z, c_hidden, n_heads, starting=True)


class TriangleAttentionEndingNode(TriangleAttention):
    """Triangular gated self-attention around the ending node, Alg. 15."""

    def __init__(self, c_z: int = 128, c_hidden: int = 32, n_heads: int = 4):
        super().__init__(c_z, c_hidden, n_heads, starting=False)


class AttentionPairBias(nn.Module):
    """Single-representation attention with pair bias, Alg. 24 without conditioning.

    The Pairformer calls it with no conditioning signal and ``beta = 0`` (Alg. 17), so
    the branch taken is: ``a <- LayerNorm(a)`` (learned scale and offset);
    ``q = Linear(a)`` (the one biased projection); ``k, v = LinearNoBias(a)``;
    ``b_ij = LinearNoBias(LayerNorm(z_ij))``; ``g = sigmoid(LinearNoBias(a))``;
    ``A_ij = softmax_j(q_i . k_j / sqrt(c) + b_ij)``;
    ``a <- LinearNoBias(concat_h g_i * sum_j A_ij v_j)``.
    Masked tokens are masked as keys (``single_mask[j]``). ``chunk_size`` loops over
    chunks of the queries ``i``.
    """

    def __init__(self, c_s: int = 384, c_z: int = 128, n_heads: int = 16, c_hidden: int = 24):
        super().__init__()
        self.n_heads = n_heads
        self.c_hidden = c_hidden
        self.layer_norm = nn.LayerNorm(c_s)
        self.linear_q = Linear(c_s, n_heads * c_hidden, bias=True)
        self.linear_k = Linear(c_s, n_heads * c_hidden)
        self.linear_v = Linear(c_s, n_heads * c_hidden)
        self.layer_norm_z = nn.LayerNorm(c_z)
        self.linear_bias = Linear(c_z, n_heads)
        self.linear_g = Linear(c_s, n_heads * c_hidden, init="gating")
        self.linear_out = Linear(n_heads * c_hidden, c_s, init="final")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.n_heads, self.c_hidden)

    def forward(self, s: torch.Tensor, z: torch.Tensor, single_mask: torch.Tensor,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        """Return the update for ``s`` ``[*, N, c_s]`` given ``z`` ``[*, N, N, c_z]`` and ``single_mask`` ``[*, N]``."""
        _check_chunk_size(chunk_size)
        a = self.layer_norm(s)
        q = self._heads(self.linear_q(a))
        k = self._heads(self.linear_k(a))
        v = self._heads(self.linear_v(a))
        key_bias = (_mask_inf(single_mask.dtype) * (single_mask - 1.0))[..., None, None, :]  # [*, 1, 1, N_keys]
        n_queries = q.shape[-3]
        step = n_queries if chunk_size is None else chunk_size
        pieces = []
        for start in range(0, n_queries, step):
            size = min(step, n_queries - start)
            # The pair bias is computed per chunk of query rows, so a chunk never holds all of z's bias.
            pair_bias = self.linear_bias(self.layer_norm_z(z.narrow(-3, start, size))).movedim(-1, -3)
            logits = torch.einsum("...ihc,...jhc->...hij", q.narrow(-3, start, size), k) / math.sqrt(self.c_hidden)
            weights = torch.softmax(logits + pair_bias + key_bias, dim=-1)
            pieces.append(torch.einsum("...hij,...jhc->...ihc", weights, v))
        o = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-3)
        g = torch.sigmoid(self.linear_g(a))
        return self.linear_out(g * o.reshape(*o.shape[:-2], self.n_heads * self.c_hidden))


def _check_inputs(s: torch.Tensor, z: torch.Tensor, single_mask: Optional[torch.Tensor],
                  pair_mask: Optional[torch.Tensor], c_s: int, c_z: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``s``, ``z`` and the masks; return the masks, ones where not given."""
    if s.dim() < 2 or z.dim() != s.dim() + 1:
        raise ValueError(f"expected s [*, N_tok, c_s] and z [*, N_tok, N_tok, c_z], got s {tuple(s.shape)} "
                         f"and z {tuple(z.shape)}")
    n_tok = s.shape[-2]
    if s.shape[-1] != c_s:
        raise ValueError(f"s has {s.shape[-1]} channels, the block expects c_s={c_s}")
    if z.shape[-1] != c_z:
        raise ValueError(f"z has {z.shape[-1]} channels, the block expects c_z={c_z}")
    if z.shape[-3] != n_tok or z.shape[-2] != n_tok or z.shape[:-3] != s.shape[:-2]:
        raise ValueError(f"z {tuple(z.shape)} does not match s {tuple(s.shape)}: expected "
                         f"{tuple(s.shape[:-2]) + (n_tok, n_tok, c_z)}")
    if single_mask is None:
        single_mask = s.new_ones(s.shape[:-1])
    elif single_mask.shape != s.shape[:-1]:
        raise ValueError(f"single_mask has shape {tuple(single_mask.shape)}, expected {tuple(s.shape[:-1])}")
    if pair_mask is None:
        pair_mask = z.new_ones(z.shape[:-1])
    elif pair_mask.shape != z.shape[:-1]:
        raise ValueError(f"pair_mask has shape {tuple(pair_mask.shape)}, expected {tuple(z.shape[:-1])}")
    return single_mask.to(s.dtype), pair_mask.to(z.dtype)


class PairformerBlock(nn.Module):
    """One block of the Pairformer stack, Alg. 17 (the body of its loop).

    ::

        z += DropoutRowwise(0.25)(TriangleMultiplicationOutgoing(z))     # Alg. 12
        z += DropoutRowwise(0.25)(TriangleMultiplicationIncoming(z))     # Alg. 13
        z += DropoutRowwise(0.25)(TriangleAttentionStartingNode(z))      # Alg. 14
        z += DropoutColumnwise(0.25)(TriangleAttentionEndingNode(z))     # Alg. 15
        z += Transition(z)                                               # Alg. 11
        s += AttentionPairBias(s, None, z, beta=0, N_head=16)            # Alg. 24
        s += Transition(s)                                               # Alg. 11

    Dropout acts in training mode only. ``chunk_size`` chunks the triangle
    attentions, the single attention and the transitions (inference memory saver;
    the result equals the unchunked one).
    """

    def __init__(self, c_s: int = 384, c_z: int = 128, n_heads_single: int = 16, c_hidden_single: int = 24,
                 n_heads_pair: int = 4, c_hidden_pair: int = 32, c_hidden_mul: int = 128, transition_n: int = 4,
                 dropout_pair: float = 0.25):
        super().__init__()
        if not 0.0 <= dropout_pair < 1.0:
            raise ValueError(f"dropout_pair must be in [0, 1), got {dropout_pair}")
        self.c_s = c_s
        self.c_z = c_z
        self.dropout_pair = dropout_pair
        self.tri_mul_out = TriangleMultiplicationOutgoing(c_z, c_hidden_mul)
        self.tri_mul_in = TriangleMultiplicationIncoming(c_z, c_hidden_mul)
        self.tri_att_start = TriangleAttentionStartingNode(c_z, c_hidden_pair, n_heads_pair)
        self.tri_att_end = TriangleAttentionEndingNode(c_z, c_hidden_pair, n_heads_pair)
        self.pair_transition = Transition(c_z, transition_n)
        self.attention_pair_bias = AttentionPairBias(c_s, c_z, n_heads_single, c_hidden_single)
        self.single_transition = Transition(c_s, transition_n)

    def forward(self, s: torch.Tensor, z: torch.Tensor, single_mask: Optional[torch.Tensor] = None,
                pair_mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Update ``s`` ``[*, N_tok, c_s]`` and ``z`` ``[*, N_tok, N_tok, c_z]``; masks are 0/1, bool or
        float (cast to the activations' dtype)."""
        single_mask, pair_mask = _check_inputs(s, z, single_mask, pair_mask, self.c_s, self.c_z)
        _check_chunk_size(chunk_size)
        p = self.dropout_pair
        z = z + dropout_rowwise(self.tri_mul_out(z, pair_mask), p, self.training)
        z = z + dropout_rowwise(self.tri_mul_in(z, pair_mask), p, self.training)
        z = z + dropout_rowwise(self.tri_att_start(z, pair_mask, chunk_size), p, self.training)
        z = z + dropout_columnwise(self.tri_att_end(z, pair_mask, chunk_size), p, self.training)
        z = z + self.pair_transition(z, chunk_size, chunk_dim=-3)
        s = s + self.attention_pair_bias(s, z, single_mask, chunk_size)
        s = s + self.single_transition(s, chunk_size, chunk_dim=-2)
        return s, z


class PairformerStack(nn.Module):
    """The Pairformer stack, Alg. 17: ``n_blocks`` ``PairformerBlock`` s with unshared weights.

    ``checkpoint=True`` wraps every block in ``torch.utils.checkpoint`` (non-reentrant)
    when training with autograd on, so activations are recomputed in backward; the
    RNG state is restored, so dropout draws the same masks when recomputing.
    """

    def __init__(self, n_blocks: int = 48, c_s: int = 384, c_z: int = 128, n_heads_single: int = 16,
                 c_hidden_single: int = 24, n_heads_pair: int = 4, c_hidden_pair: int = 32, c_hidden_mul: int = 128,
                 transition_n: int = 4, dropout_pair: float = 0.25, checkpoint: bool = False):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
        self.c_s = c_s
        self.c_z = c_z
        self.checkpoint = checkpoint
        self.blocks = nn.ModuleList(
            PairformerBlock(c_s, c_z, n_heads_single, c_hidden_single, n_heads_pair, c_hidden_pair, c_hidden_mul,
                            transition_n, dropout_pair)
            for _ in range(n_blocks)
        )

    def forward(self, s: torch.Tensor, z: torch.Tensor, single_mask: Optional[torch.Tensor] = None,
                pair_mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every block on ``s`` ``[*, N_tok, c_s]`` and ``z`` ``[*, N_tok, N_tok, c_z]``."""
        single_mask, pair_mask = _check_inputs(s, z, single_mask, pair_mask, self.c_s, self.c_z)
        for block in self.blocks:
            if self.checkpoint and self.training and torch.is_grad_enabled():
                s, z = torch.utils.checkpoint.checkpoint(block, s, z, single_mask, pair_mask, chunk_size,
                                                         use_reentrant=False)
            else:
                s, z = block(s, z, single_mask, pair_mask, chunk_size)
        return s, z
