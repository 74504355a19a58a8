"""The model zoo: every reference model, at a tiny size and at the papers' size.

    >>> from foldcompile.models import zoo
    >>> zoo.names()
    ['alphafold2', 'evoformer_block', 'evoformer_stack', 'extra_msa_stack', 'pairformer_block', 'pairformer_stack', 'structure_module', 'template_pair_stack']
    >>> module, inputs = zoo.get("evoformer_stack", size="tiny")
    >>> m, z, s = module(*inputs)

``get`` returns ``(module, example_inputs)`` with ``module(*example_inputs)`` runnable.
Parameters are drawn at random from ``seed`` with *non-zero* output projections:
AlphaFold zero-initialises the last layer of every residual update and its gates'
weights, which makes every update vanish at initialisation and would hide every bug
in a comparison between two implementations.

Sizes: ``"tiny"`` (a few thousand parameters, runs in milliseconds on a CPU) and
``"af2"`` (the papers' dimensions: AlphaFold 2 for the AlphaFold 2 models,
AlphaFold 3 for the Pairformer). Sequence sizes default to small values distinct
from every channel size (so a shape analysis can tell them apart) and can be set
with ``n_seq``, ``n_res``, ``n_extra`` (extra-MSA depth) and ``n_templ``; stacks
take ``n_blocks``. The example masks pad the last residue (mask 0), so examples
exercise the masking paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .alphafold2.evoformer import EvoformerBlock, EvoformerStack
from .alphafold2.extra_msa import ExtraMSAStack
from .alphafold2.model import AlphaFold2
from .alphafold2.structure_module import StructureModule
from .alphafold2.template import TemplatePairStack
from .pairformer import PairformerBlock, PairformerStack

SIZES = ("tiny", "af2")

# AlphaFold 2 (monomer) dimensions, supplementary information section 1.5-1.8.
_AF2 = dict(c_m=256, c_z=128, c_s=384, c_e=64, c_t=64, c_hidden_msa_att=32, n_heads_msa=8, c_hidden_opm=32,
            c_hidden_mul=128, c_hidden_pair_att=32, n_heads_pair=4, transition_n=4)
_TINY = dict(c_m=16, c_z=8, c_s=24, c_e=8, c_t=8, c_hidden_msa_att=4, n_heads_msa=2, c_hidden_opm=4,
             c_hidden_mul=8, c_hidden_pair_att=4, n_heads_pair=2, transition_n=2)
# AlphaFold 3 Pairformer dimensions (AF3 supplementary information, Alg. 17).
_AF3 = dict(c_s=384, c_z=128, n_heads_single=16, c_hidden_single=24, n_heads_pair=4, c_hidden_pair=32,
            c_hidden_mul=128, transition_n=4)
_AF3_TINY = dict(c_s=16, c_z=8, n_heads_single=2, c_hidden_single=4, n_heads_pair=2, c_hidden_pair=4,
                 c_hidden_mul=8, transition_n=2)

# Default sequence sizes: tiny ones distinct from the tiny channel sizes; af2 ones the
# training crop (N_seq=128, N_res=256) with AF2's extra-MSA depth and template count.
_SEQ_DEFAULTS = {"tiny": dict(n_seq=5, n_res=11, n_extra=6, n_templ=3),
                 "af2": dict(n_seq=128, n_res=256, n_extra=1024, n_templ=4)}
_BLOCK_DEFAULTS = {"tiny": dict(evoformer=2, extra=1, template=2, pairformer=2, recycle=1),
                   "af2": dict(evoformer=48, extra=4, template=2, pairformer=48, recycle=3)}


@dataclass
class _Spec:
    build: Callable[[str, dict, int | None], nn.Module]
    inputs: Callable[[str, dict, torch.Generator, torch.dtype], tuple]
    description: str


def _dims(size: str) -> dict:
    return dict(_AF2 if size == "af2" else _TINY)


def _pf_dims(size: str) -> dict:
    return dict(_AF3 if size == "af2" else _AF3_TINY)


# ----------------------------------------------------------------------------- inputs

def _randn(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _seq_mask(n_res: int, dtype: torch.dtype) -> torch.Tensor:
    """All residues real except the last one (a padded position), when there are at least 3."""
    mask = torch.ones(n_res, dtype=dtype)
    if n_res >= 3:
        mask[-1] = 0
    return mask


def _msa_mask(gen: torch.Generator, n_rows: int, n_res: int, dtype: torch.dtype) -> torch.Tensor:
    """Padded residue masked in every row; a few random gaps, never in the first (query) row."""
    mask = (torch.rand(n_rows, n_res, generator=gen) > 0.1).to(dtype)
    mask[0] = 1
    return mask * _seq_mask(n_res, dtype)


def _pair_mask(n_res: int, dtype: torch.dtype) -> torch.Tensor:
    seq = _seq_mask(n_res, dtype)
    return seq[:, None] * seq[None, :]


def _evoformer_inputs(size, s, gen, dtype):
    d = _dims(size)
    return (_randn(gen, dtype, s["n_seq"], s["n_res"], d["c_m"]), _randn(gen, dtype, s["n_res"], s["n_res"], d["c_z"]),
            _msa_mask(gen, s["n_seq"], s["n_res"], dtype), _pair_mask(s["n_res"], dtype))


def _extra_msa_inputs(size, s, gen, dtype):
    d = _dims(size)
    return (_randn(gen, dtype, s["n_extra"], s["n_res"], d["c_e"]), _randn(gen, dtype, s["n_res"], s["n_res"], d["c_z"]),
            _msa_mask(gen, s["n_extra"], s["n_res"], dtype), _pair_mask(s["n_res"], dtype))


def _template_inputs(size, s, gen, dtype):
    d = _dims(size)
    t = _randn(gen, dtype, s["n_templ"], s["n_res"], s["n_res"], d["c_t"])
    return t, _pair_mask(s["n_res"], dtype).expand(s["n_templ"], -1, -1).contiguous()


def _structure_inputs(size, s, gen, dtype):
    d = _dims(size)
    return (_randn(gen, dtype, s["n_res"], d["c_s"]), _randn(gen, dtype, s["n_res"], s["n_res"], d["c_z"]),
            _seq_mask(s["n_res"], dtype))


def _alphafold2_inputs(size, s, gen, dtype):
    n_seq, n_res, n_extra, n_templ = s["n_seq"], s["n_res"], s["n_extra"], s["n_templ"]
    # AF2's target_feat: [between_segment_residues (1), aatype one-hot (21)], residue
    # types 0..19 in AF2's order (glycine = 7, so channel 8 = model.GLYCINE_CHANNEL).
    aatype = torch.randint(0, 20, (n_res,), generator=gen)
    target_feat = torch.cat([torch.zeros(n_res, 1), nn.functional.one_hot(aatype, 21).float()], dim=-1).to(dtype)
    residue_index = torch.arange(n_res)
    msa_feat = _randn(gen, dtype, n_seq, n_res, 49)
    extra_msa_feat = _randn(gen, dtype, n_extra, n_res, 25)
    template_pair_feat = _randn(gen, dtype, n_templ, n_res, n_res, 88)
    template_angle_feat = _randn(gen, dtype, n_templ, n_res, 57)
    # Channels 50..56 are AF2's 7 torsion-angle masks, 0/1: mostly 1, a few 0. The psi
    # mask (channel 52) masks the template rows appended to the MSA.
    template_angle_feat[..., 50:] = (torch.rand(n_templ, n_res, 7, generator=gen) > 0.2).to(dtype)
    return (target_feat, residue_index, msa_feat, extra_msa_feat, template_pair_feat, template_angle_feat,
            _msa_mask(gen, n_seq, n_res, dtype), _seq_mask(n_res, dtype), _msa_mask(gen, n_extra, n_res, dtype),
            torch.ones(n_templ, dtype=dtype))


def _pairformer_inputs(size, s, gen, dtype):
    d = _pf_dims(size)
    return (_randn(gen, dtype, s["n_res"], d["c_s"]), _randn(gen, dtype, s["n_res"], s["n_res"], d["c_z"]),
            _seq_mask(s["n_res"], dtype), _pair_mask(s["n_res"], dtype))


# ----------------------------------------------------------------------------- builders

def _evoformer_kwargs(size: str) -> dict:
    d = _dims(size)
    return {k: d[k] for k in ("c_m", "c_z", "c_hidden_msa_att", "n_heads_msa", "c_hidden_opm", "c_hidden_mul",
                              "c_hidden_pair_att", "n_heads_pair", "transition_n")}


def _build_evoformer_block(size, s, n_blocks):
    return EvoformerBlock(**_evoformer_kwargs(size))


def _build_evoformer_stack(size, s, n_blocks):
    n = n_blocks or _BLOCK_DEFAULTS[size]["evoformer"]
    return EvoformerStack(n, c_s=_dims(size)["c_s"], **_evoformer_kwargs(size))


def _build_extra_msa_stack(size, s, n_blocks):
    d = _dims(size)
    n = n_blocks or _BLOCK_DEFAULTS[size]["extra"]
    if size == "af2":
        return ExtraMSAStack(n)  # AF2's extra-MSA dims are the module's defaults
    return ExtraMSAStack(n, c_e=d["c_e"], c_z=d["c_z"], c_hidden_msa_att=d["c_hidden_msa_att"],
                         n_heads_msa=d["n_heads_msa"], c_hidden_opm=d["c_hidden_opm"], c_hidden_mul=d["c_hidden_mul"],
                         c_hidden_pair_att=d["c_hidden_pair_att"], n_heads_pair=d["n_heads_pair"],
                         transition_n=d["transition_n"])


def _build_template_pair_stack(size, s, n_blocks):
    n = n_blocks or _BLOCK_DEFAULTS[size]["template"]
    if size == "af2":
        return TemplatePairStack(n)
    return TemplatePairStack(n, c_t=8, c_hidden_tri_att=4, n_heads_tri=2, c_hidden_tri_mul=8, transition_n=2)


def _build_structure_module(size, s, n_blocks):
    if size == "af2":
        return StructureModule()
    d = _dims(size)
    return StructureModule(c_s=d["c_s"], c_z=d["c_z"], c_ipa=4, n_heads_ipa=2, n_query_points=2, n_value_points=2,
                           c_resnet=8, n_layers=n_blocks or 2)


def _build_alphafold2(size, s, n_blocks):
    if size == "af2":
        return AlphaFold2(n_evoformer_blocks=n_blocks or 48)
    d = _dims(size)
    b = _BLOCK_DEFAULTS["tiny"]
    return AlphaFold2(
        n_evoformer_blocks=n_blocks or b["evoformer"], n_extra_blocks=b["extra"], n_template_blocks=1,
        n_recycle=b["recycle"], **_evoformer_kwargs(size), c_s=d["c_s"], c_e=d["c_e"], c_t=d["c_t"],
        c_hidden_extra_msa_att=4, n_heads_extra_msa=2, c_hidden_template_att=4, n_heads_template=2,
        c_hidden_template_mul=8, c_hidden_template_pointwise=4, n_heads_template_pointwise=2,
        c_ipa=4, n_heads_ipa=2, n_query_points=2, n_value_points=2, c_resnet=8, n_structure_layers=2,
        n_distogram_bins=10)


def _build_pairformer_block(size, s, n_blocks):
    return PairformerBlock(**_pf_dims(size))


def _build_pairformer_stack(size, s, n_blocks):
    return PairformerStack(n_blocks or _BLOCK_DEFAULTS[size]["pairformer"], **_pf_dims(size))


_REGISTRY: dict[str, _Spec] = {
    "evoformer_block": _Spec(_build_evoformer_block, _evoformer_inputs,
                             "AF2 Evoformer block (Alg. 6 body): (m, z, msa_mask, pair_mask) -> (m, z)"),
    "evoformer_stack": _Spec(_build_evoformer_stack, _evoformer_inputs,
                             "AF2 Evoformer stack (Alg. 6): (m, z, msa_mask, pair_mask) -> (m, z, s)"),
    "extra_msa_stack": _Spec(_build_extra_msa_stack, _extra_msa_inputs,
                             "AF2 extra MSA stack (Alg. 18): (e, z, msa_mask, pair_mask) -> z"),
    "template_pair_stack": _Spec(_build_template_pair_stack, _template_inputs,
                                 "AF2 template pair stack (Alg. 16): (t, pair_mask) -> t"),
    "structure_module": _Spec(_build_structure_module, _structure_inputs,
                              "AF2 structure module (Alg. 20): (s, z, mask) -> dict"),
    "alphafold2": _Spec(_build_alphafold2, _alphafold2_inputs,
                        "AF2 with templates, extra MSA and recycling (Alg. 2): features -> dict"),
    "pairformer_block": _Spec(_build_pairformer_block, _pairformer_inputs,
                              "AF3 Pairformer block (Alg. 17 body): (s, z, single_mask, pair_mask) -> (s, z)"),
    "pairformer_stack": _Spec(_build_pairformer_stack, _pairformer_inputs,
                              "AF3 Pairformer stack (Alg. 17): (s, z, single_mask, pair_mask) -> (s, z)"),
}


def names() -> list[str]:
    """The zoo's model names, sorted."""
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    """One line: what the model is and its call signature."""
    return _lookup(name).description


def _lookup(name: str) -> _Spec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown zoo model {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[name]


def randomize_parameters(module: nn.Module, seed: int = 0) -> nn.Module:
    """Draw every parameter at random, seeded, with no zero layers.

    Matrices ~ N(0, 1/fan_in) (unit-variance activations); LayerNorm scales ~ 1 + N(0, 0.1²);
    other vectors (biases) ~ N(0, 0.1²). AlphaFold's zero "final" and "gating" weights
    thereby become ordinary random layers, so every residual path contributes.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.device.type == "meta":
                continue
            if param.dim() >= 2:
                fan_in = math.prod(param.shape[1:])
                value = torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)
            elif name.endswith("weight"):
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
            else:
                value = 0.1 * torch.randn(param.shape, generator=gen)
            param.copy_(value.to(param.dtype))
    return module


def get(name: str, size: str = "tiny", n_seq: int | None = None, n_res: int | None = None,
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, *,
        n_extra: int | None = None, n_templ: int | None = None, n_blocks: int | None = None
        ) -> tuple[nn.Module, tuple]:
    """Build zoo model ``name`` at ``size`` and example inputs for it.

    Returns ``(module, example_inputs)`` in eval mode on ``device`` in ``dtype``
    (integer inputs such as residue indices stay integer). ``device="meta"`` builds
    shapes only, for FLOP counting without memory.
    """
    spec = _lookup(name)
    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; valid sizes: {', '.join(SIZES)}")
    sizes = dict(_SEQ_DEFAULTS[size])
    for key, value in (("n_seq", n_seq), ("n_res", n_res), ("n_extra", n_extra), ("n_templ", n_templ)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
            sizes[key] = value
    if n_blocks is not None and n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            module = spec.build(size, sizes, n_blocks)
    else:
        # the modules' own initialisers draw from the global RNG; fork it so a zoo call leaves the
        # caller's random state alone (every value is redrawn from ``seed`` right after)
        with torch.random.fork_rng(devices=[]):
            module = randomize_parameters(spec.build(size, sizes, n_blocks), seed)
    module = module.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = spec.inputs(size, sizes, gen, torch.float32)
    inputs = tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in inputs)
    return module, inputs
