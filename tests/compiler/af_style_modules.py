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


# ------------------------------------------------------------------ generated modules (property tests)
#
# ``Generated(spec)`` is one AF-style module per ``GenSpec``: a stack of blocks (linear, layer norm,
# attention with an optional additive mask, sigmoid gating behind a flag, a chunk loop over rows,
# in-place updates of an intermediate, a buffer), its input packed in a dict, list, tuple or bare,
# its output packed likewise, and at most one Python side effect. ``tests/compiler/
# test_capture_properties.py`` draws the specs; ``REFUSED_EFFECTS`` are those a capture must refuse
# (the graph cannot repeat them), the others it must capture and repeat exactly.

import collections
import dataclasses as _dc

GEN_LOG: list = []          # a module-level list a generated forward may append to
GEN_SCALE = 0.5             # a module-level constant a generated forward may read

BLOCKS = ("linear", "layer_norm", "attention", "gated", "chunk", "inplace", "buffer", "dropout")
CONTAINERS = ("bare", "dict", "list", "tuple")
EFFECTS = ("none", "write_argument", "append_global", "helper_global", "class_attribute", "deque_append",
           "module_attribute", "buffer_inplace", "input_inplace", "read_global", "local_container")
REFUSED_EFFECTS = frozenset({"write_argument", "append_global", "helper_global", "class_attribute", "deque_append",
                             "module_attribute"})


def _note_call() -> None:
    """A helper that writes a global: no module's ``forward`` names GEN_LOG here."""
    GEN_LOG.append("helper")


@_dc.dataclass(frozen=True)
class GenSpec:
    blocks: tuple[str, ...]
    container: str = "bare"
    output: str = "tensor"          # tensor, tuple, dict, list
    effect: str = "none"
    masked: bool = False
    gated: bool = True              # the flag the "gated" block branches on
    chunk: int = 2
    c: int = 8
    n: tuple[int, int] = (3, 5)     # (rows, columns) of the [rows, columns, c] input
    dtype: torch.dtype = torch.float32
    training: bool = False          # dropout blocks drop in training mode only


class _GenAttention(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(c, c, bias=False), nn.Linear(c, c, bias=False), nn.Linear(c, c)
        self.scale = 1.0 / math.sqrt(c)

    def forward(self, x, mask=None):
        a = torch.einsum("...ic,...jc->...ij", self.q(x) * self.scale, self.k(x))
        if mask is not None:
            a = a + (mask - 1.0)[..., None, :] * 1e9
        return torch.softmax(a, dim=-1) @ self.v(x)


class Generated(nn.Module):
    """One generated AF-style module (see ``GenSpec``)."""

    calls = 0  # a class attribute the "class_attribute" effect increments (tests use a fresh subclass)

    def __init__(self, spec: GenSpec):
        super().__init__()
        self.spec = spec
        c = spec.c
        self.kinds = list(spec.blocks)
        self.gated = spec.gated
        self.chunk_size = spec.chunk
        self.effect = spec.effect
        self.container = spec.container
        self.output = spec.output
        layers = []
        for kind in spec.blocks:
            if kind == "linear":
                layers.append(nn.Linear(c, c))
            elif kind == "layer_norm":
                layers.append(nn.LayerNorm(c))
            elif kind == "attention":
                layers.append(_GenAttention(c))
            elif kind in ("gated", "chunk"):
                layers.append(nn.Linear(c, c))
            elif kind == "dropout":
                layers.append(nn.Dropout(0.25))
            else:  # inplace, buffer: no parameters of their own
                layers.append(nn.Identity())
        self.layers = nn.ModuleList(layers)
        self.register_buffer("offset", torch.randn(c))
        self.register_buffer("count", torch.zeros(()))
        self.history = collections.deque(maxlen=3)
        self.to(spec.dtype)
        self.train(spec.training)

    def _unpack(self, inputs):
        if self.container == "dict":
            return inputs["x"]
        if self.container in ("list", "tuple"):
            return inputs[0]
        return inputs

    def forward(self, inputs, mask=None, state=None):
        x = self._unpack(inputs)
        if self.effect == "input_inplace":
            x.mul_(2.0)  # an in-place op on the caller's tensor: in the graph, repeated every call
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "attention":
                x = x + layer(x, mask)
            elif kind == "gated":
                if self.gated:
                    x = x * torch.sigmoid(layer(x))
            elif kind == "chunk":
                x = chunk_rows(lambda t: layer(t).relu(), x, self.chunk_size, dim=0)
            elif kind == "inplace":
                y = x * 1.0
                y.mul_(0.5)
                y.add_(self.offset)
                x = y
            elif kind == "buffer":
                x = x + self.offset
            else:
                x = layer(x)
        x = self._effect(x, inputs, state)
        return self._pack(x)

    def _effect(self, x, inputs, state):
        effect = self.effect
        if effect == "write_argument":
            if self.container == "dict":
                inputs["prev"] = x.detach()
            elif self.container == "list":
                inputs.append(x.detach())
            elif self.container == "tuple":
                inputs[1]["prev"] = x.detach()
            else:
                state["prev"] = x.detach()
        elif effect == "append_global":
            GEN_LOG.append(1)
        elif effect == "helper_global":
            _note_call()
        elif effect == "class_attribute":
            type(self).calls += 1
        elif effect == "deque_append":
            self.history.append(1)
        elif effect == "module_attribute":
            self.last = x.detach()
        elif effect == "buffer_inplace":
            self.count.add_(1.0)  # a buffer updated in place: the graph repeats it
            x = x + self.count
        elif effect == "read_global":
            x = x * GEN_SCALE + len(self.history)
        elif effect == "local_container":
            scratch = {"x": x}
            scratch["y"] = x * 2.0  # a container made in forward: writing it is no side effect
            x = scratch["y"] - scratch["x"]
        return x

    def _pack(self, x):
        if self.output == "tuple":
            return x, x.sum(-1)
        if self.output == "dict":
            return {"out": x, "aux": [x.mean(-1)]}
        if self.output == "list":
            return [x]
        return x


def generated_inputs(spec: GenSpec, gen: torch.Generator) -> tuple[tuple, dict]:
    """Example ``(args, kwargs)`` for ``Generated(spec)``: the input packed as the spec says, the
    optional mask (with a fully masked column when there are several), the ``state`` dict if needed."""
    rows, cols = spec.n
    x = torch.randn(rows, cols, spec.c, generator=gen, dtype=spec.dtype)
    if spec.container == "dict":
        inputs = {"x": x}
    elif spec.container == "list":
        inputs = [x]
    elif spec.container == "tuple":
        inputs = (x, {})
    else:
        inputs = x
    kwargs = {}
    if spec.masked:
        mask = (torch.rand(cols, generator=gen) > 0.3).to(spec.dtype)
        mask[0] = 1.0  # at least one column attended
        kwargs["mask"] = mask
    if spec.effect == "write_argument" and spec.container == "bare":
        kwargs["state"] = {}
    return (inputs,), kwargs
