"""The executor interface: what runs a variant's rewritten graph, and why it was chosen.

An executor is made for one variant (one static specialisation of the model, see
:mod:`foldcompile.variants`) and called with that call's arguments exactly as the user passed
them: ``executor(args, kwargs)``. It returns what the graph returns. It checks the variant's
guards first (a call the graph does not hold for raises
:class:`~foldcompile.GuardError`, and the caller builds another variant), and where it cannot
do its job on a call it runs the graph eagerly, saying so in :meth:`Executor.describe`.

    >>> import torch
    >>> from foldcompile.executors import EagerExecutor
    >>> gm = torch.fx.symbolic_trace(lambda x: x * 2)
    >>> run = EagerExecutor(gm, requested="eager", reason="requested")
    >>> run((torch.ones(2),), {})
    tensor([2., 2.])
    >>> run.describe()["executor"]
    'eager'
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx

__all__ = ["Executor", "EXECUTOR_NAMES", "graph_tensors"]

log = logging.getLogger("foldcompile.executors")

EXECUTOR_NAMES = ("auto", "eager", "cuda_graph", "inductor")


class Executor:
    """Runs one variant's graph. Subclasses set :attr:`kind` and implement :meth:`__call__`.

    ``requested`` is what the user asked for (``"auto"`` or a kind), ``reason`` why this executor
    runs (the selection rule's words). :attr:`name` is the executor actually running calls now
    (an executor that had to give up says ``"eager"`` from then on, and :attr:`reason` says why).
    """

    kind = "base"

    def __init__(self, graph: torch.fx.GraphModule, *, requested: str, reason: str):
        self.graph = graph
        self.requested = requested
        self.reason = reason

    @property
    def name(self) -> str:
        return self.kind

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """``{"executor": name, "requested": ..., "reason": ...}`` plus the executor's own counts."""
        return {"executor": self.name, "requested": self.requested, "reason": self.reason}

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        """The graph run by PyTorch (its guards checked by its own pre-hook, where it has them)."""
        return self.graph(*args, **kwargs)

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Check the graph's guards (a :class:`~foldcompile.GuardError` if one fails) and return the call
        bound to the captured signature, defaults applied."""
        guards = getattr(self.graph, "guards", None)
        if guards is None:  # a graph from Dynamo's backend interface: Dynamo guards its calls
            return args, kwargs
        bound = guards.check(args, kwargs, self.graph)
        return bound.args, bound.kwargs


def graph_tensors(gm: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """``(qualified name, tensor)`` of every parameter, buffer or constant the graph (and the subgraphs it
    calls) reads through ``get_attr``, each tensor once."""
    seen: set[int] = set()
    out: list[tuple[str, torch.Tensor]] = []

    def visit(module: torch.fx.GraphModule, prefix: str) -> None:
        for node in module.graph.nodes:
            if node.op != "get_attr":
                continue
            obj: Any = module
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor) and id(obj) not in seen:
                seen.add(id(obj))
                out.append((prefix + node.target, obj))
            elif isinstance(obj, torch.fx.GraphModule):
                visit(obj, f"{prefix}{node.target}.")

    visit(gm, "")
    return out
