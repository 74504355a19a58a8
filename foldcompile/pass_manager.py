"""The pass manager: run an ordered list of passes, keep every intermediate graph.

A pass is a callable ``fn(gm) -> PassResult`` (bind options with ``functools.partial`` or a
lambda). A pass declared with :func:`foldcompile.passes.base.declare` names the node-meta keys
it ``requires`` and ``ensures``; the manager refuses to run one whose requirements no earlier
pass ensured (nor the input graph carries), naming the pass and the key. The manager runs them in order on a copy of the captured module, keeps the graph
after every pass in ``history[name]`` (a ``Step``: the GraphModule and the PassResult), can
stop after any pass, and compares any intermediate graph with the captured one::

    >>> from functools import partial
    >>> from foldcompile.capture import trace
    >>> from foldcompile.capture import flat_inputs
    >>> from foldcompile.models import zoo
    >>> from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
    >>> block, ex = zoo.get("evoformer_block")
    >>> captured = trace(block, *ex)
    >>> values = flat_inputs(captured, ex)                  # one value per placeholder (chunk_size=None too)
    >>> pm = PassManager([normalize_pass,
    ...                   ("shape_prop", partial(shape_prop_pass, example_inputs=values)),
    ...                   ("classify", classify_pass)])
    >>> gm = pm.run(captured, stop_after="shape_prop")
    >>> list(pm.history)
    ['normalize', 'shape_prop']
    >>> code = pm.history["shape_prop"].graph_module.code   # readable Python
    >>> print(code.strip().splitlines()[0])
    def forward(self, m, z, msa_mask, pair_mask, chunk_size):
    >>> pm.compare("shape_prop", *ex)                       # max relative error, 0.0 here
    0.0

Each kept graph is its own ``fx.Graph`` (nodes and their meta copied), sharing parameters
with the captured module, so a later pass that rewrites its graph in place never changes
an earlier snapshot.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx

from foldcompile.passes.base import PassError, PassResult, declared
from foldcompile.passes.meta import NODE_KEYS
from foldcompile.progress import stage_done

_log = logging.getLogger(__name__)

__all__ = ["PassManager", "Step", "copy_graph_module", "max_rel_error"]

PassFn = Callable[[torch.fx.GraphModule], PassResult]


@dataclass
class Step:
    """The graph after one pass and what the pass returned."""

    name: str
    graph_module: torch.fx.GraphModule
    result: PassResult


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copied graph (node meta shallow-copied) sharing ``gm``'s submodules,
    parameters and buffers; ``gm.meta``, the training flag and capture guards are carried over."""
    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    # graph.output drops the output node's meta; copy it back
    old_out = next(n for n in gm.graph.nodes if n.op == "output")
    new_out = next(n for n in graph.nodes if n.op == "output")
    new_out.meta = dict(old_out.meta)
    graph._codegen = gm.graph._codegen
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    new.train(gm.training)
    if getattr(gm, "guards", None) is not None:
        # a captured module checks its guards (and binds defaults) on every call: keep that
        from foldcompile.guards import install_guards
        install_guards(new, gm.guards)
    return new


def carried_keys(gm: torch.fx.GraphModule) -> set[str]:
    """The schema's node-meta keys a graph already carries: those on every op node (a capture's
    ``module_path``), plus those recorded as ensured by passes run on it (``gm.meta["ensured"]``)."""
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    on_all = {k for k in NODE_KEYS if ops and all(k in n.meta for n in ops)}
    return on_all | set(gm.meta.get("ensured", ()))


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flatten(v)]
    if isinstance(x, dict):
        return [y for k in sorted(x, key=str) for y in _flatten(x[k])]
    return [x]


def max_rel_error(got: Any, ref: Any) -> float:
    """Largest ‖got − ref‖ / ‖ref‖ over the tensors of two (nested) outputs, in float64.

    Structures and non-tensor leaves must match exactly; a NaN anywhere gives ``inf``.
    """
    g, r = _flatten(got), _flatten(ref)
    if len(g) != len(r):
        raise PassError(f"outputs differ in structure: {len(g)} leaves vs {len(r)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(g, r)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            raise PassError(f"output {i}: {type(a).__name__} vs {type(b).__name__}")
        if not isinstance(a, torch.Tensor):
            if a != b:
                raise PassError(f"output {i}: {a!r} vs {b!r}")
            continue
        if a.shape != b.shape:
            raise PassError(f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        a64, b64 = a.detach().double(), b.detach().double()
        if torch.isnan(a64).any() or torch.isnan(b64).any():
            return float("inf")
        denom = torch.linalg.vector_norm(b64).item()
        num = torch.linalg.vector_norm(a64 - b64).item()
        err = num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))
        worst = max(worst, err)
    return worst


class PassManager:
    """Runs named passes in order; see the module docstring.

    ``passes``: ``(name, fn)`` pairs, or bare functions (named by ``__name__`` without a
    ``_pass`` suffix: ``classify_pass`` -> ``"classify"``). Names must be unique.
    """

    def __init__(self, passes: Iterable[tuple[str, PassFn] | PassFn]):
        self.passes: list[tuple[str, PassFn]] = []
        for p in passes:
            if isinstance(p, tuple):
                name, fn = p
            elif callable(p):
                fn = p
                name = getattr(p, "__name__", None) or getattr(getattr(p, "func", None), "__name__", None)
                if name is None:
                    raise PassError(f"cannot name pass {p!r}: give it as (name, fn)")
                name = name[: -len("_pass")] if name.endswith("_pass") else name
            else:
                raise PassError(f"a pass must be a callable or a (name, callable) pair, got {p!r}")
            if not callable(fn):
                raise PassError(f"pass {name!r} is not callable")
            if any(name == n for n, _ in self.passes):
                raise PassError(f"two passes are named {name!r}")
            self.passes.append((name, fn))
        self.captured: torch.fx.GraphModule | None = None
        self.history: dict[str, Step] = {}

    @property
    def names(self) -> list[str]:
        """The pass names, in order."""
        return [n for n, _ in self.passes]

    def run(self, gm: torch.fx.GraphModule, stop_after: str | None = None) -> torch.fx.GraphModule:
        """Run the passes on a copy of ``gm`` (which is kept as ``captured``), stopping after
        the pass named ``stop_after`` if given; returns the last graph. ``history`` is reset."""
        if not isinstance(gm, torch.fx.GraphModule):
            raise PassError(f"PassManager.run needs a torch.fx.GraphModule, got {type(gm).__name__}")
        if stop_after is not None and stop_after not in self.names:
            raise PassError(f"stop_after={stop_after!r} is not a pass here; passes: {self.names}")
        self.captured = gm
        self.history = {}
        cur = copy_graph_module(gm)
        have = carried_keys(cur)
        for name, fn in self.passes:
            requires, ensures = declared(fn)
            missing = sorted(requires - have)
            if missing:
                raise PassError(f"pass {name!r} requires node meta {missing[0]!r}"
                                + (f" (and {missing[1:]})" if len(missing) > 1 else "")
                                + f", which no earlier pass ensures (passes before it: {list(self.history)})")
            _log.info("running pass %s", name)
            t0 = time.perf_counter()
            result = fn(cur)
            if not isinstance(result, PassResult):
                raise PassError(f"pass {name!r} returned {type(result).__name__}, not a PassResult")
            cur = result.graph_module
            have |= ensures
            cur.meta["ensured"] = sorted(set(cur.meta.get("ensured", ())) | ensures)
            cur.graph.lint()
            cur.recompile()
            self.history[name] = Step(name, copy_graph_module(cur), result)
            stage_done(_log, f"pass {name}", time.perf_counter() - t0)
            if name == stop_after:
                break
        return cur

    def _step(self, name: str) -> Step:
        if name not in self.history:
            ran = list(self.history)
            raise PassError(f"no graph after pass {name!r}; passes run: {ran or 'none (call run first)'}")
        return self.history[name]

    def code(self, name: str) -> str:
        """The graph after pass ``name`` as readable Python."""
        return self._step(name).graph_module.code

    def compare(self, name: str, *inputs: Any) -> float:
        """Run the captured graph and the graph after pass ``name`` on ``inputs``; return the
        largest relative error over the outputs (``max_rel_error``)."""
        step = self._step(name)
        assert self.captured is not None
        # no torch.no_grad() here: a captured module guards on the grad mode it was captured in
        ref = self.captured(*inputs)
        got = step.graph_module(*inputs)
        return max_rel_error(got, ref)

    def compare_all(self, *inputs: Any) -> dict[str, float]:
        """``compare`` for every pass run, in order."""
        return {name: self.compare(name, *inputs) for name in self.history}
