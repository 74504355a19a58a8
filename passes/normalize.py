"""Normalisation: one canonical spelling for every op, and an einsum equation on every GEMM.

After ``normalize_pass`` (on a graph from ``foldcompile.capture.trace`` or a
hand-built one), for the top-level graph and every subgraph (checkpoint bodies):

- no ``call_module`` node is left: each is inlined, by tracing the submodule
  with ``torch.fx.symbolic_trace`` and splicing its graph in, with get_attr
  targets prefixed by the submodule's path (``lin.weight``); the trace bakes
  each module's ``training`` flag in, so it is recorded in
  ``gm.meta["inlined_training"]`` and a pre-hook refuses calls in another mode
  (:func:`install_training_check`);
- no ``call_method`` node is left: ``x.m(*a)`` becomes ``torch.m(x, *a)`` where
  ``torch.m`` is the same op with the same arguments (``_TORCH_SAME``), else
  ``torch.Tensor.m(x, *a)``; size varargs are packed, so ``x.permute(1, 0, 2)``
  becomes ``torch.permute(x, (1, 0, 2))`` and ``x.view(2, 3)`` becomes
  ``torch.Tensor.view(x, (2, 3))``;
- ``a @ b`` (``operator.matmul``) becomes ``torch.matmul(a, b)``; other
  ``operator`` arithmetic stays as it is (``1 - x`` has no torch.sub spelling);
- every GEMM-like node (``linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``,
  ``baddbmm``, ``einsum``) carries ``meta["einsum"]``, an explicit equation
  with concrete letters (ranks read from ``meta["example_value"]``, ``"val"``
  or ``"tensor_meta"``), e.g. linear on a rank-3 input ``"abc,dc->abd"``
  (input letters, then the weight ``[out, in]``; the bias is an epilogue),
  matmul ``"abc,acd->abd"`` (batch dims broadcast like torch), einsum its own
  equation made explicit with ``...`` expanded. Without a known rank the
  equation keeps ``...`` for the batch dims (``"...k,nk->...n"``).
  :func:`gemm_operands` returns the two (or more) contracted operands.

Example::

    >>> from foldcompile.capture import trace
    >>> from foldcompile.models import zoo
    >>> block, ex = zoo.get("evoformer_block")
    >>> res = normalize_pass(trace(block, *ex))
    >>> res.record["methods_to_functions"], res.record["gemms"]
    ({'to': 9, 'permute': 3, 'unsqueeze': 7, 'view': 12, 'transpose': 26, 'reshape': 5}, {'linear': 42, 'matmul': 8, 'einsum': 4})
    >>> {n.name: n.meta["einsum"] for n in res.graph_module.graph.nodes if n.name in ("linear", "matmul_1")}
    {'linear': 'abc,dc->abd', 'matmul_1': 'abcd,abde->abce'}
    >>> small = normalize_pass(torch.fx.symbolic_trace(lambda a, b: (a @ b).softmax(-1)))   # hand-built
    >>> small.changed, small.record["operators_to_functions"], small.record["methods_to_functions"]
    (True, {'matmul': 1}, {'softmax': 1})
    >>> print(small.graph_module.code.strip())
    def forward(self, a, b):
        matmul = torch.matmul(a, b);  a = b = None
        softmax = torch.softmax(matmul, -1);  matmul = None
        return softmax
"""
from __future__ import annotations

import operator
import string
from collections import Counter
from typing import Any

import torch
import torch.fx

from foldcompile.passes.base import PassError, PassResult, describe_node

__all__ = ["normalize_pass", "gemm_operands", "GEMM_TARGETS", "TrainingModeError", "install_training_check"]

# Tensor methods whose torch.<name> function is the same op with the same arguments after self.
_TORCH_SAME = frozenset("""
abs amax amin argmax argmin all any bmm chunk clamp clamp_min clamp_max cos cumsum diagonal div eq exp
flatten flip ge gt isnan isinf le log log_softmax logsumexp lt masked_fill matmul max mean min mm movedim
mul narrow ne neg norm pow permute prod reciprocal relu reshape roll rsqrt select sigmoid sin softmax
split sqrt square squeeze std sub sum t tanh tile transpose tril triu unbind unsqueeze var add
index_select gather logical_not logical_and logical_or nan_to_num sign erf exp2
""".split())
# Methods taking a size/dims either as varargs or as one sequence; normalised to one tuple.
_SIZE_VARARGS = frozenset({"permute", "reshape", "view", "expand", "repeat", "tile", "flip"})

_GEMM_NAMES = {
    torch.nn.functional.linear: "linear",
    torch.matmul: "matmul",
    torch.mm: "mm",
    torch.bmm: "bmm",
    torch.addmm: "addmm",
    torch.baddbmm: "baddbmm",
    torch.einsum: "einsum",
}
GEMM_TARGETS = frozenset(_GEMM_NAMES)
_LETTERS = string.ascii_lowercase


def normalize_pass(gm: torch.fx.GraphModule) -> PassResult:
    """Inline modules, turn methods into torch functions and annotate GEMMs with einsum equations."""
    record: dict[str, Any] = {
        "modules_inlined": Counter(),
        "methods_to_functions": Counter(),
        "operators_to_functions": Counter(),
        "gemms": Counter(),
        "parameters_renamed": Counter(),
    }
    changed = False
    training: dict[str, bool] = dict(gm.meta.get("inlined_training", {}))
    for prefix, owner in [("", gm)] + [(f"{name}.", m) for name, m in gm.named_modules()
                                       if isinstance(m, torch.fx.GraphModule) and m is not gm]:
        changed |= _normalize_graph(owner, record, training, prefix)
        owner.graph.lint()
        owner.recompile()
    if training:
        gm.meta["inlined_training"] = training
        install_training_check(gm)
    record = {k: dict(v) for k, v in record.items()}
    return PassResult(gm, changed, record)


class TrainingModeError(PassError):
    """A normalised graph was called in another training mode than the modules it inlined had."""


def install_training_check(gm: torch.fx.GraphModule) -> None:
    """Refuse calls of ``gm`` whose training mode differs from the one its inlined modules were traced in.

    ``symbolic_trace`` bakes ``self.training`` of each inlined module (dropout, batch norm, ``if
    self.training``) into the graph, so after ``gm.eval()`` the graph would still compute the training
    function. ``gm.meta["inlined_training"]`` maps each inlined module's path to its flag at inlining;
    a forward pre-hook compares it with the module's flag now (or ``gm.training`` where the module is
    gone) and raises :class:`TrainingModeError`.
    """
    old = getattr(gm, "_foldcompile_training_hook", None)
    if old is not None:
        old.remove()

    def _check(module: torch.nn.Module, args: tuple) -> None:
        for path, flag in module.meta.get("inlined_training", {}).items():
            try:
                now = module.get_submodule(path).training
            except AttributeError:
                now = module.training
            if now != flag:
                raise TrainingModeError(
                    f"module {path!r} was inlined by normalize_pass with training={flag} (baked into the graph: "
                    f"dropout, batch norm, `if self.training`), but is now training={now}; set it back or "
                    f"normalise a graph traced in this mode")

    gm._foldcompile_training_hook = gm.register_forward_pre_hook(_check)


def _normalize_graph(owner: torch.fx.GraphModule, record: dict, training: dict[str, bool], prefix: str) -> bool:
    changed = False
    graph = owner.graph
    while True:  # inlined bodies may hold call_module nodes of their own
        calls = [n for n in graph.nodes if n.op == "call_module"]
        if not calls:
            break
        for node in calls:
            sub = owner.get_submodule(node.target)
            record["modules_inlined"][type(sub).__name__] += 1
            training[f"{prefix}{node.target}"] = sub.training
            _inline_module(owner, node)
            changed = True
    changed |= _name_parameters_after_the_model(graph, record)
    # inlined graphs may themselves hold call_method nodes: rewrite after inlining
    for node in list(graph.nodes):
        if node.op == "call_method":
            _method_to_function(node)
            record["methods_to_functions"][node.meta["normalized_from"]] += 1
            changed = True
        elif node.op == "call_function" and node.target is operator.matmul:
            node.target = torch.matmul
            node.meta["normalized_from"] = "operator.matmul"
            record["operators_to_functions"]["matmul"] += 1
            changed = True
    for node in graph.nodes:
        if node.op == "call_function" and node.target in GEMM_TARGETS:
            eq = _einsum_of(node)
            if node.meta.get("einsum") != eq:
                node.meta["einsum"] = eq
                changed = True
            record["gemms"][_GEMM_NAMES[node.target]] += 1
    return changed


def _name_parameters_after_the_model(graph: torch.fx.Graph, record: dict) -> bool:
    """Name every parameter/buffer node after the model's own attribute path
    (``msa_att_row_layer_norm_m_weight``, not the tracer's ``l__self___msa_att_row_...``),
    so the printed graph reads like the user's model."""
    if not hasattr(torch.fx.Node, "_rename"):  # private fx API; the names are cosmetic
        return False
    changed = False
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        wanted = str(node.target).replace(".", "_")
        if not node.name.startswith(wanted):  # a clash leaves ``wanted_1``: still ours
            node._rename(wanted)
            record["parameters_renamed"]["get_attr"] += 1
            changed = True
    return changed


def _method_to_function(node: torch.fx.Node) -> None:
    name = node.target
    self_arg, *rest = node.args
    if name in _SIZE_VARARGS and rest and (len(rest) > 1 or isinstance(rest[0], int)):
        rest = [tuple(rest)]
    if name in _TORCH_SAME and hasattr(torch, name):
        target = getattr(torch, name)
    elif hasattr(torch.Tensor, name):
        target = getattr(torch.Tensor, name)
    else:
        raise PassError(f"no torch function for method {name!r}: {describe_node(node)}")
    node.op = "call_function"
    node.target = target
    node.args = (self_arg, *rest)
    node.meta["normalized_from"] = name


def _inline_module(owner: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Splice ``symbolic_trace(submodule)`` in place of a call_module node."""
    sub = owner.get_submodule(node.target)
    try:
        sub_gm = torch.fx.symbolic_trace(sub)
    except Exception as e:
        raise PassError(
            f"cannot inline module {node.target!r} ({type(sub).__name__}) with symbolic_trace: {e}; "
            f"{describe_node(node)}"
        ) from e
    graph = owner.graph
    placeholders = [n for n in sub_gm.graph.nodes if n.op == "placeholder"]
    env: dict[torch.fx.Node, Any] = {}
    bound = _bind_placeholders(placeholders, node)
    with graph.inserting_before(node):
        for n in sub_gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = bound[n.target]
            elif n.op == "output":
                result = torch.fx.node.map_arg(n.args[0], lambda a: env[a])
            else:
                new = graph.node_copy(n, lambda a: env[a])
                if n.op in ("get_attr", "call_module"):
                    new.target = f"{node.target}.{n.target}"
                # fx call_module targets are qualified from the owner: they are the module path
                new.meta["module_path"] = new.target if new.op == "call_module" else node.target
                if "stack_trace" in node.meta and "stack_trace" not in new.meta:
                    new.meta["stack_trace"] = node.meta["stack_trace"]
                env[n] = new
    if not isinstance(result, torch.fx.Node):
        raise PassError(f"inlined module {node.target!r} returns a structure, not one tensor: {describe_node(node)}")
    node.replace_all_uses_with(result)
    graph.erase_node(node)


def _bind_placeholders(placeholders: list[torch.fx.Node], node: torch.fx.Node) -> dict[str, Any]:
    bound: dict[str, Any] = {}
    args = list(node.args)
    for p in placeholders:
        if args:
            bound[p.target] = args.pop(0)
        elif p.target in node.kwargs:
            bound[p.target] = node.kwargs[p.target]
        elif p.args:  # default value recorded by symbolic_trace
            bound[p.target] = p.args[0]
        else:
            raise PassError(f"no value for argument {p.target!r} of module call: {describe_node(node)}")
    return bound


# ---------------------------------------------------------------- einsum equations


def _rank(a: Any) -> int | None:
    if not isinstance(a, torch.fx.Node):
        return None
    for key in ("val", "example_value"):
        v = a.meta.get(key)
        if isinstance(v, torch.Tensor):
            return v.dim()
    tm = a.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return len(tm.shape)
    return None


def _arg(node: torch.fx.Node, i: int, name: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def gemm_operands(node: torch.fx.Node) -> list[Any]:
    """The operands ``meta["einsum"]`` describes, in order (bias/epilogue terms excluded)."""
    t = node.target
    if t is torch.nn.functional.linear:
        return [_arg(node, 0, "input"), _arg(node, 1, "weight")]
    if t in (torch.matmul, torch.mm, torch.bmm):
        return [_arg(node, 0, "input"), _arg(node, 1, "other" if t is torch.matmul else "mat2")]
    if t is torch.addmm:
        return [_arg(node, 1, "mat1"), _arg(node, 2, "mat2")]
    if t is torch.baddbmm:
        return [_arg(node, 1, "batch1"), _arg(node, 2, "batch2")]
    if t is torch.einsum:
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        return list(ops)
    raise PassError(f"not a GEMM: {describe_node(node)}")


def _einsum_of(node: torch.fx.Node) -> str:
    t = node.target
    ops = gemm_operands(node)
    ranks = [_rank(o) for o in ops]
    if t is torch.einsum:
        return _explicit_einsum(node.args[0], ranks, node)
    if t is torch.nn.functional.linear:
        r = ranks[0]
        if r is None:
            return "...k,nk->...n"
        if r == 1:
            return "a,ba->b"
        batch = _LETTERS[: r - 1]
        k, n = _LETTERS[r - 1], _LETTERS[r]
        return f"{batch}{k},{n}{k}->{batch}{n}"
    if t in (torch.mm, torch.addmm):
        return "ab,bc->ac"
    if t in (torch.bmm, torch.baddbmm):
        return "abc,acd->abd"
    ra, rb = ranks
    if ra is None or rb is None:
        return "...ij,...jk->...ik"
    return _matmul_einsum(ra, rb)


def _matmul_einsum(ra: int, rb: int) -> str:
    """torch.matmul's semantics (1-D promotion, broadcast batch dims) as an einsum."""
    if ra == 1 and rb == 1:
        return "a,a->"
    nb = max(ra, rb, 2) - 2
    batch = _LETTERS[:nb]
    m, k, n = _LETTERS[nb : nb + 3]
    if ra == 1:
        b = batch[nb - (rb - 2):] + k + n
        return f"{k},{b}->{batch[nb - (rb - 2):]}{n}"
    a = batch[nb - (ra - 2):] + m + k
    if rb == 1:
        return f"{a},{k}->{batch[nb - (ra - 2):]}{m}"
    b = batch[nb - (rb - 2):] + k + n
    return f"{a},{b}->{batch}{m}{n}"


def _explicit_einsum(eq: Any, ranks: list[int | None], node: torch.fx.Node) -> str:
    if not isinstance(eq, str):
        raise PassError(f"einsum equation is not a constant string: {describe_node(node)}")
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != len(ranks):
        raise PassError(f"einsum {eq!r} names {len(inputs)} operands, got {len(ranks)}: {describe_node(node)}")
    if not arrow:  # implicit output: letters used once, in alphabetical order, after the ellipsis
        counts = Counter(c for s in inputs for c in s if c.isalpha())
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c, k in counts.items() if k == 1))
    if "..." not in eq or any(r is None for r, s in zip(ranks, inputs) if "..." in s):
        return f"{','.join(inputs)}->{rhs}"
    used = set(c for c in eq if c.isalpha())
    free = [c for c in _LETTERS + string.ascii_uppercase if c not in used]
    n_ell = max(r - (len(s) - 3) for r, s in zip(ranks, inputs) if "..." in s)
    ell = "".join(free[:n_ell])
    out_inputs = []
    for r, s in zip(ranks, inputs):
        if "..." in s:
            k = r - (len(s) - 3)
            s = s.replace("...", ell[n_ell - k:])
        out_inputs.append(s)
    return f"{','.join(out_inputs)}->{rhs.replace('...', ell)}"
