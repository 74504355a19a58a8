"""``torch.compile(model, backend="foldcompile")``: the optimize pipeline on Dynamo's graphs.

Users who already call ``torch.compile`` get our kernels in one word, with Dynamo's guards and
recompiles (a new shape, grad mode or training flag is Dynamo's recompile, not ours). Each graph
Dynamo hands over goes through the pipeline of :func:`foldcompile.optimize` — normalize,
shape_prop, classify, fuse (:func:`foldcompile.optimize.fuse_graph`) — and the executor the
selection rule picks (:mod:`foldcompile.executors.select`). Before that the graph is put in the
form :func:`foldcompile.trace` gives: the parameters and buffers Dynamo passes as inputs become
``get_attr`` nodes holding the model's own tensors (checked by identity on every call: a
parameter replaced by another object makes the backend build again), and the other inputs are
named after the model's arguments (``m``, ``z``, ...: shape propagation reads named dims from
those names).

Graphs with symbolic sizes (``dynamic=True``, or Dynamo's automatic dynamic shapes on the
recompile after a second shape) are not compiled by us — our fusion decisions and variants are
per static shape — and are handed, with a logged reason, to Inductor (``options={"symbolic":
"inductor"}``, the default) or run as Dynamo gave them (``"eager"``). A graph the pipeline
refuses (an error while capturing its form or fusing) runs as Dynamo gave it, the reason logged
as a warning and kept in ``Backend.handed_on``.

Options (``torch.compile(..., backend="foldcompile", options={...})``): ``executor`` (``"auto"``,
``"eager"``, ``"cuda_graph"``, ``"inductor"``), ``symbolic`` (``"inductor"`` or ``"eager"``),
``at`` (sizes at which fusions are judged, as in ``optimize``), ``dims`` (named dims).
``mode="reduce-overhead"`` means ``executor="cuda_graph"``.

    >>> import torch, foldcompile
    >>> from foldcompile.models import zoo
    >>> block, inputs = zoo.get("evoformer_block")
    >>> backend = foldcompile.dynamo_backend.Backend(executor="eager")
    >>> out = torch.compile(block, backend=backend)(*inputs)
    >>> [torch.allclose(a, b, atol=1e-5) for a, b in zip(out, block(*inputs))]
    [True, True]
    >>> backend.graphs[0].report.counts()["ln_linear"]["matched"] > 0
    True

The string ``"foldcompile"`` is known to Dynamo through the package's entry point
(``torch_dynamo_backends``) when it is installed; in a source checkout (``PYTHONPATH=.``) it is
registered when this module is imported, and by ``import foldcompile`` once torch is imported.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Mapping

import torch
import torch.fx

from foldcompile.executors import EXECUTOR_NAMES, Executor, select_executor
from foldcompile.optimize import OptimizeReport, Variant, fuse_graph

__all__ = ["Backend", "foldcompile_backend", "CompiledGraph", "register"]

log = logging.getLogger("foldcompile.dynamo_backend")

_SYMBOLIC = ("inductor", "eager")
_OWN_TENSOR = re.compile(r"\._(parameters|buffers)\[")


class CompiledGraph:
    """One Dynamo graph through the pipeline: call it with Dynamo's flat inputs."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], *, executor: str,
                 at: Mapping[str, int] | None, dims: Mapping[str, int] | None, max_rebuilds: int = 2):
        self.dynamo_graph = gm
        self.requested, self.at, self.dims = executor, at, dims
        self.sources = [_source_name(n) for n in gm.graph.find_nodes(op="placeholder")]
        self.rebuilds, self.max_rebuilds = 0, max_rebuilds
        self.fallback: str | None = None
        self._build(example_inputs)

    def _build(self, inputs: list[Any]) -> None:
        graph, self.own, self.user = _as_captured_graph(self.dynamo_graph, inputs, self.sources)
        devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
        buffers = [inputs[i] for i in self.own if not inputs[i].requires_grad]
        # shape propagation runs the graph (dropout included): the caller's generators must not move
        with torch.random.fork_rng(devices=devices):
            self.variant: Variant = fuse_graph(graph, [inputs[i] for i in self.user], at=self.at, dims=self.dims,
                                               buffers=buffers)
        self.held = [(i, inputs[i]) for i in self.own]
        self.executor: Executor = select_executor(self.variant.graph, self.requested,
                                                  [inputs[i] for i in self.user])
        counts = {rule: c["matched"] for rule, c in self.variant.record["counts"].items() if c["matched"]}
        log.info("foldcompile backend: graph of %d nodes: fused %s; executor %s (%s)", len(self.dynamo_graph.graph.nodes),
                 counts or "nothing", self.executor.name, self.executor.reason)

    @property
    def report(self) -> OptimizeReport:
        """What the fusion did on this graph and which executor runs it (as ``OptimizedModule.report``)."""
        dims = dict(self.variant.traced.meta.get("dims", {}))
        execution = self.executor.describe()
        if self.fallback:
            execution = {**execution, "executor": "eager", "reason": self.fallback}
        return OptimizeReport(self.variant.record, "dynamo graph", dims, execution)

    def __call__(self, *args: Any) -> Any:
        if self.fallback:
            return self.dynamo_graph(*args)
        if any(args[i] is not t for i, t in self.held):
            # a parameter or buffer replaced by another tensor object: Dynamo (which passes them as
            # inputs) does not recompile for that, our graph holds the old one: build again
            self.rebuilds += 1
            if self.rebuilds > self.max_rebuilds:
                self.fallback = (f"parameters/buffers replaced by other tensors {self.rebuilds} times: Dynamo's graph "
                                 "runs as it is")
                log.warning("foldcompile backend: %s", self.fallback)
                return self.dynamo_graph(*args)
            log.info("foldcompile backend: a parameter or buffer was replaced: building the graph again")
            self._build(list(args))
        return self.executor(tuple(args[i] for i in self.user), {})


class Backend:
    """A Dynamo backend running the foldcompile pipeline; ``graphs`` keeps what it compiled.

    ``torch.compile(model, backend=Backend(executor="eager"))``; the registered name
    ``"foldcompile"`` is :func:`foldcompile_backend` (a fresh ``Backend`` per graph, options from
    ``torch.compile``'s ``options=``).
    """

    def __init__(self, *, executor: str = "auto", symbolic: str = "inductor", at: Mapping[str, int] | None = None,
                 dims: Mapping[str, int] | None = None):
        if executor not in EXECUTOR_NAMES:
            raise ValueError(f"executor={executor!r}: expected one of {', '.join(map(repr, EXECUTOR_NAMES))}")
        if symbolic not in _SYMBOLIC:
            raise ValueError(f"symbolic={symbolic!r}: expected one of {', '.join(map(repr, _SYMBOLIC))}")
        self.executor, self.symbolic, self.at, self.dims = executor, symbolic, at, dims
        self.graphs: list[CompiledGraph] = []
        self.handed_on: list[str] = []  # why each graph not compiled here went elsewhere

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        why = symbolic_reason(gm)
        if why:
            self.handed_on.append(why)
            log.warning("foldcompile backend: %s: handed to %s", why, self.symbolic)
            if self.symbolic == "inductor":
                from torch._dynamo.backends.registry import lookup_backend
                return lookup_backend("inductor")(gm, example_inputs)
            return gm.forward
        try:
            compiled = CompiledGraph(gm, example_inputs, executor=self.executor, at=self.at, dims=self.dims)
        except Exception as e:  # noqa: BLE001 - a graph the pipeline refuses still runs, as Dynamo gave it
            why = f"the pipeline refused the graph: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            self.handed_on.append(why)
            log.warning("foldcompile backend: %s: it runs as Dynamo gave it", why)
            return gm.forward
        self.graphs.append(compiled)
        return compiled


def foldcompile_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None,
                        options: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """The backend registered as ``"foldcompile"`` (module docstring: its options)."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - {"executor", "symbolic", "at", "dims"})
    if unknown:
        raise ValueError(f"backend 'foldcompile': unknown option(s) {unknown}; known: executor, symbolic, at, dims")
    if mode not in (None, "default", "reduce-overhead"):
        raise ValueError(f"backend 'foldcompile': mode={mode!r} is not supported (None, 'default', 'reduce-overhead')")
    if mode == "reduce-overhead":
        opts.setdefault("executor", "cuda_graph")
    return Backend(**opts)(gm, example_inputs)


def symbolic_reason(gm: torch.fx.GraphModule) -> str | None:
    """Why ``gm`` (a Dynamo graph) has sizes that are not fixed, or None."""
    symbols: set[str] = set()
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, (torch.SymInt, torch.SymFloat)):
            symbols.add(str(value))
        elif isinstance(value, torch.Tensor):
            symbols.update(str(s) for s in (*value.shape, *value.stride()) if isinstance(s, torch.SymInt))
    if not symbols:
        return None
    shown = ", ".join(sorted(symbols)[:4]) + (", ..." if len(symbols) > 4 else "")
    return (f"the graph has symbolic sizes ({shown}): foldcompile fuses per static shape (dynamic=True, or "
            "Dynamo's automatic dynamic shapes after a second shape)")


def _source_name(node: torch.fx.Node) -> str | None:
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    name = source.name
    return str(name() if callable(name) else name)


def _attribute_path(source: str) -> str:
    """``L['self']._modules['a']._modules['b']._parameters['weight']`` -> ``a.b.weight``."""
    parts = re.findall(r"\['([^']*)'\]|\.(\w+)", source.split("]", 1)[1] if source.startswith("L[") else source)
    names = [a or b for a, b in parts]
    return ".".join(p for p in names if p not in ("_modules", "_parameters", "_buffers"))


def _as_captured_graph(gm: torch.fx.GraphModule, inputs: list[Any],
                       sources: list[str | None]) -> tuple[torch.fx.GraphModule, list[int], list[int]]:
    """Dynamo's graph in :func:`foldcompile.trace`'s form: the model's parameters and buffers (inputs whose
    source is one) as ``get_attr`` nodes holding those very tensors, the other inputs as placeholders named
    after the model's arguments. Returns the graph, the positions of the former and of the latter."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    root: dict[str, Any] = {}
    own, user = [], []
    taken: set[str] = set()
    placeholders = gm.graph.find_nodes(op="placeholder")
    for i, (node, value, source) in enumerate(zip(placeholders, inputs, sources)):
        is_own = isinstance(value, torch.Tensor) and (
            isinstance(value, torch.nn.Parameter) or (source is not None and _OWN_TENSOR.search(source)))
        if is_own:
            path = _attribute_path(source) if source else ""
            if not path or path in root or not all(p.isidentifier() for p in path.split(".")):
                path = f"_input_{i}"
            new = graph.get_attr(path)
            root[path] = value
            own.append(i)
        else:
            m = re.fullmatch(r"L\['(\w+)'\]", source or "")
            name = m.group(1) if m and m.group(1) not in taken else node.name
            taken.add(name)
            new = graph.placeholder(name)
            user.append(i)
        new.meta.update(node.meta)
        env[node] = new
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    for name, sub in gm.named_children():  # subgraph modules Dynamo's graph calls (checkpoint bodies)
        root[name] = sub
    out = torch.fx.GraphModule(root, graph, class_name="DynamoGraph")
    out.meta["capture"] = {"graphs": 1, "leaves": 0, "tracer": "dynamo (torch.compile backend)"}
    return out, own, user


def register() -> None:
    """Register :func:`foldcompile_backend` as ``"foldcompile"`` with Dynamo, unless it is already known
    (registered, or found as the package's entry point: Dynamo then loads it itself, and a second
    registration would be refused as a duplicate)."""
    from torch._dynamo.backends import registry

    known = getattr(registry, "_COMPILER_FNS", {})
    entry_points = getattr(registry, "_BACKENDS", {})
    if "foldcompile" in known or entry_points.get("foldcompile") is not None:
        return
    registry.register_backend(foldcompile_backend, name="foldcompile")


register()  # importing this module makes the name known (a no-op where Dynamo found the entry point)
