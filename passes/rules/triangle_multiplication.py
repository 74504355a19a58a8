"""The triangle multiplicative update -> one fused kernel (:mod:`foldcompile.kernels.triangle_multiplication`).

Recognised on the math, never on module or variable names. What the kernel computes, and so
what is matched (``x = LN_in(z)``)::

    a = mask · sigmoid(x W_ag^T + b_ag) · (x W_ap^T + b_ap)      b alike (the same mask, or none)
    outgoing  p_ij = Σ_k a_ik b_jk          incoming  p_ij = Σ_k a_ki b_kj
    out = sigmoid(x W_g^T + b_g) · (LN_out(p) W_o^T + b_o)

The anchor is the triangle product: a two-operand product (any GEMM spelling: ``einsum``,
``matmul``/``@``, ``bmm``; normalize gives each an explicit equation) contracting one residue
axis of two pair tensors ``[..., N, N, H]`` and pairing their channels. Its operands are
followed back through layout ops (``permute``/``transpose``, ``reshape``/``view`` merging batch
and channel axes for a ``bmm``, no-op casts), its result forward through them, with the axes
followed as *atoms* (as the outer product mean rule does), so the orientation comes from the
structure: the operand whose free residue axis lands first in the result is the kernel's
``a``; both operands keep their first residue axis (outgoing) or both their second
(incoming). AF2's released incoming update (``einsum("kjc,kic->ijc", a, b)``) thus gives the
model's ``b`` the kernel's ``a`` role, and the Pairformer's (``"kic,kjc->ijc"``) keeps them.

Each operand is a product of factors (any order and grouping of the multiplications):
``sigmoid(linear(x))`` (the gate), ``linear(x)`` (the projection) and optionally a mask that
broadcasts along the channels (``mask.unsqueeze(-1)``, ``mask[..., None]``; bool or float, taking
no gradient). Both operands may also be channel slices of one wider gated product
(``torch.chunk(t, 2, dim=-1)``, ``t[..., :H]``, ``split``): the slices of the weights are passed.
``x`` is a layer norm over the last dim (``F.layer_norm`` in any spelling, or written by hand as
the layer-norm rule recognises it) read by nothing but the five projections. The result goes
through a layer norm over the channels, a projection back to ``c_z`` and a multiplication with
``sigmoid(linear(x))`` of the same ``x``: that multiplication is the match's output. Dropout,
the residual add and anything else around it are left to the other rules (the kernel's epilogue
has none of them).

Refused, with the reason: a product over the other index (``Σ_k a_ik b_kj``: one operand keeps
its first residue axis, the other its second), a mask on one operand only or different masks,
a gate that is not a sigmoid (``relu(linear)``), a missing gate, projections of different
tensors, an ``LN(z)`` (or an interior value) used outside the update (the kernel does not expose
it), a result that is not layer-normed, projected and gated, ``c_z`` or ``c_hidden`` above the
kernel's Triton limit (it would run its unfused reference), a mask that requires grad, mixed
dtypes. What is not a triangle product at all (no gated projections, channels not paired, a
contraction over the channels) is not a candidate and is not counted.

    >>> import torch, foldcompile
    >>> from foldcompile.models.alphafold2.triangle import TriangleMultiplicationIncoming
    >>> from foldcompile.models.zoo import randomize_parameters
    >>> module = randomize_parameters(TriangleMultiplicationIncoming(c_z=8, c_hidden=4), 0)
    >>> z, mask = torch.randn(1, 9, 9, 8), (torch.rand(1, 9, 9) > 0.2).float()
    >>> fast = foldcompile.optimize(module, z, mask)
    >>> fast.report.counts()["triangle_multiplication"]
    {'matched': 1, 'rejected': 0}
    >>> "fused_triangle_multiplication(" in fast.code
    True
    >>> torch.allclose(fast(z, mask), module(z, mask), atol=1e-5)
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from foldcompile.kernels.triangle_multiplication import MAX_TRITON_DIM, TriangleMultiplicationParams
from foldcompile.kernels.triangle_multiplication import triangle_multiplication as _trimul_kernel
from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.rules import layer_norm as _ln
from foldcompile.passes.rules._values import is_noop_cast
from foldcompile.passes.rules.attention import _Builder
from foldcompile.passes.rules.outer_product_mean import _layout_step, _product_dims

__all__ = ["RULES", "fused_triangle_multiplication"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACTIVATIONS = {"relu", "gelu", "silu", "tanh", "softplus", "elu", "leaky_relu", "hardsigmoid", "sigmoid"}
_TAGS = ("p0", "p1")  # the product's two operands, in its argument order


# ------------------------------------------------------------------ what the rewritten graph calls
def fused_triangle_multiplication(z: torch.Tensor, mask: torch.Tensor | None, a_proj_weight: torch.Tensor,
                                  a_gate_weight: torch.Tensor, b_proj_weight: torch.Tensor,
                                  b_gate_weight: torch.Tensor, gate_weight: torch.Tensor, out_weight: torch.Tensor, *,
                                  a_proj_bias: torch.Tensor | None = None, a_gate_bias: torch.Tensor | None = None,
                                  b_proj_bias: torch.Tensor | None = None, b_gate_bias: torch.Tensor | None = None,
                                  gate_bias: torch.Tensor | None = None, out_bias: torch.Tensor | None = None,
                                  ln_in_weight: torch.Tensor | None = None, ln_in_bias: torch.Tensor | None = None,
                                  ln_out_weight: torch.Tensor | None = None, ln_out_bias: torch.Tensor | None = None,
                                  eps_in: float = 1e-5, eps_out: float = 1e-5, outgoing: bool = True) -> torch.Tensor:
    """The triangle multiplicative update of ``z`` through
    :func:`foldcompile.kernels.triangle_multiplication.triangle_multiplication` (formula there)."""
    params = TriangleMultiplicationParams(
        a_proj_weight=a_proj_weight, a_gate_weight=a_gate_weight, b_proj_weight=b_proj_weight,
        b_gate_weight=b_gate_weight, gate_weight=gate_weight, out_weight=out_weight, a_proj_bias=a_proj_bias,
        a_gate_bias=a_gate_bias, b_proj_bias=b_proj_bias, b_gate_bias=b_gate_bias, gate_bias=gate_bias,
        out_bias=out_bias, ln_in_weight=ln_in_weight, ln_in_bias=ln_in_bias, ln_out_weight=ln_out_weight,
        ln_out_bias=ln_out_bias, eps_in=eps_in, eps_out=eps_out)
    return _trimul_kernel(z, mask, params, outgoing)


# ------------------------------------------------------------------ small readers
def _linear(n: Any) -> tuple[torch.fx.Node, torch.fx.Node, Any] | None:
    """``(input, weight, bias)`` of ``F.linear(input, weight[, bias])`` with a 2-d weight."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function" or M.op_name(n) != "linear" or not n.args:
        return None
    x = n.args[0]
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    if not isinstance(x, torch.fx.Node) or not isinstance(w, torch.fx.Node) or M.shape(w) is None \
            or len(M.shape(w)) != 2 or not (b is None or isinstance(b, torch.fx.Node)):
        return None
    return x, w, b


def _sigmoid_of(n: Any) -> torch.fx.Node | None:
    if isinstance(n, torch.fx.Node) and n.op == "call_function" and M.op_name(n) == "sigmoid" \
            and len(n.args) == 1 and not n.kwargs and isinstance(n.args[0], torch.fx.Node):
        return n.args[0]
    return None


def _factors(t: torch.fx.Node) -> tuple[list[Any], list[torch.fx.Node]]:
    """``t`` as a product: its factors (through multiplications whose value only this product reads)
    and those multiplications (``t`` first)."""
    leaves: list[Any] = []
    muls: list[torch.fx.Node] = []

    def walk(n: Any, top: bool) -> None:
        if (isinstance(n, torch.fx.Node) and n.op == "call_function" and M.op_name(n) == "mul"
                and len(n.args) == 2 and not n.kwargs and (top or len(n.users) == 1)):
            muls.append(n)
            walk(n.args[0], False)
            walk(n.args[1], False)
        else:
            leaves.append(n)

    walk(t, True)
    return leaves, muls


def _example_requires_grad(n: torch.fx.Node) -> bool | None:
    for key in ("example_value", "val"):
        v = n.meta.get(key)
        if isinstance(v, torch.Tensor):
            return bool(v.requires_grad)
    return None


def _requires_grad(n: torch.fx.Node) -> bool:
    """Whether the traced value may need a gradient: its own example value (Dynamo's record) says;
    without one (a node a pass made, a hand-built graph) any input of it that does, or any parameter
    or buffer with no record, counts (conservative)."""
    work, seen = [n], set()
    while work:
        x = work.pop()
        if x in seen:
            continue
        seen.add(x)
        known = _example_requires_grad(x)
        if known is not None:
            if known:
                return True
            continue
        if x.op == "get_attr":
            return True
        work.extend(x.all_input_nodes)
    return False


# ------------------------------------------------------------------ layer norms (F.layer_norm or by hand)
def _norm_with_output(y: Any, ctx: Context) -> Candidate | Reject | None:
    """The layer norm whose output is ``y`` (a candidate of the layer-norm family: parts x, weight,
    bias, eps, N; region), a reason it is one the kernel cannot take, or None."""
    if not isinstance(y, torch.fx.Node):
        return None
    if y.op == "call_function" and y.target is torch.nn.functional.layer_norm:
        return _ln._recognise(y, ctx)
    # by hand: the anchor (the normalising mul/div) is at most two ops (weight, bias) before y
    frontier, seen = [y], set()
    for _ in range(3):
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, torch.fx.Node):
                continue
            seen.add(n)
            got = _ln._recognise_by_hand(n, ctx)
            if isinstance(got, Candidate) and got.output is y:
                return got
            nxt += [a for a in n.args if isinstance(a, torch.fx.Node)]
        frontier = nxt
    return None


def _norm_of_input(v: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    """The layer norm that reads ``v`` and is its only reader (``F.layer_norm(v, ...)``, or by hand)."""
    users = list(v.users)
    plain = [u for u in users if u.target is torch.nn.functional.layer_norm and u.args and u.args[0] is v]
    if plain:
        others = [u.name for u in users if u is not plain[0]]
        if others:
            return Reject(f"the triangle product's result {v.name} is read outside its layer norm (by {others[0]})")
        return _ln._recognise(plain[0], ctx)
    for u in users:
        for w in u.users:
            got = _ln._recognise_by_hand(w, ctx)
            if isinstance(got, Candidate) and got.parts["x"] is v:
                return got if set(users) <= set(got.region) else Reject(
                    f"the triangle product's result {v.name} is read outside its layer norm")
    return None


# ------------------------------------------------------------------ the gated projections
@dataclass
class _Slice:
    """One operand of the product: channels [lo, hi) of a gated product ``wide`` (all of it when not sliced)."""

    wide: torch.fx.Node
    lo: int
    hi: int
    nodes: list[torch.fx.Node]  # the slicing nodes (chunk / getitem / casts), empty when not sliced


def _channel_slice(s: torch.fx.Node) -> _Slice:
    """``s`` as channels of a wider tensor: ``chunk(t, n, dim=-1)[k]``, ``split(t, size, dim=-1)[k]``,
    ``t[..., lo:hi]`` or ``narrow(t, -1, lo, n)`` (through no-op casts of t); else all of ``s``."""
    full = _Slice(s, 0, M.shape(s)[-1], [])
    name, a = M.op_name(s), s.args
    if name == "getitem" and len(a) == 2 and isinstance(a[0], torch.fx.Node):
        src, idx = a[0], a[1]
        if isinstance(idx, int) and M.op_name(src) in ("chunk", "split") and src.meta.get("multi_output"):
            return _piece(s, src, idx) or full
        if not isinstance(idx, tuple) or not idx or M.shape(src) is None:
            return full
        rank = len(M.shape(src))
        last = idx[-1]
        lead = idx[:-1]
        if not isinstance(last, slice) or last.step not in (None, 1):
            return full
        if not (lead == (Ellipsis,) or (len(lead) == rank - 1 and all(i == slice(None) for i in lead))):
            return full
        width = M.shape(src)[-1]
        lo, hi, _ = last.indices(width)
        return _through_casts(src, lo, hi, [s]) if hi > lo else full
    if name == "narrow" and len(a) == 4 and isinstance(a[0], torch.fx.Node) and M.shape(a[0]) is not None \
            and all(isinstance(x, int) for x in a[1:]) and a[1] % len(M.shape(a[0])) == len(M.shape(a[0])) - 1:
        return _through_casts(a[0], a[2], a[2] + a[3], [s])
    return full


def _piece(s: torch.fx.Node, src: torch.fx.Node, k: int) -> _Slice | None:
    t = src.args[0] if src.args else None
    if not isinstance(t, torch.fx.Node) or M.shape(t) is None:
        return None
    rank, width = len(M.shape(t)), M.shape(t)[-1]
    if M.op_name(src) == "chunk":
        n = src.args[1] if len(src.args) > 1 else src.kwargs.get("chunks")
        dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
        if not isinstance(n, int) or not isinstance(dim, int) or dim % rank != rank - 1:
            return None
        step = -(-width // n)
        bounds = [(i, min(i + step, width)) for i in range(0, width, step)]
    else:
        size = src.args[1] if len(src.args) > 1 else src.kwargs.get("split_size_or_sections")
        dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim % rank != rank - 1:
            return None
        sizes = [size] * -(-width // size) if isinstance(size, int) else list(size)
        bounds, lo = [], 0
        for n in sizes:
            bounds.append((lo, min(lo + n, width)))
            lo += n
    if not 0 <= k < len(bounds):
        return None
    return _through_casts(t, bounds[k][0], bounds[k][1], [s, src])


def _through_casts(t: torch.fx.Node, lo: int, hi: int, nodes: list[torch.fx.Node]) -> _Slice:
    while is_noop_cast(t):  # Boltz's ``chunk(x.float(), 2, dim=-1)`` on float32 x
        nodes.append(t)
        t = t.args[0]
    return _Slice(t, lo, hi, nodes)


@dataclass
class _Gated:
    """``mask · sigmoid(linear(x, gate)) · linear(x, proj)`` over a channel slice of ``wide``."""

    x: torch.fx.Node
    proj: torch.fx.Node  # the projection's linear node
    gate: torch.fx.Node  # the gate's linear node
    mask: Any  # the mask factor (last dim 1) or None
    nodes: list[torch.fx.Node]  # the multiplications, the sigmoid and the two linears
    sl: _Slice


def _looks_gated(s: torch.fx.Node) -> bool:
    """A candidate operand: (a channel slice of) a product with a linear among its factors."""
    sl = _channel_slice(s)
    leaves, muls = _factors(sl.wide)
    return bool(muls) and any(_linear(x) is not None for x in leaves)


def _gated(s: torch.fx.Node, which: str) -> _Gated | str:
    """The gated projection behind operand ``s`` of the product, or the reason it is not one."""
    sl = _channel_slice(s)
    leaves, muls = _factors(sl.wide)
    width = M.shape(sl.wide)[-1]
    gates, projs, masks, others = [], [], [], []
    for f in leaves:
        inner = _sigmoid_of(f)
        if inner is not None and _linear(inner) is not None:
            gates.append((f, inner))
        elif _linear(f) is not None:
            projs.append(f)
        elif isinstance(f, torch.fx.Node) and M.shape(f) is not None and M.shape(f) and M.shape(f)[-1] == 1 \
                and width != 1:
            masks.append(f)
        else:
            others.append(f)
    for f in others:
        if isinstance(f, torch.fx.Node) and M.op_name(f) in _ACTIVATIONS and f.args and _linear(f.args[0]):
            return (f"{which}'s gate is {M.op_name(f)}(linear), not sigmoid(linear): the kernel gates with a "
                    "sigmoid")
        what = f"{f:g}" if isinstance(f, (int, float)) else (f.name if isinstance(f, torch.fx.Node) else repr(f))
        return f"{which} has a factor ({what}) that is neither a gate, a projection nor a mask along the pairs"
    if not gates:
        return f"{which} has no sigmoid gate (the kernel computes mask · sigmoid(linear) · linear)"
    if len(gates) > 1 or len(projs) != 1 or len(masks) > 1:
        return (f"{which} is a product of {len(gates)} sigmoid gates, {len(projs)} projections and {len(masks)} "
                "masks (the kernel takes one gate, one projection and at most one mask)")
    (sig, gate), proj = gates[0], projs[0]
    xs = {_linear(gate)[0], _linear(proj)[0]}
    if len(xs) != 1:
        return f"{which}'s gate and projection read different tensors"
    for n in (sig, gate, proj):
        if len(n.users) != 1:
            return f"multiple users of an interior value ({n.name} is used {len(n.users)} times)"
    return _Gated(xs.pop(), proj, gate, masks[0] if masks else None, [*muls, sig, gate, proj], sl)


def _mask_base(f: torch.fx.Node) -> tuple[torch.fx.Node, bool]:
    """``(tensor, peeled)``: the ``[..., N, N]`` tensor behind a ``[..., N, N, 1]`` mask factor when it
    is ``m.unsqueeze(-1)`` or ``m[..., None]`` (peeled True); else the factor itself."""
    name, a = M.op_name(f), f.args
    if name == "unsqueeze" and len(a) == 2 and isinstance(a[1], int) and isinstance(a[0], torch.fx.Node) \
            and M.shape(a[0]) is not None and a[1] % (len(M.shape(a[0])) + 1) == len(M.shape(a[0])):
        return a[0], True
    if name == "getitem" and len(a) == 2 and isinstance(a[0], torch.fx.Node) and a[1] in ((Ellipsis, None),):
        return a[0], True
    return f, False


# ------------------------------------------------------------------ recognise
def _recognise(g: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    facts = _product_dims(g, _TAGS)
    if facts is None:
        return None
    srcs, _, chains, out_dims, (s0, s1), pairs = facts
    shapes = [M.shape(s) for s in srcs]
    if any(s is None or len(s) < 3 for s in shapes):
        return None
    r0, r1 = len(shapes[0]), len(shapes[1])
    ch0, ch1 = (_TAGS[0], r0 - 1, shapes[0][-1]), (_TAGS[1], r1 - 1, shapes[1][-1])
    pair_of = dict(pairs)
    if shapes[0][-1] == 1 or pair_of.get(ch0) != ch1:
        return None  # the channels are not a batch axis of the product: not a triangle product
    if s0[1] not in (r0 - 3, r0 - 2) or s1[1] not in (r1 - 3, r1 - 2):
        return None  # the contraction is not over a residue axis
    if not all(_looks_gated(s) for s in srcs):
        return None
    # -- a triangle product candidate: from here on what does not fit is rejected with the reason
    if s0[1] - r0 != s1[1] - r1:
        return Reject("the product sums one operand's first residue axis against the other's second "
                      "(Σ_k a_ik b_kj): neither outgoing (Σ_k a_ik b_jk) nor incoming (Σ_k a_ki b_kj)")
    outgoing = s0[1] == r0 - 2  # both keep their first residue axis, sum over the second
    if r0 != r1 or shapes[0] != shapes[1]:
        return Reject(f"the operands have different shapes {shapes[0]} and {shapes[1]}")
    lead0 = [(_TAGS[0], d, shapes[0][d]) for d in range(r0 - 3) if shapes[0][d] != 1]
    if any(pair_of.get(a) != (_TAGS[1], a[1], a[2]) for a in lead0):
        return Reject("the operands' batch axes are not paired one to one")
    # forward: layout ops to the layer norm of the result
    cur, fwd, dims = g, [], list(out_dims)
    while True:
        if len(cur.users) != 1:
            break
        u = next(iter(cur.users))
        if not (u.op == "call_function" and u.args and u.args[0] is cur and M.op_name(u) != "layer_norm"):
            break
        step = _layout_step(u, dims)
        if step is None:
            break
        dims, cur = step, u
        fwd.append(u)
    flat = [a for d in dims for a in d]
    if not (len(dims) >= 3 and dims[-1] == (ch0,) and len(dims[-2]) == 1 and len(dims[-3]) == 1
            and flat == [*lead0, dims[-3][0], dims[-2][0], ch0]):
        return Reject(f"the product's result is not laid out [..., i, j, channels] before its layer norm "
                      f"(it reaches {cur.name} as {M.shape(cur)})")
    first = dims[-3][0]
    if first[1] not in (r0 - 3, r0 - 2):
        return Reject("the result's first residue axis is not a residue axis of the operands")
    a_idx = _TAGS.index(first[0])  # the operand whose free residue axis comes first: the kernel's a
    ln_out = _norm_of_input(cur, ctx)
    if ln_out is None:
        users = ", ".join(u.name for u in cur.users)
        return Reject(f"the triangle product's result is not layer-normed over its channels (read by {users})")
    if isinstance(ln_out, Reject):
        return Reject(f"the layer norm of the product: {ln_out.reason}")
    gated = []
    for i, s in enumerate(srcs):
        got = _gated(s, "a" if i == a_idx else "b")
        if isinstance(got, str):
            return Reject(got)
        gated.append(got)
    ga, gb = gated[a_idx], gated[1 - a_idx]
    if ga.x is not gb.x:
        return Reject("a and b are projections of different tensors")
    x = ga.x
    if (ga.mask is None) != (gb.mask is None):
        masked = "a" if ga.mask is not None else "b"
        return Reject(f"only {masked} is masked (the kernel masks both projections or neither)")
    if ga.mask is not None and ga.mask is not gb.mask and (_mask_base(ga.mask)[0] is not _mask_base(gb.mask)[0]
                                                          or M.shape(ga.mask) != M.shape(gb.mask)):
        return Reject("a and b are masked by different tensors (the kernel applies one mask to both)")
    for gd in (ga, gb):
        if M.shape(gd.sl.wide)[:-1] != M.shape(x)[:-1]:
            return Reject(f"{gd.sl.wide.name} is broadcast beyond the pairs of {x.name} "
                          f"({M.shape(gd.sl.wide)} from {M.shape(x)})")
    ln_in = _norm_with_output(x, ctx)
    if ln_in is None:
        return Reject(f"the projections read {x.name}, not a layer norm of z (the kernel normalises z itself)")
    if isinstance(ln_in, Reject):
        return Reject(f"the layer norm of z: {ln_in.reason}")
    z = ln_in.parts["x"]
    # the output: LN(p) -> projection -> times sigmoid(linear(x))
    ln_y = ln_out.output
    if len(ln_y.users) != 1 or _linear(next(iter(ln_y.users))) is None \
            or next(iter(ln_y.users)).args[0] is not ln_y:
        return Reject(f"the layer norm of the product ({ln_y.name}) does not feed one projection alone")
    lin_o = next(iter(ln_y.users))
    final = next(iter(lin_o.users)) if len(lin_o.users) == 1 else None
    gate_sig = None
    if final is not None and M.op_name(final) == "mul" and len(final.args) == 2 and not final.kwargs:
        other = final.args[1] if final.args[0] is lin_o else final.args[0]
        inner = _sigmoid_of(other)
        if other is not lin_o and inner is not None and _linear(inner) is not None:
            gate_sig = other
    if gate_sig is None:
        return Reject(f"the output projection ({lin_o.name}) is not multiplied by a sigmoid gate alone "
                      "(the kernel computes sigmoid(linear(LN(z))) · linear(LN(p)))")
    gate_lin = gate_sig.args[0]
    if _linear(gate_lin)[0] is not x:
        return Reject(f"the output gate reads {_linear(gate_lin)[0].name}, not the layer norm of z ({x.name})")
    for n in (gate_sig, gate_lin):
        if len(n.users) != 1:
            return Reject(f"multiple users of an interior value ({n.name} is used {len(n.users)} times)")
    if M.shape(final) != M.shape(z) or M.shape(lin_o) != M.shape(z) or M.shape(gate_sig) != M.shape(z):
        return Reject(f"the gated output {M.shape(final)} is not z's shape {M.shape(z)}")
    # the region: every node the kernel replaces; nothing in it may be read outside it
    region = [*ln_in.region, *ga.nodes, *gb.nodes, *ga.sl.nodes, *gb.sl.nodes, *chains[0], *chains[1], g, *fwd,
              *ln_out.region, lin_o, gate_lin, gate_sig, final]
    members = set(region)
    outside = [u for u in x.users if u not in members]
    if outside:
        return Reject(f"the layer norm of z ({x.name}) is also read by {outside[0].name}, outside the update: the "
                      "kernel does not expose LN(z)")
    for n in region:
        if n is not final:
            out = [u for u in n.users if u not in members]
            if out:
                return Reject(f"multiple users of an interior value ({n.name} is also read by {out[0].name})")
    C, H = M.shape(z)[-1], shapes[0][-1]
    notes = [f"{'outgoing' if outgoing else 'incoming'} (Σ_k a_{'ik' if outgoing else 'ki'} "
             f"b_{'jk' if outgoing else 'kj'})",
             f"the product's {'first' if a_idx == 0 else 'second'} operand is the kernel's a",
             "masked" if ga.mask is not None else "no mask"]
    if ga.sl.nodes or gb.sl.nodes:
        notes.append("a and b are channel slices of wider projections")
    if ln_in.rule == "hand_layer_norm" or ln_out.rule == "hand_layer_norm":
        notes.append("a layer norm written out by hand")
    parts: dict[str, Any] = dict(z=z, x=x, a=ga, b=gb, outgoing=outgoing, ln_in=ln_in.parts, ln_out=ln_out.parts,
                                 out_lin=lin_o, gate_lin=gate_lin, product=g, C=C, H=H)
    order = {n: k for k, n in enumerate(g.graph.nodes)}
    return Candidate("triangle_multiplication", g, sorted(members, key=order.__getitem__), final, parts, notes)


# ------------------------------------------------------------------ check, profit
def _check(c: Candidate, ctx: Context) -> str | None:
    p = c.parts
    dt = M.dtype(p["z"])
    if dt not in _DTYPES:
        return f"unsupported dtype {dt} (z of one of fp16/bf16/fp32/fp64)"
    bad = [n for n in c.region if isinstance(M.dtype(n), torch.dtype) and M.dtype(n) != dt]
    if bad:
        return f"mixed dtypes: {bad[0].name} is {M.dtype(bad[0])}, z is {dt} (the kernel computes in z's dtype)"
    if p["C"] > MAX_TRITON_DIM or p["H"] > MAX_TRITON_DIM:
        return (f"c_z {p['C']} / c_hidden {p['H']} above the kernel's limit of {MAX_TRITON_DIM} channels (it would "
                "run its unfused reference)")
    zs = M.shape(p["z"])
    if zs[-2] != zs[-3]:
        return f"z is not square over its residue axes: {zs}"
    mask = p["a"].mask
    if mask is not None:
        if M.dtype(mask) != torch.bool and not (isinstance(M.dtype(mask), torch.dtype)
                                                and M.dtype(mask).is_floating_point):
            return f"the mask has dtype {M.dtype(mask)} (the kernel takes bool or floating masks)"
        ms = M.shape(mask)
        if len(ms) > len(zs):
            return f"the mask {ms} has more axes than z {zs}"
        try:
            ok = torch.broadcast_shapes(ms[:-1], zs[:-1]) == tuple(zs[:-1])
        except RuntimeError:
            ok = False
        if not ok:
            return f"the mask {ms} does not broadcast to z's pairs {zs[:-1]}"
        if _requires_grad(mask):
            return f"the mask {mask.name} requires grad (the kernel's mask takes no gradient)"
    for lin, want in ((p["out_lin"], (p["C"], p["H"])), (p["gate_lin"], (p["C"], p["C"]))):
        if M.shape(_linear(lin)[1]) != want:
            return f"{lin.name}'s weight is {M.shape(_linear(lin)[1])}, expected {want}"
    for which in ("a", "b"):
        gd = p[which]
        for lin in (gd.proj, gd.gate):
            _, w, b = _linear(lin)
            width = M.shape(gd.sl.wide)[-1]
            if M.shape(w) != (width, p["C"]) or (b is not None and M.shape(b) != (width,)):
                return f"{lin.name}'s weight/bias do not project c_z {p['C']} to {width} channels"
    return None


def _profitable(c: Candidate, ctx: Context) -> str | None:
    """The kernel reads z twice (projections, output) and the mask once, writes a and b and reads them in
    the product, writes p and reads it in the output kernel, writes the output: compared with the bytes
    the replaced ops move, at the stated size."""
    p = c.parts
    before = sum(M.cost_bytes_at(n, ctx.subs) for n in c.region)
    pair_h = M.bytes_at(p["product"], ctx.subs)  # one [..., N, N, H] tensor
    after = 2 * M.bytes_at(p["z"], ctx.subs) + M.bytes_at(c.output, ctx.subs) + 6 * pair_h
    if p["a"].mask is not None:
        after += M.bytes_at(p["a"].mask, ctx.subs)
    if before and after > before:
        return f"not profitable at the stated size: {after} bytes fused vs {before} unfused"
    return None


# ------------------------------------------------------------------ replace
def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    p = c.parts
    b = _Builder(ctx.gm.graph, c.output, c)

    def rows(t: Any, sl: _Slice) -> Any:  # the slice's rows of a weight or bias of the wide projection
        if t is None or (sl.lo, sl.hi) == (0, M.shape(sl.wide)[-1]):
            return t
        return b(torch.narrow, t, 0, sl.lo, sl.hi - sl.lo)

    kw: dict[str, Any] = {}
    weights = []
    for which in ("a", "b"):
        gd = p[which]
        _, wp, bp = _linear(gd.proj)
        _, wg, bg = _linear(gd.gate)
        weights += [rows(wp, gd.sl), rows(wg, gd.sl)]
        kw[f"{which}_proj_bias"], kw[f"{which}_gate_bias"] = rows(bp, gd.sl), rows(bg, gd.sl)
    _, w_g, b_g = _linear(p["gate_lin"])
    _, w_o, b_o = _linear(p["out_lin"])
    kw.update(gate_bias=b_g, out_bias=b_o, ln_in_weight=p["ln_in"]["weight"], ln_in_bias=p["ln_in"]["bias"],
              ln_out_weight=p["ln_out"]["weight"], ln_out_bias=p["ln_out"]["bias"])
    kw = {k: v for k, v in kw.items() if v is not None}
    mask = p["a"].mask
    if mask is not None:
        base, peeled = _mask_base(mask)
        mask = base if peeled else b(torch.select, mask, -1, 0)
    out = b(fused_triangle_multiplication, p["z"], mask, *weights, w_g, w_o, **kw, eps_in=p["ln_in"]["eps"],
            eps_out=p["ln_out"]["eps"], outgoing=p["outgoing"])
    out.meta["shape"], out.meta["dtype"] = M.shape(c.output), M.dtype(c.output)
    return out


RULES = [Rule("triangle_multiplication", "triangle_multiplication", 95, _recognise, _check, _profitable, _replace,
              "sigmoid(linear(LN z)) · linear(LN(Σ_k a b)) with a, b gated masked projections of LN z "
              "-> fused_triangle_multiplication")]

