"""AlphaFold 3 trunk modules written the way Protenix (bytedance/Protenix) writes them.

Written for this corpus from reading Protenix's public ``protenix/model`` code (its
``modules/primitives.py``, ``modules/pairformer.py``, ``modules/transformer.py`` and
``utils.py``): the same math and spelling habits, our own code and names. What is
characteristic of that code base and kept:

- its own ``permute_final_dims`` / ``flatten_final_dims`` (``t.reshape(shape=t.shape[:-n] + (-1,))``);
- ``Attention._prep_qkv`` with the scale on ``q`` NOT in place (``q = q / math.sqrt(c)``),
  a biased ``linear_q`` (AF3) and bias-free ``linear_k/v/o/g``;
- ``_attention`` that upcasts ``q``/``k``/bias with ``.to(dtype=torch.float32)`` and either calls
  ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)`` (the scale is
  already in ``q``) or spells it ``q @ k.transpose(-1, -2)``, ``attn_weights += attn_bias``
  (``inplace_safe``) / ``attn_weights = attn_weights + attn_bias``, ``F.softmax`` and
  ``attn_weights.to(dtype=input_dtype) @ v``;
- a bias of rank 3 ``[..., Q, K]`` unsqueezed to heads with ``attn_bias.unsqueeze(dim=-3)``
  when ``len(attn_bias.shape) != len(q.shape)``;
- a local-window bias built in ``forward`` by a Python loop of slice assignments into a
  zeros tensor, then ``(1 - attn_mask) * -inf`` with a finite ``inf = 1e10``;
- ``MSAPairWeightedAveraging`` (AF3 Alg. 10): a softmax of the pair bias over ``j`` and
  ``einsum("...ijh,...mjhc->...mihc")`` - a biased softmax that is NOT an attention;
- a SwiGLU ``Transition`` whose eval path reshapes to 2-D, ``torch.chunk`` s the rows, writes
  into a ``torch.empty`` output by slice assignment and uses in-place ``F.silu(a, True)``
  and ``b *= a``;
- ``AdaptiveLayerNorm`` (AF3 Alg. 26): ``LayerNorm(elementwise_affine=False)`` on ``a``, a
  bias-free ``LayerNorm`` on ``s`` and ``sigmoid(linear(s)) * a + linear_nobias(s)``.

Spellings Protenix itself does not use but that AF3-style PyTorch code commonly does are
marked as such where they appear (boolean masks with ``masked_fill`` / ``torch.where`` and
``finfo.min``, ``bmm`` over flattened heads): they sit on Protenix's ``Attention`` skeleton.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "permute_final_dims", "flatten_final_dims", "PXAttention", "PXAttentionPairBias", "PXBoolMaskAttention",
    "PXBmmAttention", "PXMSAPairWeightedAveraging", "PXTransition", "PXAdaptiveLayerNorm",
    "PXLayerNormByHand",
]


def permute_final_dims(tensor: torch.Tensor, inds: list) -> torch.Tensor:
    """Permute the final ``len(inds)`` dims."""
    zero_index = -1 * len(inds)
    first_inds = list(range(len(tensor.shape[:zero_index])))
    return tensor.permute(first_inds + [zero_index + i for i in inds])


def flatten_final_dims(t: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Flatten the final ``num_dims`` dims."""
    return t.reshape(shape=t.shape[:-num_dims] + (-1,))


def _attention(q, k, v, attn_bias=None, use_efficient_implementation=True, inplace_safe=False):
    input_dtype = q.dtype
    q = q.to(dtype=torch.float32)
    k = k.to(dtype=torch.float32)
    if attn_bias is not None:
        attn_bias = attn_bias.to(dtype=torch.float32)
    if use_efficient_implementation:
        return F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=attn_bias, scale=1.0)
    k = k.transpose(-1, -2)
    attn_weights = q @ k
    if attn_bias is not None:
        if inplace_safe:
            attn_weights += attn_bias
        else:
            attn_weights = attn_weights + attn_bias
    attn_weights = F.softmax(attn_weights, dim=-1)
    return attn_weights.to(dtype=input_dtype) @ v


def local_window_bias(n: int, n_queries: int, n_keys: int, inf: float = 1e10, device=None) -> torch.Tensor:
    """Additive bias letting each block of ``n_queries`` queries see a window of ``n_keys`` keys."""
    n_trunks = int(math.ceil(n / n_queries))
    padded = n_trunks * n_queries
    attn_mask = torch.zeros(padded, padded, device=device)
    for block in range(n_trunks):
        i = block * n_queries
        j1 = max(0, n_queries * block - (n_keys - n_queries) // 2)
        j2 = n_queries * block + (n_queries + n_keys) // 2
        attn_mask[i:i + n_queries, j1:j2] = 1.0
    attn_bias = (1 - attn_mask) * -inf
    return attn_bias[:n, :n]


class PXAttention(nn.Module):
    """Protenix's ``Attention`` skeleton: ``_prep_qkv``, ``_attention``, ``_wrap_up``."""

    def __init__(self, c_q: int, c_k: int, c_v: int, c_hidden: int, num_heads: int, gating: bool = True,
                 q_linear_bias: bool = True, use_efficient_implementation: bool = True, inplace_safe: bool = False):
        super().__init__()
        self.c_hidden = c_hidden
        self.num_heads = num_heads
        self.use_efficient_implementation = use_efficient_implementation
        self.inplace_safe = inplace_safe
        self.linear_q = nn.Linear(c_q, c_hidden * num_heads, bias=q_linear_bias)
        self.linear_k = nn.Linear(c_k, c_hidden * num_heads, bias=False)
        self.linear_v = nn.Linear(c_v, c_hidden * num_heads, bias=False)
        self.linear_o = nn.Linear(c_hidden * num_heads, c_q, bias=False)
        self.linear_g = nn.Linear(c_q, c_hidden * num_heads, bias=False) if gating else None
        self.sigmoid = nn.Sigmoid()

    def _prep_qkv(self, q_x, kv_x, apply_scale: bool = True):
        q = self.linear_q(q_x)
        k = self.linear_k(kv_x)
        v = self.linear_v(kv_x)
        q = q.view(q.shape[:-1] + (self.num_heads, -1)).transpose(-2, -3)
        k = k.view(k.shape[:-1] + (self.num_heads, -1)).transpose(-2, -3)
        v = v.view(v.shape[:-1] + (self.num_heads, -1)).transpose(-2, -3)
        if apply_scale:
            q = q / math.sqrt(self.c_hidden)
        return q, k, v

    def _wrap_up(self, o, q_x):
        if self.linear_g is not None:
            g = self.sigmoid(self.linear_g(q_x))
            g = g.view(g.shape[:-1] + (self.num_heads, -1))
            o = o * g
        o = flatten_final_dims(o, num_dims=2)
        return self.linear_o(o)

    def forward(self, q_x, kv_x, attn_bias: Optional[torch.Tensor] = None, n_queries: Optional[int] = None,
                n_keys: Optional[int] = None, inf: float = 1e10, chunk_size: Optional[int] = None):
        q, k, v = self._prep_qkv(q_x=q_x, kv_x=kv_x, apply_scale=True)
        if attn_bias is not None and len(attn_bias.shape) != len(q.shape):
            attn_bias = attn_bias.unsqueeze(dim=-3)
        if n_queries and n_keys:
            local = local_window_bias(q.shape[-2], n_queries, n_keys, inf=inf, device=q.device)
            local = local.reshape((1,) * len(q.shape[:-2]) + local.shape)
            attn_bias = local if attn_bias is None else local + attn_bias
        if chunk_size is not None and not self.training:
            # inference: cut the queries into chunks along dim -2 and concatenate
            pieces = []
            for i in range(0, q.shape[-2], chunk_size):
                b = None if attn_bias is None else attn_bias[..., i:i + chunk_size, :]
                pieces.append(_attention(q[..., i:i + chunk_size, :], k, v, b, self.use_efficient_implementation,
                                         self.inplace_safe))
            o = torch.cat(pieces, dim=-2)
        else:
            o = _attention(q, k, v, attn_bias, self.use_efficient_implementation, self.inplace_safe)
        o = o.transpose(-2, -3)
        return self._wrap_up(o, q_x)


class PXAttentionPairBias(nn.Module):
    """Protenix-style AttentionPairBias (AF3 Alg. 24, no conditioning).

    Style: Protenix ``modules/transformer.AttentionPairBias`` over its ``Attention``. Spelling:
    ``LayerNorm(a)``; pair bias ``linear_nobias_z(layernorm_z(z))`` permuted with
    ``permute_final_dims(.., [2, 0, 1])``; key mask ``(1 - mask[..., None, :]) * -inf`` with a
    finite ``inf = 1e10``, broadcast to heads with ``.unsqueeze(-3)`` and added to the pair
    bias (one summed bias goes into ``Attention``); scale ``q = q / sqrt(c)``; ``q.to(float32)``. ``efficient=True``:
    ``F.scaled_dot_product_attention(attn_mask=bias, scale=1.0)``; ``efficient=False``:
    ``q @ k.T``, in-place ``+=`` of the bias (``inplace_safe``), ``F.softmax``, ``@ v``.
    ``local=(n_queries, n_keys)`` adds the local-window bias built by a loop of slice
    assignments; ``chunk_size`` (eval only) cuts the queries into a Python loop and
    concatenates.
    """

    def __init__(self, c_a: int = 16, c_z: int = 16, n_heads: int = 2, efficient: bool = True,
                 inplace_safe: bool = False, local: Optional[tuple] = None, chunk_size: Optional[int] = None,
                 inf: float = 1e10):
        super().__init__()
        self.n_heads = n_heads
        self.inf = inf
        self.local = local
        self.chunk_size = chunk_size
        self.layernorm_a = nn.LayerNorm(c_a)
        self.layernorm_z = nn.LayerNorm(c_z)
        self.linear_nobias_z = nn.Linear(c_z, n_heads, bias=False)
        self.attention = PXAttention(c_a, c_a, c_a, c_a // n_heads, n_heads,
                                     use_efficient_implementation=efficient, inplace_safe=inplace_safe)

    def forward(self, a: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.layernorm_a(a)
        bias = permute_final_dims(self.linear_nobias_z(self.layernorm_z(z)), [2, 0, 1])  # [..., H, N, N]
        mask_bias = (1 - mask[..., None, :]) * -self.inf  # [..., 1, N]: rank 3 with the query dim
        attn_bias = bias + mask_bias.unsqueeze(-3)
        n_queries, n_keys = self.local if self.local else (None, None)
        return self.attention(a, a, attn_bias=attn_bias, n_queries=n_queries, n_keys=n_keys, inf=self.inf,
                              chunk_size=self.chunk_size)


class PXBoolMaskAttention(nn.Module):
    """Protenix-skeleton attention with a BOOLEAN key mask, in one of four spellings.

    Style: Protenix ``Attention`` (``_prep_qkv`` / ``_wrap_up``, upcast to float32, its permute
    helpers), with the boolean-mask spellings common in AF3-style PyTorch code rather than
    Protenix's own additive ``-inf`` biases. Spelling: ``mask_style`` picks one of
    ``"masked_fill_inf"``: ``logits.masked_fill(~mask, float("-inf"))``;
    ``"masked_fill_finfo"``: ``logits.masked_fill(~mask, torch.finfo(logits.dtype).min)``;
    ``"where"``: ``torch.where(mask, logits, -inf)`` (a 0-dim tensor fill value);
    ``"sdpa_bool"``: ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` with SDPA's
    own default scale (so ``_prep_qkv`` skips the scale); and two spellings that clean up the
    NaN weights of rows that keep no key after an ``-inf`` fill, as padded-batch code does:
    ``"masked_fill_inf_nan_to_num"``: ``torch.nan_to_num(F.softmax(...))``;
    ``"masked_fill_inf_where_isnan"``: ``torch.where(torch.isnan(w), torch.zeros_like(w), w)``.
    The example masks leave at least one key per row for the first four (so ``-inf`` never
    meets a fully masked row); the clean-up spellings' examples mask one batch element whole.
    """

    STYLES = ("masked_fill_inf", "masked_fill_finfo", "where", "sdpa_bool", "masked_fill_inf_nan_to_num",
              "masked_fill_inf_where_isnan")
    CLEAN_UP = ("masked_fill_inf_nan_to_num", "masked_fill_inf_where_isnan")

    def __init__(self, c: int = 16, n_heads: int = 2, mask_style: str = "masked_fill_inf"):
        super().__init__()
        assert mask_style in self.STYLES
        self.mask_style = mask_style
        self.layernorm = nn.LayerNorm(c)
        self.attention = PXAttention(c, c, c, c // n_heads, n_heads, use_efficient_implementation=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x [B, N, c]; mask [B, N] bool, True = attend
        x = self.layernorm(x)
        att = self.attention
        key_mask = mask[:, None, None, :]  # [B, 1, 1, N]
        if self.mask_style == "sdpa_bool":
            q, k, v = att._prep_qkv(x, x, apply_scale=False)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        else:
            q, k, v = att._prep_qkv(x, x)
            logits = q.to(dtype=torch.float32) @ k.to(dtype=torch.float32).transpose(-1, -2)
            if self.mask_style.startswith("masked_fill_inf"):
                logits = logits.masked_fill(~key_mask, float("-inf"))
            elif self.mask_style == "masked_fill_finfo":
                logits = logits.masked_fill(~key_mask, torch.finfo(logits.dtype).min)
            else:
                logits = torch.where(key_mask, logits, torch.tensor(float("-inf"), dtype=logits.dtype))
            w = F.softmax(logits, dim=-1)
            if self.mask_style == "masked_fill_inf_nan_to_num":
                w = torch.nan_to_num(w)
            elif self.mask_style == "masked_fill_inf_where_isnan":
                w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
            o = w.to(dtype=v.dtype) @ v
        return att._wrap_up(o.transpose(-2, -3), x)


class PXBmmAttention(nn.Module):
    """Protenix-skeleton attention with a fused QKV projection and ``torch.bmm`` over flattened heads.

    Style: Protenix ``Attention`` math (biased q projection, pair bias, gate, bias-free output)
    in a spelling Protenix does not use. Spelling: one ``linear_qkv`` split with ``.split(d, dim=-1)``, heads
    flattened into the batch with ``reshape(B * H, N, c)``, the scale on ``k`` (``k * c ** -0.5``),
    ``torch.bmm(q, k.transpose(1, 2))`` plus the pair bias reshaped to ``[B * H, N, N]``, ``torch.softmax``,
    ``torch.bmm(w, v)``, heads restored with ``view`` + ``permute``; gate ``torch.sigmoid``.
    """

    def __init__(self, c: int = 16, c_z: int = 16, n_heads: int = 2):
        super().__init__()
        self.n_heads = n_heads
        self.c_head = c // n_heads
        self.layernorm = nn.LayerNorm(c)
        self.layernorm_z = nn.LayerNorm(c_z)
        self.linear_z = nn.Linear(c_z, n_heads, bias=False)
        self.linear_qkv = nn.Linear(c, 3 * c)
        self.linear_g = nn.Linear(c, c, bias=False)
        self.linear_o = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, D = self.n_heads, self.c_head
        x = self.layernorm(x)
        q, k, v = self.linear_qkv(x).split(C, dim=-1)
        q = q.reshape(B, N, H, D).permute(0, 2, 1, 3).reshape(B * H, N, D)
        k = k.reshape(B, N, H, D).permute(0, 2, 1, 3).reshape(B * H, N, D) * D ** -0.5
        v = v.reshape(B, N, H, D).permute(0, 2, 1, 3).reshape(B * H, N, D)
        bias = self.linear_z(self.layernorm_z(z)).permute(0, 3, 1, 2).reshape(B * H, N, N)
        w = torch.softmax(torch.bmm(q, k.transpose(1, 2)) + bias, dim=-1)
        o = torch.bmm(w, v).view(B, H, N, D).permute(0, 2, 1, 3).reshape(B, N, C)
        return self.linear_o(torch.sigmoid(self.linear_g(x)) * o)


class PXMSAPairWeightedAveraging(nn.Module):
    """Protenix-style MSA pair-weighted averaging (AF3 Alg. 10).

    Style: Protenix ``modules/pairformer.MSAPairWeightedAveraging``. Spelling: the weights are a
    softmax of the PAIR bias alone, ``nn.Softmax(dim=-2)`` over ``j`` of ``b [.., i, j, h]``, used
    as ``einsum("...ijh,...mjhc->...mihc", w, v)``; gate ``torch.sigmoid(linear(m))`` reshaped to
    heads; ``o.reshape(*o.shape[:-2], H * c)``. There is no query-key product: a biased softmax,
    not an attention.
    """

    def __init__(self, c_m: int = 16, c: int = 8, c_z: int = 16, n_heads: int = 2):
        super().__init__()
        self.c = c
        self.n_heads = n_heads
        self.layernorm_m = nn.LayerNorm(c_m)
        self.linear_no_bias_mv = nn.Linear(c_m, c * n_heads, bias=False)
        self.layernorm_z = nn.LayerNorm(c_z)
        self.linear_no_bias_z = nn.Linear(c_z, n_heads, bias=False)
        self.linear_no_bias_mg = nn.Linear(c_m, c * n_heads, bias=False)
        self.softmax_w = nn.Softmax(dim=-2)
        self.linear_no_bias_out = nn.Linear(c * n_heads, c_m, bias=False)

    def forward(self, m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        m = self.layernorm_m(m)
        v = self.linear_no_bias_mv(m)
        v = v.reshape(*v.shape[:-1], self.n_heads, self.c)
        b = self.linear_no_bias_z(self.layernorm_z(z))
        g = torch.sigmoid(self.linear_no_bias_mg(m))
        g = g.reshape(*g.shape[:-1], self.n_heads, self.c)
        w = self.softmax_w(b)
        wv = torch.einsum("...ijh,...mjhc->...mihc", w, v)
        o = g * wv
        o = o.reshape(*o.shape[:-2], self.n_heads * self.c)
        return self.linear_no_bias_out(o)


class PXTransition(nn.Module):
    """Protenix-style SwiGLU transition with its eval path.

    Style: Protenix ``modules/primitives.Transition``. Spelling: train ``F.silu(a) * b``; eval
    ``x.reshape(-1, c)``, ``torch.chunk(x, n_chunks, dim=-2)``, a ``torch.empty`` output filled by
    slice assignment, in-place ``F.silu(a, True)`` and ``b *= a``, then reshaped back (8 chunks from
    3200 rows of the second-last dim on, as Protenix does; one chunk at the corpus's sizes).
    """

    def __init__(self, c_in: int = 16, n: int = 2):
        super().__init__()
        self.c_in = c_in
        self.layernorm1 = nn.LayerNorm(c_in)
        self.linear_no_bias_a = nn.Linear(c_in, n * c_in, bias=False)
        self.linear_no_bias_b = nn.Linear(c_in, n * c_in, bias=False)
        self.linear_no_bias = nn.Linear(n * c_in, c_in, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = self.layernorm1(x)
            a = self.linear_no_bias_a(x)
            b = self.linear_no_bias_b(x)
            return self.linear_no_bias(F.silu(a) * b)
        other_dims = x.shape[:-1]
        size = x.shape[-2]
        x = x.reshape(-1, x.shape[-1])
        chunk_num = 1 if size < 3200 else 8  # one chunk at the corpus's sizes: the path is still the eval one
        outputs = torch.empty((x.shape[0], self.c_in), dtype=x.dtype, device=x.device)
        start = 0
        for chunk in torch.chunk(x, chunk_num, dim=-2):
            y = self.layernorm1(chunk)
            a = self.linear_no_bias_a(y)
            a = F.silu(a, True)
            b = self.linear_no_bias_b(y)
            b *= a
            b = self.linear_no_bias(b)
            outputs[start:start + b.shape[0]] = b
            start += b.shape[0]
        return outputs.reshape(*other_dims, self.c_in)


class PXAdaptiveLayerNorm(nn.Module):
    """Protenix-style adaptive layer norm (AF3 Alg. 26).

    Style: Protenix ``modules/primitives.AdaptiveLayerNorm``. Spelling: ``nn.LayerNorm(c_a,
    elementwise_affine=False)`` on ``a``, ``nn.LayerNorm(c_s, bias=False)`` on ``s``, then
    ``torch.sigmoid(linear_s(s)) * a + linear_nobias_s(s)`` (sigmoid gating plus shift).
    """

    def __init__(self, c_a: int = 16, c_s: int = 8):
        super().__init__()
        self.layernorm_a = nn.LayerNorm(c_a, elementwise_affine=False)
        self.layernorm_s = nn.LayerNorm(c_s, bias=False)
        self.linear_s = nn.Linear(c_s, c_a)
        self.linear_nobias_s = nn.Linear(c_s, c_a, bias=False)

    def forward(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        a = self.layernorm_a(a)
        s = self.layernorm_s(s)
        return torch.sigmoid(self.linear_s(s)) * a + self.linear_nobias_s(s)


class PXLayerNormByHand(nn.Module):
    """A layer norm with Protenix's ``OpenFoldLayerNorm`` interface, its body written out by hand.

    Style: Protenix ``modules/primitives``/``triangular/layers.OpenFoldLayerNorm`` parameters
    (``weight``, ``bias``, ``eps = 1e-5``) followed by a bias-free ``LinearNoBias``, with the
    normalisation spelled out as plain PyTorch code commonly does (Protenix itself calls
    ``F.layer_norm`` or a fused kernel). Spelling: ``spelling`` picks one of ``"rsqrt"``:
    ``mean = x.mean(dim=-1, keepdim=True)``, ``var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)``
    (the biased variance), ``(x - mean) * torch.rsqrt(var + eps) * weight + bias``; ``"var_sqrt"``:
    ``x.var(dim=-1, keepdim=True, unbiased=False)`` and ``(x - mean) / torch.sqrt(var + eps)``;
    ``"pow_mean"``: ``(x - mean).pow(2).mean(-1, keepdim=True)`` and ``weight * ((x - mean) /
    (var + eps).sqrt()) + bias``. The math of a layer norm: a rule matching by math takes it (the
    near misses ``NMRMSNorm``, ``NMUnbiasedVarianceNorm`` and ``NMEpsOutsideRoot`` are the ones
    it must not take).
    """

    SPELLINGS = ("rsqrt", "var_sqrt", "pow_mean")

    def __init__(self, c: int = 16, eps: float = 1e-5, spelling: str = "rsqrt"):
        super().__init__()
        assert spelling in self.SPELLINGS
        self.spelling = spelling
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.linear_no_bias = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        if self.spelling == "rsqrt":
            var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
            y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        elif self.spelling == "var_sqrt":
            var = x.var(dim=-1, keepdim=True, unbiased=False)
            y = (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias
        else:
            centred = x - mean
            var = centred.pow(2).mean(-1, keepdim=True)
            y = self.weight * (centred / (var + self.eps).sqrt()) + self.bias
        return self.linear_no_bias(y)
