"""The outer product mean: ``linear(flatten(sum_s a ⊗ b)) / (eps + sum_s m_a m_b)`` -> one fused kernel.

Recognised on the math. The anchor is a two-operand product (any GEMM spelling: ``einsum``,
``matmul``/``@``, ``bmm``; normalize gives each an explicit equation in ``meta["einsum"]``) with one
contracted axis s whose result, through layout ops only (``reshape``/``view``/``flatten``,
``permute``/``transpose``, ``unsqueeze``/``squeeze``, indexing with ``None`` and full slices), reaches a projection (``linear``, or ``matmul``
with a 2-d weight) whose contracted dim is the flattened pair of one channel axis of each operand:

    AF2 / this repository:  o = einsum("...sic,...sje->...ijce", a, b); linear(o.reshape(..., c*e))
    OpenFold:               einsum("...bac,...dae->...bdce", a.transpose(-2, -3), b.transpose(-2, -3))
    reshaped bmm:           (a.reshape(S, I*C).t() @ b.reshape(S, J*E)).view(I, C, J, E).permute(0, 2, 1, 3)

Every axis of the operands is followed as an *atom* through those ops (a reshape may merge or split
atoms, never cut one), so the roles come from the structure, not from names or sizes: the
contracted atom is the sequence axis, the atoms merged into the projection's input are the
channels (c from one operand, e from the other, in either order: ``...ijec`` reads the weight
through a permuted view), the other free atoms the residues i and j, the rest batch axes.

The mean: a division of the projection's output (the bias divided too: AlphaFold's order) or of
its input (the bias not divided) by

- ``eps + count`` (``count + eps``), ``eps`` a positive Python number and ``count`` a product of two
  tensors over the same sequence axis, aligned with i and j (``einsum("...si,...sj->...ij", m, m)``
  unsqueezed, OpenFold's ``einsum("...abc,...adc->...bdc", m[..., None], m[..., None])``): the kernel
  computes ``sum_s m_a[s, i] m_b[s, j]`` from the two tensors itself;
- or the number of sequences S itself (a plain mean, no mask).

Refused, with the reason: a divisor that is not one of those (a count without eps, where a pair
no sequence has divides by 0; a count over another axis or not aligned with i and j; a sum of one
mask rather than a product; another constant, e.g. the number of residues), a division that
broadcasts the result, interior values with other users, dtypes the kernel does not take.
What the atoms cannot express (a layout that cuts an axis, batch axes merged) is not an outer
product mean for this rule and is left alone without a rejection.

    >>> import torch, foldcompile
    >>> class OPM(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.out = torch.nn.Linear(16, 8)
    ...     def forward(self, a, b, mask):                      # a, b [S, N, 4], mask [S, N]
    ...         o = torch.einsum("sic,sje->ijce", a, b).reshape(a.shape[1], b.shape[1], 16)
    ...         return self.out(o) / (1e-3 + torch.einsum("si,sj->ij", mask, mask)[..., None])
    >>> a, b, mask = torch.randn(5, 7, 4), torch.randn(5, 7, 4), torch.ones(5, 7)
    >>> fast = foldcompile.optimize(OPM(), a, b, mask)
    >>> fast.report.counts()["outer_product_mean"]
    {'matched': 1, 'rejected': 0}
    >>> "fused_outer_product_mean(" in fast.code
    True
    >>> torch.allclose(fast(a, b, mask), OPM.forward(fast.model, a, b, mask), atol=1e-5)
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from foldcompile.kernels.outer_product_mean import outer_product_mean as _opm_kernel
from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.rules._values import is_noop_cast
from foldcompile.passes.rules.attention import _Builder, _gemm, _num

__all__ = ["RULES", "fused_outer_product_mean"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYOUT = {"reshape", "view", "flatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "contiguous", "getitem"}


# ------------------------------------------------------------------ what the rewritten graph calls
def fused_outer_product_mean(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, *, mask_a: torch.Tensor | None = None,
                             mask_b: torch.Tensor | None = None, eps: float = 0.0,
                             bias_divided: bool = True) -> torch.Tensor:
    """``(flatten(sum_s a_s ⊗ b_s) @ weight^T + bias) / (eps + sum_s mask_a mask_b)`` through
    :func:`foldcompile.kernels.outer_product_mean.outer_product_mean` (the outer product never written)."""
    return _opm_kernel(a, b, weight, bias, mask_a=mask_a, mask_b=mask_b, eps=eps, bias_divided=bias_divided)


# ------------------------------------------------------------------ atoms: axes followed through layouts
Atom = tuple[str, int, int]  # (which source tensor, its dim, size)
Dims = list[tuple[Atom, ...]]  # per dim of a value: the atoms it holds, outermost first (() = size 1)


def _source_dims(tag: str, shape: tuple[int, ...]) -> Dims:
    return [((tag, d, s),) if s != 1 else () for d, s in enumerate(shape)]


def _regroup(dims: Dims, shape: tuple[int, ...]) -> Dims | None:
    """A reshape: the atoms in order, cut into ``shape``'s dims; None where a dim would cut an atom."""
    atoms = [a for d in dims for a in d]
    out: Dims = []
    k = 0
    for size in shape:
        group: list[Atom] = []
        prod = 1
        while prod < size and k < len(atoms):
            group.append(atoms[k])
            prod *= atoms[k][2]
            k += 1
        if prod != size:
            return None
        out.append(tuple(group))
    return out if k == len(atoms) else None


def _layout_step(n: torch.fx.Node, dims: Dims) -> Dims | None:
    """``dims`` of n's output from those of its first input; None if n is not a layout op we follow."""
    name, a, r = M.op_name(n), n.args, len(dims)
    if name in ("reshape", "view", "flatten"):
        return _regroup(dims, M.shape(n)) if M.shape(n) is not None else None
    if name == "contiguous" or is_noop_cast(n):
        return list(dims)
    if name == "permute" and len(a) == 2 and isinstance(a[1], (tuple, list)) and len(a[1]) == r:
        return [dims[p % r] for p in a[1]]
    if name == "transpose" and len(a) == 3 and all(isinstance(x, int) for x in a[1:]):
        out = list(dims)
        i, j = a[1] % r, a[2] % r
        out[i], out[j] = dims[j], dims[i]
        return out
    if name == "t" and r == 2:
        return [dims[1], dims[0]]
    if name == "unsqueeze" and len(a) == 2 and isinstance(a[1], int):
        out = list(dims)
        out.insert(a[1] % (r + 1), ())
        return out
    if name == "squeeze" and M.shape(n) is not None:
        return _regroup(dims, M.shape(n))
    if name == "getitem" and _new_axes_only(a[1]):  # x[..., None], x[:, None]
        idx = a[1] if isinstance(a[1], tuple) else (a[1],)
        out, k = [], 0
        for i in idx:
            if i is None:
                out.append(())
            elif i is Ellipsis:  # it covers the dims the full slices do not
                span = r - sum(isinstance(x, slice) for x in idx)
                out += dims[k: k + span]
                k += span
            else:
                out.append(dims[k])
                k += 1
        return out + list(dims[k:])
    return None


def _new_axes_only(idx: Any) -> bool:
    """An index of full slices, ``None`` and at most one ``...``: a view that only adds size-1 axes."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    return (all(i is None or i is Ellipsis or i == slice(None) for i in idx)
            and sum(i is Ellipsis for i in idx) <= 1)


def _is_layout(n: Any) -> bool:
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.args
            and isinstance(n.args[0], torch.fx.Node)):
        return False
    name = M.op_name(n)
    if name == "getitem":
        return len(n.args) == 2 and _new_axes_only(n.args[1])
    return name in _LAYOUT or is_noop_cast(n)


def _trace_back(x: torch.fx.Node, tag: str) -> tuple[torch.fx.Node, Dims, list[torch.fx.Node]] | None:
    """Walk back from ``x`` through layout ops to its source; ``x``'s dims as atoms of that source,
    and the layout nodes passed (source first)."""
    chain = []
    while _is_layout(x):
        chain.append(x)
        x = x.args[0]
    if M.shape(x) is None:
        return None
    dims = _source_dims(tag, M.shape(x))
    for n in reversed(chain):
        dims = _layout_step(n, dims)
        if dims is None:
            return None
    return x, dims, chain[::-1]


def _product_dims(g: torch.fx.Node, tags: tuple[str, str]):
    """For a two-operand product: (sources, their dims, layout chains, the output's dims, contracted atoms,
    batch atom pairs), or None where it is not one contraction over single axes."""
    got = _gemm(g)
    if got is None:
        return None
    _, ins, out_letters, ops = got
    traced = [_trace_back(op, tag) for op, tag in zip(ops, tags)]
    if any(t is None for t in traced):
        return None
    (src_a, dims_a, chain_a), (src_b, dims_b, chain_b) = traced
    la, lb = ins
    if len(la) != len(dims_a) or len(lb) != len(dims_b):
        return None
    of_a, of_b = dict(zip(la, dims_a)), dict(zip(lb, dims_b))
    contracted = (set(la) & set(lb)) - set(out_letters)
    if len(contracted) != 1 or (set(la) ^ set(lb)) - set(out_letters):
        return None
    s = contracted.pop()
    if len(of_a[s]) != 1 or len(of_b[s]) != 1 or of_a[s][0][2] != of_b[s][0][2]:
        return None
    pairs = []
    out_dims: Dims = []
    for letter in out_letters:
        if letter in of_a and letter in of_b:  # a batch axis of the product
            if len(of_a[letter]) != len(of_b[letter]):
                return None
            pairs += list(zip(of_a[letter], of_b[letter]))
            out_dims.append(of_a[letter])
        else:
            out_dims.append(of_a[letter] if letter in of_a else of_b[letter])
    return (src_a, src_b), (dims_a, dims_b), (chain_a, chain_b), out_dims, (of_a[s][0], of_b[s][0]), pairs


def _atoms_of(dims: Dims) -> set[Atom]:
    return {a for d in dims for a in d}


# ------------------------------------------------------------------ recognise
@dataclass
class _Division:
    node: torch.fx.Node  # the division
    dims: Dims  # the divided value's dims (atoms of the outer product's operands)
    before_projection: bool


def _projection(x: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None, bool] | None:
    """``(node, weight, bias, weight_is_transposed)`` when ``x``'s only user projects its last dim:
    ``linear(x, W[, bias])`` or ``matmul(x, Wt)`` with a 2-d ``Wt``."""
    if len(x.users) != 1:
        return None
    u = next(iter(x.users))
    name = M.op_name(u)
    if name == "linear" and u.args and u.args[0] is x:
        w = u.args[1] if len(u.args) > 1 else u.kwargs.get("weight")
        bias = u.args[2] if len(u.args) > 2 else u.kwargs.get("bias")
        if isinstance(w, torch.fx.Node) and M.shape(w) is not None and len(M.shape(w)) == 2:
            return u, w, bias, False
    if name == "matmul" and len(u.args) == 2 and u.args[0] is x and isinstance(u.args[1], torch.fx.Node):
        w = u.args[1]
        if M.shape(w) is not None and len(M.shape(w)) == 2:
            return u, w, None, True
    return None


def _divisor(d: Any) -> tuple[str, Any]:
    """What a divisor is: ``("number", c)``, ``("eps_count", (eps, count node))``, ``("count", node)`` (a
    product with no eps) or ``("other", reason)``."""
    c = _num(d)
    if c is not None:
        return "number", c
    if not isinstance(d, torch.fx.Node):
        return "other", "the divisor is not a tensor or a number"
    if M.op_name(d) == "add" and len(d.args) == 2 and not d.kwargs:
        for i in (0, 1):
            eps, term = _num(d.args[i]), d.args[1 - i]
            if eps is not None and isinstance(term, torch.fx.Node):
                return "eps_count", (eps, term)
    return "count", d


def _count(term: torch.fx.Node):
    """The count ``sum_s m_a[s, i] m_b[s, j]`` behind ``term`` (through layout ops): (its dims as atoms of
    the two mask tensors, the product's facts, the nodes from the product to ``term``), or None."""
    chain = []
    x = term
    while _is_layout(x):
        chain.append(x)
        x = x.args[0]
    facts = _product_dims(x, ("ma", "mb"))
    if facts is None:
        return None
    dims = facts[3]
    for n in reversed(chain):
        dims = _layout_step(n, dims)
        if dims is None:
            return None
    return dims, facts, [x, *chain[::-1]]


def _recognise(g: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    facts = _product_dims(g, ("a", "b"))
    if facts is None:
        return None
    (src_a, src_b), (dims_a, dims_b), (chain_a, chain_b), dims, (s_a, s_b), pairs = facts
    # forward: layouts and at most one division, to the projection
    cur, chain, division = g, [], None
    while True:
        proj = _projection(cur)
        if proj is not None:
            break
        if len(cur.users) != 1:
            return None
        u = next(iter(cur.users))
        if _is_layout(u) and u.args[0] is cur:
            dims = _layout_step(u, dims)
            if dims is None:
                return None
        elif (M.op_name(u) == "div" and len(u.args) == 2 and u.args[0] is cur and division is None
              and M.shape(u) == M.shape(cur)):
            division = _Division(u, list(dims), True)
        else:
            return None
        chain.append(u)
        cur = u
    lin, weight, bias, transposed = proj
    # the projection's contracted dim: one free atom of each operand, the channels c and e
    last = dims[-1]
    free = (_atoms_of(dims_a) | _atoms_of(dims_b)) - {s_a, s_b} - {a for p in pairs for a in p}
    if len(last) != 2 or {last[0][0], last[1][0]} != {"a", "b"} or not set(last) <= free:
        return None  # not an outer product whose channel pairs feed a projection
    # -- from here on it is an outer product mean candidate: what does not fit is rejected with a reason
    res, lead = dims[-3:-1], dims[:-3]
    if len(dims) < 3 or any(len(d) != 1 for d in res) or {res[0][0][0], res[1][0][0]} != {"a", "b"}:
        return Reject("the projection's input is not [..., residue, residue, channels] (residues merged or missing)")
    first, second = res[0][0][0], res[1][0][0]  # the operand whose residue comes first is the kernel's a
    i_atom, j_atom = res[0][0], res[1][0]
    ce = last[0][0] == first  # the flattened channels are (c of a, e of b): the weight as it is
    c_atom, e_atom = (last[0], last[1]) if ce else (last[1], last[0])
    # the product's batch axes hold a's atoms in its output (paired with b's): one leading dim each
    pair_ab = {x: y for x, y in pairs}
    lead_a = []
    for d in lead:
        if len(d) != 1 or d[0] not in pair_ab:
            return Reject("the leading axes of the projection's input are not the product's batch axes one by one")
        lead_a.append(d[0])
    if len(lead_a) != len(pairs):
        return Reject("a batch axis of the product is summed or merged before the projection")
    srcs = {"a": (src_a, s_a, chain_a), "b": (src_b, s_b, chain_b)}
    lead_of = {"a": lead_a, "b": [pair_ab[x] for x in lead_a]}
    want = {first: [*lead_of[first], srcs[first][1], i_atom, c_atom],
            second: [*lead_of[second], srcs[second][1], j_atom, e_atom]}
    for tag in (first, second):
        src = srcs[tag][0]
        extra = _atoms_of(_source_dims(tag, M.shape(src))) - set(want[tag])
        if extra:
            return Reject(f"operand {src.name} has axes that are neither batch, sequence, residue nor channel axes "
                          f"(sizes {sorted(a[2] for a in extra)})")
    S = s_a[2]
    out = lin
    if division is None:  # then it follows the projection: the bias is divided too
        u = next(iter(lin.users)) if len(lin.users) == 1 else None
        if u is not None and M.op_name(u) in ("cat", "concat", "concatenate"):
            return Reject("the projection's output is concatenated (a chunk loop): the pieces of a chunked "
                          "outer product mean are not merged into one call")
        if u is None or M.op_name(u) != "div" or len(u.args) != 2 or u.args[0] is not lin:
            return Reject("no division after the outer product (not a mean)")
        if M.shape(u) != M.shape(lin):
            return Reject(f"the division broadcasts the result from {M.shape(lin)} to {M.shape(u)}")
        division = _Division(u, dims[:-1] + [()], False)
        out = u
    region = [*_single_use(chain_a), *_single_use(chain_b), g, *chain, lin, division.node]
    notes = [f"channels {'c·e' if ce else 'e·c (the weight read through a permuted view)'}",
             "divided before the projection" if division.before_projection else "bias divided"]
    parts: dict[str, Any] = dict(first=srcs[first][0], second=srcs[second][0], want_first=want[first],
                                 want_second=want[second], tags=(first, second), weight=weight, bias=bias,
                                 transposed=transposed, ce=ce, C=c_atom[2], E=e_atom[2], Z=M.shape(lin)[-1],
                                 bias_divided=not division.before_projection, eps=0.0, masks=None)
    kind, what = _divisor(division.node.args[1])
    if kind == "number":
        if what != S:
            return Reject(f"divides by {what:g}, not by the number of sequences {S} (the summed axis)")
        notes.append(f"a plain mean over the {S} sequences")
    elif kind == "other":
        return Reject(what)
    elif kind == "count":
        if _count(what) is not None:
            return Reject("the count has no eps: a pair that no sequence has divides by 0")
        return Reject("the divisor is neither eps + a product of two tensors over the sequences nor their number")
    else:
        eps, term = what
        if not eps > 0:
            return Reject(f"eps {eps:g} is not positive: a pair that no sequence has divides by {eps:g}")
        counted = _count(term)
        if counted is None:
            return Reject("the divisor is eps + something that is not a product of two tensors over one axis")
        masks = _mask_operands(counted, division, lead_a, i_atom, j_atom, S)
        if isinstance(masks, str):
            return Reject(masks)
        parts.update(eps=eps, masks=masks)
        region += [n for n in (*counted[2], division.node.args[1]) if len(n.users) == 1]
        notes.append(f"divided by the count of sequences with both residues + {eps:g}")
    order = {n: k for k, n in enumerate(g.graph.nodes)}
    return Candidate("outer_product_mean", g, sorted(set(region), key=order.__getitem__), out, parts, notes)


def _single_use(chain: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The operand's layout nodes the fused call replaces: the tail of the chain used only along it."""
    keep: list[torch.fx.Node] = []
    for n in reversed(chain):
        if len(n.users) != 1:
            break
        keep.append(n)
    return keep[::-1]


def _mask_operands(counted, division: _Division, lead: list[Atom], i_atom: Atom, j_atom: Atom, S: int):
    """The count's axes must line up with the divided value's: its residue axes at i and j (one from
    each tensor), size 1 at the channels, a batch axis or size 1 at each leading axis; its summed axis
    as long as the sequences. Returns ``((mask_a, wanted atoms), (mask_b, wanted atoms))``, mask_a the
    tensor counted along i, or the reason the divisor is not that count."""
    cdims, facts, _ = counted
    (src_ma, src_mb), _, _, _, (s_ma, s_mb), cpairs = facts
    if s_ma[2] != S:
        return f"the count sums over an axis of {s_ma[2]}, not over the {S} sequences"
    divided = division.dims
    if len(cdims) > len(divided):
        return f"the count has more axes ({len(cdims)}) than the value it divides ({len(divided)})"
    aligned = [()] * (len(divided) - len(cdims)) + list(cdims)
    cpair = {x: y for x, y in cpairs}
    cfree = {a for d in cdims for a in d} - set(cpair) - set(cpair.values())
    want_ma: list[Atom | None] = [None] * len(lead)
    want_mb: list[Atom | None] = [None] * len(lead)
    mi = mj = None
    for d_val, d_cnt in zip(divided, aligned):
        if d_val in ((i_atom,), (j_atom,)):
            if len(d_cnt) != 1 or d_cnt[0] not in cfree:
                return "the count does not vary along both residue axes as Σ_s m[s, i] m[s, j] does"
            if d_val == (i_atom,):
                mi = d_cnt[0]
            else:
                mj = d_cnt[0]
        elif len(d_val) == 1 and d_val[0] in lead:
            if d_cnt == ():
                continue  # the count is the same along this batch axis: broadcast
            if len(d_cnt) != 1 or d_cnt[0] not in cpair:
                return "the count varies along a leading axis that is not one of its batch axes"
            k = lead.index(d_val[0])
            want_ma[k], want_mb[k] = d_cnt[0], cpair[d_cnt[0]]
        elif d_cnt != ():
            return "the count varies along the channels"
    if mi is None or mj is None or mi[0] == mj[0]:
        return "the count is not one tensor's residue axis times the other's (Σ_s m[s, i] m[s, j])"
    if mi[2] != i_atom[2] or mj[2] != j_atom[2]:
        return "the count's residue axes are not as long as the outer product's"
    if mi[0] == "mb":  # the count is written the other way round: its second tensor counts i
        src_ma, src_mb, s_ma, s_mb = src_mb, src_ma, s_mb, s_ma
        want_ma, want_mb = want_mb, want_ma
    masks = []
    for src, tag, s_atom, r_atom, lead_atoms in ((src_ma, mi[0], s_ma, mi, want_ma), (src_mb, mj[0], s_mb, mj, want_mb)):
        wanted = [*lead_atoms, s_atom, r_atom]
        if _atoms_of(_source_dims(tag, M.shape(src))) - set(a for a in wanted if a is not None):
            return "a tensor of the count has an axis that is summed or merged (not m[s, i] m[s, j])"
        masks.append((src, tag, wanted))
    return tuple(masks)


# ------------------------------------------------------------------ check, profit
def _check(c: Candidate, ctx: Context) -> str | None:
    p = c.parts
    dts = {M.dtype(p["first"]), M.dtype(p["second"]), M.dtype(p["weight"])}
    if len(dts) != 1 or next(iter(dts)) not in _DTYPES:
        return f"unsupported dtypes {sorted(map(str, dts))} (a, b and the weight of one of fp16/bf16/fp32/fp64)"
    if p["bias"] is not None and (not isinstance(p["bias"], torch.fx.Node) or M.shape(p["bias"]) != (p["Z"],)):
        return "the projection's bias is not a [c_z] tensor"
    if M.dtype(c.output) != M.dtype(p["first"]):
        return "the result's dtype differs from the operands' (a promoting divisor)"
    return None


def _profitable(c: Candidate, ctx: Context) -> str | None:
    before = sum(M.cost_bytes_at(n, ctx.subs) for n in c.region)
    p = c.parts
    after = sum(M.bytes_at(n, ctx.subs) for n in (p["first"], p["second"], p["weight"])) + M.bytes_at(c.output,
                                                                                                        ctx.subs)
    if p["masks"]:
        after += sum(M.bytes_at(m[0], ctx.subs) for m in p["masks"])
    if before and after > before:
        return f"not profitable at the stated size: {after} bytes fused vs {before} unfused"
    return None


# ------------------------------------------------------------------ replace
def _as_atoms(b: _Builder, x: torch.fx.Node, tag: str, want: list[Atom | None]) -> torch.fx.Node:
    """``x`` as a view with one dim per entry of ``want``: that atom of ``x`` (tagged ``tag``), or a size-1
    dim for None (a reshape dropping x's size-1 dims, a permute, a reshape inserting the wanted ones)."""
    atoms = [a for d in _source_dims(tag, M.shape(x)) for a in d]
    shape = tuple(a[2] for a in atoms)
    if tuple(M.shape(x)) != shape:
        x = b(torch.reshape, x, shape)
    perm = [atoms.index(a) for a in want if a is not None]
    if perm != list(range(len(atoms))):
        x = b(torch.permute, x, tuple(perm))
    final = tuple(1 if a is None else a[2] for a in want)
    if final != tuple(atoms[i][2] for i in perm):
        x = b(torch.reshape, x, final)
    return x


def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    p = c.parts
    b = _Builder(ctx.gm.graph, c.output, c)
    a_in = _as_atoms(b, p["first"], p["tags"][0], p["want_first"])
    b_in = _as_atoms(b, p["second"], p["tags"][1], p["want_second"])
    w = p["weight"]
    if p["transposed"]:  # matmul(x, Wt): the weight is Wt's transpose
        w = b(torch.transpose, w, 0, 1)
    if not p["ce"]:  # the projection reads (e, c): the weight as [Z, C, E] through a permuted view
        w = b(torch.transpose, b(torch.reshape, w, (p["Z"], p["E"], p["C"])), 1, 2)
    kw: dict[str, Any] = dict(eps=p["eps"], bias_divided=p["bias_divided"])
    if p["masks"]:
        (ma, tag_a, want_a), (mb, tag_b, want_b) = p["masks"]
        kw.update(mask_a=_as_atoms(b, ma, tag_a, want_a), mask_b=_as_atoms(b, mb, tag_b, want_b))
    out = b(fused_outer_product_mean, a_in, b_in, w, p["bias"], **kw)
    out.meta["shape"], out.meta["dtype"] = M.shape(c.output), M.dtype(c.output)
    return out


RULES = [Rule("outer_product_mean", "outer_product_mean", 90, _recognise, _check, _profitable, _replace,
              "linear(flatten(Σ_s a ⊗ b)) / (eps + Σ_s m_a m_b) -> fused_outer_product_mean")]
