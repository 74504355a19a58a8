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

Identical blocks are captured once (:mod:`foldcompile.regions`): submodules with the same
code, configuration, parameter shapes and no hooks (the 48 blocks of AlphaFold's trunk)
are traced once per distinct call and stamped out into the graph with each block's own
parameters, module paths and names (``blocks_17_linear_3``, ``meta["region"]``); the
graph is the one a whole-model trace gives. ``regions_disabled()`` traces every block.

Why not ``torch.fx.symbolic_trace`` as a fast path: on a model it accepts it
can still compute a different function, silently: a Proxy's ``x.dtype is
torch.bfloat16`` is always False and ``with torch.autocast(...)`` leaves no
trace (see PITFALLS.md). Dynamo checks both, so it is the only tracer here.

What cannot be captured as one graph (Python control flow on tensor values,
``.item()`` feeding Python) raises :class:`CaptureError` naming the construct
and the user's source file and line.

The graph cannot repeat Python side effects, so a ``forward`` that writes
anything that outlives the call is refused with a :class:`CaptureError` naming
the object written and the line: module state (``self.last = x``,
``self.calls.append(...)``, ``self.n += 1``, a deque's ``append``), class
attributes (``type(self).calls += 1``), globals (``LOG.append(1)``,
``global N; N += 1``) and the arguments' containers (AF2's recycling
``prev["z"] = z``, ``acc.append(x)``). Dynamo runs with its side-effect replay
off and its side-effect check raising (it tracks every such write, in helper
functions too); it traces private copies of the argument containers, and the
model's state, the classes' attributes and the globals named in ``forward`` are
compared before and after as a second line (and restored), so the caller's
objects are never changed by a capture. Writes into objects created inside
``forward`` are fine, and so are in-place tensor ops (the graph repeats them).

Limitations (not guarded unless said; the caller must keep them fixed after capture):

- module-level globals read during the capture are guarded where they hold plain
  data (or a tensor, by identity) and are named in a module class's ``forward``
  code or appear in Dynamo's own guards as a global of a Python module (helper
  functions, ``import cfg; cfg.SCALE``); closure variables, globals reached through
  locals, and objects that are not plain data are not: do not change them after
  capture;
- process-wide module hooks (``torch.nn.modules.module.register_module_forward_hook``,
  ``register_module_forward_pre_hook``, ``register_module_full_backward_hook``,
  ``register_module_full_backward_pre_hook``) are refused at capture and, registered
  after it, refused by the guards on every call (a ``GuardError`` naming them):
  eager runs them around every submodule, the graph runs none;
- ``torch.compiler.is_compiling()`` (and ``torch._dynamo.is_compiling()``) is
  True during capture, so a branch on it takes its compiling side in the graph;
- process-wide flags read in ``forward`` (``torch.backends.*``,
  ``torch.are_deterministic_algorithms_enabled()``, default dtype, matmul
  precision) are not guarded;
- the graph holds the values of tensors it read that are not the model's
  parameters, buffers or tensor attributes (constants built in ``forward``);
- an in-place dunder called by name on an argument's list (``acc.__iadd__([x])``,
  where ``acc += [x]`` is refused) is not recorded by Dynamo (torch 2.13) and not
  replayed either, so neither check sees it: the graph does not repeat the write.

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

import ast
import collections
import contextlib
import copy
import inspect
import logging
import os
import re
import sysconfig
import textwrap
import traceback
import types
from typing import Any, Mapping, Sequence

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
import torch.utils.checkpoint

from foldcompile.guards import (Guards, global_module_hooks, install_guards, module_state_changes,
                                snapshot_module_state)
from foldcompile.regions import capture_with_regions

__all__ = ["trace", "CaptureError", "flat_inputs", "module_path_of", "regions_disabled"]


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

    hooks = global_module_hooks()
    if hooks:
        raise CaptureError(f"cannot capture {type(model).__name__}: global module hook(s) are registered "
                           f"({', '.join(hooks)}, torch.nn.modules.module): eager runs them around every module, "
                           "a graph cannot hold them; remove them before the capture (and keep them off while the "
                           "graph runs: its guards refuse calls while any is registered)")

    # The graph cannot repeat Python side effects, so a forward that writes anything outside itself is
    # refused. Dynamo traces on private copies of the argument containers (the caller's are never
    # handed to it) with its side-effect replay switched off and its side-effect check set to raise;
    # the before/after comparison below is the second line, for what Dynamo does not report.
    private = _private_copy(dict(bound.arguments))
    args, kwargs = _split_arguments(signature, private)
    before = snapshot_module_state(model)
    try:
        with torch._dynamo.config.patch(**_dynamo_side_effect_config()), _quiet_fake_tensor_log():
            # repeated blocks captured once (foldcompile/regions.py); None: the whole model as one trace
            deduplicated = capture_with_regions(model, args, kwargs, _dynamo_export) if _REGIONS else None
            if deduplicated is not None:
                exported, dynamo_guards = deduplicated
            else:
                exported, whole = _dynamo_export(model, args, kwargs)
                dynamo_guards = [(model, whole)]
    except Exception as e:  # Dynamo raises many exception types; all mean "not one graph"
        module_state_changes(before, restore=True)
        effects = _side_effects_seen_by_dynamo(e, list(bound.arguments))
        if effects:
            raise CaptureError(_side_effect_message(model, effects)) from None
        # An op that failed on fake tensors (a wrong channel size, ...) most likely fails in eager too:
        # then the model's own error is what the user must see. Only then is the model run eagerly, so a
        # refusal never runs the user's forward for other failures.
        eager_error = _eager_failure(model, signature, bound) if type(e).__name__ == "TorchRuntimeError" else None
        if eager_error is not None:
            raise CaptureError(eager_error[0]) from eager_error[1]
        raise CaptureError(_describe_failure(model, e, args, kwargs)) from e
    changes = module_state_changes(before, restore=True)
    changes += [f"mutates argument {where} (the caller's object is unchanged: the capture ran on a copy)"
                for where in _argument_changes(dict(bound.arguments), private)]
    if changes:
        raise CaptureError(_side_effect_message(model, changes))
    # recorded after the capture and the side-effect check, so they describe the model as it is now
    guards = Guards.record(model, bound)
    for root, root_guards in dynamo_guards:  # each capture's globals, named from its root's module
        guards.add_dynamo_globals(root, root_guards)

    gm = _rebuild(model, exported)
    if "regions" in exported.meta:
        gm.meta["regions"] = exported.meta["regions"]
    gm.train(model.training)
    leaves = sum(1 for g in _all_graphs(gm) for n in g.nodes if n.op == "call_module")
    gm.meta["capture"] = {"graphs": 1, "leaves": leaves, "tracer": "dynamo"}
    guards.record_graph_attrs(model, gm)
    install_guards(gm, guards)
    return gm


def _dynamo_export(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, Any]:
    return torch._dynamo.export(module, assume_static_by_default=True)(*args, **kwargs)


# whether trace captures repeated blocks once (foldcompile/regions.py); see `regions_disabled`
_REGIONS = True


@contextlib.contextmanager
def regions_disabled():
    """Within this context :func:`trace` traces every block again (no regions), as before regions existed:
    for comparisons and for a model the regions get wrong."""
    global _REGIONS
    was, _REGIONS = _REGIONS, False
    try:
        yield
    finally:
        _REGIONS = was


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


_TOKEN = re.compile(r"\.([A-Za-z_]\w*)|\.(\d+)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")


def flat_inputs(gm: torch.fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> list[Any]:
    """The example inputs of a captured graph as its placeholders take them, one value each.

    A capture keeps the model's call signature (defaults included: ``mask=None`` is a
    placeholder too), so a call ``(args, kwargs)`` is bound to that signature and flattened
    with the graph's own input spec, as its generated ``forward`` does (what shape propagation
    and every pass that runs the graph take)::

        >>> from foldcompile.models import zoo
        >>> block, ex = zoo.get("evoformer_block")
        >>> gm = trace(block, *ex)
        >>> len(ex), len(flat_inputs(gm, ex))                 # chunk_size=None is a placeholder too
        (4, 5)
    """
    kwargs = dict(kwargs or {})
    guards = getattr(gm, "guards", None)
    if guards is not None:
        bound = guards.bind(tuple(args), kwargs)
        args, kwargs = bound.args, bound.kwargs
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        if kwargs:
            raise CaptureError("this graph takes positional inputs only; got keyword inputs "
                            f"{sorted(kwargs)}")
        return list(args)
    return list(fx_pytree.tree_flatten_spec((tuple(args), kwargs), info.in_spec))


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
    key = str(key).split("@")[0]  # Dynamo marks a module's later calls "<id>@1", "<id>@2", ...
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


# ------------------------------------------------------------------ side effects


def _dynamo_side_effect_config() -> dict[str, Any]:
    """Dynamo settings for a capture: never replay ``forward``'s Python side effects on the real objects
    (they would be written once, with fake tensors, and never by the graph), and raise on any instead.
    Only the settings this torch build has: where it lacks them, the before/after comparison in
    :func:`trace` is what refuses."""
    cfg = torch._dynamo.config
    wanted = {"replay_side_effects": False, "side_effect_replay_policy": "error"}
    return {k: v for k, v in wanted.items() if hasattr(cfg, k)}


def _private_copy(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments with every container copied and every tensor, module, class and function kept as
    the caller's very object (tensors' identities are what the graph's inputs are matched by)."""
    memo: dict[int, Any] = {}
    _keep_identity(arguments, memo, 0)
    try:
        return copy.deepcopy(arguments, memo)
    except Exception:  # an argument that cannot be copied: Dynamo's side-effect check still guards it
        return arguments


def _keep_identity(v: Any, memo: dict[int, Any], depth: int) -> None:
    if id(v) in memo or depth > 32:
        return
    if isinstance(v, (torch.Tensor, torch.nn.Module, type, types.ModuleType, types.FunctionType,
                      types.BuiltinFunctionType, types.MethodType)):
        memo[id(v)] = v
        return
    if isinstance(v, dict):
        for k, x in v.items():
            _keep_identity(k, memo, depth + 1)
            _keep_identity(x, memo, depth + 1)
    elif isinstance(v, (list, tuple, set, frozenset, collections.deque)):
        for x in v:
            _keep_identity(x, memo, depth + 1)
    elif hasattr(v, "__dict__"):
        for x in vars(v).values():
            _keep_identity(x, memo, depth + 1)


def _split_arguments(signature: inspect.Signature, arguments: dict[str, Any]) -> tuple[tuple, dict]:
    bound = inspect.BoundArguments(signature, arguments)  # type: ignore[arg-type]
    return bound.args, bound.kwargs


def _argument_changes(originals: dict[str, Any], private: dict[str, Any]) -> list[str]:
    """Where the private copies differ from the caller's arguments after the capture (``'prev' (prev['z'])``)."""
    out: list[str] = []
    for name, v in originals.items():
        if private is originals:
            break
        where = _first_difference(v, private[name], name, 0)
        if where is not None:
            out.append(f"{name!r}" + (f" ({where})" if where != name else ""))
    return out


def _first_difference(a: Any, b: Any, path: str, depth: int) -> str | None:
    if a is b:
        return None
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b) or depth > 32:
        return path  # tensors are the caller's objects in the copy too: another object is a write
    if isinstance(a, (list, tuple, collections.deque)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} -> {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := _first_difference(x, y, f"{path}[{i}]", depth + 1)) is not None:
                return d
        return None
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} -> {list(b)}"
        for k in a:
            if (d := _first_difference(a[k], b[k], f"{path}[{k!r}]", depth + 1)) is not None:
                return d
        return None
    if isinstance(a, (set, frozenset)):
        return None if a == b else path
    if hasattr(a, "__dict__") and not isinstance(a, type):
        va, vb = vars(a), vars(b)
        if list(va) != list(vb):
            return f"{path}: attributes {list(va)} -> {list(vb)}"
        for k in va:
            if (d := _first_difference(va[k], vb[k], f"{path}.{k}", depth + 1)) is not None:
                return d
        return None
    try:
        return None if bool(a == b) else path
    except Exception:
        return path


_SIDE_EFFECT_ERROR = "found certain side effects happened"


def _side_effects_seen_by_dynamo(e: BaseException, arg_names: list[str]) -> list[str]:
    """The side effects Dynamo refused (``side_effect_replay_policy="error"``), described for the user with
    the line of each write; empty if ``e`` is another failure.

    Dynamo's error lists the written objects by their source names only (``L['prev']``) and points
    at the ``return``; the line of each write is in its side-effect record (``mutation_user_stacks``),
    read from the ``OutputGraph`` in the traceback of the error."""
    chain, exc = [], e
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    text = next((str(x) for x in chain if _SIDE_EFFECT_ERROR in str(x)), None)
    if text is None:
        return []
    m = re.search(r"double check: (\[.*?\])", text)
    try:
        names = [str(n) for n in ast.literal_eval(m.group(1))] if m else []
    except (ValueError, SyntaxError):
        names = []
    records = _side_effect_records(chain)
    out = []
    for var, kind, attrs, stacks in records:
        name = _source_name(getattr(var, "source", None))
        if name is None or (names and name not in names):
            continue
        cls = _class_of(var)
        out.append(_describe_write(name, kind, attrs, cls, arg_names) + _user_line(stacks))
        names = [n for n in names if n != name] if names else names
    out += [_describe_write(n, "", [], None, arg_names) for n in names]  # those with no record found
    return out or ["has Python side effects Dynamo could not name"]


def _side_effect_records(chain: list[BaseException]) -> list[tuple[Any, str, list[str], list]]:
    """``(variable, "value"|"attr", attributes written, user stacks)`` of every write Dynamo recorded on an
    object that existed before ``forward`` ran."""
    try:
        from torch._dynamo.output_graph import OutputGraph
        from torch._dynamo.variables.base import AttributeMutationExisting, ValueMutationExisting
    except ImportError:
        return []
    graph = None
    for exc in chain:
        tb = exc.__traceback__
        while tb is not None and graph is None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, OutputGraph):
                graph = owner
            tb = tb.tb_next
    if graph is None:
        return []
    se = graph.side_effects
    out = []
    for var, stacks in getattr(se, "mutation_user_stacks", {}).items():
        mt = getattr(var, "mutation_type", None)
        if isinstance(mt, ValueMutationExisting):
            out.append((var, "value", [], stacks))
        elif isinstance(mt, AttributeMutationExisting):
            out.append((var, "attr", list(getattr(se, "store_attr_mutations", {}).get(var, {})), stacks))
    return out


def _class_of(var: Any) -> type | None:
    """The class a class-attribute write goes to (a ``UserDefinedClassVariable``'s value), else None."""
    try:
        v = var.value if type(var).__name__ == "UserDefinedClassVariable" else None
    except Exception:  # a variable that cannot give a value
        return None
    return v if isinstance(v, type) else None


def _source_name(source: Any) -> str | None:
    if source is None:
        return None
    name = source.name
    return str(name() if callable(name) else name)


def _describe_write(name: str, kind: str, attrs: list[str], value: Any, arg_names: list[str]) -> str:
    """A Dynamo source name and write kind in the user's terms: ``mutates argument 'prev' in place``."""
    verb = "assigns" if kind == "attr" else "mutates"
    tail = "" if kind == "attr" else " in place"
    if m := re.fullmatch(r"type\((L\['self'\].*)\)", name):
        path = _parse_source(m.group(1))
        cls = value.__name__ if isinstance(value, type) else "class of " + (path or "the model")
        what = ", ".join(f"'{cls}.{a}'" for a in attrs) or f"'{cls}'"
        return f"{verb} class attribute {what}{tail}"
    if name.startswith("L['self']"):
        path = _parse_source(name)
        if kind == "attr" and attrs:
            what = ", ".join(repr(f"{path}.{a}" if path else a) for a in attrs)
        else:
            what = repr(path) if path else "the model"
        return f"{verb} module attribute {what}{tail}"
    if m := re.fullmatch(r"G\['([^']+)'\](.*)", name):
        at = f" ({m.group(1)}{m.group(2)})" if m.group(2) else ""
        return f"{verb} global '{m.group(1)}'{at}{tail}"
    if (m := re.fullmatch(r"L\['([^']+)'\](.*)", name)) and m.group(1) in arg_names:
        arg, rest = m.group(1), m.group(2)
        at = f" ({arg}{rest})" if rest else ""
        if kind == "attr" and attrs:
            return f"assigns attribute(s) {', '.join(attrs)} of argument '{arg}'{at}"
        return f"{verb} argument '{arg}'{at}{tail}"
    return f"{verb} {name}{tail}"


def _user_line(stacks: list) -> str:
    """`` at file:line in fn: code`` of the innermost user frame of a write: not torch's own code, nor the
    standard library's (``self.counts.update(x)`` writes inside ``collections``; the user's line is
    the call), unless the stack has no other frame."""
    torch_dir = os.path.dirname(torch.__file__)
    for stack in stacks:
        frames = [f for f in stack if not f.filename.startswith(torch_dir)]
        users = [f for f in frames if not _in_stdlib(f.filename)] or frames
        if users:
            f = users[-1]
            return f" at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    return ""


def _in_stdlib(filename: str) -> bool:
    """Whether a file is the standard library's (installed packages may live below its folder too)."""
    paths = sysconfig.get_paths()
    if any(filename.startswith(paths[k]) for k in ("purelib", "platlib")) or "-packages" + os.sep in filename:
        return False
    return filename.startswith(paths["stdlib"] + os.sep)


def _side_effect_message(model: torch.nn.Module, changes: list[str]) -> str:
    # a change found by comparing state has no line of its own: name where forward is instead
    site = "" if " at " in changes[0] else f" (in {_forward_site(model)})"
    return (f"cannot capture {type(model).__name__}: forward {changes[0]}"
            + (f" (and {len(changes) - 1} more: {'; '.join(changes[1:4])})" if len(changes) > 1 else "")
            + f"{site}: the captured graph cannot repeat Python side effects; keep such "
            "state outside the model or return it (the model, its arguments and the globals it writes are as "
            "they were before the capture)")


def _forward_site(model: torch.nn.Module) -> str:
    fwd = type(model).forward
    try:
        return f"{type(model).__name__}.forward is at {inspect.getsourcefile(fwd)}:{inspect.getsourcelines(fwd)[1]}"
    except (OSError, TypeError):
        return f"{type(model).__name__}.forward"


# ------------------------------------------------------------------ other failures


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """Dynamo logs a full traceback at ERROR level for every op that fails on fake tensors before it
    raises; the CaptureError says the same in a few lines, so that log is held back during capture."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _eager_failure(model: torch.nn.Module, signature: inspect.Signature,
                   bound: inspect.BoundArguments) -> tuple[str, BaseException] | None:
    """When an op failed on fake tensors during capture, run the model eagerly once (on private copies
    of the arguments, without autograd, module state restored): if the model itself fails on these
    inputs, that is the user's error to see — reported as such with its own source line, not as a
    capture failure."""
    private = _private_copy(dict(bound.arguments))
    args, kwargs = _split_arguments(signature, private)
    before = snapshot_module_state(model)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # the model's own error, whatever its type
        return (f"{type(model).__name__} fails when run eagerly on the example inputs (not a capture problem): "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                f"{_innermost_user_frame(e)}", e)
    finally:
        module_state_changes(before, restore=True)
    return None


def _innermost_user_frame(e: BaseException) -> str:
    """`` at file:line in fn: code`` for the innermost frame of ``e`` outside torch and foldcompile."""
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not os.path.abspath(f.filename).startswith((torch_dir, ours))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _describe_failure(model: torch.nn.Module, e: Exception, args: tuple = (), kwargs: dict | None = None) -> str:
    """One readable message: the construct Dynamo could not take, and the user's file and line."""
    construct = getattr(e, "gb_type", None)
    text = str(e)
    if not construct:
        construct = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    where = None
    frames = getattr(e, "real_stack", None)
    if frames:
        f = frames[-1]
        where = f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    else:
        m = re.search(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', text.split("from user code:")[-1])
        if m:
            where = f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}"
    if where is None:
        # export's own checks of the graph's inputs and outputs run after tracing, with no user frame
        if re.search(r"in the outputs|outputs with type", text):
            construct = (f"an output of a type export cannot flatten ({_output_type(text)}; return tensors in "
                         "tuples, lists or dicts, or register the type with torch.utils._pytree)")
            where = _return_lines(model)
        elif "inputs with type" in text:
            construct = (f"an argument of a type export cannot flatten ({_output_type(text)}; pass tensors in "
                         "tuples, lists or dicts, or register the type with torch.utils._pytree)")
            where = _forward_site(model)
        elif "in the inputs" in text:
            found = _graph_input_not_an_argument(model, args, kwargs or {})
            if found:
                construct, where = found
    where = where or f"an unknown line ({_forward_site(model)})"
    detail = "\n".join(text.splitlines()[:12])
    return (
        f"cannot capture {type(model).__name__} as one graph: {construct} at {where}\n"
        f"(Dynamo: {type(e).__name__}: {detail})"
    )


def _output_type(text: str) -> str:
    m = re.search(r"type `?<class '([^']+)'>`?", text)
    return m.group(1).rsplit(".", 1)[-1] if m else "unknown type"


def _return_lines(model: torch.nn.Module) -> str | None:
    """``file:line in forward: return ...`` of the return statement(s) of the model's ``forward``."""
    fwd = type(model).forward
    try:
        lines, first = inspect.getsourcelines(fwd)
        filename = inspect.getsourcefile(fwd)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    found = [f"{filename}:{first + n.lineno - 1} in forward: {lines[n.lineno - 1].strip()}"
             for n in ast.walk(tree) if isinstance(n, ast.Return)]
    return " / ".join(found) if found else None


class _GraphSeen(Exception):
    pass


def _graph_input_not_an_argument(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[str, str] | None:
    """Trace ``model`` once more with a backend that only looks at the graph, and name the first graph
    input that is not an argument, parameter or buffer (a numpy array read through ``torch.from_numpy``)
    with the line that reads it. ``None`` if there is none or the trace fails."""
    inputs: list[tuple[str | None, str]] = []

    def look(gm: torch.fx.GraphModule, _inputs: list) -> Any:
        # read here: Dynamo drops the placeholders' "grapharg" (their sources) once the backend returns
        for node in gm.graph.find_nodes(op="placeholder"):
            inputs.append((_source_name(getattr(node.meta.get("grapharg"), "source", None)),
                           node.meta.get("stack_trace") or ""))
        raise _GraphSeen  # nothing needs to run

    try:
        with torch._dynamo.config.patch(**_dynamo_side_effect_config()):
            torch.compile(model, backend=look, fullgraph=True, dynamic=False)(*args, **kwargs)
    except Exception:  # the backend's own stop, or a failure: either way only `inputs` is read
        pass
    arg_roots = tuple(f"L['{name}']" for name in inspect.signature(model.forward).parameters)
    for source, trace_text in inputs:
        if source is None or source.startswith(arg_roots) or "_parameters[" in source or "_buffers[" in source:
            continue
        readable = re.sub(r"L\['([^']+)'\]", r"\1", source).replace("___", "torch.")
        m = list(re.finditer(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace_text))
        line = f"{m[-1].group(1)}:{m[-1].group(2)} in {m[-1].group(3)}: {m[-1].group(4).strip()}" if m else None
        return (f"forward reads {readable}, which is not an argument, parameter or buffer (export would make it a "
                "graph input; convert it once, outside forward, into a registered buffer)", line)
    return None
    arg_roots = tuple(f"L['{name}']" for name in inspect.signature(model.forward).parameters)
    for node in seen[0].graph.find_nodes(op="placeholder"):
        source = _source_name(getattr(node.meta.get("grapharg"), "source", None))
        if source is None or source.startswith(arg_roots) or "_parameters[" in source or "_buffers[" in source:
            continue
        readable = re.sub(r"L\['([^']+)'\]", r"\1", source).replace("___", "torch.")
        trace_text = node.meta.get("stack_trace") or ""
        m = list(re.finditer(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace_text))
        line = f"{m[-1].group(1)}:{m[-1].group(2)} in {m[-1].group(3)}: {m[-1].group(4).strip()}" if m else None
        return (f"forward reads {readable}, which is not an argument, parameter or buffer (export would make it a "
                "graph input; convert it once, outside forward, into a registered buffer)", line)
    return None
