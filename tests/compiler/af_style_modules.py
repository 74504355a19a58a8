"""Small modules written the way open-source AlphaFold code is written, one construct each.

Every construct here is something ``torch.fx.symbolic_trace`` rejects or, worse,
gets silently wrong (see PITFALLS.md). The helpers mimic the utilities such code
bases carry (``permute_final_dims``, ``flatten_final_dims``, a ``chunk_layer``
that loops over a size, an einops-style ``rearrange`` indexing by ``ndim``);
they are written here from their descriptions, not copied.

``EvoformerishBlock`` mixes them all, as a real block does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn


# ------------------------------------------------------------------ helpers in the style of AF code bases


def permute_final_dims(tensor: torch.Tensor, inds: list[int]) -> torch.Tensor:
    """Permute the last ``len(inds)`` dims, keeping the leading ones (uses ``len(x.shape)``)."""
    zero_index = -1 * len(inds)
    first_inds = list(range(len(tensor.shape[:zero_index])))
    return tensor.permute(first_inds + [zero_index + i for i in inds])


def flatten_final_dims(t: torch.Tensor, no_dims: int) -> torch.Tensor:
    """Merge the last ``no_dims`` dims (uses ``list(x.shape)``)."""
    return t.reshape(list(t.shape[:-no_dims]) + [-1])


def chunk_rows(fn, x: torch.Tensor, chunk_size: int, dim: int = -3) -> torch.Tensor:
    """Apply ``fn`` on slices of ``x`` along ``dim`` and concatenate (a chunking helper)."""
    if type(x) is not torch.Tensor and not isinstance(x, torch.Tensor):
        raise TypeError("chunk_rows expects a tensor")
    outs = []
    for i in range(0, x.shape[dim], chunk_size):
        sl = [slice(None)] * len(x.shape)
        sl[dim] = slice(i, min(i + chunk_size, x.shape[dim]))
        outs.append(fn(x[tuple(sl)]))
    return torch.cat(outs, dim=dim)


def rearrange_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``'... n (h d) -> ... h n d'`` the einops way: the pattern is resolved from ``x.ndim``."""
    ndim = x.ndim
    *batch, n, hd = x.shape
    x = x.view(*batch, n, heads, hd // heads)
    order = list(range(ndim - 2)) + [ndim - 1, ndim - 2, ndim]
    return x.permute(*order)


# ------------------------------------------------------------------ one construct each


class FlagIf(nn.Module):
    """Python flags in ``if`` and a conditional expression on a flag."""

    def __init__(self, c: int = 8, gated: bool = True, mask_trans: bool = False):
        super().__init__()
        self.gated = gated
        self._mask_trans = mask_trans
        self.linear = nn.Linear(c, c)
        self.gate = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask if self._mask_trans else None
        y = self.linear(x)
        if self.gated:
            y = y * torch.sigmoid(self.gate(x))
        if m is not None:
            y = y * m[..., None]
        return y


class OptionalMaskAttention(nn.Module):
    """Attention with ``mask=None`` and ``bias=None`` defaults, scaled by ``1/sqrt(c)``."""

    def __init__(self, c: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.c = c // heads
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.o = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        q = rearrange_heads(self.q(x), self.heads) / math.sqrt(self.c)
        k = rearrange_heads(self.k(x), self.heads)
        v = rearrange_heads(self.v(x), self.heads)
        a = q @ k.transpose(-1, -2)
        if mask is not None:
            a = a + (1e9 * (mask - 1))[..., None, None, :]
        if bias is not None:
            a = a + bias
        a = torch.softmax(a, dim=-1)
        o = torch.matmul(a, v)
        return self.o(flatten_final_dims(permute_final_dims(o, [1, 0, 2]), 2))


class ChunkLoop(nn.Module):
    """``for i in range(0, z.shape[-3], chunk)``: slice, compute, concatenate."""

    def __init__(self, c: int = 8, chunk_size: int = 2):
        super().__init__()
        self.chunk_size = chunk_size
        self.ln = nn.LayerNorm(c)
        self.proj = nn.Linear(c, c)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return chunk_rows(lambda t: self.proj(self.ln(t)).relu(), z, self.chunk_size)


class PermuteHelper(nn.Module):
    """``len(x.shape)`` and ``list(x.shape)`` in permute/flatten helpers around an einsum."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a = nn.Linear(c, c)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = permute_final_dims(self.a(z), [2, 0, 1])  # [*, c, i, k]
        p = torch.einsum("...cik,...cjk->...cij", a, a)
        return flatten_final_dims(permute_final_dims(p, [1, 2, 0]), 1)


class DtypeBranch(nn.Module):
    """``if x.dtype is torch.bfloat16`` with an ``autocast(enabled=False)`` fp32 island."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a = nn.Linear(c, c)
        self.b = nn.Linear(c, c)
        self.out = nn.Linear(c, c)

    def _combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ikc,...jkc->...ijc", a, b)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = self.a(z)
        b = self.b(z)
        if a.dtype is torch.bfloat16:
            with torch.autocast(device_type=z.device.type, enabled=False):
                x = self._combine(a.float(), b.float())
        else:
            x = self._combine(a, b)
        return self.out(x)


class Checkpointed(nn.Module):
    """Blocks run under ``torch.utils.checkpoint.checkpoint`` (recomputed in backward)."""

    def __init__(self, c: int = 8, n_blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.GELU()) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if torch.is_grad_enabled():
                x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return x


class TrainingBranch(nn.Module):
    """``if self.training``: row-wise dropout with a mask shared along dim -3."""

    def __init__(self, c: int = 8, p: float = 0.25):
        super().__init__()
        self.p = p
        self.lin = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.training:
            shape = list(y.shape)
            shape[-3] = 1
            keep = torch.bernoulli(y.new_full(shape, 1.0 - self.p))
            y = y * keep / (1.0 - self.p)
        return x + y


# ------------------------------------------------------------------ the mixed block


class _RowAttentionWithPairBias(nn.Module):
    def __init__(self, c_m: int, c_z: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_m = nn.LayerNorm(c_m)
        self.ln_z = nn.LayerNorm(c_z)
        self.bias = nn.Linear(c_z, heads, bias=False)
        self.att = OptionalMaskAttention(c_m, heads)

    def forward(self, m, z, mask=None):
        b = permute_final_dims(self.bias(self.ln_z(z)), [2, 0, 1])  # [h, i, j]
        return self.att(self.ln_m(m), mask=mask, bias=b.unsqueeze(-4))


class _OuterProductMean(nn.Module):
    def __init__(self, c_m: int, c_z: int, c_hidden: int = 4, chunk_size: Optional[int] = None):
        super().__init__()
        self.chunk_size = chunk_size
        self.ln = nn.LayerNorm(c_m)
        self.a = nn.Linear(c_m, c_hidden)
        self.b = nn.Linear(c_m, c_hidden)
        self.out = nn.Linear(c_hidden * c_hidden, c_z)

    def _opm(self, a, b):
        outer = torch.einsum("...bac,...dae->...bdce", a, b)
        return self.out(flatten_final_dims(outer, 2))

    def forward(self, m, mask=None):
        if mask is None:
            mask = m.new_ones(m.shape[:-1])
        ln = self.ln(m)
        a = self.a(ln) * mask.unsqueeze(-1)
        b = self.b(ln) * mask.unsqueeze(-1)
        a = a.transpose(-2, -3)  # [i, s, c]
        b = b.transpose(-2, -3)
        if self.chunk_size is not None:
            out = chunk_rows(lambda t: self._opm(t, b), a, self.chunk_size, dim=-3)
        else:
            out = self._opm(a, b)
        norm = torch.einsum("...abc,...adc->...bdc", mask[..., None], mask[..., None])
        return out / (norm + 1e-3)


class EvoformerishBlock(nn.Module):
    """An Evoformer-like block using every construct above at once."""

    def __init__(self, c_m: int = 8, c_z: int = 6, heads: int = 2, chunk_size: Optional[int] = 3,
                 use_checkpoint: bool = True, p_drop: float = 0.25):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.p_drop = p_drop
        self.row_att = _RowAttentionWithPairBias(c_m, c_z, heads)
        self.opm = _OuterProductMean(c_m, c_z, chunk_size=chunk_size)
        self.tri = DtypeBranch(c_z)
        self.transition = nn.Sequential(nn.LayerNorm(c_m), nn.Linear(c_m, 2 * c_m), nn.ReLU(), nn.Linear(2 * c_m, c_m))

    def _dropout_rowwise(self, x):
        if not self.training or self.p_drop == 0.0:
            return x
        shape = list(x.shape)
        shape[-3] = 1
        return x * torch.bernoulli(x.new_full(shape, 1.0 - self.p_drop)) / (1.0 - self.p_drop)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                return_pair: bool = True):
        m = m + self._dropout_rowwise(self.row_att(m, z, mask=msa_mask))
        if self.use_checkpoint and torch.is_grad_enabled():
            m = m + torch.utils.checkpoint.checkpoint(self.transition, m, use_reentrant=False)
        else:
            m = m + self.transition(m)
        z = z + self.opm(m, mask=msa_mask)
        z = z + self.tri(z)
        if len(z.shape) == 3 and z.shape[-3] > 4:
            z = z * 0.5
        return (m, z) if return_pair else m


# ------------------------------------------------------------------ what cannot be one graph


class DataDependentIf(nn.Module):
    """Python ``if`` on a tensor value: not capturable as one graph."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if y.sum() > 0:
            return y * 2
        return y


class ItemLoop(nn.Module):
    """``.item()`` feeding a Python loop: not capturable as one graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = int(x.abs().max().item()) + 1
        for _ in range(steps):
            x = x * 0.5
        return x
