"""What every pass returns (see docs/DESIGN.md, "The pipeline").

A pass is a function ``name_pass(gm: torch.fx.GraphModule, **options) -> PassResult``
that reads and writes only the graph and ``node.meta``. It returns the (possibly
rewritten) module, whether it changed anything (so a manager can iterate to a
fixed point and a test can assert "this pass did nothing here"), and a record of
what it did (counts and decisions, with reasons) for ``explain``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import torch.fx


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    changed: bool
    record: dict[str, Any] = field(default_factory=dict)


F = TypeVar("F", bound=Callable[..., Any])


def declare(requires: Iterable[str] = (), ensures: Iterable[str] = ()) -> Callable[[F], F]:
    """Declare the ``node.meta`` keys (:mod:`foldcompile.passes.meta`) a pass reads and writes.

    The pass manager refuses to run a pass whose ``requires`` no earlier pass ``ensures`` (and
    the input graph does not carry), naming the pass and the key::

        >>> @declare(requires=("shape",), ensures=("op_class",))
        ... def my_pass(gm): ...
        >>> sorted(my_pass.requires), sorted(my_pass.ensures)
        (['shape'], ['op_class'])
    """
    def deco(fn: F) -> F:
        fn.requires = frozenset(requires)  # type: ignore[attr-defined]
        fn.ensures = frozenset(ensures)  # type: ignore[attr-defined]
        return fn
    return deco


def declared(fn: Callable[..., Any]) -> tuple[frozenset[str], frozenset[str]]:
    """``(requires, ensures)`` of a pass, seen through ``functools.partial``; empty when undeclared."""
    while fn is not None and not hasattr(fn, "requires") and hasattr(fn, "func"):
        fn = fn.func
    return frozenset(getattr(fn, "requires", ())), frozenset(getattr(fn, "ensures", ()))


class PassError(RuntimeError):
    """A pass met a graph it cannot handle; the message names the node and its source line."""


def describe_node(node: torch.fx.Node) -> str:
    """`name = target(args)` plus the user's source line where the tracer recorded it."""
    where = ""
    stack = node.meta.get("stack_trace")
    if stack:
        lines = [l.strip() for l in stack.strip().splitlines() if l.strip()]
        # the last 'File ..., line N' entry and the code line after it point at the user's code
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("File "):
                code = lines[i + 1] if i + 1 < len(lines) else ""
                where = f" at {lines[i]}: {code}"
                break
    return f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)}){where}"
