"""The triangle multiplication rule (passes/rules/triangle_multiplication.py) on its spellings and near misses.

Spellings (each fused into one ``fused_triangle_multiplication`` call that computes what the module
computes, outputs and every gradient, fp32): the zoo's AF2 update (incoming as AF2's released code
writes it, ``kjc,kic``) and the Pairformer's (the AF3 paper's ``kic,kjc``), outgoing and incoming; an
OpenFold-style module (separate a/b linears, ``nn.Sigmoid``, ``mask.unsqueeze(-1)``, einsum) and
OpenFold's own ``permute_final_dims`` + ``matmul``; Boltz's one ``2c`` projection and gate cut by
``torch.chunk`` (einsum, and a ``bmm`` of permuted reshapes with a batch of 2); a Protenix-style
module (no biases, one fused ``ab`` projection sliced ``ab[..., :c]``, ``matmul``), with and without a
mask; layer norms written out by hand. Near misses are refused with the reason and left as they were.
Then the zoo: the Evoformer and Pairformer blocks through ``optimize`` (eval and training with dropout,
every parameter gradient), and the count on every zoo model: every triangle multiplication matched.
"""
from __future__ import annotations

import doctest
import importlib
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.kernels._dispatch import record_launches  # noqa: E402
from foldcompile.models import pairformer as pf  # noqa: E402
from foldcompile.models import zoo  # noqa: E402
from foldcompile.models.alphafold2.triangle import TriangleMultiplicativeUpdate  # noqa: E402
from foldcompile.models.zoo import randomize_parameters  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from third_party.boltz_style import BZTriangleMultiplication  # noqa: E402
from third_party.openfold_style import OFTriangleMultiplicativeUpdate, permute_final_dims  # noqa: E402

full = pytest.mark.full
N, C, H = 11, 16, 8
RULE = "triangle_multiplication"


def _pair(seed: int = 0, batch: tuple = (1,), n: int = N, c: int = C, empty_row: bool = True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*batch, n, n, c, generator=g).requires_grad_()
    mask = (torch.rand(*batch, n, n, generator=g) > 0.2).float()
    if empty_row:
        mask[..., 2, :] = 0.0  # a residue whose every pair is padding
    return z, mask


# ------------------------------------------------------------------ spellings written for this test
class OFStyleEinsum(nn.Module):
    """OpenFold-style: separate a/b linears, ``nn.Sigmoid``, ``mask.unsqueeze(-1)`` applied first, einsum."""

    def __init__(self, outgoing: bool):
        super().__init__()
        self.outgoing = outgoing
        self.layer_norm_in, self.layer_norm_out = nn.LayerNorm(C), nn.LayerNorm(H)
        self.linear_a_p, self.linear_a_g = nn.Linear(C, H), nn.Linear(C, H)
        self.linear_b_p, self.linear_b_g = nn.Linear(C, H), nn.Linear(C, H)
        self.linear_g, self.linear_z = nn.Linear(C, C), nn.Linear(H, C)
        self.sigmoid = nn.Sigmoid()

    def forward(self, z, mask):
        mask = mask.unsqueeze(-1)
        z = self.layer_norm_in(z)
        a = mask * self.sigmoid(self.linear_a_g(z))
        a = a * self.linear_a_p(z)
        b = mask * self.sigmoid(self.linear_b_g(z))
        b = b * self.linear_b_p(z)
        eq = "...ikc,...jkc->...ijc" if self.outgoing else "...kic,...kjc->...ijc"
        x = self.layer_norm_out(torch.einsum(eq, a, b))
        return self.linear_z(x) * self.sigmoid(self.linear_g(z))


class BoltzStyleBmm(nn.Module):
    """Boltz-style: one ``2c`` projection and gate, ``torch.chunk``, the product as a ``bmm`` of permuted
    reshapes (batch and channels merged), viewed and permuted back."""

    def __init__(self, outgoing: bool, dim: int = C):
        super().__init__()
        self.outgoing = outgoing
        self.norm_in, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.p_in, self.g_in = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.p_out, self.g_out = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask):
        x = self.norm_in(x)
        x_in = x
        x = self.p_in(x) * self.g_in(x).sigmoid()
        x = x * mask.unsqueeze(-1)
        a, b = torch.chunk(x, 2, dim=-1)
        B, n, _, d = a.shape
        if self.outgoing:  # [B·d, i, k] @ [B·d, k, j]
            a2 = a.permute(0, 3, 1, 2).reshape(B * d, n, n)
            b2 = b.permute(0, 3, 2, 1).reshape(B * d, n, n)
        else:  # [B·d, i, k] = a_ki, [B·d, k, j] = b_kj
            a2 = a.permute(0, 3, 2, 1).reshape(B * d, n, n)
            b2 = b.permute(0, 3, 1, 2).reshape(B * d, n, n)
        x = torch.bmm(a2, b2).view(B, d, n, n).permute(0, 2, 3, 1)
        return self.p_out(self.norm_out(x)) * self.g_out(x_in).sigmoid()


class ProtenixStyle(nn.Module):
    """Protenix-style (AF3 without biases): one fused ``ab`` projection and gate, sliced ``ab[..., :c]``,
    ``permute_final_dims`` + ``matmul``; the mask optional (left out when None)."""

    def __init__(self, outgoing: bool):
        super().__init__()
        self.outgoing = outgoing
        self.layer_norm_in, self.layer_norm_out = nn.LayerNorm(C), nn.LayerNorm(H)
        self.linear_ab_p = nn.Linear(C, 2 * H, bias=False)
        self.linear_ab_g = nn.Linear(C, 2 * H, bias=False)
        self.linear_g, self.linear_z = nn.Linear(C, C, bias=False), nn.Linear(H, C, bias=False)

    def forward(self, z, mask=None):
        z = self.layer_norm_in(z)
        ab = torch.sigmoid(self.linear_ab_g(z)) * self.linear_ab_p(z)
        if mask is not None:
            ab = ab * mask[..., None]
        a, b = ab[..., :H], ab[..., H:]
        if self.outgoing:
            p = torch.matmul(permute_final_dims(a, (2, 0, 1)), permute_final_dims(b, (2, 1, 0)))
        else:
            p = torch.matmul(permute_final_dims(a, (2, 1, 0)), permute_final_dims(b, (2, 0, 1)))
        x = self.layer_norm_out(permute_final_dims(p, (1, 2, 0)))
        return torch.sigmoid(self.linear_g(z)) * self.linear_z(x)


def _hand_ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + eps) * w + b


class HandNorms(OFStyleEinsum):
    """Both layer norms written out by hand (the layer-norm rule's spelling)."""

    def forward(self, z, mask):
        m = mask.unsqueeze(-1)
        x = _hand_ln(z, self.layer_norm_in.weight, self.layer_norm_in.bias)
        a = torch.sigmoid(self.linear_a_g(x)) * self.linear_a_p(x) * m
        b = torch.sigmoid(self.linear_b_g(x)) * self.linear_b_p(x) * m
        p = torch.einsum("...ikc,...jkc->...ijc", a, b)
        y = _hand_ln(p, self.layer_norm_out.weight, self.layer_norm_out.bias)
        return torch.sigmoid(self.linear_g(x)) * self.linear_z(y)


SPELLINGS = {
    "af2_outgoing": (lambda: TriangleMultiplicativeUpdate(C, H, outgoing=True), "outgoing", "first"),
    "af2_incoming": (lambda: TriangleMultiplicativeUpdate(C, H, outgoing=False), "incoming", "second"),
    "pairformer_outgoing": (lambda: pf.TriangleMultiplicationOutgoing(C, H), "outgoing", "first"),
    "pairformer_incoming": (lambda: pf.TriangleMultiplicationIncoming(C, H), "incoming", "first"),
    "openfold_einsum_outgoing": (lambda: OFStyleEinsum(True), "outgoing", "first"),
    "openfold_einsum_incoming": (lambda: OFStyleEinsum(False), "incoming", "first"),
    "openfold_matmul_incoming": (lambda: OFTriangleMultiplicativeUpdate(C, H, outgoing=False), "incoming", "first"),
    "boltz_chunk_einsum_outgoing": (lambda: BZTriangleMultiplication(C, outgoing=True), "outgoing", "first"),
    "boltz_bmm_outgoing": (lambda: BoltzStyleBmm(True), "outgoing", "first"),
    "boltz_bmm_incoming": (lambda: BoltzStyleBmm(False), "incoming", "first"),
    "protenix_outgoing": (lambda: ProtenixStyle(True), "outgoing", "first"),
    "protenix_incoming_no_mask": (lambda: ProtenixStyle(False), "incoming", "first"),
    "hand_written_layer_norms": (lambda: HandNorms(True), "outgoing", "first"),
}
_BATCH = {"boltz_chunk_einsum_outgoing": (2,), "boltz_bmm_outgoing": (2,), "boltz_bmm_incoming": (2,),
          "openfold_matmul_incoming": ()}


def _inputs(name: str, seed: int):
    z, mask = _pair(seed, _BATCH.get(name, (1,)))
    return (z,) if name.endswith("no_mask") else (z, mask)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spellings_are_fused_and_compute_what_the_module_computes(name):
    build, orientation, a_operand = SPELLINGS[name]
    model = randomize_parameters(build(), 0)
    inputs = _inputs(name, 0)
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()[RULE] == {"matched": 1, "rejected": 0}, fast.report.rejections
    (match,) = [m for m in fast.report.matches if m["rule"] == RULE]
    assert match["notes"][0].startswith(orientation) and f"{a_operand} operand is the kernel's a" in match["notes"][1]
    assert ("no mask" if name.endswith("no_mask") else "masked") in match["notes"]
    code = fast.code
    assert code.count("fused_triangle_multiplication(") == 1
    # the product, both layer norms and every projection went into the kernel
    assert not any(w in code for w in ("einsum(", "matmul(", "bmm(", "F.linear(", "layer_norm(", "sigmoid"))
    fresh = _inputs(name, 1)
    with record_launches() as launched:
        assert assert_same_function(model, fresh, fast) <= 1e-5
    assert {"trimul_proj", "trimul_out", "trimul_out_bwd", "trimul_proj_bwd"} <= set(launched)


# ------------------------------------------------------------------ near misses
class NearMiss(nn.Module):
    """AF2-style update with one deliberate difference, named by ``style``."""

    def __init__(self, style: str, c: int = C, h: int = H):
        super().__init__()
        self.style = style
        self.ln_in, self.ln_out = nn.LayerNorm(c), nn.LayerNorm(h)
        self.a_p, self.a_g, self.b_p, self.b_g = (nn.Linear(c, h) for _ in range(4))
        self.g, self.o = nn.Linear(c, c), nn.Linear(h, c)

    def forward(self, z, mask, mask2=None):
        st = self.style
        m = mask.unsqueeze(-1)
        x = self.ln_in(z)
        gate = torch.relu if st == "relu_gate" else torch.sigmoid
        a = gate(self.a_g(x)) * self.a_p(x) * m
        b = torch.sigmoid(self.b_g(x)) * self.b_p(x)
        if st == "different_masks":
            b = b * mask2.unsqueeze(-1)
        elif st == "no_gate":
            b = self.b_p(x) * m
        elif st != "mask_on_a_only":
            b = b * m
        eq = "...ikc,...kjc->...ijc" if st == "other_index" else "...ikc,...jkc->...ijc"
        prod = torch.einsum(eq, a, b)
        p = self.ln_out(prod)
        if st == "no_output_gate":
            return self.o(p)
        g = torch.sigmoid(self.g(z if st == "gate_of_raw_z" else x))
        out = g * self.o(p)
        if st == "ln_used_elsewhere":
            return out + x
        if st == "product_used_elsewhere":
            return out, prod
        return out


NEAR_MISSES = [
    ("mask_on_a_only", {}, "only a is masked"),
    ("different_masks", {}, "masked by different tensors"),
    ("other_index", {}, "neither outgoing"),
    ("relu_gate", {}, "relu(linear), not sigmoid(linear)"),
    ("no_gate", {}, "b has no sigmoid gate"),
    ("no_output_gate", {}, "not multiplied by a sigmoid gate"),
    ("gate_of_raw_z", {}, "the output gate reads"),
    ("ln_used_elsewhere", {}, "the kernel does not expose LN(z)"),
    ("product_used_elsewhere", {}, "is read outside its layer norm"),
    ("wide_c_z", dict(c=264, h=4), "above the kernel's limit of 256"),
    ("wide_c_hidden", dict(c=8, h=260), "above the kernel's limit of 256"),
    ("mask_requires_grad", {}, "requires grad"),
]


@pytest.mark.parametrize("style, sizes, reason", NEAR_MISSES, ids=[s for s, _, _ in NEAR_MISSES])
def test_near_misses_are_refused_with_the_reason(style, sizes, reason):
    model = randomize_parameters(NearMiss(style, **sizes), 0)
    c = sizes.get("c", C)
    n = 3 if sizes else 7
    z, mask = _pair(0, n=n, c=c)
    inputs = (z, mask, _pair(1, n=n, c=c)[1]) if style == "different_masks" else (z, mask)
    if style == "mask_requires_grad":
        mask.requires_grad_()
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()[RULE] == {"matched": 0, "rejected": 1}, fast.report.rejections
    (rej,) = [r for r in fast.report.rejections if r["rule"] == RULE]
    assert reason in rej["reason"], rej["reason"]
    assert "fused_triangle_multiplication(" not in fast.code
    assert_same_function(model, inputs, fast)


def test_a_product_that_is_no_triangle_multiplication_is_not_a_candidate():
    """A contraction over the channels (an attention-like product) or of unpaired channels (an outer
    product) is not counted: only gated pair tensors contracted over a residue axis are candidates."""

    class Others(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.g = nn.Linear(C, H), nn.Linear(C, H)

        def forward(self, z, mask):
            a = torch.sigmoid(self.g(z)) * self.p(z) * mask[..., None]
            logits = torch.einsum("...ijc,...ikc->...ijk", a, a)        # over the channels
            outer = torch.einsum("...kic,...kje->...ijce", a, a)       # channels not paired
            return logits.sum(-1), outer.sum((-1, -2))

    model = randomize_parameters(Others(), 0)
    z, mask = _pair(0, n=7)
    with torch.no_grad():
        fast = foldcompile.optimize(model, z, mask)
    assert fast.report.counts()[RULE] == {"matched": 0, "rejected": 0}


def test_doctest():
    mod = importlib.import_module("foldcompile.passes.rules.triangle_multiplication")
    assert doctest.testmod(mod).failed == 0


# ------------------------------------------------------------------ the zoo
def _trimul_calls(model: nn.Module, inputs: tuple) -> tuple[int, list[str]]:
    """How many triangle multiplications the model runs (the zoo's two module classes, counted by hooks
    in an eager call: the oracle, independent of the rule's recognition) and the paths of those modules."""
    classes = (TriangleMultiplicativeUpdate, pf.TriangleMultiplication)
    calls, paths = [0], []
    hooks = []
    for path, mod in model.named_modules():
        if isinstance(mod, classes):
            paths.append(path)
            hooks.append(mod.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls[0], paths


# the Evoformer block runs in the quick tier through tests/optimize/test_zoo_optimize.py (head dims 8, the
# same rule on, counts and fidelity in eval and training); here in the full tier
@pytest.mark.parametrize("name", [pytest.param("evoformer_block", marks=full), "pairformer_block"])
def test_zoo_blocks_fused_forward_and_backward_eval_and_training(name):
    model, inputs = zoo.get(name)
    calls, paths = _trimul_calls(model, inputs)
    assert calls == 2
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()[RULE] == {"matched": 2, "rejected": 0}, fast.report.rejections
    assert sorted(m["site"] for m in fast.report.matches if m["rule"] == RULE) == sorted(paths)
    assert fast.code.count("fused_triangle_multiplication(") == 2
    with record_launches() as launched:
        assert assert_same_function(model, inputs, fast) <= 1e-5
    assert launched.count("trimul_proj") == 2 and launched.count("trimul_proj_bwd") == 2
    model.train()  # dropout on the update stays an element-wise node, drawn from torch's generator
    assert assert_same_function(model, inputs, fast) <= 1e-5
    assert fast.report.counts()[RULE] == {"matched": 2, "rejected": 0}  # the training variant's report


# the two blocks are counted above (and in test_zoo_optimize.py's quick tier)
@full
@pytest.mark.parametrize("name", [n for n in zoo.names() if n not in ("evoformer_block", "pairformer_block")])
def test_every_zoo_triangle_multiplication_is_matched(name):
    model, inputs = zoo.get(name)
    calls, _ = _trimul_calls(model, inputs)
    with torch.no_grad():
        fast = foldcompile.optimize(model, *inputs)
        assert fast.report.counts()[RULE] == {"matched": calls, "rejected": 0}, fast.report.rejections
        assert fast.code.count("fused_triangle_multiplication(") == calls
        if name == "template_pair_stack":
            assert_same_function(model, inputs, fast, grads=False)


def test_fuse_pass_alone_on_a_symbolically_traced_graph():
    """The rule on its own pass, on a graph with no capture records: a plain function of its tensors
    (parameters as arguments) through torch.fx.symbolic_trace."""
    import torch.nn.functional as F

    from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
    from foldcompile.passes.fuse import fuse_pass

    def update(z, mask, ln_w, wa, wag, wb, wbg, wg, wo):
        x = F.layer_norm(z, (C,), ln_w, None)
        m = mask[..., None]
        a = torch.sigmoid(F.linear(x, wag)) * F.linear(x, wa) * m
        b = torch.sigmoid(F.linear(x, wbg)) * F.linear(x, wb) * m
        p = F.layer_norm(torch.einsum("...kic,...kjc->...ijc", a, b), (H,))
        return torch.sigmoid(F.linear(x, wg)) * F.linear(p, wo)

    g = torch.Generator().manual_seed(5)
    z, mask = _pair(0, n=7)
    ws = [torch.randn(C, generator=g)] + [torch.randn(H, C, generator=g) / C ** 0.5 for _ in range(4)]
    ws += [torch.randn(C, C, generator=g) / C ** 0.5, torch.randn(C, H, generator=g) / H ** 0.5]
    args = (z.detach(), mask, *ws)
    gm = normalize_pass(torch.fx.symbolic_trace(update)).graph_module
    shape_prop_pass(gm, args, dims={})
    classify_pass(gm)
    result = fuse_pass(gm)
    assert result.record["counts"][RULE] == {"matched": 1, "rejected": 0}, result.record["rejections"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert [getattr(t, "__name__", "") for t in targets] == ["fused_triangle_multiplication"]
    torch.testing.assert_close(gm(*args), update(*args), atol=1e-5, rtol=1e-5)
