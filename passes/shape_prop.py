"""Shape propagation with symbolic sizes.

``shape_prop_pass(gm, example_inputs, dims)`` runs the graph once on the example
inputs (an ``fx.Interpreter``) and writes into every node's meta:

- ``shape``: the concrete size tuple (``None`` for non-tensors; a tuple of tuples
  for ops returning several tensors, e.g. ``split``, with ``multi_output=True``),
- ``dtype``: the tensor dtype (tuple of dtypes for several tensors),
- ``sym_shape``: the same sizes as sympy expressions over named dims
  (``N_seq``, ``N_res``, ``N_templ``, ...). Channel sizes stay plain integers;
- ``sym_value``: for integer-valued nodes (``x.shape[0] // 2``) the expression;
- ``aliases_input``: for ops whose output shares storage with an input (views).

The nodes of an activation-checkpoint body (a capture's ``checkpoint(wrap_body_0, *args)``
call) are annotated too, the body's inputs taking the arguments' symbolic sizes: later
passes (classify, fuse) see inside the region.

Symbolic sizes are derived op by op (a rule per op: broadcasting, reshape groups,
einsum letters, slices, cat, pad, ...; the rules and their contract are in
:mod:`foldcompile.passes.shape_rules`). Integers written literally into the graph
(a capture that specialised ``x.view(169, 32)``) are resolved structurally first
(reshape groups, factors of the input size), and only then by value: a literal
equal to a named dim's example value is that dim. Ops with no rule fall back to
that value matching, and are listed in the pass record (``record["fallback"]``).
Every derived expression is checked against the concrete size at the example
dims; a rule that disagrees raises ``PassError``.

Where dims come from: ``dims={"N_seq": 11, "N_res": 13}`` from the caller; else
they are inferred from placeholders whose names fix their layout (trailing dims,
leading batch dims stay constant)::

    m, msa, msa_act, m_*            [..., N_seq, N_res, c]
    z, pair, pair_act, z_*          [..., N_res, N_res, c]
    msa_mask, m_mask                [..., N_seq, N_res]
    pair_mask, z_mask               [..., N_res, N_res]
    s, single, s_*                  [..., N_res, c]
    t, template, templ, t_*         [..., N_templ, N_res, N_res, c]
    seq_mask                        [..., N_res]

(Tracer prefixes such as ``l_`` and surrounding underscores are ignored.)
A size is *ambiguous*, and raises ``PassError``, when two dims share an example value,
a dim's example value is 1, a dim equals a channel size of a known-layout input or any
size of a parameter or buffer (capture at distinct example sizes and evaluate the cost at
the sizes wanted: explicit dims cannot tell a 128 that is N_res from a 128 that is c_z),
or one name is inferred with two different values (pass explicit dims).

Example::

    >>> gm = torch.fx.symbolic_trace(lambda z: z.reshape(z.shape[0] * z.shape[1], -1))
    >>> result = shape_prop_pass(gm, (torch.randn(13, 13, 8),))
    >>> result.changed, result.record["dims"]
    (False, {'N_res': 13})
    >>> [n.meta["sym_shape"] for n in gm.graph.nodes][-2]
    (N_res**2, 8)

A captured zoo model is in :func:`shape_prop_pass`.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.meta import ALIASES_INPUT, DTYPE, MULTI_OUTPUT, SHAPE, SYM_ARGS, SYM_SHAPE, SYM_VALUE
from foldcompile.passes.registry import entry_of, op_name
from foldcompile.passes.shape_rules import NoRule, RuleContext, numel_expr

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["shape_prop_pass", "dim_symbol", "numel_expr", "infer_dims", "LAYOUT_PATTERNS", "op_name",
           "calls_checkpoint_body"]

# (name regex, trailing dim names; None = a channel size kept as an integer)
LAYOUT_PATTERNS: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(msa_mask|m_mask)", ("N_seq", "N_res")),
    (r"(pair_mask|z_mask)", ("N_res", "N_res")),
    (r"seq_mask", ("N_res",)),
    (r"(m|msa|msa_act|m_.*)", ("N_seq", "N_res", None)),
    (r"(z|pair|pair_act|z_.*)", ("N_res", "N_res", None)),
    (r"(s|single|s_.*)", ("N_res", None)),
    (r"(t|template|templ|t_.*)", ("N_templ", "N_res", "N_res", None)),
]


def dim_symbol(name: str) -> sympy.Symbol:
    """The sympy symbol used for a named dim (positive integer)."""
    return sympy.Symbol(name, positive=True, integer=True)


def _clean_name(name: str) -> str:
    n = name.lower()
    n = re.sub(r"^l_+", "", n)
    return n.strip("_")


def infer_dims(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
               dims: dict[str, int] | None = None) -> dict[str, int]:
    """Named dims for ``gm``: the caller's ``dims`` plus those inferred from inputs.

    Raises ``PassError`` on any ambiguity (see the module docstring).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    given = dict(dims or {})
    for name, v in given.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise PassError(f"dims[{name!r}] must be an int, got {v!r}")
    inferred: dict[str, tuple[int, str]] = {}
    channel_sizes: list[tuple[int, str]] = []
    for ph, x in zip(placeholders, example_inputs):
        if not isinstance(x, torch.Tensor):
            continue
        pname = _clean_name(ph.name)
        for pattern, names in LAYOUT_PATTERNS:
            if not re.fullmatch(pattern, pname):
                continue
            if x.dim() < len(names):
                break  # this input does not have the layout its name suggests; infer nothing from it
            tail = x.shape[x.dim() - len(names):]
            for dname, size in zip(names, tail):
                where = f"input {ph.name!r} {tuple(x.shape)}"
                if dname is None:
                    channel_sizes.append((int(size), where))
                    continue
                if dname in inferred and inferred[dname][0] != int(size):
                    raise PassError(
                        f"dim {dname} is {inferred[dname][0]} in {inferred[dname][1]} but {int(size)} in {where}; "
                        "pass explicit dims={...}")
                inferred.setdefault(dname, (int(size), where))
            break
    result = {k: v for k, (v, _) in inferred.items()}
    for name, v in given.items():
        if name in inferred and inferred[name][0] != v:
            raise PassError(f"dims[{name!r}]={v} but {inferred[name][1]} has {name}={inferred[name][0]}")
        result[name] = v
    # Ambiguity checks: a size must name at most one thing.
    by_value: dict[int, str] = {}
    for name, v in result.items():
        if v == 1:
            raise PassError(f"example size of {name} is 1, which cannot be told from broadcasting; "
                            "use an example size > 1")
        if v in by_value:
            raise PassError(f"dims {by_value[v]} and {name} both have example size {v}: ambiguous, even with "
                            "explicit dims; capture at distinct example sizes and evaluate report.cost(...) at "
                            "these sizes")
        by_value[v] = name
    for size, where in channel_sizes:
        if size in by_value:
            raise PassError(f"channel size {size} of {where} equals the example {by_value[size]}={size}: "
                            "ambiguous, even with explicit dims; capture at example sizes distinct from every "
                            f"channel size and evaluate report.cost({by_value[size]}={size})")
    for pname, p in list(gm.named_parameters()) + list(gm.named_buffers()):
        for size in p.shape:
            if int(size) in by_value:
                raise PassError(
                    f"parameter/buffer {pname!r} {tuple(p.shape)} has a size equal to the example "
                    f"{by_value[int(size)]}={int(size)}: ambiguous, even with explicit dims; capture at example "
                    f"sizes distinct from every channel size and evaluate report.cost({by_value[int(size)]}="
                    f"{int(size)})")
    return result


def _fake_mode(example_inputs: Sequence[Any]) -> FakeTensorMode:
    for x in example_inputs:
        if isinstance(x, FakeTensor):
            return x.fake_mode
    # parameters stay real tensors: the mode converts them where they meet fake inputs
    return FakeTensorMode(allow_non_fake_inputs=True)


def gm_module(node: torch.fx.Node) -> Any:
    """The module a call_module node calls (for error messages)."""
    return node.graph.owning_module.get_submodule(str(node.target))


def _storage_ptr(t: torch.Tensor) -> int | None:
    # the storage's identity, for real and fake tensors alike (a fake tensor has no data pointer)
    try:
        return t.untyped_storage()._cdata
    except Exception:  # tensors without storage (e.g. sparse)
        return None


def _literal_sizes(n: torch.fx.Node, entry: Any, sym: Any) -> dict[int, Any] | None:
    """The symbolic meaning of a literal size argument (``view(x, (11, 11, 2, 4))`` ->
    ``{1: (N_res, N_res, 2, 4)}``): each literal is the output size it sets; ``-1`` stays, a size
    computed in the graph stays its node. Ops whose sizes sit elsewhere say so in their entry
    (``literal_sizes``: split sections, unflatten sizes, a narrow's length)."""
    if entry is not None and entry.literal_sizes is not None and sym is not None:
        return entry.literal_sizes(n, sym)
    if entry is None or entry.size_arg is None or not isinstance(sym, tuple):
        return None
    i = entry.size_arg
    raw = n.args[i] if len(n.args) == i + 1 else tuple(n.args[i:])
    if not isinstance(raw, (list, tuple)) or len(raw) != len(sym):
        return None
    return {i: tuple(-1 if isinstance(r, int) and r == -1 else (s if isinstance(r, int) else r)
                     for r, s in zip(raw, sym))}


class _SymShapeProp(torch.fx.Interpreter):
    """Runs the graph; for each node finds its symbolic sizes (by its registry entry's shape rule, else by value),
    checks them against the concrete result and writes the node's meta."""

    def __init__(self, gm: torch.fx.GraphModule, dims: dict[str, int], input_syms: Sequence[Any] | None = None):
        super().__init__(gm)
        self.dims = dims
        # a checkpoint body's inputs: the symbolic sizes of the caller's arguments (not found by value)
        self.input_syms = list(input_syms) if input_syms is not None else None
        self.n_placeholders = 0
        self.value_to_sym = {v: dim_symbol(k) for k, v in dims.items()}
        self.example_subs = {dim_symbol(k): v for k, v in dims.items()}
        self.sym: dict[torch.fx.Node, Any] = {}
        self.fallback: list[dict[str, Any]] = []
        self.op_name = op_name

    # -- helpers used by the rules
    def sym_of(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.sym.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.sym_of(x) for x in a) if isinstance(a, list) else tuple(self.sym_of(x) for x in a)
        if isinstance(a, bool):
            return None
        if isinstance(a, int):
            return sympy.Integer(a)
        return None

    def match_value(self, v: int) -> sympy.Expr:
        return self.value_to_sym.get(int(v), sympy.Integer(int(v)))

    def _fallback(self, node: torch.fx.Node, out: Any, reason: str) -> Any:
        """Sizes by value: an input's size expression with that value, else a named dim, else the int."""
        table: dict[int, set] = {}

        def collect(s):
            if isinstance(s, sympy.Expr):
                try:
                    table.setdefault(int(s.subs(self.example_subs)), set()).add(s)
                except TypeError:
                    pass
            elif isinstance(s, (list, tuple)):
                for x in s:
                    collect(x)

        for a in list(node.args) + list(node.kwargs.values()):
            collect(self.sym_of(a))
        ambiguous: list[str] = []

        def pick(v: int) -> sympy.Expr:
            if v == 1:
                return sympy.Integer(1)
            cands = table.get(v, set()) - {sympy.Integer(v)}
            if len(cands) > 1:
                ambiguous.append(f"size {v} could be any of {sorted(map(str, cands))}")
            if len(cands) == 1:
                return next(iter(cands))
            return self.match_value(v)

        result = self._map_out(out, lambda t: tuple(pick(int(c)) for c in t.shape), pick)
        if ambiguous:
            raise PassError(f"cannot derive symbolic sizes of {describe_node(node)} ({reason}): "
                            + "; ".join(ambiguous) + "; use distinct example sizes or explicit dims")
        self.fallback.append({"node": node.name, "op": op_name(node), "reason": reason})
        return result

    @staticmethod
    def _map_out(out: Any, ft: Callable, fi: Callable) -> Any:
        if isinstance(out, torch.Tensor):
            return ft(out)
        if isinstance(out, bool):
            return None
        if isinstance(out, int):
            return fi(out)
        if isinstance(out, torch.Size):
            return [fi(int(x)) for x in out]
        if isinstance(out, (list, tuple)):
            return type(out)(_SymShapeProp._map_out(x, ft, fi) for x in out) if isinstance(out, list) \
                else tuple(_SymShapeProp._map_out(x, ft, fi) for x in out)
        return None

    def _check(self, node: torch.fx.Node, out: Any, sym: Any) -> None:
        def chk(o, s):
            if isinstance(o, torch.Tensor):
                if not isinstance(s, tuple) or len(s) != o.dim():
                    raise PassError(f"symbolic shape {s} of {describe_node(node)} has the wrong rank "
                                    f"for {tuple(o.shape)}")
                for c, e in zip(o.shape, s):
                    if int(sympy.sympify(e).subs(self.example_subs)) != int(c):
                        raise PassError(f"symbolic shape {s} of {describe_node(node)} evaluates to other "
                                        f"sizes than {tuple(o.shape)} at {self.dims}")
            elif isinstance(o, (list, tuple)) and isinstance(s, (list, tuple)):
                for a, b in zip(o, s):
                    chk(a, b)
        chk(out, sym)

    # -- the interpreter
    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_module":
            raise PassError(f"{describe_node(n)} calls module {n.target!r} ({type(gm_module(n)).__name__}): "
                            "shape_prop_pass takes op-level graphs (a capture, normalized), with no call_module node")
        if calls_checkpoint_body(n):
            out, sym = self._run_checkpoint_body(n)
            self._check(n, out, sym)
            self.sym[n] = sym
            self._write_meta(n, out, sym)
            return out
        out = super().run_node(n)
        if n.op == "placeholder" and self.input_syms is not None and self.n_placeholders < len(self.input_syms):
            sym = self.input_syms[self.n_placeholders]
            self.n_placeholders += 1
        elif n.op in ("placeholder", "get_attr"):
            sym = self._map_out(out, lambda t: tuple(self.match_value(int(c)) if n.op == "placeholder"
                                                     else sympy.Integer(int(c)) for c in t.shape),
                                lambda i: sympy.Integer(i))
        elif n.op == "output":
            sym = self.sym_of(n.args[0])
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            entry = entry_of(n)
            rule = entry.shape_rule if entry is not None else None
            sym = None
            if out is None:  # a state-setting call (``_set_grad_enabled``): no sizes to derive
                pass
            elif rule is not None:
                try:
                    sym = rule(RuleContext(self, n, args, kwargs, out))
                except NoRule as e:
                    sym = self._fallback(n, out, f"no rule for this form: {e}")
                except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
                    # a rule that breaks is a bug to report, not a reason to guess sizes by value
                    raise PassError(f"the symbolic shape rule for {describe_node(n)} failed: "
                                    f"{type(e).__name__}: {e}") from e
            else:
                sym = self._fallback(n, out, "no symbolic rule for this op")
            if sym is None and isinstance(out, torch.Tensor):
                sym = self._fallback(n, out, "rule gave no shape")
            self._check(n, out, sym)
            if isinstance(out, torch.Tensor):
                ptrs = {_storage_ptr(a) for a in args if isinstance(a, torch.Tensor)} - {None}
                n.meta[ALIASES_INPUT] = _storage_ptr(out) in ptrs
            n.meta.pop(SYM_ARGS, None)
            literal = _literal_sizes(n, entry, sym)
            if literal is not None:
                n.meta[SYM_ARGS] = literal
        self.sym[n] = sym
        self._write_meta(n, out, sym)
        return out

    def _run_checkpoint_body(self, n: torch.fx.Node) -> tuple[Any, Any]:
        """Annotate the body a ``torch.utils.checkpoint.checkpoint(body, *args)`` node calls, node by
        node like this graph, its inputs taking the arguments' symbolic sizes; the call's value is
        the body's. (Run here without grad, checkpointing would only drop what the body saves.)"""
        args, _ = self.fetch_args_kwargs_from_env(n)
        inner = _SymShapeProp(args[0], self.dims, input_syms=[self.sym_of(a) for a in n.args[1:]])
        out = inner.run(*args[1:])
        body = n.args[0].target if isinstance(n.args[0], torch.fx.Node) else "body"
        self.fallback += [{**f, "node": f"{body}.{f['node']}"} for f in inner.fallback]
        output = next(x for x in reversed(args[0].graph.nodes) if x.op == "output")
        return out, inner.sym_of(output.args[0])

    def _write_meta(self, n: torch.fx.Node, out: Any, sym: Any) -> None:
        n.meta.pop("multi_output", None)
        n.meta.pop("sym_value", None)
        if isinstance(out, torch.Tensor):
            n.meta["shape"], n.meta["dtype"], n.meta["sym_shape"] = tuple(out.shape), out.dtype, tuple(sym)
        elif isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
            n.meta["shape"] = tuple(tuple(t.shape) for t in out)
            n.meta["dtype"] = tuple(t.dtype for t in out)
            n.meta["sym_shape"] = tuple(tuple(s) for s in sym) if sym is not None else None
            n.meta["multi_output"] = True
        else:
            n.meta["shape"] = n.meta["dtype"] = n.meta["sym_shape"] = None
            if isinstance(sym, sympy.Expr):
                n.meta["sym_value"] = sym
            elif isinstance(sym, list):
                n.meta["sym_value"] = list(sym)


def calls_checkpoint_body(n: torch.fx.Node) -> bool:
    """``torch.utils.checkpoint.checkpoint(body, *args)`` on a subgraph of this module (a capture's
    activation-checkpoint region): shape propagation annotates the body's nodes too, so the
    passes after it (classify, fuse) see inside the region."""
    if n.op != "call_function" or n.target is not torch.utils.checkpoint.checkpoint or not n.args:
        return False
    body, owner = n.args[0], n.graph.owning_module
    if not isinstance(body, torch.fx.Node) or body.op != "get_attr" or owner is None:
        return False
    try:
        return isinstance(owner.get_submodule(str(body.target)), torch.fx.GraphModule)
    except AttributeError:
        return False


@declare(requires=(), ensures=(SHAPE, DTYPE, SYM_SHAPE, SYM_VALUE, SYM_ARGS, MULTI_OUTPUT, ALIASES_INPUT))
def shape_prop_pass(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                    dims: dict[str, int] | None = None, fake: bool = False) -> PassResult:
    """Annotate every node with ``shape``, ``dtype`` and ``sym_shape`` (see the module docstring).

    The graph is not rewritten (``changed`` is False). ``gm.meta["dims"]`` gets the named
    dims with their example values. The record holds ``dims``, the number of annotated
    nodes and ``fallback``: the nodes whose sizes were found by value, with the reason.

    ``fake=True`` (or fake example inputs) runs the graph on fake tensors: no data is touched,
    so a graph with collectives (``torch.ops._c10d_functional.all_to_all_single``) or with the
    kernels' ``torch.ops.foldcompile`` ops can be annotated again after a rewrite. Literal size
    arguments get their symbolic meaning in ``meta["sym_args"]``.

    ``example_inputs`` are one value per placeholder, as the graph takes them (a captured
    model's defaults included). On a tiny Evoformer block (N_seq=5, N_res=11, c_m=16, c_z=8)::

        >>> import foldcompile
        >>> from foldcompile.capture import flat_inputs
        >>> from foldcompile.models import zoo
        >>> from foldcompile.passes import normalize_pass
        >>> block, (m, z, msa_mask, pair_mask) = zoo.get("evoformer_block")
        >>> gm = normalize_pass(foldcompile.trace(block, m, z, msa_mask, pair_mask)).graph_module
        >>> flat = flat_inputs(gm, (m, z, msa_mask, pair_mask))  # chunk_size=None is an input too
        >>> result = shape_prop_pass(gm, flat)
        >>> result.changed, result.record["dims"], result.record["fallback"]
        (False, {'N_seq': 5, 'N_res': 11}, [])
        >>> logits = next(n for n in gm.graph.nodes if n.name == "logits")  # MSA row attention
        >>> logits.meta["shape"], logits.meta["sym_shape"]
        ((5, 2, 11, 11), (N_seq, 2, N_res, N_res))
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise PassError(f"shape_prop_pass needs a torch.fx.GraphModule, got {type(gm).__name__}")
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # placeholders after the given inputs must have defaults (a captured ``mask=None``)
    required = sum(1 for n in phs if not n.args)
    if not required <= len(example_inputs) <= len(phs) or any(not n.args for n in phs[len(example_inputs):]):
        raise PassError(f"graph has {len(phs)} inputs ({required} without a default) but "
                        f"{len(example_inputs)} example inputs were given")
    all_dims = infer_dims(gm, example_inputs, dims)
    prop = _SymShapeProp(gm, all_dims)
    mode = _fake_mode(example_inputs) if fake or any(isinstance(x, FakeTensor) for x in example_inputs) else None
    if mode is None:
        with torch.no_grad():
            prop.run(*example_inputs)
    else:
        # no data: fake tensors carry sizes and dtypes only, so graphs holding collectives or
        # fused-kernel ops (torch.library ops with fake implementations) are annotated without running them
        inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) else x
                  for x in example_inputs]
        with torch.no_grad(), mode:
            prop.run(*inputs)
    gm.meta["dims"] = dict(all_dims)
    # sizes found by value hold at the example sizes only: cost_totals refuses other sizes then
    gm.meta["shape_fallbacks"] = list(prop.fallback)
    record = {"dims": dict(all_dims), "nodes": len(gm.graph.nodes), "fallback": prop.fallback}
    _log.info("shape_prop: %d nodes at %s%s, %d sized by value", len(gm.graph.nodes), all_dims,
              " on fake tensors" if mode is not None else "", len(prop.fallback))
    return PassResult(gm, False, record)
