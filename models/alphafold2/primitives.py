"""Building blocks shared by every AlphaFold 2 module.

AlphaFold 2 (supplementary information, section 1.11.4) initialises its linear
layers in one of a few ways; the layer carries the scheme by name so a module
reads like the paper: ``Linear(c_m, c_z, init="final")``.

  default  LeCun (fan-in) truncated normal, bias 0
  relu     He truncated normal, bias 0 (layers followed by ReLU)
  glorot   Glorot uniform, bias 0 (attention query/key/value)
  gating   weights 0, bias 1 (sigmoid gates start open)
  final    weights 0, bias 0 (the last layer of every residual update)

Note that ``final`` makes every residual update vanish at initialisation, exactly
as in the paper; ``foldcompile.models.zoo`` re-randomises all parameters so that
comparisons between implementations see every path.
"""
from __future__ import annotations

import math

import torch
from torch import nn

LayerNorm = nn.LayerNorm


def mask_inf(dtype: torch.dtype) -> float:
    """The large constant that turns a 0/1 mask into an additive logit bias.

    AlphaFold 2's code uses 1e9 (float32, bfloat16 and float64 hold it). float16
    does not (its largest finite value is 65504): 1e9 would become -inf, and a
    row whose keys are all masked (a padded query) would give NaN, which then
    spreads to real residues through ``0 * NaN``. For float16 we take 3e4, as
    Uni-Fold does: finite, and still large enough that ``exp(-3e4)`` is exactly 0.
    """
    return 3e4 if dtype == torch.float16 else 1e9


def cast_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask (bool or any float dtype) in ``x``'s dtype; ones of ``x.shape[:-1]`` if None.

    Every public module that takes a mask calls this on entry, so a float32 or
    bool mask works with bfloat16/float16 activations (mixing them would promote
    the activations to float32, or fail on ``bool - 1``).
    """
    if mask is None:
        return x.new_ones(x.shape[:-1])
    return mask.to(dtype=x.dtype)


def _trunc_normal_(weight: torch.Tensor, scale: float) -> None:
    fan_in = weight.shape[1]
    # std of a standard normal truncated to [-2, 2] is 0.87962566103423978
    std = math.sqrt(scale / max(1, fan_in)) / 0.87962566103423978
    with torch.no_grad():
        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class Linear(nn.Linear):
    """``nn.Linear`` with AlphaFold 2's initialisation schemes (suppl. 1.11.4)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = "default"):
        self.init_scheme = init
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        init = getattr(self, "init_scheme", "default")
        if init == "default":
            _trunc_normal_(self.weight, 1.0)
        elif init == "relu":
            _trunc_normal_(self.weight, 2.0)
        elif init == "glorot":
            nn.init.xavier_uniform_(self.weight)
        elif init == "gating":
            nn.init.zeros_(self.weight)
        elif init == "final":
            nn.init.zeros_(self.weight)
        else:
            raise ValueError(f"unknown init scheme {init!r}; use default, relu, glorot, gating or final")
        if self.bias is not None:
            with torch.no_grad():
                self.bias.fill_(1.0 if init == "gating" else 0.0)


def dropout_rowwise(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask shared along dim -3 (suppl. 1.11.6, "DropoutRowwise").

    For an MSA update ``[*, N_seq, N_res, c]`` the mask is drawn per (residue,
    channel) and shared by every sequence row; for a pair update it is shared
    along the first residue dim.
    """
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shape[-3] = 1
    keep = torch.bernoulli(torch.full(shape, 1.0 - p, dtype=x.dtype, device=x.device))
    return x * keep / (1.0 - p)


def dropout_columnwise(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask shared along dim -2 ("DropoutColumnwise")."""
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shape[-2] = 1
    keep = torch.bernoulli(torch.full(shape, 1.0 - p, dtype=x.dtype, device=x.device))
    return x * keep / (1.0 - p)
