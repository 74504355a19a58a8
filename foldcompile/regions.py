"""Identical blocks captured once: one Dynamo trace per kind of block, stamped out for every block.

AlphaFold's trunk is 48 Evoformer blocks with the same code, configuration and parameter
shapes; tracing each of them again is what made capturing the stack take minutes.
:func:`capture_with_regions` captures such a model in three steps:

1. **Groups.** Submodules that are the same block are found by a structural key
   (:func:`block_key`): the same class at every level, the same training flags, the same
   configuration (plain attributes by value, every other object by identity), the same
   parameter, buffer and tensor-attribute names with the same dtype, shape, strides, device
   and ``requires_grad``, the same sharing of tensors and submodules inside the block, and no
   hooks anywhere in it. The outermost modules with submodules whose key repeats form the
   groups (:func:`block_groups`); a group of fewer than :data:`MIN_MEMBERS` is not worth its
   regions and is traced inline.
2. **The outer trace.** Dynamo traces the model with every group member's ``forward``
   replaced (on the instance, for the capture only) by a call to :func:`_block_call`, a
   function Dynamo puts in the graph as one node without tracing into it. Its outputs are
   made from the region the call needs (a fresh tensor of the region's output shape, dtype
   and strides per output). A call whose region does not exist yet takes, for now, the
   outputs of a region of the group on inputs of the same shapes (the first block of a stack,
   whose inputs do not require grad, stands in for the others), or else stops the trace; the
   missing regions are captured and the model traced again, until one trace finds them all.
3. **Regions.** A region is one Dynamo capture of the group's first member on inputs like
   the call's (zeros of the same shapes, strides and aliasing), keyed by the call
   (:func:`call_key`: tensor metadata, which arguments are one tensor or share memory, the
   other arguments by value, grad mode and autocast state). Every ``_block_call`` node is
   then replaced by a copy of its region's graph, with the member's own parameters
   (``get_attr`` of ``blocks.17.…``, one node per parameter and graph), its module paths
   (``meta["module_path"]``), names prefixed with its path (``blocks_17_linear_3``) and
   ``meta["region"] = (region id, member path)``; inside an activation-checkpoint body the
   member's parameters are passed in as extra operands, as Dynamo does. The result is one
   flat graph, as a capture without regions gives. The copies share their region's example
   values; where the graph writes anything in place, every node's example value is computed
   again in one fake mode, so that the storage identities normalize and fuse compare are
   right across copies.

What the regions cannot stand for exactly is traced inline, with the reason logged under
``foldcompile.regions``: a group whose region writes into its inputs in place, returns a view
of an input or a parameter, two outputs sharing memory, or something other than tensors, whose
block cannot be captured alone (a side effect: the whole-model capture then reports it with its
line), that is called with more than 8 distinct keys, or that saves fewer than two block traces.
A block call inside a higher-order op other than activation checkpointing, or any other
failure, makes :func:`capture_with_regions` return ``None``: the caller then traces the whole
model as before.

    >>> from foldcompile.models import zoo
    >>> stack, inputs = zoo.get("evoformer_stack", n_blocks=3)
    >>> [len(g) for g in block_groups(stack)]
    [3]
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.amp.autocast_mode as am
from torch.utils import _pytree as pytree

from foldcompile.guards import _MODULE_INTERNALS, _snap, autocast_state
from foldcompile.passes.meta import MODULE_PATH, REGION, STACK_TRACE

__all__ = ["capture_with_regions", "block_groups", "block_key", "RegionRefused"]

log = logging.getLogger("foldcompile.regions")

_CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint
# higher-order ops whose body takes its operands in order (extra operands may be appended)
_BODY_HOPS = {_CHECKPOINT_HOP}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential, torch.nn.ParameterList,
               torch.nn.ParameterDict)
_MAX_REGIONS_PER_GROUP = 8  # distinct call keys of one group before the group is traced inline
# a group is worth its regions from this many members (each region costs one block's trace, and the
# first block of a stack is usually called with other inputs than the rest: a region of its own)
MIN_MEMBERS = 6
_MAX_ATTEMPTS = 24  # outer traces (each stops at a missing region) before the regions are given up
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                       operator.irshift, operator.imatmul, operator.setitem}


class RegionRefused(Exception):
    """The regions cannot stand for this model (``group`` None) or for one group of blocks exactly; the
    message says why. A refused group is traced inline like the rest of the model."""

    def __init__(self, message: str, group: int | None = None):
        super().__init__(message)
        self.group = group


# ------------------------------------------------------------------ groups


def _hashable(s: tuple) -> Any:
    """A guards snapshot with its identity leaves as ids (the objects stay alive during the capture)."""
    tag = s[0]
    if tag == "id":
        return ("id", id(s[1]))
    if tag == "seq":
        return ("seq", s[1], tuple(_hashable(x) for x in s[2]))
    if tag == "deque":
        return ("deque", s[1], s[2], tuple(_hashable(x) for x in s[3]))
    if tag in ("dict", "obj"):
        return (tag, s[1], tuple((k, _hashable(x)) for k, x in s[2]))
    return s  # ("v", value), ("set", type, frozenset), ("missing",)


def _tensor_key(t: torch.Tensor | None) -> Any:
    if t is None:
        return None
    return (type(t), t.dtype, tuple(t.shape), t.stride() if t.layout == torch.strided else None, str(t.device),
            t.requires_grad, t.layout)


def _has_hooks(mod: torch.nn.Module) -> bool:
    return any(getattr(mod, d, None) for d in _HOOK_DICTS)


def block_key(mod: torch.nn.Module, _memo: dict[int, Any] | None = None) -> Any:
    """A hashable key equal for two modules that one capture can stand for, with each one's own
    tensors; ``None`` for a module that must not share (a hook in it, an instance ``forward``, a
    value that cannot be keyed)."""
    memo = {} if _memo is None else _memo
    if id(mod) in memo:
        return memo[id(mod)]
    memo[id(mod)] = None  # a module containing itself: not keyed
    key = _block_key(mod, memo)
    memo[id(mod)] = key
    return key


def _block_key(mod: torch.nn.Module, memo: dict[int, Any]) -> Any:
    if _has_hooks(mod) or "forward" in vars(mod):
        return None
    attrs = []
    for name, v in vars(mod).items():
        if name in _MODULE_INTERNALS:
            continue
        if isinstance(v, torch.Tensor):  # a tensor attribute: each block has its own, matched by name
            attrs.append((name, ("tensor", _tensor_key(v))))
            continue
        try:
            k = _hashable(_snap(v))
            hash(k)
        except TypeError:
            return None
        attrs.append((name, k))
    children = []
    for name, child in mod._modules.items():
        if child is None:
            children.append((name, None))
            continue
        k = block_key(child, memo)
        if k is None:
            return None
        children.append((name, k))
    return (type(mod), mod.training, tuple(attrs),
            tuple((n, _tensor_key(p)) for n, p in mod._parameters.items()),
            tuple((n, _tensor_key(b)) for n, b in mod._buffers.items()),
            tuple(children))


def _sharing(mod: torch.nn.Module) -> tuple:
    """Which tensors and submodules inside ``mod`` are one object under several names (tying)."""
    first: dict[int, int] = {}
    pattern = []
    for _, obj in _member_objects(mod):
        pattern.append(first.setdefault(id(obj), len(first)))
    return tuple(pattern)


def _member_objects(mod: torch.nn.Module) -> Iterable[tuple[tuple[str, str, str], Any]]:
    """``((module path, store, name), object)`` of every submodule, parameter, buffer and tensor attribute
    inside ``mod`` (paths relative to it, shared objects under each of their names)."""
    for path, sub in mod.named_modules(remove_duplicate=False):
        yield (path, "module", ""), sub
        for store in ("_parameters", "_buffers"):
            for name, t in getattr(sub, store).items():
                if t is not None:
                    yield (path, store, name), t
        for name, v in vars(sub).items():
            if isinstance(v, torch.Tensor) and name not in _MODULE_INTERNALS:
                yield (path, "__dict__", name), v


def block_groups(model: torch.nn.Module, min_members: int = 2) -> list[list[tuple[str, torch.nn.Module]]]:
    """The groups of submodules one region can stand for: ``[[(path, module), ...], ...]``, each group
    in model order, at least ``min_members`` members with submodules, none inside another group's
    member (a block's repeated sublayers stay inside the block's region)."""
    memo: dict[int, Any] = {}
    count: collections.Counter = collections.Counter()
    named = list(model.named_modules())[1:]  # not the root: it is the outer trace
    keys = {}
    for path, mod in named:
        if isinstance(mod, _CONTAINERS) or not mod._modules:
            continue
        k = block_key(mod, memo)
        if k is not None:
            keys[path] = (k, _sharing(mod))
            count[keys[path]] += 1
    repeated = {p for p, k in keys.items() if count[k] >= 2}
    # the outermost repeated modules: none of their ancestors is repeated (a block's own sublayers, or a
    # module repeated across different blocks, stay inside the block's region)
    outermost = [(p, m) for p, m in named if p in repeated
                 and not any(".".join(p.split(".")[:i]) in repeated for i in range(1, p.count(".") + 1))]
    by_key: dict[Any, list[tuple[str, torch.nn.Module]]] = collections.defaultdict(list)
    for p, m in outermost:
        by_key[keys[p]].append((p, m))
    return [members for members in by_key.values() if len(members) >= min_members]


# ------------------------------------------------------------------ the call a member's forward becomes


@dataclass
class _Output:
    """One output of a region: the input leaf it returns as is, or the metadata of a new tensor."""

    input_index: int | None
    shape: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    requires_grad: bool = False


@dataclass
class _Region:
    """One capture of a group's first member on one call key."""

    id: int
    group: int
    key: tuple
    graph_module: torch.fx.GraphModule
    outputs: list[_Output]
    out_spec: Any
    names: dict[int, tuple[str, str, str]]  # id of a tensor of the first member -> its (path, store, name)
    members: list[str] = field(default_factory=list)


class _Plan:
    """The state of one capture with regions (module-level while the outer trace runs)."""

    def __init__(self, model: torch.nn.Module, groups: list[list[tuple[str, torch.nn.Module]]]):
        self.model = model
        self.groups = groups
        self.members: list[tuple[int, str, torch.nn.Module]] = [(g, p, m) for g, ms in enumerate(groups)
                                                              for p, m in ms]
        self.regions: dict[tuple[int, tuple], _Region] = {}
        # the calls whose region is missing in this trace: (member, key, args, kwargs)
        self.pending: dict[tuple[int, tuple], tuple[int, tuple, tuple, dict]] = {}
        self.calls: dict[int, set] = collections.defaultdict(set)  # member -> the call keys it was traced with
        self.refused: RegionRefused | None = None
        self.dropped: set[int] = set()  # groups traced inline after all
        self.next_id = 0  # of the next region
        self.attr_nodes: dict[tuple[int, int], torch.fx.Node] = {}  # (graph, tensor) -> its get_attr node


_ACTIVE: _Plan | None = None


def _leaf_spec(x: Any, leaves: list, storages: list) -> Any:
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise RegionRefused(f"a block is called with a {x.layout} tensor")
        # aliasing among the arguments: the first argument that is this very tensor, and the first
        # sharing its memory (self-attention passes one tensor as query and key)
        same = next(i for i, y in enumerate(leaves) if y is x)
        shared = storages.index(x.untyped_storage()._cdata)
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.storage_offset(), x.dtype, str(x.device),
                x.requires_grad, same, shared)
    try:
        hash(x)
    except TypeError:
        raise RegionRefused(f"a block is called with an unhashable {type(x).__name__}") from None
    return ("value", type(x), x)


def call_key(args: tuple, kwargs: dict) -> tuple:
    """What a region is specialised on, for one call: the arguments' structure, each tensor's metadata
    and which arguments are one tensor or share memory, each other value, grad mode and autocast state."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    storages = [x.untyped_storage()._cdata if isinstance(x, torch.Tensor) else None for x in leaves]
    autocast = tuple(sorted((d, e, str(t)) for d, (e, t) in autocast_state().items()))
    return (repr(spec), tuple(_leaf_spec(x, leaves, storages) for x in leaves), torch.is_grad_enabled(), autocast)


@torch._dynamo.allow_in_graph
def _block_call(member: int, *args: Any, **kwargs: Any) -> Any:
    """What a group member's ``forward`` is during the outer trace: one graph node, whose outputs have
    the metadata of the member's region (made by the region, captured on demand)."""
    plan = _ACTIVE
    if plan is None:
        raise RuntimeError("foldcompile.regions._block_call runs only inside a capture with regions")
    group = plan.members[member][0]
    try:
        key = call_key(args, kwargs)
    except RegionRefused as e:
        plan.refused = RegionRefused(str(e), group)
        raise
    region = plan.regions.get((group, key))
    leaves = pytree.tree_leaves((args, kwargs))
    requires_grad = None
    if region is None:
        plan.pending.setdefault((group, key), (member, key, args, kwargs))
        # a region of the group on inputs of the same shapes (another grad mode, or inputs that do not
        # require grad: the first block of a stack) stands in for now, so that one trace finds the
        # missing regions of every block; the trace runs again once they exist. Without one, it stops.
        region = next((r for (g, k), r in plan.regions.items() if g == group and _shapes(k) == _shapes(key)), None)
        if region is None:
            raise RegionRefused("region not captured yet")
        # outputs of a differentiable block under grad mode require grad when anything it reads does
        requires_grad = torch.is_grad_enabled() and (
            any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)
            or any(p.requires_grad for p in plan.members[member][2].parameters()))
    else:
        plan.calls[member].add(key)
    outs = []
    for o in region.outputs:
        if o.input_index is not None:
            outs.append(leaves[o.input_index])
        else:
            outs.append(torch.empty_strided(o.shape, o.stride, dtype=o.dtype, device=o.device,
                                            requires_grad=o.requires_grad if requires_grad is None else requires_grad))
    return pytree.tree_unflatten(outs, region.out_spec)


def _shapes(key: tuple) -> tuple:
    """A call key without its grad mode and ``requires_grad`` flags (what a stand-in must agree on)."""
    spec, leaves, _grad, autocast = key
    return (spec, tuple(x[:6] + x[7:] if x[0] == "tensor" else x for x in leaves), autocast)


# never dead-code eliminated: a block may write its own buffers even where its outputs go unused
getattr(torch.fx.node, "has_side_effect", torch.fx.node._side_effectful_functions.add)(_block_call)


# ------------------------------------------------------------------ regions


def _example_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Real tensors like the (fake) arguments of a call: same shapes, strides, offsets, dtypes, devices
    and ``requires_grad`` (values are zeros: a static capture does not read them)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    by_storage: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
    for x in tensors:
        by_storage[x.untyped_storage()._cdata].append(x)
    made: dict[int, torch.Tensor] = {}
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        for views in by_storage.values():
            # one zero-filled base per memory the arguments share, each argument a view of it
            if len({v.dtype for v in views}) != 1 or len({v.requires_grad for v in views}) != 1:
                raise RegionRefused("a block is called with views of one memory in several dtypes or grad modes")
            extent = max(v.storage_offset() + sum((n - 1) * st for n, st in zip(v.shape, v.stride())) + 1
                         if all(n > 0 for n in v.shape) else 0 for v in views)
            with torch.no_grad():
                base = torch.zeros(extent, dtype=views[0].dtype, device=views[0].device)
            if len({id(v) for v in views}) == 1:  # one argument: a leaf, as a model's input would be
                v = views[0]
                t = base.as_strided(tuple(v.shape), tuple(v.stride()), v.storage_offset())
                made[id(v)] = t.detach().requires_grad_(True) if v.requires_grad else t
                continue
            if views[0].requires_grad:  # views of one tensor that requires grad
                base.requires_grad_(True)
            for v in views:
                if id(v) not in made:
                    made[id(v)] = base.as_strided(tuple(v.shape), tuple(v.stride()), v.storage_offset())
    real = [made[id(x)] if isinstance(x, torch.Tensor) else x for x in leaves]
    args_, kwargs_ = pytree.tree_unflatten(real, spec)
    return args_, kwargs_


def _state_of(key: tuple) -> contextlib.ExitStack:
    """A context reproducing a call key's grad mode and autocast state."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.set_grad_enabled(key[2]))
    now = autocast_state()
    for device, enabled, dtype in key[3]:
        if now.get(device) != (enabled, getattr(torch, dtype.replace("torch.", ""))):
            stack.enter_context(torch.autocast(device, dtype=getattr(torch, dtype.replace("torch.", "")),
                                               enabled=enabled))
    return stack


def _writes_in_place(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _IN_PLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if isinstance(node.target, torch._ops.OpOverload):
            return any(a.alias_info is not None and a.alias_info.is_write for a in node.target._schema.arguments)
        return name.endswith("_") and not name.endswith("__") and getattr(torch.Tensor, name, None) is node.target
    return False


def _memory(node: Any) -> Any:
    v = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    if isinstance(v, torch.Tensor):
        try:
            return v.untyped_storage()._cdata
        except Exception:
            return None
    return None


def _capture_region(plan: _Plan, member: int, key: tuple, args: tuple, kwargs: dict,
                    plan_export: Callable[[torch.nn.Module, tuple, dict], tuple]) -> tuple[_Region, Any]:
    """Capture the first member of ``member``'s group on inputs like the call's; check that a node
    can stand for it."""
    group = plan.members[member][0]
    if sum(1 for g, _ in plan.regions if g == group) >= _MAX_REGIONS_PER_GROUP:
        raise RegionRefused(f"more than {_MAX_REGIONS_PER_GROUP} call keys for one group of blocks", group)
    first_path, first = plan.groups[group][0]
    example_args, example_kwargs = _example_inputs(args, kwargs)
    patched = first.__dict__.pop("forward")  # the region is the member's own forward
    try:
        with _state_of(key):
            gm, dynamo_guards = plan_export(first, example_args, example_kwargs)
    finally:
        first.__dict__["forward"] = patched
    placeholders = gm.graph.find_nodes(op="placeholder")
    n_leaves = len(pytree.tree_leaves((example_args, example_kwargs)))
    if len(placeholders) != n_leaves:
        raise RegionRefused(f"the capture of {first_path} has {len(placeholders)} inputs for {n_leaves} arguments")
    input_memory = {_memory(p): i for i, p in enumerate(placeholders) if _memory(p) is not None}
    for node in gm.graph.nodes:
        if _writes_in_place(node) and node.args and _memory(node.args[0]) in input_memory:
            raise RegionRefused(f"{first_path} writes into its input in place ({node.format_node()})")
    attr_memory = {_memory(n) for n in gm.graph.find_nodes(op="get_attr")} - {None}
    output = next(iter(gm.graph.find_nodes(op="output")))
    flat_out = output.args[0]
    flat_out = list(flat_out) if isinstance(flat_out, (list, tuple)) else [flat_out]
    outputs, seen_memory = [], {}
    for o in flat_out:
        if not isinstance(o, torch.fx.Node) or not isinstance(o.meta.get("example_value"), torch.Tensor):
            raise RegionRefused(f"{first_path} returns something other than tensors")
        if o.op == "placeholder":
            outputs.append(_Output(placeholders.index(o)))
            continue
        mem = _memory(o)
        if mem in input_memory or mem in attr_memory or o.op == "get_attr":
            raise RegionRefused(f"{first_path} returns a view of an input or a parameter")
        if mem in seen_memory and seen_memory[mem] is not o:
            raise RegionRefused(f"{first_path} returns two outputs sharing memory")
        seen_memory[mem] = o
        v = o.meta["example_value"]
        if v.layout != torch.strided:
            raise RegionRefused(f"{first_path} returns a {v.layout} tensor")
        outputs.append(_Output(None, tuple(v.shape), tuple(v.stride()), v.dtype, v.device, v.requires_grad))
    names = {id(obj): where for where, obj in _member_objects(first) if where[1] != "module"}
    plan.next_id += 1
    region = _Region(plan.next_id - 1, group, key, gm, outputs, gm._out_spec, names)
    return region, dynamo_guards


# ------------------------------------------------------------------ the capture


def capture_with_regions(model: torch.nn.Module, args: tuple, kwargs: dict,
                         export: Callable[[torch.nn.Module, tuple, dict], tuple]
                         ) -> tuple[torch.fx.GraphModule, list[tuple[torch.nn.Module, list]]] | None:
    """Capture ``model`` with its repeated blocks as regions (module docstring): ``(graph module,
    [(captured root, its Dynamo guards), ...])`` (the model's trace, then each region's, whose globals
    Dynamo names from its block's module), the graph flat with ``meta["regions"]``; or ``None`` where
    the model has no repeated blocks or the regions cannot stand for it (logged).
    ``export(module, args, kwargs)`` is the caller's Dynamo capture (with its side-effect settings)."""
    global _ACTIVE
    try:
        groups = block_groups(model, MIN_MEMBERS)
    except Exception as e:  # a model the keys cannot describe: no regions
        log.info("foldcompile: capturing %s without regions (%s: %s)", type(model).__name__, type(e).__name__, e)
        return None
    if not groups:
        return None
    plan = _Plan(model, groups)
    installed: list[torch.nn.Module] = []
    region_guards: list = []
    try:
        for i, (_, _, mod) in enumerate(plan.members):
            mod.__dict__["forward"] = functools.partial(_block_call, i)
            installed.append(mod)
        _ACTIVE = plan
        exported, guards = _trace_outer(plan, args, kwargs, export, region_guards)
        _splice_all(plan, exported)
        _propagate_example_values(exported, args, kwargs)
    except RegionRefused as e:
        log.info("foldcompile: capturing %s without regions: %s", type(model).__name__, e)
        return None
    except Exception as e:  # anything else in the regions: the plain capture decides
        log.info("foldcompile: capturing %s without regions (%s: %s)", type(model).__name__, type(e).__name__, e)
        return None
    finally:
        _ACTIVE = None
        for mod in installed:
            mod.__dict__.pop("forward", None)
    exported.meta["regions"] = [
        {"id": r.id, "class": type(plan.groups[r.group][0][1]).__name__, "captured_from": plan.groups[r.group][0][0],
         "members": r.members, "nodes": sum(1 for n in r.graph_module.graph.nodes
                                            if n.op not in ("placeholder", "output"))}
        for r in sorted(plan.regions.values(), key=lambda r: r.id) if r.members]
    return exported, [(plan.model, list(guards or ()))] + region_guards


def _trace_outer(plan: _Plan, args: tuple, kwargs: dict, export: Callable, region_guards: list) -> tuple:
    """Trace the model with the members as calls until every call has its region: each trace stops at
    a group's first missing region or, where the group has another region standing in, collects the
    missing ones; they are captured and the model traced again. A group refused on the way (or not
    worth it: fewer than two calls saved) is traced inline from then on."""
    for _ in range(_MAX_ATTEMPTS):
        if all(g in plan.dropped for g in range(len(plan.groups))):  # nothing left to share: the plain capture
            raise RegionRefused("every group of blocks is traced inline")
        plan.pending, plan.refused = {}, None
        plan.calls.clear()
        try:
            result = export(plan.model, args, kwargs)
            failure = None
        except Exception as e:  # a stop at a missing region, a refused call, or the model's own failure
            result, failure = None, e
        if plan.refused is not None:
            _drop(plan, plan.refused)
            continue
        if plan.pending:
            for member, key, call_args, call_kwargs in plan.pending.values():
                group = plan.members[member][0]
                if group in plan.dropped:
                    continue
                if sum(1 for g, _ in plan.regions if g == group) >= len(plan.groups[group]) - 2:
                    # nearly a key per block: the regions would save less than they cost
                    _drop(plan, RegionRefused("about one call key per block", group))
                    continue
                try:
                    region, guards = _capture_region(plan, member, key, call_args, call_kwargs, plan_export=export)
                except RegionRefused as e:
                    _drop(plan, RegionRefused(str(e), group if e.group is None else e.group))
                    continue
                except Exception as e:  # the block alone cannot be captured: inline, where the whole-model
                    # capture says what is wrong with it
                    _drop(plan, RegionRefused(f"capturing {plan.members[member][1]} alone failed: "
                                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                              group))
                    continue
                plan.regions[(group, key)] = region
                # Dynamo names the globals a region reads from its block's module: kept with the block
                region_guards.append((plan.groups[group][0][1], list(guards or ())))
            continue
        if failure is not None:
            raise RegionRefused(f"the outer capture failed: {type(failure).__name__}: "
                                f"{str(failure).splitlines()[0] if str(failure) else ''}")
        poor = [g for g in range(len(plan.groups)) if g not in plan.dropped and _saved(plan, g, result[0]) < 2]
        if poor:
            for g in poor:
                _drop(plan, RegionRefused("fewer than two block traces saved", g))
            continue
        return result
    raise RegionRefused(f"no complete trace in {_MAX_ATTEMPTS} attempts")


def _saved(plan: _Plan, group: int, gm: torch.fx.GraphModule) -> int:
    """Block traces a group's regions save: its calls in the graph less the regions they use."""
    calls = sum(1 for n in _all_nodes(gm) if n.op == "call_function" and n.target is _block_call
                and plan.members[n.args[0]][0] == group)
    used = set().union(*[keys for m, keys in plan.calls.items() if plan.members[m][0] == group])
    return calls - len(used)


def _drop(plan: _Plan, why: RegionRefused) -> None:
    """Trace a refused group inline from now on (all groups where the reason names none)."""
    if why.group is None:
        raise why
    plan.dropped.add(why.group)
    log.info("foldcompile: blocks %s traced inline: %s", plan.groups[why.group][0][0], why)
    for g, path, mod in plan.members:
        if g == why.group:
            mod.__dict__.pop("forward", None)
    for k in [k for k in plan.regions if k[0] == why.group]:
        del plan.regions[k]


# ------------------------------------------------------------------ splicing


def _splice_all(plan: _Plan, exported: torch.fx.GraphModule) -> None:
    """Replace every ``_block_call`` node, in the root graph and in checkpoint bodies, by a copy of its region."""
    body_users: dict[int, list[torch.fx.Node]] = collections.defaultdict(list)
    for g in _graphs(exported):
        for n in g.nodes:
            if n.op == "call_function":
                for a in n.args:
                    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                        body_users[id(_fetch(_owner(exported, g), a.target))].append(n)
    _splice_graph(plan, exported, exported.graph, exported, None, body_users)
    if any(n.op == "call_function" and n.target is _block_call for n in _all_nodes(exported)):
        raise RegionRefused("a block call is left in the graph (a block inside another block's region)")
    for g in _graphs(exported):
        g.lint()
    exported.recompile()


def _graphs(gm: torch.fx.GraphModule) -> list[torch.fx.Graph]:
    return [gm.graph] + [m.graph for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]


def _owner(root: torch.fx.GraphModule, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    for _, m in root.named_modules():
        if isinstance(m, torch.fx.GraphModule) and m.graph is graph:
            return m
    raise RegionRefused("a graph without a module")


def _fetch(obj: Any, target: str) -> Any:
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def _splice_graph(plan: _Plan, root: torch.fx.GraphModule, graph: torch.fx.Graph, owner: torch.fx.GraphModule,
                  lift: Callable[[torch.Tensor, str], torch.fx.Node] | None, body_users: dict) -> None:
    """Splice the regions into ``graph`` (the root's when ``lift`` is None; else a body, whose tensors are
    lifted into operands by ``lift``), and into the bodies of its checkpoint nodes."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _block_call:
            _splice_call(plan, root, graph, node, lift)
            continue
        bodies = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                  and isinstance(_fetch(owner, a.target), torch.fx.GraphModule)]
        for b in bodies:
            body = _fetch(owner, b.target)
            if not any(n.target is _block_call for n in _all_nodes(body)):
                continue
            if node.target not in _BODY_HOPS:
                raise RegionRefused(f"a block is called inside {node.target}")
            if len(body_users[id(body)]) != 1:
                raise RegionRefused("a checkpoint body shared by several calls holds a block")
            _splice_graph(plan, root, body.graph, body, _lifter(graph, node, body, lift, root), body_users)
            body.recompile()


def _all_nodes(gm: torch.fx.GraphModule) -> Iterable[torch.fx.Node]:
    for g in _graphs(gm):
        yield from g.nodes


def _lifter(parent: torch.fx.Graph, hop: torch.fx.Node, body: torch.fx.GraphModule,
            parent_lift: Callable | None, root: torch.fx.GraphModule) -> Callable[[torch.Tensor, str], torch.fx.Node]:
    """A tensor needed inside ``body`` becomes a new last placeholder of it, fed by a new last operand
    of the checkpoint node ``hop`` (a get_attr in the root, or lifted again from an outer body)."""
    lifted: dict[int, torch.fx.Node] = {}

    def lift(t: torch.Tensor, name: str) -> torch.fx.Node:
        if id(t) in lifted:
            return lifted[id(t)]
        with parent.inserting_before(hop):
            outer = parent_lift(t, name) if parent_lift is not None else _get_attr(root, parent, t, name)
        hop.args = (*hop.args, outer)
        existing = body.graph.find_nodes(op="placeholder")
        where = body.graph.inserting_after(existing[-1]) if existing else \
            body.graph.inserting_before(next(iter(body.graph.nodes)))
        with where:
            ph = body.graph.placeholder(name)
        ph.meta["example_value"] = outer.meta.get("example_value")
        lifted[id(t)] = ph
        return ph

    return lift


def _get_attr(root: torch.fx.GraphModule, graph: torch.fx.Graph, t: Any, name: str) -> torch.fx.Node:
    """A get_attr node of ``root`` reading ``t`` under a fresh attribute name like ``name``."""
    target, i = name, 0
    while hasattr(root, target):
        i += 1
        target = f"{name}_{i}"
    if isinstance(t, torch.nn.Parameter):
        root.register_parameter(target, t)
    elif isinstance(t, torch.Tensor):
        root.register_buffer(target, t)
    else:
        setattr(root, target, t)
    return graph.get_attr(target)


def _splice_call(plan: _Plan, root: torch.fx.GraphModule, graph: torch.fx.Graph, node: torch.fx.Node,
                 lift: Callable | None) -> None:
    member = node.args[0]
    group, path, mod = plan.members[member]
    call_args, call_kwargs = tuple(node.args[1:]), dict(node.kwargs)
    flat, spec = pytree.tree_flatten((call_args, call_kwargs))
    keys = plan.calls[member]
    if len(keys) == 1:
        key = next(iter(keys))
    else:  # a member called with several keys: which one this call had, from its arguments and context
        if lift is not None:
            raise RegionRefused(f"{path} is called with several keys, one inside a checkpoint body")
        example = [a.meta.get("example_value") if isinstance(a, torch.fx.Node) else a for a in flat]
        with _StateAt(graph, node):
            key = call_key(*pytree.tree_unflatten(example, spec))
        if key not in keys:
            raise RegionRefused(f"cannot tell which region the call of {path} at {node.name} needs")
    region = plan.regions.get((group, key))
    if region is None:
        raise RegionRefused(f"no region for the call of {path} at {node.name}")
    region.members.append(path)
    rg = region.graph_module
    placeholders = rg.graph.find_nodes(op="placeholder")
    if len(placeholders) != len(flat):
        raise RegionRefused(f"the call of {path} has {len(flat)} inputs, its region {len(placeholders)}")
    own = dict(_member_objects(mod))
    prefix = path.replace(".", "_")
    env: dict[torch.fx.Node, Any] = dict(zip(placeholders, flat))
    outer_trace = node.meta.get("stack_trace") or ""
    rel_names = {str(id(m)): name for name, m in plan.groups[group][0][1].named_modules(remove_duplicate=False)}
    from foldcompile.capture import module_path_of

    with graph.inserting_before(node):
        for n in rg.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr":
                obj = _fetch(rg, n.target)
                if isinstance(obj, torch.fx.GraphModule):
                    obj = copy.deepcopy(obj)  # a body: each copy its own (its nodes get this member's paths)
                    _set_paths(obj, path, rel_names, outer_trace, region, module_path_of)
                    new = _get_attr(root, graph, obj, f"{prefix}_{n.target}") if lift is None else None
                    if new is None:
                        raise RegionRefused("a higher-order op inside a block inside a checkpoint body")
                else:
                    where = region.names.get(id(obj))
                    t = own[where] if where is not None else obj  # the member's own, or a shared constant
                    attr = _prefixed(str(n.target), prefix)
                    if lift is not None:
                        new = lift(t, attr)
                    elif (id(graph), id(t)) in plan.attr_nodes:  # read before (the same block again): one node
                        env[n] = plan.attr_nodes[(id(graph), id(t))]
                        continue
                    else:
                        new = plan.attr_nodes[(id(graph), id(t))] = _get_attr(root, graph, t, attr)
            else:
                new = graph.create_node(n.op, n.target, torch.fx.node.map_arg(n.args, lambda a: env[a]),
                                        torch.fx.node.map_arg(n.kwargs, lambda a: env[a]),
                                        name=_prefixed(n.name, prefix), type_expr=n.type)
            new.meta.update({k: v for k, v in n.meta.items() if k not in ("nn_module_stack", MODULE_PATH)})
            rel = module_path_of(n, rel_names)
            new.meta[MODULE_PATH] = f"{path}.{rel}" if rel else path
            new.meta[STACK_TRACE] = outer_trace + (n.meta.get(STACK_TRACE) or "")
            new.meta[REGION] = (region.id, path)
            env[n] = new
    output = next(iter(rg.graph.find_nodes(op="output")))
    flat_out = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    result = pytree.tree_unflatten([env[o] for o in flat_out], region.out_spec)
    _replace_uses(node, result)
    graph.erase_node(node)


def _prefixed(name: str, prefix: str) -> str:
    """A copy's name: the member's path first (``blocks_17_linear_3``), after Dynamo's ``l__self___`` /
    ``L__self___`` of parameter names (``l__self___blocks_17_lin_weight``, as a whole-model capture
    names them)."""
    for head in ("l__self___", "L__self___"):
        if name.startswith(head):
            return f"{head}{prefix}_{name[len(head):]}"
    return f"{prefix}_{name}"


def _set_paths(body: torch.fx.GraphModule, path: str, rel_names: dict, outer_trace: str, region: _Region,
               module_path_of: Callable) -> None:
    for g in _graphs(body):
        for n in g.nodes:
            rel = module_path_of(n, rel_names)
            n.meta.pop("nn_module_stack", None)
            n.meta[MODULE_PATH] = f"{path}.{rel}" if rel else path
            n.meta[STACK_TRACE] = outer_trace + (n.meta.get(STACK_TRACE) or "")
            n.meta[REGION] = (region.id, path)


class _StateAt:
    """The grad mode and autocast state a node of ``graph`` runs under, from the context nodes before it
    (the state the outer trace was in when it reached the call)."""

    def __init__(self, graph: torch.fx.Graph, node: torch.fx.Node):
        self.steps = []
        for n in graph.nodes:
            if n is node:
                break
            if n.op == "call_function" and n.target is torch._C._set_grad_enabled:
                self.steps.append(("grad", n.args[0]))
            elif n.op == "call_function" and getattr(n.target, "__name__", "") == "_enter_autocast":
                self.steps.append(("enter", n))
            elif n.op == "call_function" and getattr(n.target, "__name__", "") == "_exit_autocast":
                self.steps.append(("exit", n.args[0]))

    def __enter__(self) -> "_StateAt":
        self.grad = torch.is_grad_enabled()
        self.entered = []

        for kind, value in self.steps:
            if kind == "grad":
                torch._C._set_grad_enabled(value)
            elif kind == "enter":
                self.entered.append((value, am._enter_autocast(*value.args, **value.kwargs)))
            else:
                for i in range(len(self.entered) - 1, -1, -1):
                    if self.entered[i][0] is value:
                        am._exit_autocast(self.entered.pop(i)[1])
                        break
        return self

    def __exit__(self, *exc: Any) -> bool:
        for _, ctx in reversed(self.entered):
            am._exit_autocast(ctx)
        torch._C._set_grad_enabled(self.grad)
        return False


def _replace_uses(node: torch.fx.Node, value: Any) -> None:
    """Every use of ``node`` (a call returning the pytree ``value`` of nodes) reads ``value`` instead:
    ``getitem(node, i)`` becomes ``value[i]`` (recursively), any other use takes the structure."""
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node \
                and not isinstance(value, torch.fx.Node):
            _replace_uses(user, value[user.args[1]])
            user.graph.erase_node(user)
        elif isinstance(value, torch.fx.Node):
            user.replace_input_with(node, value)
        else:
            def swap(a: Any) -> Any:
                return value if a is node else a
            user.args = pytree.tree_map(swap, user.args)
            user.kwargs = pytree.tree_map(swap, user.kwargs)


# ------------------------------------------------------------------ example values, in one fake mode


class _FakeRun(torch.fx.Interpreter):
    """Runs a graph on fake tensors and records every node's value as its ``example_value``."""

    def __init__(self, gm: torch.fx.GraphModule, mode: Any):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.op != "output":
            n.meta["example_value"] = value
            if "val" in n.meta:
                n.meta["val"] = value
        return value

    def get_attr(self, target: Any, args: tuple, kwargs: dict) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self.mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in _BODY_HOPS and args and isinstance(args[0], torch.fx.GraphModule):
            # the body's own nodes get their values too; a checkpoint computes its body's function
            out = _FakeRun(args[0], self.mode).run(*args[1:])
            return out
        return super().call_function(target, args, kwargs)


def _propagate_example_values(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Every node's ``example_value`` again, all in one fake mode, where the graph writes anything in
    place: the copies were traced apart (the copies of a region share its example values), and what
    reads storage identities (normalize's in-place respelling, fusion's check that no read moves past
    a write) must see aliasing across the whole graph. A graph without in-place writes keeps the
    copied values (their shapes, dtypes and strides are right; no one compares their storages)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not any(_writes_in_place(n) for n in _all_nodes(gm)):
        return

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    flat = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in pytree.tree_leaves((args, kwargs))]
    grad = torch.is_grad_enabled()
    try:
        with mode:
            _FakeRun(gm, mode).run(*flat)
    finally:
        torch._C._set_grad_enabled(grad)
