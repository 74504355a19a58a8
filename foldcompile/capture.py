"""The front end: capture an unmodified model as ONE torch.fx graph at the torch-function level.

``trace(model, *example_inputs, **example_kwargs)`` runs TorchDynamo's export
(``torch._dynamo.export``) with all shapes static, which specialises Python
flags, ``self.training``, loops over tensor sizes, ``len(x.shape)`` and dtype
branches on the example inputs, inlines every ``nn.Module`` into functional
calls on its parameters, and keeps ``torch.autocast`` regions
(``_enter_autocast``/``_exit_autocast`` nodes) and activation checkpointing
with their effect: Dynamo's ``tag_activation_checkpoint`` higher-order op is
rewritten to a ``torch.utils.checkpoint.checkpoint(body, *args,
use_reentrant=False)`` node whose body is a subgraph (``wrap_body_0``), because
torch 2.11 runs that op eagerly without recomputation. The result is then
rebuilt into the project's contract:

- the graph module's ``forward`` keeps the model's argument names; a guard
  pre-hook binds each call to the model's signature, applies its defaults and
  checks what the capture specialised on (:mod:`foldcompile.guards`);
- parameters and buffers are ``get_attr`` nodes named by the model's own
  qualified names (``blocks.0.lin.weight``) holding the model's very
  ``Parameter`` objects, so an optimizer step on the model is seen by the graph
  and gradients of the graph land in the model;
- every node has ``meta["module_path"]`` (``"blocks.0.tri_att_start"``, ``""``
  for the root) and, where Dynamo saw the source, ``meta["stack_trace"]``;
- ``gm.meta["capture"] = {"graphs": 1, "leaves": 0, "tracer": "dynamo"}``,
  ``gm.meta["guards"]`` and ``gm.guards``.

Why not ``torch.fx.symbolic_trace`` as a fast path: on a model it accepts it
can still compute a different function, silently: a Proxy's ``x.dtype is
torch.bfloat16`` is always False and ``with torch.autocast(...)`` leaves no
trace (see PITFALLS.md). Dynamo checks both, so it is the only tracer here.

What cannot be captured as one graph (Python control flow on tensor values,
``.item()`` feeding Python) raises :class:`CaptureError` naming the construct
and the user's source file and line. A ``forward`` that writes module state
(``self.last = x``, ``self.calls.append(...)``, ``self.n += 1``) is refused with a
:class:`CaptureError` naming the attribute, and the state is restored: the graph
cannot repeat Python side effects.

Limitations (not guarded; the caller must keep them fixed after capture):

- module-level globals and closure variables read by ``forward`` are guarded
  only where they are named directly in a module class's ``forward`` code and
  hold plain data (or a tensor, by identity); those read in helper functions,
  closures, or other objects' methods are not, because Dynamo's own guards on
  them are not evaluated by foldcompile: do not change such globals after
  capture;
- ``torch.compiler.is_compiling()`` (and ``torch._dynamo.is_compiling()``) is
  True during capture, so a branch on it takes its compiling side in the graph;
- process-wide flags read in ``forward`` (``torch.backends.*``,
  ``torch.are_deterministic_algorithms_enabled()``, default dtype, matmul
  precision) are not guarded;
- the graph holds the values of tensors it read that are not the model's
  parameters, buffers or tensor attributes (constants built in ``forward``).

Example::

    >>> from foldcompile.models import zoo
    >>> block, (m, z, msa_mask, pair_mask) = zoo.get("evoformer_block")
    >>> gm = trace(block, m, z, msa_mask, pair_mask)
    >>> gm.meta["capture"]
    {'graphs': 1, 'leaves': 0, 'tracer': 'dynamo'}
    >>> [torch.allclose(a, b) for a, b in zip(gm(m, z, msa_mask, pair_mask), block(m, z, msa_mask, pair_mask))]
    [True, True]
    >>> gm.graph.find_nodes(op="get_attr")[0].target            # the model's own parameter names
    'msa_att_row.layer_norm_m.weight'
"""
from __future__ import annotations

import inspect
import re
from typing import Any

import torch
import torch.fx
import torch.utils.checkpoint

from foldcompile.guards import Guards, install_guards, module_state_changes, snapshot_module_state

__all__ = ["trace", "CaptureError", "module_path_of"]


_CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint


class CaptureError(RuntimeError):
    """The model cannot be captured as one graph; the message names the construct and its source line."""


def trace(model: torch.nn.Module, *example_inputs: Any, **example_kwargs: Any) -> torch.fx.GraphModule:
    """Capture ``model`` called on the example inputs as one guarded ``torch.fx.GraphModule``.

    The graph is specialised on the examples (shapes, dtypes, flags, training
    mode, autocast and grad mode at the time of the call) and refuses, with a
    ``GuardError``, any call for which that specialisation may not hold.
    Capture under the autocast/grad state you will run in.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trace expects a torch.nn.Module, got {type(model).__name__}")
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*example_inputs, **example_kwargs)
    except TypeError as e:
        raise CaptureError(f"example inputs do not match {type(model).__name__}.forward{signature}: {e}") from None
    bound.apply_defaults()

    # Dynamo replays forward's Python side effects on the real modules (with fake tensors); the graph
    # cannot repeat them, so a forward that writes module state is refused (and the state restored)
    before = snapshot_module_state(model)
    try:
        exported = torch._dynamo.export(model, assume_static_by_default=True)(*bound.args, **bound.kwargs)[0]
    except Exception as e:  # Dynamo raises many exception types; all mean "not one graph"
        module_state_changes(before, restore=True)
        raise CaptureError(_describe_failure(model, e)) from e
    changes = module_state_changes(before, restore=True)
    if changes:
        raise CaptureError(
            f"cannot capture {type(model).__name__}: forward {changes[0]}"
            + (f" (and {len(changes) - 1} more: {'; '.join(changes[1:4])})" if len(changes) > 1 else "")
            + ": the captured graph cannot repeat Python side effects; keep such state outside the model "
            "or return it (module state restored to before the capture)"
        )
    # recorded after the capture and the side-effect check, so they describe the model as it is now
    guards = Guards.record(model, bound)

    gm = _rebuild(model, exported)
    gm.train(model.training)
    leaves = sum(1 for g in _all_graphs(gm) for n in g.nodes if n.op == "call_module")
    gm.meta["capture"] = {"graphs": 1, "leaves": leaves, "tracer": "dynamo"}
    guards.record_graph_attrs(model, gm)
    install_guards(gm, guards)
    return gm


def _rebuild(model: torch.nn.Module, exported: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Copy Dynamo's graph, renaming get_attr targets to the model's parameter/buffer names."""
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        names.setdefault(id(t), name)
    module_names = {str(id(m)): name for name, m in model.named_modules(remove_duplicate=False)}

    graph = torch.fx.Graph()
    graph._codegen = exported.graph._codegen  # the pytree codegen that keeps the call signature
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    root: dict[str, Any] = {}
    for node in exported.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        if node.op == "get_attr":
            obj = _fetch_attr(exported, node.target)
            target = names.get(id(obj), node.target)
            new.target = target
            root[target] = obj
    for g in [graph] + [root[k].graph for k in root if isinstance(root[k], torch.fx.GraphModule)]:
        for n in g.nodes:
            n.meta["module_path"] = module_path_of(n, module_names)
            if n.op == "call_function" and n.target is _CHECKPOINT_HOP:
                # torch 2.11 runs this higher-order op eagerly WITHOUT checkpointing (no recompute in
                # backward); calling torch.utils.checkpoint on the body subgraph keeps the effect everywhere.
                n.target = torch.utils.checkpoint.checkpoint
                n.kwargs = {"use_reentrant": False, **{k: v for k, v in n.kwargs.items() if k != "use_reentrant"}}
    gm = torch.fx.GraphModule(root, graph, class_name=type(model).__name__)
    return gm


def _all_graphs(gm: torch.fx.GraphModule):
    yield gm.graph
    for _, sub in gm.named_modules():
        if isinstance(sub, torch.fx.GraphModule) and sub is not gm:
            yield sub.graph


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_TOKEN = re.compile(r"\.([A-Za-z_]\w*)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")


def module_path_of(node: torch.fx.Node, module_names: dict[str, str] | None = None) -> str:
    """The qualified name of the innermost model module a node came from (``""`` for the root).

    Read from Dynamo's ``nn_module_stack`` (keys are module ids, values
    ``(source, type)`` with sources like ``L['self'].blocks[0].tri_att_start``);
    an existing ``meta["module_path"]`` wins.
    """
    if "module_path" in node.meta:
        return node.meta["module_path"]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, (source, _) = list(stack.items())[-1]
    if module_names and key in module_names:
        return module_names[key]
    return _parse_source(str(source))


def _parse_source(source: str) -> str:
    """``L['self'].blocks[0]._modules['x'].lin`` -> ``blocks.0.x.lin``."""
    m = re.match(r"L\['[^']*'\]", source)
    rest = source[m.end():] if m else source
    parts = []
    for tok in _TOKEN.finditer(rest):
        part = next(g for g in tok.groups() if g is not None)
        if part != "_modules":
            parts.append(part)
    return ".".join(parts)


def _describe_failure(model: torch.nn.Module, e: Exception) -> str:
    """One readable message: the construct Dynamo could not take, and the user's file and line."""
    construct = getattr(e, "gb_type", None)
    text = str(e)
    if not construct:
        construct = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    where = "unknown source line"
    frames = getattr(e, "real_stack", None)
    if frames:
        f = frames[-1]
        where = f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    else:
        m = re.search(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', text.split("from user code:")[-1])
        if m:
            where = f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}"
    detail = "\n".join(text.splitlines()[:12])
    return (
        f"cannot capture {type(model).__name__} as one graph: {construct} at {where}\n"
        f"(Dynamo: {type(e).__name__}: {detail})"
    )
