"""Normalisation: one canonical spelling for every op, and an einsum equation on every GEMM.

After ``normalize_pass`` (on a graph from ``foldcompile.capture.trace`` or a
hand-built one), for the top-level graph and every subgraph (checkpoint bodies):

- a ``call_module`` node is an error naming the module: one IR level, ops only (the
  capture, :func:`foldcompile.capture.trace`, inlines every module);
- no ``call_method`` node is left: ``x.m(*a)`` becomes ``torch.m(x, *a)`` where
  ``torch.m`` is the same op with the same arguments (the op's registry entry says
  so: ``canonical``), else
  ``torch.Tensor.m(x, *a)``; size varargs are packed, so ``x.permute(1, 0, 2)``
  becomes ``torch.permute(x, (1, 0, 2))`` and ``x.view(2, 3)`` becomes
  ``torch.Tensor.view(x, (2, 3))``;
- ``a @ b`` (``operator.matmul``) becomes ``torch.matmul(a, b)``; other
  ``operator`` arithmetic stays as it is (``1 - x`` has no torch.sub spelling);
- every GEMM-like node (``linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``,
  ``baddbmm``, ``einsum``, ``scaled_dot_product_attention``) carries ``meta["einsum"]``
  (:func:`foldcompile.passes.einsum.equation_of`), an explicit equation with concrete
  letters (ranks read by :func:`foldcompile.passes.meta.rank_of`), e.g. linear on a rank-3 input ``"abc,dc->abd"``
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

import logging
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx

from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.einsum import GEMM_TARGETS, equation_of, gemm_operands
from foldcompile.passes.meta import EINSUM, NORMALIZED_FROM, memory_of
from foldcompile.passes.registry import functional_form, lookup, op_name

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["normalize_pass", "gemm_operands", "GEMM_TARGETS"]

# Methods taking a size/dims either as varargs or as one sequence; normalised to one tuple (a
# calling convention of the method spelling, not a fact about the op).
_SIZE_VARARGS = frozenset({"permute", "reshape", "view", "expand", "repeat", "tile", "flip"})


@declare(requires=(), ensures=(EINSUM, NORMALIZED_FROM))
def normalize_pass(gm: torch.fx.GraphModule) -> PassResult:
    """Turn methods into torch functions and annotate GEMMs with einsum equations (see the module
    docstring); a ``call_module`` node is an error naming the module."""
    record: dict[str, Any] = {
        "methods_to_functions": Counter(),
        "operators_to_functions": Counter(),
        "gemms": Counter(),
        "parameters_renamed": Counter(),
        "inplace_to_functional": Counter(),
        "inplace_kept": Counter(),
    }
    changed = False
    for owner in [gm] + [m for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]:
        changed |= _normalize_graph(owner, record)
        owner.graph.lint()
        owner.recompile()
    record = {k: dict(v) for k, v in record.items()}
    _log.info("normalize: %d method calls and %d operators respelled, %d GEMMs annotated",
              sum(record["methods_to_functions"].values()), sum(record["operators_to_functions"].values()),
              sum(record["gemms"].values()))
    return PassResult(gm, changed, record)


def _normalize_graph(owner: torch.fx.GraphModule, record: dict) -> bool:
    changed = False
    graph = owner.graph
    for node in graph.nodes:
        if node.op == "call_module":
            # one IR level: a capture holds ops, not modules; a module left here would need every
            # later pass to know what each module class computes
            sub = owner.get_submodule(str(node.target))
            raise PassError(f"{describe_node(node)} calls module {node.target!r} ({type(sub).__name__}); "
                            "normalize_pass takes op-level graphs: capture the model with foldcompile.trace")
    changed |= _name_parameters_after_the_model(graph, record)
    for node in list(graph.nodes):
        if node.op == "call_method":
            _method_to_function(node)
            record["methods_to_functions"][node.meta[NORMALIZED_FROM]] += 1
            changed = True
        elif node.op == "call_function" and node.target is operator.matmul:
            node.target = torch.matmul
            node.meta[NORMALIZED_FROM] = "operator.matmul"
            record["operators_to_functions"]["matmul"] += 1
            changed = True
    changed |= _inplace_to_functional(graph, record)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in GEMM_TARGETS:
            eq = equation_of(node)
            if node.meta.get(EINSUM) != eq:
                node.meta[EINSUM] = eq
                changed = True
            record["gemms"][op_name(node)] += 1
    return changed


def _inplace_to_functional(graph: torch.fx.Graph, record: dict) -> bool:
    """Rewrite ``x += y`` (and ``x.mul_(y)``, ...) as ``x + y`` where no one can tell the difference:
    ``x`` is a value the graph made itself (not an input or parameter), nothing that shares ``x``'s
    memory is read after the write except through the written result, and the result's dtype and
    shape are ``x``'s (``fp16 += fp32`` stays in fp16 in place but promotes out of place). Otherwise
    the node is left as it is, counted in ``record["inplace_kept"]`` with the reason."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    memory: dict[torch.fx.Node, Any] = {}  # node -> identity of the memory its value lives in
    for n in graph.nodes:
        key = memory_of(n)
        if key is not None:
            memory[n] = key
    changed = False
    for node in list(graph.nodes):
        form = functional_form(node)
        if form is None:
            continue
        target, name = form
        reason, downstream = _why_kept_in_place(node, order, memory)
        if reason is not None:
            record["inplace_kept"][reason] += 1
            continue
        node.target = target
        node.meta[NORMALIZED_FROM] = name
        record["inplace_to_functional"][name] += 1
        changed = True
        # the result now has memory of its own, shared by the views taken of it downstream
        fresh, old = object(), memory.get(node)
        for n in [node, *downstream]:
            if memory.get(n) == old:
                memory[n] = fresh
    return changed


def _why_kept_in_place(node: torch.fx.Node, order: dict,
                       memory: dict) -> tuple[str | None, set[torch.fx.Node]]:
    reason = _check_in_place(node, order, memory)
    return reason if isinstance(reason, str) else None, reason if isinstance(reason, set) else set()


def _check_in_place(node: torch.fx.Node, order: dict, memory: dict) -> str | set[torch.fx.Node]:
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or x.op != "call_function":
        return "writes into an input, a parameter or a constant"
    if node.kwargs.get("out") is not None:
        return "has an out= argument"
    xv, nv = x.meta.get("example_value"), node.meta.get("example_value")
    if not isinstance(xv, torch.Tensor) or not isinstance(nv, torch.Tensor):
        return "no example value to check dtype, shape and aliasing"
    if nv.dtype != xv.dtype or tuple(nv.shape) != tuple(xv.shape):
        return "the out-of-place result would have another dtype or shape"
    others = [a for a in node.args[1:] if isinstance(a, torch.fx.Node)]
    for a in others:
        av = a.meta.get("example_value")
        if isinstance(av, torch.Tensor) and av.dtype != xv.dtype and av.dim() > 0:
            return "an operand of another dtype (type promotion differs out of place)"
    if any(order[u] > order[node] for u in x.users if u is not node):
        return "the value is read again after the in-place write"
    # everything sharing x's memory must be x itself or computed from the written result
    downstream, todo = set(), [node]
    while todo:
        for u in todo.pop().users:
            if u not in downstream:
                downstream.add(u)
                todo.append(u)
    key = memory.get(x)
    for alias, k in memory.items():
        if k == key and alias is not x and alias is not node and alias not in downstream:
            return "another view of the same memory exists"
    return downstream


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
    """``x.m(*a)`` as the registry's spelling of ``m`` (``torch.m`` where that is the same op with
    the same arguments, else ``torch.Tensor.m``); a method without an entry as ``torch.Tensor.m``."""
    name = str(node.target)
    self_arg, *rest = node.args
    if name in _SIZE_VARARGS and rest and (len(rest) > 1 or isinstance(rest[0], int)):
        rest = [tuple(rest)]
    method = getattr(torch.Tensor, name, None)
    entry = lookup(method) if method is not None else None
    target = entry.canonical if entry is not None and entry.canonical is not None else method
    if target is None:
        raise PassError(f"no torch function for method {name!r}: {describe_node(node)}")
    node.op = "call_function"
    node.target = target
    node.args = (self_arg, *rest)
    node.meta[NORMALIZED_FROM] = name
