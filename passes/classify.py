"""Op classification with a symbolic cost model.

``classify_pass(gm)`` tags every node ``node.meta["op_class"]`` with one of GEMM, REDUCTION,
ELEMENTWISE, LAYOUT, COMM, OTHER (placeholders and get_attr nodes: ``"INPUT"``, the output
node: ``"OUTPUT"``) and ``node.meta["cost"] = {"flops": expr, "bytes": expr}`` in the
symbolic sizes of ``shape_prop_pass`` (which must run first). The rules are in
``foldcompile.passes.cost_model``. Unknown ops become OTHER with zero FLOPs (bytes still
counted) and are listed in the record, never dropped.

``check_flops_against_flop_counter(gm, example_inputs)`` runs the graph node by node
under ``torch.utils.flop_counter.FlopCounterMode`` and lists every node whose counted
FLOPs differ from its GEMM FLOPs (non-GEMM nodes must count 0).

Example::

    >>> from foldcompile.passes import normalize_pass, shape_prop_pass
    >>> gm = normalize_pass(torch.fx.symbolic_trace(lambda a, b: torch.matmul(a, b).relu())).graph_module
    >>> _ = shape_prop_pass(gm, (torch.randn(3, 5), torch.randn(5, 7)), dims={"M": 3, "K": 5, "N": 7})
    >>> classify_pass(gm).record["counts"]
    {'GEMM': 1, 'ELEMENTWISE': 1}
    >>> [(n.name, n.meta["op_class"], n.meta["cost"]["flops"]) for n in gm.graph.nodes]
    [('a', 'INPUT', 0), ('b', 'INPUT', 0), ('matmul', 'GEMM', 2*K*M*N), ('relu', 'ELEMENTWISE', M*N), ('output', 'OUTPUT', 0)]
    >>> check_flops_against_flop_counter(gm, (torch.randn(3, 5), torch.randn(5, 7)))   # no mismatch
    []
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import sympy
import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.cost_model import mask_only_nodes, node_cost, op_class_of, uncosted
from foldcompile.passes.meta import COST, DTYPE, EINSUM, OP_CLASS, SHAPE, SYM_SHAPE
from foldcompile.passes.registry import op_name
from foldcompile.passes.shape_prop import dim_symbol

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["classify_pass", "check_flops_against_flop_counter", "FlopMismatch"]


@declare(requires=(SHAPE, SYM_SHAPE, DTYPE, EINSUM), ensures=(OP_CLASS, COST))
def classify_pass(gm: torch.fx.GraphModule) -> PassResult:
    """Write ``op_class`` and ``cost`` into every node's meta (the graph is unchanged).

    A matrix product whose operands hold only mask values (``einsum("si,sj->ij", mask, mask)``,
    the outer product mean's count of unmasked pairs) is a REDUCTION, not a model GEMM; its
    product FLOPs stay in its cost.

    Record: ``counts`` (nodes per class), ``other`` (``[{"node", "op"}]`` for every OTHER node),
    ``uncosted`` (``[{"node", "op"}]`` for every node whose FLOPs are unknown — ops without a
    registry entry, costed 0 FLOPs — so no cost is silently missing), ``mask_products`` (the
    names of the mask-only products), ``bodies`` (per checkpoint body that shape_prop annotated,
    its nodes' counts: they are classified too, but not counted in ``counts``).
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise PassError(f"classify_pass needs a torch.fx.GraphModule, got {type(gm).__name__}")
    counts: dict[str, int] = {}
    other: list[dict[str, str]] = []
    missing: list[dict[str, str]] = []
    mask_products: list[str] = []
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "get_attr", "output") and "shape" not in n.meta:
            raise PassError(f"{describe_node(n)} has no shape meta: run shape_prop_pass before classify_pass")
    _classify_graph(gm, counts, other, missing, mask_products)
    bodies: dict[str, dict[str, int]] = {}
    for name, body in _annotated_bodies(gm):
        # a checkpoint body shape_prop annotated: its nodes are classified too (for the fusion rules),
        # counted apart so the root's counts stay those of the graph's own nodes
        bodies[name] = {}
        _classify_graph(body, bodies[name], other, missing, mask_products)
    _log.info("classify: %s; %d un-costed", counts, len(missing))
    for item in missing:
        _log.warning("classify: no cost known for %s (node %s): counted 0 FLOPs", item["op"], item["node"])
    return PassResult(gm, False, {"counts": counts, "other": other, "uncosted": missing,
                                  "mask_products": mask_products, "bodies": bodies})


def _classify_graph(gm: torch.fx.GraphModule, counts: dict, other: list, missing: list, mask_products: list) -> None:
    masks = mask_only_nodes(gm)
    for n in gm.graph.nodes:
        cls = op_class_of(n, mask_only=n in masks)
        n.meta["op_class"] = cls
        n.meta["cost"] = node_cost(n, cls)
        if cls not in ("INPUT", "OUTPUT"):
            counts[cls] = counts.get(cls, 0) + 1
        if cls == "OTHER":
            other.append({"node": n.name, "op": op_name(n)})
        if uncosted(n):
            missing.append({"node": n.name, "op": op_name(n)})
        if cls != "GEMM" and "product_flops" in n.meta["cost"]:
            mask_products.append(n.name)


def _annotated_bodies(gm: torch.fx.GraphModule) -> list[tuple[str, torch.fx.GraphModule]]:
    """The subgraphs (checkpoint bodies) whose every node shape propagation annotated."""
    return [(name, m) for name, m in gm.named_modules()
            if isinstance(m, torch.fx.GraphModule) and m is not gm
            and all(n.op in ("placeholder", "get_attr", "output") or "shape" in n.meta for n in m.graph.nodes)]


@dataclass
class FlopMismatch:
    """One node whose cost-model FLOPs differ from FlopCounterMode's count."""

    node: str
    op: str
    op_class: str
    expected: int
    counted: int


class _CountingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.counted: dict[torch.fx.Node, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in ("call_function", "call_method"):
            return super().run_node(n)
        with FlopCounterMode(display=False) as fc:
            out = super().run_node(n)
        self.counted[n] = int(fc.get_total_flops())
        return out


def check_flops_against_flop_counter(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[FlopMismatch]:
    """Every node's product FLOPs (``cost["product_flops"]``, which is ``cost["flops"]`` for every
    GEMM), evaluated at the captured dims, against ``FlopCounterMode``'s count when running that
    node alone; nodes without products must count 0. Returns the mismatches (empty when all
    agree). ``classify_pass`` must have run."""
    subs = {dim_symbol(k): v for k, v in gm.meta.get("dims", {}).items()}
    interp = _CountingInterpreter(gm)
    with torch.no_grad():
        interp.run(*example_inputs)
    out: list[FlopMismatch] = []
    for n, counted in interp.counted.items():
        cls = n.meta.get("op_class")
        if cls is None:
            raise PassError(f"{describe_node(n)} is not classified: run classify_pass first")
        cost = n.meta["cost"]
        if cls == "GEMM" and cost.get("product_flops") != cost["flops"]:
            raise PassError(f"{describe_node(n)}: GEMM flops differ from its product flops")
        expected = int(sympy.sympify(cost.get("product_flops", 0)).subs(subs))
        if expected != counted:
            out.append(FlopMismatch(n.name, op_name(n), cls, expected, counted))
    return out
