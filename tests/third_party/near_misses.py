"""Near misses: modules that look like a fusion rule's pattern but compute something else.

A rule that matched one of these would change the function. Each module says, in its
docstring, which rule family must refuse it and why, and has a ``misread(*inputs)``
method computing what the model would return if that rule HAD matched (the function the
look-alike pattern denotes); the corpus tests check that ``misread`` really differs from
``forward``, so every near miss is a real trap and not a pattern in disguise.

They are written in the same AlphaFold-family style as the rest of the corpus (the
Protenix/OpenFold ``_prep_qkv`` skeleton, pair biases, additive ``inf * (mask - 1)`` masks),
the way a user's variant of such code would look. Rule families: ``attention``,
``layer_norm``, ``softmax`` (biased / masked softmax outside an attention),
``elementwise`` (chains such as bias + dropout + residual and sigmoid gating) and
``triangle_multiplication`` (the triangle multiplicative update).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .openfold_style import flatten_final_dims, permute_final_dims

__all__ = [
    "NMSoftmaxOverQueries", "NMMaskAfterSoftmax", "NMBiasAfterSoftmax", "NMPerPositionScale",
    "NMValueOverQueries", "NMRMSNorm", "NMUnbiasedVarianceNorm", "NMSoftmaxSumOverOtherDim",
    "NMSoftmaxBiasAfter", "NMDropPathNoRescale", "NMChainThroughLinear", "NMEpsOutsideRoot", "NMSoftMaskFill",
    "NMNanCleanUpToUniform", "NMTriangleProductOverOtherIndex",
]


class _PairBiasAttentionBase(nn.Module):
    """Shared skeleton: LN, projections to heads, pair bias from LN(z), key mask, gate, output.

    Subclasses override ``_combine(q, k, v, pair_bias, mask_bias, mask)`` (``q`` already scaled); the
    base ``_combine`` is the real attention, which ``misread`` uses.
    """

    def __init__(self, c: int = 16, c_z: int = 16, n_heads: int = 2, inf: float = 1e9):
        super().__init__()
        self.n_heads = n_heads
        self.c_hidden = c // n_heads
        self.inf = inf
        self.layer_norm = nn.LayerNorm(c)
        self.layer_norm_z = nn.LayerNorm(c_z)
        self.linear_z = nn.Linear(c_z, n_heads, bias=False)
        self.linear_q = nn.Linear(c, c, bias=False)
        self.linear_k = nn.Linear(c, c, bias=False)
        self.linear_v = nn.Linear(c, c, bias=False)
        self.linear_g = nn.Linear(c, c)
        self.linear_o = nn.Linear(c, c)

    def _heads(self, t):
        return t.view(t.shape[:-1] + (self.n_heads, -1)).transpose(-2, -3)

    def _attention(self, q, k, v, pair_bias, mask_bias, mask=None):
        a = torch.matmul(q, k.transpose(-1, -2)) + pair_bias + mask_bias
        return torch.matmul(torch.softmax(a, dim=-1), v)

    def _combine(self, q, k, v, pair_bias, mask_bias, mask):
        return self._attention(q, k, v, pair_bias, mask_bias)

    def _run(self, x, z, mask, combine):
        x = self.layer_norm(x)
        q = self._heads(self.linear_q(x)) / math.sqrt(self.c_hidden)
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        pair_bias = permute_final_dims(self.linear_z(self.layer_norm_z(z)), (2, 0, 1))  # [B, H, N, N]
        mask_bias = (self.inf * (mask - 1))[:, None, None, :]
        o = combine(q, k, v, pair_bias, mask_bias, mask).transpose(-2, -3)
        o = torch.sigmoid(self.linear_g(x)).view(o.shape) * o
        return self.linear_o(flatten_final_dims(o, 2))

    def forward(self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._run(x, z, mask, self._combine)

    def misread(self, x, z, mask):
        return self._run(x, z, mask, self._attention)


# ----------------------------------------------------------------------------- attention


class NMSoftmaxOverQueries(_PairBiasAttentionBase):
    """Near miss (attention must refuse): the softmax runs over the QUERY dim (``dim=-2``).

    Style: OpenFold/Protenix pair-bias attention skeleton. Spelling: ``torch.softmax(a, dim=-2)``
    on logits ``[B, H, Q, K]``; the weights then multiply ``v`` as usual. Weights sum to one
    over queries, not keys: no attention. (A biased-softmax rule may still take the softmax
    itself, over dim -2.)
    """

    def _combine(self, q, k, v, pair_bias, mask_bias, mask):
        a = torch.matmul(q, k.transpose(-1, -2)) + pair_bias + mask_bias
        return torch.matmul(torch.softmax(a, dim=-2), v)


class NMMaskAfterSoftmax(_PairBiasAttentionBase):
    """Near miss (attention must refuse): the key mask multiplies the weights AFTER the softmax.

    Style: pair-bias attention skeleton. Spelling: ``softmax(qk + pair_bias) * mask[:, None,
    None, :]`` with no renormalisation, so rows no longer sum to one; a masked attention
    (mask as logit bias before the softmax) computes something else.
    """

    def _combine(self, q, k, v, pair_bias, mask_bias, mask):
        w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + pair_bias, dim=-1) * mask[:, None, None, :]
        return torch.matmul(w, v)


class NMBiasAfterSoftmax(_PairBiasAttentionBase):
    """Near miss (attention must refuse): the pair bias is added AFTER the softmax.

    Style: pair-bias attention skeleton. Spelling: ``(softmax(qk + mask_bias) + pair_bias) @ v``.
    """

    def _combine(self, q, k, v, pair_bias, mask_bias, mask):
        w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + mask_bias, dim=-1) + pair_bias
        return torch.matmul(w, v)


class NMPerPositionScale(_PairBiasAttentionBase):
    """Near miss (attention must refuse): the logit scale is a LEARNED tensor varying per (query, key).

    Style: pair-bias attention skeleton. Spelling: ``(q @ k.T) * self.logit_scale`` with a
    Parameter ``[N, N]`` (not a scalar, not separable into per-query or per-key factors that
    could be folded into ``q`` or ``k``). ``misread`` uses its mean as the one scalar scale a
    rule might take.
    """

    def __init__(self, c: int = 16, c_z: int = 16, n_heads: int = 2, n: int = 11):
        super().__init__(c, c_z, n_heads)
        self.logit_scale = nn.Parameter(1.0 + 0.5 * torch.randn(n, n))

    def _combine(self, q, k, v, pair_bias, mask_bias, mask):
        a = torch.matmul(q, k.transpose(-1, -2)) * self.logit_scale + pair_bias + mask_bias
        return torch.matmul(torch.softmax(a, dim=-1), v)

    def misread(self, x, z, mask):
        def scalar_scaled(q, k, v, pair_bias, mask_bias, mask):
            return self._attention(q * self.logit_scale.mean(), k, v, pair_bias, mask_bias)

        return self._run(x, z, mask, scalar_scaled)


class NMValueOverQueries(_PairBiasAttentionBase):
    """Near miss (attention must refuse): the value product contracts over QUERIES, not keys.

    Style: pair-bias attention skeleton. Spelling: ``einsum("bhqk,bhqd->bhkd", softmax(...), v)``:
    the softmax normalises over keys ``k`` but ``v`` is indexed by the query sequence, so the
    value is not the key's sequence (possible only because Q and K have the same length).
    """

    def _combine(self, q, k, v, pair_bias, mask_bias, mask):
        w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + pair_bias + mask_bias, dim=-1)
        return torch.einsum("bhqk,bhqd->bhkd", w, v)


# ----------------------------------------------------------------------------- layer norm


class _NormThenProject(nn.Module):
    def __init__(self, c: int = 16, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(c))
        self.bias = nn.Parameter(0.1 * torch.randn(c))
        self.linear = nn.Linear(c, c)

    def misread(self, x):
        return self.linear(F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps))


class NMRMSNorm(_NormThenProject):
    """Near miss (layer_norm must refuse): an RMS norm, no mean subtraction.

    Style: hand-written normalisation as in AF3-family code that rolls its own norms.
    Spelling: ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight + bias``.
    The example inputs have a non-zero mean per row, so it differs from a layer norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias
        return self.linear(y)


class NMUnbiasedVarianceNorm(_NormThenProject):
    """Near miss (layer_norm must refuse): mean subtracted but the variance is UNBIASED (``/ (c - 1)``).

    Style: hand-written layer norm. Spelling: ``(x - x.mean(-1, keepdim=True)) /
    torch.sqrt(x.var(-1, keepdim=True) + eps) * weight + bias`` - ``Tensor.var`` defaults to
    Bessel's correction, a layer norm divides by ``c``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(x.var(-1, keepdim=True) + self.eps) * self.weight + self.bias
        return self.linear(y)


class NMEpsOutsideRoot(_NormThenProject):
    """Near miss (layer_norm must refuse): ``eps`` added OUTSIDE the square root.

    Style: hand-written layer norm. Spelling: ``(x - mu) / (torch.sqrt(((x - mu) ** 2).mean(-1,
    keepdim=True)) + eps) * weight + bias``: the biased variance, but ``sqrt(var) + eps`` is not
    ``sqrt(var + eps)``. (``eps = 0.1`` here so that the two differ visibly on the example inputs;
    a rule must refuse it for any eps.)
    """

    def __init__(self, c: int = 16, eps: float = 0.1):
        super().__init__(c, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / (torch.sqrt(var) + self.eps) * self.weight + self.bias
        return self.linear(y)


class _BoolMaskAttentionBase(nn.Module):
    """LN, projections to heads, a boolean key mask ``[B, N]`` (True = attend), output projection."""

    def __init__(self, c: int = 16, n_heads: int = 2):
        super().__init__()
        self.n_heads = n_heads
        self.layer_norm = nn.LayerNorm(c)
        self.linear_q = nn.Linear(c, c, bias=False)
        self.linear_k = nn.Linear(c, c, bias=False)
        self.linear_v = nn.Linear(c, c, bias=False)
        self.linear_o = nn.Linear(c, c)

    def _heads(self, t):
        return t.view(t.shape[:-1] + (self.n_heads, -1)).transpose(-2, -3)

    def _run(self, x, mask, weights):
        x = self.layer_norm(x)
        q = self._heads(self.linear_q(x))
        q = q / math.sqrt(q.shape[-1])
        k, v = self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        w = weights(q @ k.transpose(-1, -2), mask[:, None, None, :])
        return self.linear_o(flatten_final_dims((w @ v).transpose(-2, -3), 2))


class NMSoftMaskFill(_BoolMaskAttentionBase):
    """Near miss (attention must refuse): a boolean mask filled with a FINITE value, -2.

    Style: AF3-style boolean-mask attention on the Protenix skeleton. Spelling:
    ``torch.where(mask, logits, torch.tensor(-2.0))`` (a 0-dim tensor built in forward): masked
    keys get logit -2 and keep weight; only ``-inf`` or the dtype's lowest value remove them.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._run(x, mask, lambda a, m: F.softmax(torch.where(m, a, torch.tensor(-2.0)), dim=-1))

    def misread(self, x, mask):
        return self._run(x, mask, lambda a, m: F.softmax(a.masked_fill(~m, float("-inf")), dim=-1))


class NMNanCleanUpToUniform(_BoolMaskAttentionBase):
    """Near miss (attention must refuse to fold the clean-up): NaN weights become 1/N, not 0.

    Style: AF3-style boolean-mask attention on the Protenix skeleton, with a padded batch entry.
    Spelling: ``w = F.softmax(logits.masked_fill(~mask, -inf), -1)`` then
    ``torch.nan_to_num(w, nan=1.0 / w.shape[-1])``: a row that keeps no key averages v uniformly.
    Folding it as the kernel's 0 for such rows (the ``nan=0`` clean-up) changes those rows.
    """

    def _weights(self, nan: Optional[float]):
        def weights(a, m):
            w = F.softmax(a.masked_fill(~m, float("-inf")), dim=-1)
            return torch.nan_to_num(w, nan=1.0 / w.shape[-1] if nan is None else nan)
        return weights

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._run(x, mask, self._weights(None))

    def misread(self, x, mask):
        return self._run(x, mask, self._weights(0.0))


# ----------------------------------------------------------------------------- softmax


class NMSoftmaxSumOverOtherDim(nn.Module):
    """Near miss (softmax must refuse): a hand-written softmax whose sum runs over another dim.

    Style: the pair-weighted-averaging weights of AF3-style code (a softmax of a pair bias in
    the ``[B, i, j, h]`` layout), spelled by hand. Spelling:
    ``e = torch.exp(s - s.amax(-2, keepdim=True)); w = e / e.sum(-3, keepdim=True)`` - the max
    is taken over ``j`` but the normaliser sums over ``i``. Not a softmax over any one dim.
    """

    def __init__(self, c_z: int = 16, n_heads: int = 2, c_m: int = 16):
        super().__init__()
        self.n_heads = n_heads
        self.layer_norm_z = nn.LayerNorm(c_z)
        self.linear_z = nn.Linear(c_z, n_heads, bias=False)
        self.linear_v = nn.Linear(c_m, c_m, bias=False)

    def _apply(self, w, m):
        v = self.linear_v(m).view(m.shape[:-1] + (self.n_heads, -1))  # [B, S, j, h, c]
        return torch.einsum("bijh,bsjhc->bsihc", w, v).flatten(-2)

    def forward(self, m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        s = self.linear_z(self.layer_norm_z(z))  # [B, i, j, h]
        e = torch.exp(s - s.amax(-2, keepdim=True))
        return self._apply(e / e.sum(-3, keepdim=True), m)

    def misread(self, m, z):
        return self._apply(torch.softmax(self.linear_z(self.layer_norm_z(z)), dim=-2), m)


class NMSoftmaxBiasAfter(nn.Module):
    """Near miss (softmax must refuse to take the bias): the bias is added AFTER the softmax.

    Style: a Protenix-like weighted average over a pair bias. Spelling:
    ``w = F.softmax(b + mask_bias, dim=-2) + self.prior`` with a learned additive prior
    ``[j, h]``: the softmax (with its mask bias) may be fused, but ``prior`` must not be taken
    as a pre-softmax bias.
    """

    def __init__(self, c_z: int = 16, n_heads: int = 2, c_m: int = 16, n: int = 11, inf: float = 1e9):
        super().__init__()
        self.n_heads = n_heads
        self.inf = inf
        self.layer_norm_z = nn.LayerNorm(c_z)
        self.linear_z = nn.Linear(c_z, n_heads, bias=False)
        self.prior = nn.Parameter(0.1 * torch.randn(n, n_heads))
        self.linear_v = nn.Linear(c_m, c_m, bias=False)

    def _run(self, m, z, mask, prior_inside: bool):
        b = self.linear_z(self.layer_norm_z(z)) + (self.inf * (mask - 1))[:, None, :, None]
        w = F.softmax(b + self.prior, dim=-2) if prior_inside else F.softmax(b, dim=-2) + self.prior
        v = self.linear_v(m).view(m.shape[:-1] + (self.n_heads, -1))
        return torch.einsum("bijh,bsjhc->bsihc", w, v).flatten(-2)

    def forward(self, m: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._run(m, z, mask, prior_inside=False)

    def misread(self, m, z, mask):
        return self._run(m, z, mask, prior_inside=True)


# ----------------------------------------------------------------------------- element-wise


class NMDropPathNoRescale(nn.Module):
    """Near miss (elementwise dropout rule must refuse): drop-path WITHOUT the ``1 / keep`` rescale.

    Style: Protenix ``DropPath(scale_by_keep=False)`` around a gated update with bias and
    residual. Spelling: ``keep = x.new_empty(shape).bernoulli_(1 - p)`` (one draw per sample),
    ``x + update * keep`` with no ``div_(1 - p)``. A bias + dropout + residual rule that
    recognises this as dropout would insert the rescale; a generic element-wise fusion of
    the same ops is fine.
    """

    def __init__(self, c: int = 16, p: float = 0.3):
        super().__init__()
        self.p = p
        self.linear = nn.Linear(c, c)
        self.gate = nn.Linear(c, c)

    def _update(self, x):
        return torch.sigmoid(self.gate(x)) * self.linear(x)

    def _keep(self, x):
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x.new_empty(shape).bernoulli_(1 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x + self._update(x)
        return x + self._update(x) * self._keep(x)

    def misread(self, x):
        if not self.training:
            return x + self._update(x)
        return x + self._update(x) * self._keep(x).div_(1 - self.p)


class NMChainThroughLinear(nn.Module):
    """Near miss (elementwise grouping must refuse to merge): a chain that runs THROUGH a linear.

    Style: an OpenFold-like gated residual. Spelling: ``h = x + self.bias`` feeds both
    ``self.linear(h)`` and the gate product ``h * torch.sigmoid(self.linear(h))``: the add and
    the product are element-wise, but one kernel holding both would need the linear's result
    inside itself (a cycle through an unfused node). Two groups are right; one is not. The
    function is the same either way (no ``misread``): the check is on the grouping.
    """

    def __init__(self, c: int = 16):
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(c))
        self.linear = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.bias
        return h * torch.sigmoid(self.linear(h))

    misread: Optional[object] = None


class NMTriangleProductOverOtherIndex(nn.Module):
    """Near miss (triangle_multiplication must refuse): the "triangle product" sums over the other index.

    Style: an OpenFold-like triangle multiplicative update (LN, masked sigmoid-gated projections
    ``a`` and ``b``, LN of the product, output projection gated by ``sigmoid(linear(LN(z)))``).
    Spelling: the product is ``einsum("...ikc,...kjc->...ijc", a, b)``: ``Σ_k a_ik b_kj``, a per-channel
    matrix product of the two pair maps, neither outgoing (``Σ_k a_ik b_jk``) nor incoming
    (``Σ_k a_ki b_kj``). ``misread`` is the outgoing update with the same parameters.
    """

    def __init__(self, c_z: int = 16, c_hidden: int = 8):
        super().__init__()
        self.layer_norm_in, self.layer_norm_out = nn.LayerNorm(c_z), nn.LayerNorm(c_hidden)
        self.linear_a_p, self.linear_a_g = nn.Linear(c_z, c_hidden), nn.Linear(c_z, c_hidden)
        self.linear_b_p, self.linear_b_g = nn.Linear(c_z, c_hidden), nn.Linear(c_z, c_hidden)
        self.linear_g, self.linear_z = nn.Linear(c_z, c_z), nn.Linear(c_hidden, c_z)

    def _update(self, z: torch.Tensor, mask: torch.Tensor, equation: str) -> torch.Tensor:
        m = mask.unsqueeze(-1)
        z = self.layer_norm_in(z)
        a = m * torch.sigmoid(self.linear_a_g(z)) * self.linear_a_p(z)
        b = m * torch.sigmoid(self.linear_b_g(z)) * self.linear_b_p(z)
        x = self.layer_norm_out(torch.einsum(equation, a, b))
        return torch.sigmoid(self.linear_g(z)) * self.linear_z(x)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._update(z, mask, "...ikc,...kjc->...ijc")

    def misread(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._update(z, mask, "...ikc,...jkc->...ijc")
