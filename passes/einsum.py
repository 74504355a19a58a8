"""Contractions: every GEMM-like op as one einsum equation, its letter sizes, FLOPs and letter roles.

One module derives the equation of a node (``linear``, ``matmul``/``@``, ``mm``, ``bmm``,
``addmm``, ``baddbmm``, ``einsum``, and ``scaled_dot_product_attention`` as its two
products); ``normalize_pass`` writes it into ``node.meta["einsum"]``, the cost model reads it
back, and the sharding pass will read the letter roles:

- **batch** letters appear in every operand and in the output (split freely, no communication);
- **free** letters appear in the output but not in every operand (split one operand);
- **contracted** letters appear in operands but not in the output (split both: a partial sum).

    >>> c = parse("bij,bjk->bik")
    >>> c.batch, c.free, c.contracted
    ('b', 'ik', 'j')
    >>> parse("...ik,...jk", (3, 3)).equation                 # '...' expanded, output made explicit
    'aik,ajk->aij'
    >>> import sympy
    >>> M, K, N = sympy.symbols("M K N", positive=True)
    >>> parse("mk,kn->mn").flops({"m": M, "k": K, "n": N})
    2*K*M*N
"""
from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import sympy
import torch
import torch.fx

from foldcompile.passes.base import PassError, describe_node
from foldcompile.passes.meta import EINSUM, SHAPE, SYM_SHAPE, rank_of
from foldcompile.passes.registry import entries, lookup

__all__ = ["Contraction", "parse", "expand_equation", "equation_of", "contractions_of", "gemm_operands",
           "einsum_operands", "letter_sizes", "GEMM_TARGETS"]

_LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Contraction:
    """One explicit einsum equation: operand terms and the output term (no ``...``)."""

    inputs: tuple[str, ...]
    output: str

    @property
    def equation(self) -> str:
        return f"{','.join(self.inputs)}->{self.output}"

    @property
    def batch(self) -> str:
        """Letters in every operand and in the output, in output order."""
        return "".join(c for c in self.output if all(c in t for t in self.inputs))

    @property
    def free(self) -> str:
        """Output letters missing from some operand, in output order."""
        return "".join(c for c in self.output if not all(c in t for t in self.inputs))

    @property
    def contracted(self) -> str:
        """Operand letters summed away, in order of first appearance."""
        seen = dict.fromkeys(c for t in self.inputs for c in t)
        return "".join(c for c in seen if c not in self.output)

    def flops(self, sizes: Mapping[str, sympy.Expr]) -> sympy.Expr:
        """2 × the product of the index sizes of each pairwise product, contracting left to right
        (as torch does without a path optimiser); an index survives a step while a later operand or
        the output uses it. One operand: 0 (a sum or a permutation, not a product)."""
        if len(self.inputs) == 1:
            return sympy.Integer(0)
        total = sympy.Integer(0)
        cur = self.inputs[0]
        for k in range(1, len(self.inputs)):
            idx = set(cur) | set(self.inputs[k])
            total += 2 * sympy.Mul(*[sizes[c] for c in sorted(idx)])
            later = set("".join(self.inputs[k + 1:])) | set(self.output)
            cur = "".join(sorted(c for c in idx if c in later))
        return total


def expand_equation(eq: str, ranks: Sequence[int | None]) -> str:
    """``eq`` with spaces removed, the output made explicit and ``...`` expanded to fresh letters
    where the ranks are known (an operand of unknown rank keeps ``...``).

    An implicit output is the letters used once, in alphabetical order, after the ellipsis (torch's rule).
    """
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != len(ranks):
        raise PassError(f"einsum {eq!r} names {len(inputs)} operands, got {len(ranks)}")
    if not arrow:
        counts = Counter(c for s in inputs for c in s if c.isalpha())
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c, k in counts.items() if k == 1))
    if "..." not in eq or any(r is None for r, s in zip(ranks, inputs) if "..." in s):
        return f"{','.join(inputs)}->{rhs}"
    used = set(c for c in eq if c.isalpha())
    spare = [c for c in _LETTERS + string.ascii_uppercase if c not in used]
    n_ell = max(r - (len(s) - 3) for r, s in zip(ranks, inputs) if "..." in s)
    ell = "".join(spare[:n_ell])
    out_inputs = []
    for r, s in zip(ranks, inputs):
        if "..." in s:
            s = s.replace("...", ell[n_ell - (r - (len(s) - 3)):])
        out_inputs.append(s)
    return f"{','.join(out_inputs)}->{rhs.replace('...', ell)}"


def parse(eq: str, ranks: Sequence[int] | None = None) -> Contraction:
    """An equation as a :class:`Contraction`; ``ranks`` (one per operand) expand ``...``."""
    n_ops = eq.split("->")[0].count(",") + 1
    full = expand_equation(eq, list(ranks) if ranks is not None else [None] * n_ops)
    if "..." in full:
        raise PassError(f"einsum {eq!r} has '...' and operands of unknown rank")
    lhs, rhs = full.split("->")
    return Contraction(tuple(lhs.split(",")), rhs)


def _arg(node: torch.fx.Node, i: int, name: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def einsum_operands(args: Sequence[Any]) -> tuple[str, list[Any]]:
    """(equation, operands) from an ``einsum`` call's args (operands as varargs or one list)."""
    eq = args[0]
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    return eq, ops


class _GemmTargets:
    """The callables whose nodes carry ``meta["einsum"]``: every target of a registry entry with
    ``gemm=True`` (read from the registry on use, so an op registered later is one too)."""

    def __contains__(self, target: Any) -> bool:
        entry = lookup(target)
        return entry is not None and entry.gemm

    def __iter__(self):
        return iter([t for e in entries() if e.gemm for t in e.targets])


GEMM_TARGETS = _GemmTargets()


def _gemm_name(node: torch.fx.Node) -> str:
    entry = lookup(node.target) if node.op == "call_function" else None
    if entry is None or not entry.gemm:
        raise PassError(f"not a GEMM: {describe_node(node)}")
    return entry.name


def gemm_operands(node: torch.fx.Node) -> list[Any]:
    """The operands ``meta["einsum"]`` describes, in order (bias/epilogue terms excluded)."""
    name = _gemm_name(node)
    if name == "linear":
        return [_arg(node, 0, "input"), _arg(node, 1, "weight")]
    if name == "matmul":
        return [_arg(node, 0, "input"), _arg(node, 1, "other")]
    if name in ("mm", "bmm"):
        return [_arg(node, 0, "input"), _arg(node, 1, "mat2")]
    if name == "addmm":
        return [_arg(node, 1, "mat1"), _arg(node, 2, "mat2")]
    if name == "baddbmm":
        return [_arg(node, 1, "batch1"), _arg(node, 2, "batch2")]
    if name == "einsum":
        return einsum_operands(node.args)[1]
    if name == "scaled_dot_product_attention":
        return [_arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")]
    if name == "foldcompile.attention":
        return [_arg(node, 0, "q"), _arg(node, 1, "k"), _arg(node, 2, "v")]
    if name == "foldcompile.outer_product_mean":
        return [_arg(node, 0, "a"), _arg(node, 1, "b"), _arg(node, 2, "weight")]
    raise PassError(f"no equation known for GEMM {name!r}: {describe_node(node)}")


def _matmul_equation(ra: int, rb: int) -> str:
    """torch.matmul's semantics (1-D promotion, broadcast batch dims) as an einsum."""
    if ra == 1 and rb == 1:
        return "a,a->"
    nb = max(ra, rb, 2) - 2
    batch = _LETTERS[:nb]
    m, k, n = _LETTERS[nb: nb + 3]
    if ra == 1:
        return f"{k},{batch[nb - (rb - 2):]}{k}{n}->{batch[nb - (rb - 2):]}{n}"
    a = batch[nb - (ra - 2):] + m + k
    if rb == 1:
        return f"{a},{k}->{batch[nb - (ra - 2):]}{m}"
    return f"{a},{batch[nb - (rb - 2):]}{k}{n}->{batch}{m}{n}"


def equation_of(node: torch.fx.Node) -> str | tuple[str, str]:
    """The einsum equation of a GEMM-like node, with concrete letters where its operands' ranks
    are known (``...`` for the batch dims where not): linear on a rank-3 input ``"abc,dc->abd"``
    (the weight is ``[out, in]``; the bias is an epilogue), matmul with torch's broadcasting,
    einsum its own equation made explicit; SDPA its two products ``(QKᵀ, PV)``."""
    name = _gemm_name(node)
    ops = gemm_operands(node)
    ranks = [rank_of(o) for o in ops]
    if name == "einsum":
        if not isinstance(node.args[0], str):
            raise PassError(f"einsum equation is not a constant string: {describe_node(node)}")
        try:
            return expand_equation(node.args[0], ranks)
        except PassError as e:
            raise PassError(f"{e}: {describe_node(node)}") from None
    if name == "linear":
        r = ranks[0]
        if r is None:
            return "...k,nk->...n"
        if r == 1:
            return "a,ba->b"
        batch = _LETTERS[: r - 1]
        k, n = _LETTERS[r - 1], _LETTERS[r]
        return f"{batch}{k},{n}{k}->{batch}{n}"
    if name in ("mm", "addmm"):
        return "ab,bc->ac"
    if name in ("bmm", "baddbmm"):
        return "abc,acd->abd"
    if name in ("scaled_dot_product_attention", "foldcompile.attention"):
        r = ranks[0]
        b = "..." if r is None else _LETTERS[: r - 2]
        return f"{b}le,{b}se->{b}ls", f"{b}ls,{b}sf->{b}lf"
    if name == "foldcompile.outer_product_mean":  # o = sum_s a ⊗ b, then o's (c, e) through the weight
        r = ranks[0]
        if r is None:
            return "...sic,...sje->...ijce", "...ijk,zk->...ijz"
        b, (s, i, c, j, e, z, k) = _LETTERS[: r - 3], _LETTERS[r - 3: r + 4]
        if ranks[2] == 3:  # a [Z, C, E] weight
            return f"{b}{s}{i}{c},{b}{s}{j}{e}->{b}{i}{j}{c}{e}", f"{b}{i}{j}{c}{e},{z}{c}{e}->{b}{i}{j}{z}"
        return f"{b}{s}{i}{c},{b}{s}{j}{e}->{b}{i}{j}{c}{e}", f"{b}{i}{j}{k},{z}{k}->{b}{i}{j}{z}"
    ra, rb = ranks
    if ra is None or rb is None:
        return "...ij,...jk->...ik"
    return _matmul_equation(ra, rb)


def letter_sizes(terms: Sequence[str], sym_shapes: Sequence[Sequence[Any]],
                 shapes: Sequence[Sequence[int]]) -> dict[str, sympy.Expr]:
    """Each letter's symbolic size; a letter broadcast (size 1) in one operand takes its size
    from an operand where it is not."""
    sizes: dict[str, sympy.Expr] = {}
    for t, c, s in zip(terms, shapes, sym_shapes):
        for ch, cv, sv in zip(t, c, s):
            if ch not in sizes or (cv != 1 and sizes[ch] == 1):
                sizes[ch] = sympy.sympify(sv) if cv != 1 else sizes.get(ch, sympy.Integer(1))
    return sizes


def contractions_of(node: torch.fx.Node) -> tuple[list[Contraction], dict[str, sympy.Expr]]:
    """The node's contractions (one; two for SDPA) from ``meta["einsum"]``, expanded against the
    operand ranks shape propagation found, and the letter sizes in its symbolic shapes.

    ``meta["einsum"]`` is written by ``normalize_pass``; where normalize saw no ranks the equation
    still holds ``...`` and is derived again here, by :func:`equation_of`, from the ranks now known."""
    if EINSUM not in node.meta:
        raise PassError(f"{describe_node(node)} has no meta['einsum']: run normalize_pass first")
    ops = gemm_operands(node)
    eqs = node.meta[EINSUM]
    eqs = list(eqs) if isinstance(eqs, tuple) else [eqs]
    if any("..." in e for e in eqs):
        eqs = equation_of(node)
        eqs = list(eqs) if isinstance(eqs, tuple) else [eqs]
    if any("..." in e for e in eqs):
        raise PassError(f"{describe_node(node)}: operand ranks unknown: run shape_prop_pass first")
    cons = [parse(e) for e in eqs]
    if len(cons) == 2:  # SDPA: q and k feed the first product, v the second (the outer product mean: a, b; weight)
        terms = [cons[0].inputs[0], cons[0].inputs[1], cons[1].inputs[1]]
    else:
        terms = list(cons[0].inputs)
    for o in ops:
        if not isinstance(o, torch.fx.Node) or o.meta.get(SYM_SHAPE) is None:
            raise PassError(f"{describe_node(node)}: an operand has no symbolic shape: run shape_prop_pass first")
    sizes = letter_sizes(terms, [o.meta[SYM_SHAPE] for o in ops], [o.meta[SHAPE] for o in ops])
    return cons, sizes
