"""The third-party corpus as one table: every module, how to build it, what a correct compiler matches.

``cases()`` yields :class:`Case` s. Each case builds its module and example inputs at small
sizes (sequence dims <= 24 and not multiples of 8, channels >= 8, head dims >= 8, so a
fused kernel accepts what it should) and states what a correct ``foldcompile.optimize``
matches in it::

    >>> from tests.third_party.catalog import cases
    >>> case = next(c for c in cases() if c.name == "of_triangle_attention_start")
    >>> case.expected
    {'attention': 1, 'layer_norm': 1, 'softmax': 0}
    >>> module = case.build()                       # fixed seed: the same module every call
    >>> args, kwargs = case.inputs(seed=1)          # fresh inputs of the same shapes per seed
    >>> module.eval()(*args, **kwargs).shape
    torch.Size([11, 11, 16])

Counting convention (what ``expected`` means; keys that are absent are not asserted):

- ``attention``: fused attentions, one per attention in the source, whatever its spelling
  (a Python chunk loop over query rows or batch rows that concatenates the pieces counts
  once: it is one attention);
- ``layer_norm``: layer norms over the last dim (``nn.LayerNorm``, ``F.layer_norm``, with or
  without affine parameters, or written out by hand; ``handwritten`` says how many of the
  expected ones are hand-written);
- ``softmax``: biased / masked softmaxes OUTSIDE a matched attention (a softmax absorbed
  into an attention is not counted again);
- ``triangle_multiplication``: triangle multiplicative updates, one fused call each (their two
  layer norms are part of it and not counted under ``layer_norm``);
- ``at_least`` (a separate dict) gives lower bounds where grouping is the compiler's
  choice: ``elementwise`` = fused element-wise chains (bias + dropout + residual, sigmoid
  gating, masking), at least this many.

Counts are the same in train and eval mode unless a case says otherwise
(``expected_eval``). ``train`` / ``eval`` say in which modes a case is meaningful (all of
them: both); ``eval_differs`` marks the cases whose eval mode runs other code (eval-time
chunk loops, dropout switched off, a separate inference path), where capturing and
optimizing in eval tests something train does not. Near misses (``style == "near_miss"``) name in ``refuse`` the rule
family that must NOT match them and in ``why`` what exactly must not happen; their
``expected`` counts include that family's correct count (usually 0).

Every module's parameters are drawn from a fixed seed; layer-norm scales and offsets are
redrawn away from 1 and 0 so that every path is visible to a gradient comparison.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from . import boltz_style as bz
from . import near_misses as nm
from . import openfold_style as of
from . import protenix_style as px

__all__ = ["Case", "cases", "case", "FAMILIES"]

FAMILIES = ("attention", "layer_norm", "softmax", "elementwise", "triangle_multiplication")


@dataclass(frozen=True)
class Case:
    """One corpus module: builder, example inputs, expected matches."""

    name: str
    style: str  # "openfold" | "boltz" | "protenix" | "near_miss"
    module: type  # the class (its docstring says which public code style and which spellings)
    make: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator], tuple]
    expected: dict
    at_least: dict = field(default_factory=dict)
    expected_eval: Optional[dict] = None
    refuse: Optional[str] = None  # near misses: the rule family that must refuse
    why: str = ""
    train: bool = True  # meaningful in train mode (run it there)
    eval: bool = True  # meaningful in eval mode
    eval_differs: bool = False  # eval runs other code than train (eval chunking, dropout off, an eval path)
    handwritten: dict = field(default_factory=dict)  # how many of ``expected`` are written out by hand
    seq_dims: tuple = ()  # the sequence-like sizes of the example (<= 24, not multiples of 8)
    head_dim: Optional[int] = None

    def build(self, seed: int = 0) -> nn.Module:
        """The module, with parameters drawn from ``seed`` (the same module for the same seed)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            module = self.make()
            _redraw_norms(module)
        return module

    def inputs(self, seed: int = 0) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for ``forward``: fresh values for each seed, always the same shapes."""
        g = torch.Generator().manual_seed(1000 + seed)
        out = self.make_inputs(g)
        return (out, {}) if not isinstance(out[-1], dict) else (tuple(out[:-1]), out[-1])

    def expected_for(self, training: bool) -> dict:
        return dict(self.expected if training or self.expected_eval is None else self.expected_eval)


def _redraw_norms(module: nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.LayerNorm, of.OFLayerNorm, px.PXLayerNormByHand)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn_like(m.bias))


# ----------------------------------------------------------------------------- inputs

N_SEQ, N_RES, N_TOK, B, C = 5, 11, 13, 2, 16


def _randn(g, *shape, shift: float = 0.0):
    return torch.randn(*shape, generator=g) + shift


def _mask(g, *shape, p_keep: float = 0.75):
    """A float 0/1 mask with zeros in it and a 1 at index 0 of the last two dims (no empty key row)."""
    m = (torch.rand(*shape, generator=g) < p_keep).float()
    m[..., 0] = 1.0
    if len(shape) >= 2:
        m[..., 0, :] = 1.0
    return m


def _bool_mask(g, *shape):
    return _mask(g, *shape) > 0.5


def _bool_mask_one_padded(g, *shape):
    """A boolean key mask whose first batch element keeps no key at all (a padded entry)."""
    m = _bool_mask(g, *shape)
    m[0] = False
    return m


# ----------------------------------------------------------------------------- the table


def _openfold() -> list[Case]:
    msa = lambda g: (_randn(g, N_SEQ, N_RES, C), _randn(g, N_RES, N_RES, C), {"mask": _mask(g, N_SEQ, N_RES)})
    pair = lambda g: (_randn(g, N_RES, N_RES, C), _mask(g, N_RES, N_RES))
    return [
        Case("of_msa_row_attention_pair_bias", "openfold", of.OFMSARowAttentionWithPairBias,
             lambda: of.OFMSARowAttentionWithPairBias(C, C, 8, 2, chunk_size=2),
             msa,
             {"attention": 1, "layer_norm": 2, "softmax": 0}, seq_dims=(N_SEQ, N_RES), head_dim=8, eval_differs=True),
        Case("of_msa_column_attention", "openfold", of.OFMSAColumnAttention,
             lambda: of.OFMSAColumnAttention(C, 8, 2),
             lambda g: (_randn(g, N_SEQ, N_RES, C), _mask(g, N_SEQ, N_RES)),
             {"attention": 1, "layer_norm": 1, "softmax": 0}, seq_dims=(N_SEQ, N_RES), head_dim=8),
        Case("of_msa_column_global_attention", "openfold", of.OFMSAColumnGlobalAttention,
             lambda: of.OFMSAColumnGlobalAttention(C, 8, 2),
             lambda g: (_randn(g, N_SEQ, N_RES, C), _mask(g, N_SEQ, N_RES)),
             {"attention": 1, "layer_norm": 1, "softmax": 0}, seq_dims=(N_SEQ, N_RES), head_dim=8),
        Case("of_triangle_attention_start", "openfold", of.OFTriangleAttention,
             lambda: of.OFTriangleAttention(C, 8, 2, starting=True, chunk_size=4), pair,
             {"attention": 1, "layer_norm": 1, "softmax": 0}, seq_dims=(N_RES,), head_dim=8, eval_differs=True),
        Case("of_triangle_attention_end", "openfold", of.OFTriangleAttention,
             lambda: of.OFTriangleAttention(C, 8, 2, starting=False, chunk_size=4), pair,
             {"attention": 1, "layer_norm": 1, "softmax": 0}, seq_dims=(N_RES,), head_dim=8, eval_differs=True),
        Case("of_triangle_mult_outgoing", "openfold", of.OFTriangleMultiplicativeUpdate,
             lambda: of.OFTriangleMultiplicativeUpdate(C, 8, outgoing=True), pair,
             {"attention": 0, "layer_norm": 0, "softmax": 0, "triangle_multiplication": 1}, seq_dims=(N_RES,)),
        Case("of_triangle_mult_incoming", "openfold", of.OFTriangleMultiplicativeUpdate,
             lambda: of.OFTriangleMultiplicativeUpdate(C, 8, outgoing=False), pair,
             {"attention": 0, "layer_norm": 0, "softmax": 0, "triangle_multiplication": 1}, seq_dims=(N_RES,)),
        Case("of_outer_product_mean", "openfold", of.OFOuterProductMean,
             lambda: of.OFOuterProductMean(C, C, 8, chunk_size=4),
             lambda g: (_randn(g, N_SEQ, N_RES, C), _mask(g, N_SEQ, N_RES)),
             {"attention": 0, "layer_norm": 1, "softmax": 0}, seq_dims=(N_SEQ, N_RES), eval_differs=True),
        Case("of_pair_transition", "openfold", of.OFPairTransition,
             lambda: of.OFPairTransition(C, 2), pair,
             {"attention": 0, "layer_norm": 1, "softmax": 0}, seq_dims=(N_RES,)),
        Case("of_pair_core", "openfold", of.OFPairCore,
             lambda: of.OFPairCore(C, 8, 2, p=0.25), pair,
             {"attention": 2, "layer_norm": 3, "softmax": 0, "triangle_multiplication": 1}, {"elementwise": 3},
             seq_dims=(N_RES,), head_dim=8, eval_differs=True),
    ]


def _boltz() -> list[Case]:
    pair = lambda g: (_randn(g, 1, N_TOK, N_TOK, C), _mask(g, 1, N_TOK, N_TOK))  # Boltz's inference batch of 1

    def apb_inputs(g):
        s = _randn(g, B, N_TOK, C)
        return (s, _randn(g, B, N_TOK, N_TOK, C), _mask(g, B, N_TOK), s)

    def tri_att_inputs(g):
        z, m = pair(g)
        return (z, {"mask": m, "chunk_size": 5})

    return [
        Case("bz_attention_pair_bias", "boltz", bz.BZAttentionPairBias,
             lambda: bz.BZAttentionPairBias(C, C, 2), apb_inputs,
             {"attention": 1, "layer_norm": 1, "softmax": 0}, seq_dims=(N_TOK,), head_dim=8),
        Case("bz_triangle_attention_start", "boltz", bz.BZTriangleAttention,
             lambda: bz.BZTriangleAttention(C, 8, 2, starting=True), tri_att_inputs,
             {"attention": 1, "layer_norm": 1, "softmax": 0}, seq_dims=(N_TOK,), head_dim=8),
        Case("bz_triangle_attention_end", "boltz", bz.BZTriangleAttention,
             lambda: bz.BZTriangleAttention(C, 8, 2, starting=False), tri_att_inputs,
             {"attention": 1, "layer_norm": 1, "softmax": 0}, seq_dims=(N_TOK,), head_dim=8),
        Case("bz_triangle_mult_outgoing", "boltz", bz.BZTriangleMultiplication,
             lambda: bz.BZTriangleMultiplication(C, outgoing=True), pair,
             {"attention": 0, "layer_norm": 0, "softmax": 0, "triangle_multiplication": 1}, seq_dims=(N_TOK,)),
        Case("bz_triangle_mult_incoming", "boltz", bz.BZTriangleMultiplication,
             lambda: bz.BZTriangleMultiplication(C, outgoing=False), pair,
             {"attention": 0, "layer_norm": 0, "softmax": 0, "triangle_multiplication": 1}, seq_dims=(N_TOK,)),
        Case("bz_transition_chunked", "boltz", bz.BZTransition,
             lambda: bz.BZTransition(C, 40, chunk_size=16), lambda g: (_randn(g, B, N_TOK, C),),
             {"attention": 0, "layer_norm": 1, "softmax": 0}, seq_dims=(N_TOK,), eval_differs=True),
        Case("bz_pair_stack_layer", "boltz", bz.BZPairStackLayer,
             lambda: bz.BZPairStackLayer(C, 8, 2, dropout=0.25, eval_chunk_size=5), pair,
             {"attention": 2, "layer_norm": 3, "softmax": 0, "triangle_multiplication": 2}, {"elementwise": 4},
             seq_dims=(N_TOK,), head_dim=8, eval_differs=True),
    ]


def _protenix() -> list[Case]:
    apb = lambda g: (_randn(g, B, N_TOK, C), _randn(g, B, N_TOK, N_TOK, C), _mask(g, B, N_TOK))
    boolx = lambda g: (_randn(g, B, N_TOK, C), _bool_mask(g, B, N_TOK))
    boolx_padded = lambda g: (_randn(g, B, N_TOK, C), _bool_mask_one_padded(g, B, N_TOK))
    out = [
        Case("px_attention_pair_bias_sdpa", "protenix", px.PXAttentionPairBias,
             lambda: px.PXAttentionPairBias(C, C, 2, efficient=True), apb,
             {"attention": 1, "layer_norm": 2, "softmax": 0}, seq_dims=(N_TOK,), head_dim=8),
        Case("px_attention_pair_bias_inplace", "protenix", px.PXAttentionPairBias,
             lambda: px.PXAttentionPairBias(C, C, 2, efficient=False, inplace_safe=True), apb,
             {"attention": 1, "layer_norm": 2, "softmax": 0}, seq_dims=(N_TOK,), head_dim=8),
        Case("px_attention_local_window_chunked", "protenix", px.PXAttentionPairBias,
             lambda: px.PXAttentionPairBias(C, C, 2, efficient=False, local=(4, 8), chunk_size=5), apb,
             {"attention": 1, "layer_norm": 2, "softmax": 0}, seq_dims=(N_TOK,), head_dim=8, eval_differs=True),
    ]
    for style in px.PXBoolMaskAttention.STYLES:
        out.append(Case(f"px_bool_mask_{style}", "protenix", px.PXBoolMaskAttention,
                        (lambda s=style: px.PXBoolMaskAttention(C, 2, mask_style=s)),
                        boolx_padded if style in px.PXBoolMaskAttention.CLEAN_UP else boolx,
                        {"attention": 1, "layer_norm": 1, "softmax": 0}, seq_dims=(N_TOK,), head_dim=8))
    out += [
        Case("px_bmm_attention", "protenix", px.PXBmmAttention,
             lambda: px.PXBmmAttention(C, C, 2), lambda g: (_randn(g, B, N_TOK, C), _randn(g, B, N_TOK, N_TOK, C)),
             {"attention": 1, "layer_norm": 2, "softmax": 0}, seq_dims=(N_TOK,), head_dim=8),
        Case("px_msa_pair_weighted_averaging", "protenix", px.PXMSAPairWeightedAveraging,
             lambda: px.PXMSAPairWeightedAveraging(C, 8, C, 2),
             lambda g: (_randn(g, N_SEQ, N_RES, C), _randn(g, N_RES, N_RES, C)),
             {"attention": 0, "layer_norm": 2, "softmax": 1}, seq_dims=(N_SEQ, N_RES)),
        Case("px_transition", "protenix", px.PXTransition,
             lambda: px.PXTransition(C, 2), lambda g: (_randn(g, N_RES, N_RES, C),),
             {"attention": 0, "layer_norm": 1, "softmax": 0}, seq_dims=(N_RES,), eval_differs=True),
        Case("px_adaptive_layer_norm", "protenix", px.PXAdaptiveLayerNorm,
             lambda: px.PXAdaptiveLayerNorm(C, 8), lambda g: (_randn(g, B, N_TOK, C), _randn(g, B, N_TOK, 8)),
             {"attention": 0, "layer_norm": 2, "softmax": 0}, {"elementwise": 1}, seq_dims=(N_TOK,)),
    ]
    for spelling in px.PXLayerNormByHand.SPELLINGS:
        out.append(Case("px_layer_norm_by_hand" + ("" if spelling == "rsqrt" else f"_{spelling}"), "protenix",
                        px.PXLayerNormByHand, (lambda s=spelling: px.PXLayerNormByHand(C, spelling=s)),
                        lambda g: (_randn(g, B, N_TOK, C, shift=0.7),),
                        {"attention": 0, "layer_norm": 1, "softmax": 0}, handwritten={"layer_norm": 1},
                        seq_dims=(N_TOK,)))
    return out


def _near_misses() -> list[Case]:
    att = lambda g: (_randn(g, B, N_TOK, C), _randn(g, B, N_TOK, N_TOK, C), _mask(g, B, N_TOK))
    wavg = lambda g: (_randn(g, B, N_SEQ, N_RES, C), _randn(g, B, N_RES, N_RES, C), _mask(g, B, N_RES))
    norm = lambda g: (_randn(g, B, N_TOK, C, shift=0.7),)
    att_exp = {"attention": 0, "layer_norm": 2}
    return [
        Case("nm_softmax_over_queries", "near_miss", nm.NMSoftmaxOverQueries,
             lambda: nm.NMSoftmaxOverQueries(C, C, 2), att, att_exp, refuse="attention",
             why="the softmax normalises over queries (dim -2), not keys", seq_dims=(N_TOK,), head_dim=8),
        Case("nm_mask_after_softmax", "near_miss", nm.NMMaskAfterSoftmax,
             lambda: nm.NMMaskAfterSoftmax(C, C, 2), att, att_exp, refuse="attention",
             why="the key mask multiplies the weights after the softmax (rows no longer sum to 1); "
                 "taking it as an attention key mask changes the function", seq_dims=(N_TOK,), head_dim=8),
        Case("nm_bias_after_softmax", "near_miss", nm.NMBiasAfterSoftmax,
             lambda: nm.NMBiasAfterSoftmax(C, C, 2), att, att_exp, refuse="attention",
             why="the pair bias is added to the weights after the softmax", seq_dims=(N_TOK,), head_dim=8),
        Case("nm_per_position_scale", "near_miss", nm.NMPerPositionScale,
             lambda: nm.NMPerPositionScale(C, C, 2, n=N_TOK), att, att_exp, refuse="attention",
             why="the logit scale is a learned [Q, K] tensor, not a scalar (and not foldable into q or k)",
             seq_dims=(N_TOK,), head_dim=8),
        Case("nm_value_over_queries", "near_miss", nm.NMValueOverQueries,
             lambda: nm.NMValueOverQueries(C, C, 2), att, att_exp, refuse="attention",
             why="the weights are contracted with v over the query axis, not the key axis the softmax "
                 "normalised", seq_dims=(N_TOK,), head_dim=8),
        Case("nm_rms_norm", "near_miss", nm.NMRMSNorm, lambda: nm.NMRMSNorm(C), norm,
             {"attention": 0, "layer_norm": 0, "softmax": 0}, refuse="layer_norm",
             why="no mean subtraction (an RMS norm)", seq_dims=(N_TOK,)),
        Case("nm_unbiased_variance_norm", "near_miss", nm.NMUnbiasedVarianceNorm, lambda: nm.NMUnbiasedVarianceNorm(C),
             norm, {"attention": 0, "layer_norm": 0, "softmax": 0}, refuse="layer_norm",
             why="Tensor.var's default Bessel correction divides by c - 1, a layer norm by c", seq_dims=(N_TOK,)),
        Case("nm_eps_outside_root", "near_miss", nm.NMEpsOutsideRoot, lambda: nm.NMEpsOutsideRoot(C), norm,
             {"attention": 0, "layer_norm": 0, "softmax": 0}, refuse="layer_norm",
             why="(x - mean) / (sqrt(var) + eps) is not (x - mean) / sqrt(var + eps)", seq_dims=(N_TOK,)),
        Case("nm_soft_mask_fill", "near_miss", nm.NMSoftMaskFill, lambda: nm.NMSoftMaskFill(C, 2),
             lambda g: (_randn(g, B, N_TOK, C), _bool_mask(g, B, N_TOK)), {"attention": 0, "layer_norm": 1},
             refuse="attention", why="torch.where(mask, logits, torch.tensor(-2.0)): masked keys keep weight; "
                                     "taking it as a mask drops them", seq_dims=(N_TOK,), head_dim=8),
        Case("nm_nan_clean_up_to_uniform", "near_miss", nm.NMNanCleanUpToUniform,
             lambda: nm.NMNanCleanUpToUniform(C, 2),
             lambda g: (_randn(g, B, N_TOK, C), _bool_mask_one_padded(g, B, N_TOK)),
             {"attention": 0, "layer_norm": 1}, refuse="attention",
             why="the NaN weights of a row that keeps no key become 1/N, not 0: folding the clean-up as the "
                 "kernel's 0 would drop the mean of v there", seq_dims=(N_TOK,), head_dim=8),
        Case("nm_softmax_sum_over_other_dim", "near_miss", nm.NMSoftmaxSumOverOtherDim,
             lambda: nm.NMSoftmaxSumOverOtherDim(C, 2, C), lambda g: wavg(g)[:2], {"attention": 0, "layer_norm": 1, "softmax": 0},
             refuse="softmax", why="max over dim -2 but the normalising sum over dim -3: not a softmax",
             seq_dims=(N_SEQ, N_RES)),
        Case("nm_softmax_bias_after", "near_miss", nm.NMSoftmaxBiasAfter,
             lambda: nm.NMSoftmaxBiasAfter(C, 2, C, n=N_RES), wavg, {"attention": 0, "layer_norm": 1},
             refuse="softmax", why="the learned prior is added after the softmax; a biased-softmax match "
                                    "may take the mask bias but must not take the prior as its bias",
             seq_dims=(N_SEQ, N_RES)),
        Case("nm_drop_path_no_rescale", "near_miss", nm.NMDropPathNoRescale, lambda: nm.NMDropPathNoRescale(C),
             lambda g: (_randn(g, B * 3, N_TOK, C),), {"attention": 0, "layer_norm": 0, "softmax": 0},
             refuse="elementwise", why="a keep mask without the 1/(1-p) rescale: a rule that recognises "
                                        "bias + dropout + residual must not turn it into a (rescaled) dropout",
             seq_dims=(N_TOK,), eval_differs=True),
        Case("nm_chain_through_linear", "near_miss", nm.NMChainThroughLinear, lambda: nm.NMChainThroughLinear(C),
             lambda g: (_randn(g, B, N_TOK, C),), {"attention": 0, "layer_norm": 0, "softmax": 0},
             refuse="elementwise", why="the add and the gate product must not be one fused group: the group "
                                        "would contain a cycle through the unfused linear (convexity)",
             seq_dims=(N_TOK,)),
        Case("nm_triangle_product_over_other_index", "near_miss", nm.NMTriangleProductOverOtherIndex,
             lambda: nm.NMTriangleProductOverOtherIndex(C, 8), lambda g: (_randn(g, N_RES, N_RES, C),
                                                                          _mask(g, N_RES, N_RES)),
             {"attention": 0, "layer_norm": 2, "softmax": 0, "triangle_multiplication": 0},
             refuse="triangle_multiplication",
             why="the product is Σ_k a_ik b_kj (a matrix product of the pair maps), neither the outgoing "
                 "Σ_k a_ik b_jk nor the incoming Σ_k a_ki b_kj the kernel computes", seq_dims=(N_RES,)),
    ]


def cases() -> Iterator[Case]:
    """Every corpus case, positives first (OpenFold, Boltz, Protenix), then near misses."""
    yield from _openfold()
    yield from _boltz()
    yield from _protenix()
    yield from _near_misses()


def case(name: str) -> Case:
    """The case called ``name``."""
    for c in cases():
        if c.name == name:
            return c
    raise KeyError(f"no corpus case {name!r}; known: {', '.join(c.name for c in cases())}")
