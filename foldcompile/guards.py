"""What a capture specialised on, and the check that runs before every call.

A captured graph is specialised on its example inputs AND on the model's state:
Python branches on shapes, dtypes, flags, module attributes, ``self.training``
and hooks were decided once, at capture time, chunk loops over tensor sizes
were unrolled, and parameters were baked in as the very objects the model held.
Running it where those decisions differ would compute a different function
silently, so the capture records a :class:`Guards` set and installs a forward
pre-hook that checks it on every call, raising :class:`GuardError` that names
the failed guard::

    >>> from foldcompile.capture import trace
    >>> from foldcompile.models import zoo
    >>> block, (m, z, msa_mask, pair_mask) = zoo.get("evoformer_block")    # m: [5, 11, 16]
    >>> gm = trace(block, m, z, msa_mask, pair_mask)
    >>> gm(torch.randn(6, 11, 16), z, msa_mask, pair_mask)
    Traceback (most recent call last):
        ...
    foldcompile.guards.GuardError: input 'm' shape (6, 11, 16) != captured (5, 11, 16)

What is guarded (simple and sound rather than minimal):

- every argument of ``forward`` (defaults applied): tensors by shape, dtype,
  device, layout, ``requires_grad`` and strides (of the dims longer than 1);
  everything else (flags, ``None``, numbers, strings, nested containers) by
  structure and value;
- the module tree: every submodule by identity and exact class (a swapped
  ``m.act = nn.GELU()`` or a parametrization registered after capture is
  refused), its ``training`` flag, the set of its instance attribute names,
  and the number and identity of its forward, forward-pre, backward and
  backward-pre hooks (Dynamo inlined the hooks present at capture);
- module attributes, instance AND class attributes (from the class's MRO up to
  ``nn.Module``; methods, properties and other descriptors are skipped): plain
  data (bool/int/float/str/None/dtype/device/Enum and tuples, lists, dicts and
  sets of them, dataclass instances and plain objects' ``__dict__``) by value
  against a deep snapshot; anything else (callables, tensors, opaque objects),
  and containers nested deeper than 4 levels or longer than 256 items, by
  identity (an in-place change inside those is not seen);
- every parameter, buffer or tensor constant the graph reads (``get_attr``):
  it must still be the model's very object at that path (a re-assigned
  ``model.lin.weight = nn.Parameter(...)`` or ``load_state_dict(assign=True)``
  is refused; in-place updates share storage and are fine), with its captured
  dtype, shape, device and ``requires_grad`` (``model.double()`` is refused);
- plain-data globals (and global tensors, by identity) named in the
  ``forward`` code of each module class of the model, and those Dynamo's own
  guards record as read from a Python module (helper functions, other modules:
  :meth:`Guards.add_dynamo_globals`);
- the autocast state (enabled, dtype) for cpu and cuda, and grad mode;
- that no process-wide module hook (``register_module_forward_hook`` and its
  pre-hook and backward variants) is registered: eager would run it around every
  submodule, the graph runs none (a capture refuses them too).

Deques are compared by their items and ``maxlen`` like lists (they have no ``__dict__``).

Every state guard is precomputed at capture into a flat list (module weakref,
attribute, snapshot), so a full check is a loop of identity and value comparisons;
it walks every submodule and parameter, so it grows with the model (about 7 ms for
48 Evoformer blocks). A call runs it only where something it reads may have moved:
after a full check passes, :mod:`foldcompile.state_watch` takes cheap tags (dict
version tags of every module's ``__dict__`` and parameter/children dicts, module
classes, counters of hook handles and registrations, the metadata of every tensor
the graph reads), and each call compares those, plus what no tag sees (mutable
attribute values by content, class attributes once per class, the hooks of modules
hooked at capture, globals); any difference sends the call to the full check, which
names the guard (``Guards.fast.watch.full_checks`` counts those). The guards then hold
the model's modules (the graph holds its parameters anyway).

The hook also binds the call to the model's signature and fills in defaults,
so the graph module accepts the same calls as the model (``gm(x)`` with
``mask=None`` defaulted). A pass that builds a new GraphModule must carry the
guards over with :func:`install_guards` (or :func:`copy_guards`).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import enum
import inspect
import math
import re
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch.nn.modules import module as _nn_module
from torch.utils import _pytree as pytree

from foldcompile import state_watch

__all__ = [
    "GuardError", "Guards", "TensorSpec", "install_guards", "copy_guards", "autocast_state",
    "snapshot_module_state", "module_state_changes", "global_module_hooks", "Mismatch", "variant_key",
]

_PRIMITIVES = (bool, int, float, str, type(None), torch.dtype, torch.device)
# immutable leaf values compared by type and value
_VALUE_TYPES = frozenset({bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
                          torch.layout, torch.memory_format})
_AUTOCAST_DEVICES = ("cpu", "cuda")
# nn.Module's own bookkeeping (hooks, training flag, ...): not model configuration
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) | {"_compiled_call_impl", "_is_full_backward_hook"}
# attributes Dynamo itself sets on the modules it captures: not the model's side effects
_DYNAMO_ATTRS = frozenset({"_is_torch_compile"})
_DYNAMO_PREFIXES = ("_dynamo", "_torchdynamo", "___")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# how deep plain objects/containers are compared by value; deeper, by identity
_MAX_DEPTH = 4
# containers longer than this are compared by identity (a per-call deep compare would cost too much)
_MAX_ITEMS = 256
_MISSING = object()


class GuardError(RuntimeError):
    """A captured graph was called where one of its capture-time assumptions does not hold.

    ``guard`` names the kind of guard that failed (see :class:`Mismatch`)."""

    def __init__(self, message: str, guard: str | None = None):
        super().__init__(message)
        self.guard = guard


@dataclass(frozen=True)
class Mismatch:
    """Which guard a call breaks: ``guard`` is one of ``"signature"``, ``"input 'NAME'"``, ``"autocast"``,
    ``"grad_mode"``, ``"training"``, ``"global_hooks"``, ``"module_state"``, ``"parameters"``,
    ``"globals"``; ``message`` is the text the GuardError would carry."""

    guard: str
    message: str

    def __str__(self) -> str:
        return f"{self.guard}: {self.message}"


@dataclass(frozen=True)
class TensorSpec:
    """The properties of an input tensor that the capture specialised on.

    ``strides`` holds the strides of the dims longer than 1 (``None`` for
    length-1 dims, whose stride means nothing), so two contiguous tensors of a
    shape always match but a transposed or expanded view does not.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    layout: torch.layout
    requires_grad: bool = False
    strides: tuple[int | None, ...] | None = None

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(int(s) for s in t.shape), t.dtype, t.device, t.layout, t.requires_grad, _strides(t))

    def mismatch(self, t: torch.Tensor) -> str | None:
        """Why ``t`` does not match, or None."""
        if tuple(t.shape) != self.shape:
            return f"shape {tuple(t.shape)} != captured {self.shape}"
        if t.dtype != self.dtype:
            return f"dtype {t.dtype} != captured {self.dtype}"
        if t.device != self.device:
            return f"device {t.device} != captured {self.device}"
        if t.layout != self.layout:
            return f"layout {t.layout} != captured {self.layout}"
        if t.requires_grad != self.requires_grad:
            return f"requires_grad {t.requires_grad} != captured {self.requires_grad}"
        if self.strides is not None:
            got = _strides(t)
            if got != self.strides:
                return (f"strides {got} != captured {self.strides} (None: a length-1 dim); pass a tensor of the "
                        "captured layout (e.g. .contiguous()) or capture with this one")
        return None

    def __str__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{grad})"


def _strides(t: torch.Tensor) -> tuple[int | None, ...] | None:
    if t.layout != torch.strided:
        return None
    return tuple(None if n == 1 else int(s) for n, s in zip(t.shape, t.stride()))


def autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    """``{device_type: (enabled, dtype)}`` of the ambient autocast for cpu and cuda."""
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES}


def _leaf_spec(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorSpec.of(v)
    return v


# ------------------------------------------------------------------ value snapshots
#
# A snapshot is a tagged tuple: ("v", value) immutable leaf; ("id", obj) identity;
# ("seq", type, (snaps...)); ("deque", type, maxlen, (snaps...)); ("set", type, frozenset);
# ("dict", type, ((key, snap), ...));
# ("obj", type, ((attr, snap), ...)) a dataclass or plain object by its fields; ("missing",).


def _is_value(v: Any) -> bool:
    return type(v) in _VALUE_TYPES or isinstance(v, enum.Enum)


def _is_plain_object(v: Any) -> bool:
    """A configuration-like object compared by its fields: a dataclass instance, a SimpleNamespace,
    or an instance of a user class with a ``__dict__`` that is not callable, a module, a tensor or a type."""
    if isinstance(v, (torch.Tensor, torch.nn.Module, type, types.ModuleType)) or callable(v):
        return False
    if dataclasses.is_dataclass(v) or isinstance(v, types.SimpleNamespace):
        return True
    mod = getattr(type(v), "__module__", "") or ""
    return hasattr(v, "__dict__") and not mod.startswith(("torch", "builtins", "numpy"))


def _snap(v: Any, depth: int = 0) -> tuple:
    if _is_value(v):
        return ("v", v)
    if depth >= _MAX_DEPTH:
        return ("id", v)
    t = type(v)
    # subclasses too (namedtuples, torch.Size, OrderedDict, ...): their contents are what code reads
    if isinstance(v, (tuple, list)):
        if len(v) > _MAX_ITEMS:
            return ("id", v)
        return ("seq", t, tuple(_snap(x, depth + 1) for x in v))
    if isinstance(v, collections.deque):  # no __dict__, not a list: by its items and maxlen
        if len(v) > _MAX_ITEMS:
            return ("id", v)
        return ("deque", t, v.maxlen, tuple(_snap(x, depth + 1) for x in v))
    if isinstance(v, (set, frozenset)):
        if len(v) <= _MAX_ITEMS and all(_is_value(x) for x in v):
            return ("set", t, frozenset((type(x), x) for x in v))
        return ("id", v)
    if isinstance(v, dict):
        if len(v) > _MAX_ITEMS or not all(_is_value(k) for k in v):
            return ("id", v)
        return ("dict", t, tuple((k, _snap(x, depth + 1)) for k, x in v.items()))
    if _is_plain_object(v):
        if dataclasses.is_dataclass(v):
            items = [(f.name, getattr(v, f.name, _MISSING)) for f in dataclasses.fields(v)]
        else:
            items = list(vars(v).items())
        if len(items) > _MAX_ITEMS:
            return ("id", v)
        return ("obj", t, tuple((k, ("missing",) if x is _MISSING else _snap(x, depth + 1)) for k, x in items))
    return ("id", v)


def _same(v: Any, s: tuple) -> bool:
    """Does ``v`` still match snapshot ``s``?"""
    tag = s[0]
    if tag == "v":
        want = s[1]
        if type(v) is not type(want):
            return False
        if v == want:
            return True
        return isinstance(v, float) and math.isnan(v) and math.isnan(want)
    if tag == "id":
        return v is s[1]
    if tag == "missing":
        return v is _MISSING
    if type(v) is not s[1]:
        return False
    if tag == "seq":
        return len(v) == len(s[2]) and all(_same(x, sx) for x, sx in zip(v, s[2]))
    if tag == "set":
        return len(v) == len(s[2]) and frozenset((type(x), x) for x in v) == s[2]
    if tag == "deque":
        return v.maxlen == s[2] and len(v) == len(s[3]) and all(_same(x, sx) for x, sx in zip(v, s[3]))
    if tag == "dict":
        return len(v) == len(s[2]) and all(k in v and _same(v[k], sx) for k, sx in s[2])
    if tag == "obj":
        if dataclasses.is_dataclass(v):
            return all(_same(getattr(v, k, _MISSING), sx) for k, sx in s[2])
        d = getattr(v, "__dict__", None)
        return d is not None and len(d) == len(s[2]) and all(_same(d.get(k, _MISSING), sx) for k, sx in s[2])
    raise AssertionError(f"unknown snapshot tag {tag!r}")


def _shown(s: tuple) -> str:
    """A snapshot as the value it stood for (for messages)."""
    tag = s[0]
    if tag in ("v", "id"):
        return _short(s[1])
    if tag == "missing":
        return "<missing>"
    if tag == "seq":
        return _short(s[1](_Shown(_shown(x)) for x in s[2])) if s[1] in (tuple, list) else f"{s[1].__name__}(...)"
    if tag == "set":
        return _short({x for _, x in s[2]})
    if tag == "deque":
        return _short(collections.deque((_Shown(_shown(x)) for x in s[3]), maxlen=s[2]))
    if tag == "dict":
        return _short({k: _Shown(_shown(x)) for k, x in s[2]})
    return f"{s[1].__name__}({', '.join(f'{k}={_shown(x)}' for k, x in s[2])})"[:80]


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


# ------------------------------------------------------------------ module state


def _is_descriptor_or_function(v: Any) -> bool:
    return isinstance(v, (types.FunctionType, staticmethod, classmethod, property, types.MethodType,
                          types.MethodDescriptorType, types.WrapperDescriptorType,
                          types.MemberDescriptorType, types.GetSetDescriptorType)) \
        or hasattr(type(v), "__get__") and not isinstance(v, (type, torch.Tensor))


def _class_attrs(cls: type) -> dict[str, Any]:
    """Non-dunder data attributes of ``cls`` and its bases up to (not including) ``nn.Module``; the
    nearest class wins, as attribute lookup does."""
    out: dict[str, Any] = {}
    for base in cls.__mro__:
        if base is torch.nn.Module or base is object:
            break
        if base.__module__.startswith("torch.nn.modules") and base.__name__ == "Module":
            break
        for name, v in vars(base).items():
            if name.startswith("__") and name.endswith("__") or name in out or name in _MODULE_INTERNALS:
                continue
            if _is_descriptor_or_function(v):
                out[name] = _MISSING  # shadowed by a method: a base's data attribute of this name is not read
                continue
            out[name] = v
    return {k: v for k, v in out.items() if v is not _MISSING}


_NO_HOOKS = ((), (), (), ())

# process-wide hooks that nn.Module.__call__ runs around EVERY module (torch.nn.modules.module's dicts),
# by the public function that registers them
_GLOBAL_HOOKS = (
    ("_global_forward_pre_hooks", "register_module_forward_pre_hook"),
    ("_global_forward_hooks", "register_module_forward_hook"),
    ("_global_backward_pre_hooks", "register_module_full_backward_pre_hook"),
    ("_global_backward_hooks", "register_module_full_backward_hook/register_module_backward_hook"),
)


def global_module_hooks() -> list[str]:
    """The process-wide module hooks registered now, as ``"register_module_forward_hook (1)"``; empty
    when there are none. A capture refuses them and a captured graph's guards refuse a call while any
    is registered: eager runs them around every submodule, the graph holds none of them."""
    return [f"{name} ({len(d)})" for attr, name in _GLOBAL_HOOKS if (d := getattr(_nn_module, attr, None))]


def _hook_keys(mod: torch.nn.Module) -> tuple[tuple, ...]:
    return tuple(tuple(getattr(mod, d, None) or ()) for d in _HOOK_DICTS)


@dataclass
class _ModuleGuard:
    """Everything guarded on one module (precomputed; checked per call in :meth:`Guards.check`)."""

    path: str
    ref: Callable[[], torch.nn.Module | None]
    cls: type
    training: bool
    keys: frozenset
    instance_attrs: list[tuple[str, tuple]]
    class_attrs: list[tuple[str, tuple]]
    hooks: tuple[tuple, ...]
    children: list[tuple[str, Callable[[], torch.nn.Module | None]]]
    slots: tuple = ()  # _tensor_slots: the parameter and buffer names, and which of them are None


def _tensor_slots(mod: torch.nn.Module) -> tuple:
    """A module's parameter and buffer names and the names holding None (``Linear(bias=False)``'s bias):
    a parameter put where the capture saw None, or a new or deleted one, is a change eager would see."""
    return (tuple(mod._parameters), tuple(mod._buffers),
            tuple(k for k, v in mod._parameters.items() if v is None), tuple(k for k, v in mod._buffers.items() if v is None))


def _module_guards(model: torch.nn.Module) -> list[_ModuleGuard]:
    out = []
    for path, mod in model.named_modules():  # one entry per module object; shared ones by their first path
        inst = [(k, _snap(v)) for k, v in vars(mod).items() if k not in _MODULE_INTERNALS]
        cls_attrs = [(k, _snap(v)) for k, v in _class_attrs(type(mod)).items() if k not in vars(mod)]
        out.append(_ModuleGuard(
            path=path or "<root>", ref=weakref.ref(mod), cls=type(mod), training=mod.training,
            keys=frozenset(vars(mod)), instance_attrs=inst, class_attrs=cls_attrs, hooks=_hook_keys(mod),
            children=[(name, weakref.ref(child)) for name, child in mod._modules.items() if child is not None],
            slots=_tensor_slots(mod),
        ))
    return out


def _module_attrs(model: torch.nn.Module) -> dict[str, Any]:
    """Plain Python attributes (bool/int/float/str/None/dtype/device) of every submodule, by path:
    the flags code may branch on (``explain`` reads ``chunk_size``-like ones)."""
    out: dict[str, Any] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for attr, value in vars(mod).items():
            if attr in _MODULE_INTERNALS:
                continue
            if isinstance(value, _PRIMITIVES):
                out[f"{name}.{attr}" if name else attr] = value
    return out


def _training_flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name or "<root>": m.training for name, m in model.named_modules(remove_duplicate=False)}


def _attr_path(path: str, attr: str) -> str:
    return attr if path == "<root>" else f"{path}.{attr}"


# ------------------------------------------------------------------ side effects of a capture


def _restorable_copy(v: Any, s: tuple) -> Any:
    """A deep copy of a mutable plain-data value (to put back after an in-place change), or _MISSING."""
    if s[0] not in ("seq", "deque", "set", "dict", "obj"):
        return _MISSING
    try:
        return copy.deepcopy(v)
    except Exception:  # an uncopyable object: a change is still detected, just not undone
        return _MISSING


def snapshot_module_state(model: torch.nn.Module) -> dict[str, list[tuple]]:
    """The state a ``forward`` could write, to compare after running it once (:func:`module_state_changes`):

    - every module's instance dict (shallow), deep copies of its mutable plain data, and its parameter,
      buffer and submodule dicts;
    - the data attributes of every class of those modules, up to ``nn.Module`` (``type(self).calls``);
    - the globals named in each module class's ``forward`` code (``LOG.append(...)``, ``global N``).

    Globals written only by helper functions are not in it: Dynamo's own side-effect tracking
    (:mod:`foldcompile.capture`) is what sees those."""
    modules = []
    for path, mod in model.named_modules():
        d = dict(vars(mod))
        values = {k: _snap(v) for k, v in d.items() if k not in _MODULE_INTERNALS}
        copies = {k: c for k, s in values.items() if (c := _restorable_copy(d[k], s)) is not _MISSING}
        modules.append((path or "<root>", mod, d, values, copies,
                        dict(mod._parameters), dict(mod._buffers), dict(mod._modules)))
    classes, seen_cls = [], set()
    for mod in model.modules():
        for cls in type(mod).__mro__:
            if cls is torch.nn.Module or cls is object or cls in seen_cls or \
                    (cls.__module__ or "").startswith("torch."):
                break
            seen_cls.add(cls)
            d = {k: v for k, v in vars(cls).items() if not (k.startswith("__") and k.endswith("__"))}
            values = {k: _snap(v) for k, v in d.items() if not _is_descriptor_or_function(v)}
            copies = {k: c for k, s in values.items() if (c := _restorable_copy(d[k], s)) is not _MISSING}
            classes.append((cls, d, values, copies))
    globs, seen_code = [], set()
    for mod in model.modules():
        fwd = getattr(type(mod), "forward", None)
        code, glob = getattr(fwd, "__code__", None), getattr(fwd, "__globals__", None)
        if code is None or glob is None or id(code) in seen_code:
            continue
        seen_code.add(id(code))
        for name in code.co_names:
            v = glob.get(name, _MISSING)
            if isinstance(v, (types.ModuleType, type)) or callable(v) and not isinstance(v, torch.nn.Module):
                continue  # modules, classes and functions: not state a forward writes
            s = ("missing",) if v is _MISSING else _snap(v)
            globs.append((fwd.__module__, glob, name, v, s, _restorable_copy(v, s)))
    return {"modules": modules, "classes": classes, "globals": globs}


def module_state_changes(snapshot: dict[str, list[tuple]], restore: bool = True) -> list[str]:
    """What changed in the modules, their classes and the globals their ``forward`` names since
    :func:`snapshot_module_state` (``"assigns module attribute 'blocks.0.last'"``, ...), restoring the
    snapshot where possible when ``restore``. Empty if nothing changed."""
    changes = []
    for path, mod, before, values, copies, params, buffers, modules in snapshot["modules"]:
        now = vars(mod)
        for k in list(before) + [k for k in now if k not in before]:  # in definition order
            if k in _MODULE_INTERNALS or k in _DYNAMO_ATTRS or k.startswith(_DYNAMO_PREFIXES):
                if restore and k in now and k not in before:
                    del now[k]  # leave the model as it was, so the guards' attribute-name set matches
                continue
            where = _attr_path(path, k)
            if k not in now:
                changes.append(f"deletes module attribute {where!r}")
                if restore:
                    now[k] = before[k]
            elif k not in before:
                changes.append(f"assigns module attribute {where!r} (new, {_short(now[k])})")
                if restore:
                    del now[k]
            elif now[k] is not before[k]:
                changes.append(f"assigns module attribute {where!r} ({_short(before[k])} -> {_short(now[k])})")
                if restore:
                    now[k] = before[k]
            elif not _same(now[k], values[k]):
                changes.append(f"mutates module attribute {where!r} in place")
                if restore and k in copies:
                    _put_back(now, k, copies[k])
        for kind, was, cur in (("parameter", params, mod._parameters), ("buffer", buffers, mod._buffers),
                               ("submodule", modules, mod._modules)):
            if set(was) != set(cur) or any(cur[k] is not was[k] for k in was):
                changed = sorted(k for k in set(was) | set(cur) if was.get(k, _MISSING) is not cur.get(k, _MISSING))
                changes.append(f"re-assigns {kind}(s) {[_attr_path(path, k) for k in changed]}")
                if restore:
                    cur.clear()
                    cur.update(was)
    for cls, before, values, copies in snapshot["classes"]:
        now = vars(cls)
        for k in list(before) + [k for k in now if k not in before and not (k.startswith("__") and k.endswith("__"))]:
            if k.startswith(_DYNAMO_PREFIXES):  # Dynamo's own bookkeeping on classes, not the model's
                continue
            where = f"class attribute '{cls.__name__}.{k}'"
            if k not in now:
                changes.append(f"deletes {where}")
                if restore:
                    setattr(cls, k, before[k])
            elif k not in before:
                changes.append(f"assigns {where} (new, {_short(now[k])})")
                if restore:
                    delattr(cls, k)
            elif now[k] is not before[k]:
                changes.append(f"assigns {where} ({_short(before[k])} -> {_short(now[k])})")
                if restore:
                    setattr(cls, k, before[k])
            elif k in values and not _same(now[k], values[k]):
                changes.append(f"mutates {where} in place")
                if restore and k in copies:
                    _put_back(cls, k, copies[k])
    for module_name, glob, name, v, s, saved in snapshot["globals"]:
        cur = glob.get(name, _MISSING)
        where = f"global '{name}' (of {module_name})"
        if cur is not v:
            changes.append(f"assigns {where} ({_short(v) if v is not _MISSING else '<missing>'} -> {_short(cur)})")
            if restore:
                if v is _MISSING:
                    glob.pop(name, None)
                else:
                    glob[name] = v
        elif not _same(cur, s):
            changes.append(f"mutates {where} in place")
            if restore and saved is not _MISSING:
                _put_back(glob, name, saved)
    return changes


def _put_back(owner: Any, name: str, saved: Any) -> None:
    """Undo an in-place change of ``owner[name]`` (or ``owner.name``) by writing the saved copy's contents
    into the very object there, so that other references to it see the old contents again."""
    cur = owner[name] if isinstance(owner, dict) else getattr(owner, name)
    try:
        if isinstance(cur, (list, collections.deque)):
            cur.clear()
            cur.extend(saved)
            return
        if isinstance(cur, (dict, set)):
            cur.clear()
            cur.update(saved)
            return
        if hasattr(cur, "__dict__") and not isinstance(cur, type):
            vars(cur).clear()
            vars(cur).update(vars(saved))
            return
    except (TypeError, AttributeError):
        pass
    if isinstance(owner, dict):
        owner[name] = saved
    else:
        setattr(owner, name, saved)


# ------------------------------------------------------------------ parameters, buffers, globals


@dataclass
class _AttrGuard:
    """A tensor the graph reads by ``get_attr``: the model's object at ``target`` and its properties."""

    target: str
    obj: torch.Tensor
    owner: Callable[[], torch.nn.Module | None] | None  # the model's module holding it, None: a graph constant
    name: str
    spec: tuple
    store: str = "_parameters"  # where the owner keeps it: _parameters, _buffers or __dict__

    @staticmethod
    def spec_of(t: torch.Tensor) -> tuple:
        return (t.dtype, tuple(t.shape), t.device, t.requires_grad)


def _model_tensor(model: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str, Any, str] | None:
    """The model's module holding ``target`` and the tensor there, or None if the path is not the model's."""
    mod_path, _, name = target.rpartition(".")
    try:
        mod = model.get_submodule(mod_path) if mod_path else model
    except AttributeError:
        return None
    for store in ("_parameters", "_buffers", "__dict__"):
        if name in getattr(mod, store):
            return mod, name, getattr(mod, store)[name], store
    return None


def _global_guards(model: torch.nn.Module) -> list[tuple[str, Callable, str, tuple]]:
    """``(where, forward function, name, snapshot)`` of each plain-data global (or global tensor, by
    identity) named in the ``forward`` code of a module class of the model."""
    out, seen = [], set()
    for mod in model.modules():
        fwd = getattr(type(mod), "forward", None)
        code, glob = getattr(fwd, "__code__", None), getattr(fwd, "__globals__", None)
        if code is None or glob is None or (id(code)) in seen:
            continue
        seen.add(id(code))
        for name in code.co_names:
            if name not in glob:
                continue
            v = glob[name]
            s = _snap(v)
            if isinstance(v, torch.Tensor) or (s[0] != "id" and _plain_data(s)):
                out.append((f"{fwd.__module__}.{name}", fwd, name, s))  # the function, not its globals dict:
                # functions deep-copy as themselves, a globals dict would be copied whole
    return out


def _plain_data(s: tuple) -> bool:
    """A snapshot that holds only values and containers of them (no identity leaves, no objects)."""
    tag = s[0]
    if tag in ("v", "set"):
        return True
    if tag == "seq":
        return all(_plain_data(x) for x in s[2])
    if tag == "deque":
        return all(_plain_data(x) for x in s[3])
    if tag == "dict":
        return all(_plain_data(x) for _, x in s[2])
    return False


@dataclass
class Guards:
    """Everything a capture specialised on; :meth:`check` raises :class:`GuardError` on a mismatch.

    ``signature`` is the model's ``forward`` signature (without ``self``);
    ``inputs`` maps each argument name to its pytree structure and leaf specs
    (:class:`TensorSpec` for tensors, the value itself otherwise);
    ``module_attrs`` the primitive instance attributes of every submodule by path
    (for reports; the check uses the fuller precomputed module guards).
    """

    signature: inspect.Signature
    inputs: dict[str, tuple[Any, list[Any]]]
    training: dict[str, bool]
    module_attrs: dict[str, Any]
    autocast: dict[str, tuple[bool, torch.dtype]]
    grad_enabled: bool
    model_ref: Callable[[], torch.nn.Module | None] | None = field(default=None, repr=False, compare=False)
    root_training: bool = True
    modules: list[_ModuleGuard] = field(default_factory=list, repr=False, compare=False)
    attrs: list[_AttrGuard] = field(default_factory=list, repr=False, compare=False)
    globals: list[tuple[str, Callable, str, tuple]] = field(default_factory=list, repr=False, compare=False)
    # the per-call fast path (_FastState), made after the first full check passes
    fast: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def record(cls, model: torch.nn.Module, bound: inspect.BoundArguments) -> "Guards":
        """Record the guards of a capture of ``model`` on the (defaults-applied) ``bound`` arguments.

        Parameter guards are added by :meth:`record_graph_attrs` once the graph exists."""
        inputs = {}
        for name, value in bound.arguments.items():
            leaves, spec = pytree.tree_flatten(value)
            inputs[name] = (spec, [_leaf_spec(v) for v in leaves])
        return cls(
            signature=bound.signature,
            inputs=inputs,
            training=_training_flags(model),
            module_attrs=_module_attrs(model),
            autocast=autocast_state(),
            grad_enabled=torch.is_grad_enabled(),
            model_ref=weakref.ref(model),
            root_training=model.training,
            modules=_module_guards(model),
            globals=_global_guards(model),
        )

    def record_graph_attrs(self, model: torch.nn.Module, gm: torch.fx.GraphModule) -> None:
        """Guard every tensor ``gm`` reads by ``get_attr``: the model's object at that path, or, for a
        constant of the graph's own, its properties."""
        self.attrs = []
        seen = set()
        graphs = [gm] + [m for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]
        for owner in graphs:
            for node in owner.graph.find_nodes(op="get_attr"):
                target = str(node.target)
                try:
                    obj = _fetch(owner, target)
                except AttributeError:
                    continue
                if not isinstance(obj, torch.Tensor) or (id(owner), target) in seen:
                    continue
                seen.add((id(owner), target))
                found = _model_tensor(model, target) if owner is gm else None
                if found is not None and found[2] is obj:
                    self.attrs.append(_AttrGuard(target, obj, weakref.ref(found[0]), found[1],
                                                 _AttrGuard.spec_of(obj), found[3]))
                else:
                    self.attrs.append(_AttrGuard(target, obj, None, target, _AttrGuard.spec_of(obj)))

    def add_dynamo_globals(self, model: torch.nn.Module, dynamo_guards: Any) -> None:
        """Guard the plain-data globals (and global tensors) Dynamo's own guards say the capture read:
        ``G['X']`` in the model's ``forward`` module, ``G['__import_pkg_dot_mod'].X`` or ``G['mod'].X`` in
        another module — globals read by helper functions and other modules' code, which the
        ``forward``-code scan of :meth:`record` does not see. Torch's own module state is left out, and
        so are globals reached through closures or locals."""
        fwd = getattr(type(model), "forward", None)
        root = getattr(fwd, "__globals__", None)
        seen = {(id(h if isinstance(h, dict) else h.__globals__), n) for _, h, n, _ in self.globals}
        for guard in dynamo_guards or ():
            src = str(getattr(guard, "name", ""))
            if m := re.fullmatch(r"G\['([A-Za-z_]\w*)'\]", src):
                holder, name, where = root, m.group(1), f"{getattr(fwd, '__module__', '?')}.{m.group(1)}"
            elif m := re.fullmatch(r"G\['([A-Za-z_]\w*)'\]\.([A-Za-z_]\w*)", src):
                # a module's global: through Dynamo's import alias (helpers of other modules) or through a
                # module object bound to a global of forward's module (``import cfg; cfg.SCALE``)
                base = m.group(1)
                module = sys.modules.get(base[len("__import_"):].replace("_dot_", ".")) \
                    if base.startswith("__import_") else (root or {}).get(base)
                if not isinstance(module, types.ModuleType) or module.__name__.split(".")[0] == "torch":
                    continue
                holder, name, where = vars(module), m.group(2), f"{module.__name__}.{m.group(2)}"
            else:
                continue
            if holder is None or name.startswith("__") or name not in holder or (id(holder), name) in seen:
                continue
            seen.add((id(holder), name))
            v = holder[name]
            snap = _snap(v)
            if isinstance(v, torch.Tensor) or (snap[0] != "id" and _plain_data(snap)):
                self.globals.append((where, holder if holder is not root else fwd, name, snap))

    def __deepcopy__(self, memo: dict) -> "Guards":
        # a deep-copied graph module keeps checking the same model: the snapshots hold objects compared
        # by identity (callables, tensors, the model's parameters), which a deep copy would replace
        return copy.copy(self)

    def bind(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        """Bind a call to the model's signature with defaults applied; a bad call is a GuardError."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise GuardError(f"call does not match the captured signature {self.signature}: {e}",
                             "signature") from None
        bound.apply_defaults()
        return bound

    def check(self, args: tuple, kwargs: dict, graph_module: torch.nn.Module | None = None) -> inspect.BoundArguments:
        """Check a call against every guard; return the bound arguments or raise GuardError."""
        bound = self.bind(args, kwargs)
        for name, (spec, leaf_specs) in self.inputs.items():
            value = bound.arguments[name]
            leaves, got_spec = pytree.tree_flatten(value)
            guard = f"input {name!r}"
            if got_spec != spec:
                raise GuardError(
                    f"input {name!r} structure {_short(value)} != captured {pytree.tree_unflatten(leaf_specs, spec)!r}",
                    guard)
            for i, (leaf, want) in enumerate(zip(leaves, leaf_specs)):
                where = f"input {name!r}" + (f" leaf {i}" if len(leaves) > 1 else "")
                if isinstance(want, TensorSpec):
                    if not isinstance(leaf, torch.Tensor):
                        raise GuardError(f"{where} is {_short(leaf)}, captured a tensor {want}", guard)
                    why = want.mismatch(leaf)
                    if why:
                        raise GuardError(f"{where} {why}", guard)
                else:
                    if isinstance(leaf, torch.Tensor) or type(leaf) is not type(want) or leaf != want:
                        raise GuardError(f"{where} = {_short(leaf)} != captured {want!r}", guard)
        state = autocast_state()
        for dev, want in self.autocast.items():
            if state[dev] != want:
                raise GuardError(
                    f"autocast({dev!r}) (enabled, dtype) = {state[dev]} != captured {want}; "
                    "capture again under the autocast state you run in", "autocast"
                )
        if torch.is_grad_enabled() != self.grad_enabled:
            raise GuardError(f"grad mode {torch.is_grad_enabled()} != captured {self.grad_enabled}", "grad_mode")
        if graph_module is not None and graph_module.training != self.root_training:
            raise GuardError(
                f"graph module training={graph_module.training} != captured {self.root_training}; "
                "capture again after model.train()/model.eval()", "training"
            )
        if _nn_module._global_forward_pre_hooks or _nn_module._global_forward_hooks \
                or _nn_module._global_backward_pre_hooks or _nn_module._global_backward_hooks:
            raise GuardError(f"global module hook(s) registered since capture: {', '.join(global_module_hooks())} "
                             "(torch.nn.modules.module): eager runs them around every submodule, the graph runs "
                             "none of them; remove them (handle.remove()) to call the graph", "global_hooks")
        if self.fast is None or not self.fast.holds():
            self._check_state()
            self._watch_state()
        for where, holder, name, s in self.globals:
            glob = holder if isinstance(holder, dict) else holder.__globals__
            if not _same(glob.get(name, _MISSING), s):
                if s[0] == "id":
                    raise GuardError(f"global {where} was rebound to another object since capture "
                                     "(the graph holds the one it had then): capture again", "globals")
                raise GuardError(f"global {where} = {_short(glob.get(name, '<missing>'))} != captured {_shown(s)}; "
                                 "the graph baked the value it had at capture: capture again", "globals")
        return bound

    def mismatch(self, args: tuple, kwargs: dict, graph_module: torch.nn.Module | None = None) -> Mismatch | None:
        """The first guard a call breaks, or None where :meth:`check` would pass; never raises a GuardError
        (a variant cache asks this before choosing or building a variant)."""
        try:
            self.check(args, kwargs, graph_module)
        except GuardError as e:
            return Mismatch(e.guard or "unknown", str(e))
        return None

    def variant_key(self, args: tuple, kwargs: dict) -> tuple:
        """:func:`variant_key` of a call, bound to the captured signature (defaults applied) and with the
        training mode of the captured model (the graph's own where the model is gone)."""
        model = self.model_ref() if self.model_ref is not None else None
        training = model.training if model is not None else self.root_training
        return _key_of(self.bind(args, kwargs), training)

    def _check_state(self) -> None:
        """The full check of the model's state: every module guard and every parameter guard."""
        try:
            self._check_modules()
        except GuardError as e:
            # a module's training flag is the training guard; everything else there is module state
            e.guard = e.guard or ("training" if " training=" in str(e) else "module_state")
            raise
        try:
            self._check_attrs()
        except GuardError as e:
            e.guard = e.guard or "parameters"
            raise

    def _watch_state(self) -> None:
        """Right after :meth:`_check_state` passed: take (or take again) the tags of the fast path."""
        if self.fast is not None:
            self.fast.watch.retake()
        elif state_watch.available():
            self.fast = _FastState.of(self)

    def _check_modules(self) -> None:
        for g in self.modules:
            mod = g.ref()
            if mod is None:  # the model is gone; the graph holds what it needs
                return
            if type(mod) is not g.cls:
                raise GuardError(f"module {g.path!r} is now a {type(mod).__name__}, captured a {g.cls.__name__} "
                                 "(a parametrization or class swap after capture): capture again")
            if mod.training != g.training:
                raise GuardError(f"module {g.path!r} training={mod.training} != captured {g.training}")
            d = mod.__dict__
            if d.keys() != g.keys:
                diff = sorted((set(d) ^ g.keys) - _MODULE_INTERNALS)
                if diff:
                    raise GuardError(f"module {g.path!r} attributes {diff} added or deleted since capture")
            for attr, s in g.instance_attrs:
                v = d.get(attr, _MISSING)
                if s[0] == "v" and type(v) is type(s[1]) and v == s[1]:  # the common case, inline
                    continue
                if not _same(v, s):
                    if s[0] == "id" and v is not _MISSING:  # both would print alike (two equal-looking tensors)
                        raise GuardError(f"module attribute {_attr_path(g.path, attr)!r} is another object than the "
                                         f"one captured ({_short(v)}; the graph holds the one it had then): "
                                         "capture again")
                    raise GuardError(f"module attribute {_attr_path(g.path, attr)!r} = "
                                     f"{_short(d.get(attr, '<missing>'))} != captured {_shown(s)}")
            for attr, s in g.class_attrs:
                v = getattr(mod, attr, _MISSING)
                if not _same(v, s):
                    if s[0] == "id" and v is not _MISSING:
                        raise GuardError(f"class attribute {_attr_path(g.path, attr)!r} ({type(mod).__name__}.{attr}) "
                                         f"is another object than the one captured ({_short(v)}): capture again")
                    raise GuardError(f"class attribute {_attr_path(g.path, attr)!r} "
                                     f"({type(mod).__name__}.{attr}) = {_short(v)} != captured {_shown(s)}")
            if (g.hooks == _NO_HOOKS and (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
                                          or mod._backward_pre_hooks)) \
                    or (g.hooks != _NO_HOOKS and _hook_keys(mod) != g.hooks):
                raise GuardError(f"hooks of module {g.path!r} (forward, forward-pre, backward, backward-pre counts "
                                 f"{tuple(len(h) for h in _hook_keys(mod))}) changed since capture "
                                 f"{tuple(len(h) for h in g.hooks)}: the graph inlined the hooks present then")
            if _tensor_slots(mod) != g.slots:
                was, now = g.slots, _tensor_slots(mod)
                raise GuardError(f"parameters/buffers of module {g.path!r} changed since capture (names "
                                 f"{list(now[0] + now[1])}, None: {list(now[2] + now[3])}; captured "
                                 f"{list(was[0] + was[1])}, None: {list(was[2] + was[3])}): capture again")
            children = mod._modules
            for name, ref in g.children:
                if children.get(name) is not ref():
                    raise GuardError(f"submodule {_attr_path(g.path, name)!r} is now "
                                     f"{type(children.get(name)).__name__}, not the module captured: capture again")
            if len(children) != len(g.children):
                raise GuardError(f"module {g.path!r} has {len(children)} submodules, captured {len(g.children)}")

    def _check_attrs(self) -> None:
        for a in self.attrs:
            if a.owner is not None:
                mod = a.owner()
                if mod is None:
                    continue
                if getattr(mod, a.store).get(a.name, _MISSING) is not a.obj:
                    raise GuardError(f"parameter/buffer {a.target!r} of the model is no longer the tensor "
                                     f"captured (re-assigned, e.g. load_state_dict(assign=True)): capture again "
                                     f"(in-place updates such as load_state_dict() or optimizer steps are fine)")
            o, (dtype, shape, device, requires_grad) = a.obj, a.spec
            if o.dtype is not dtype or o.requires_grad is not requires_grad or o.shape != shape or o.device != device:
                spec = _AttrGuard.spec_of(o)
                names = ("dtype", "shape", "device", "requires_grad")
                diff = ", ".join(f"{n} {g} != captured {w}" for n, g, w in zip(names, spec, a.spec) if g != w)
                raise GuardError(f"parameter/buffer {a.target!r}: {diff}")

    def __str__(self) -> str:
        lines = ["Guards:"]
        for name, (spec, leaf_specs) in self.inputs.items():
            shown = pytree.tree_unflatten([str(s) if isinstance(s, TensorSpec) else s for s in leaf_specs], spec)
            lines.append(f"  input {name!r}: {shown}")
        lines.append(f"  autocast: {self.autocast}")
        lines.append(f"  grad_enabled: {self.grad_enabled}")
        n_train = sum(self.training.values())
        lines.append(f"  training: {n_train}/{len(self.training)} modules in training mode (root {self.root_training})")
        n_attr = sum(len(g.instance_attrs) + len(g.class_attrs) for g in self.modules)
        lines.append(f"  modules: {len(self.modules)} (identity, class, hooks), {n_attr} attributes")
        lines.append(f"  parameters/buffers read by the graph: {len(self.attrs)}; globals: {len(self.globals)}")
        return "\n".join(lines)


def _is_mutable(s: tuple) -> bool:
    """Whether the value a snapshot stands for can change without being rebound (a list, a dict, a set,
    a deque, a plain object, or a tuple holding one): those are compared by content on every call."""
    tag = s[0]
    if tag in ("v", "id", "missing"):
        return False
    if tag == "seq":
        return not issubclass(s[1], tuple) or any(_is_mutable(x) for x in s[2])
    if tag == "set":
        return s[1] is not frozenset
    return True


@dataclass
class _FastState:
    """The per-call fast path of :meth:`Guards.check`: the tags of a :class:`~foldcompile.state_watch.StateWatch`
    (dict versions, classes, registrations, tensor metadata) and what no tag sees, polled on every call:
    mutable attribute values by content, class attributes once per class, the hooks of the modules that
    had hooks at capture. Any of them differing sends the call to the full check (which names the guard)."""

    watch: state_watch.StateWatch
    mutable: list[tuple[torch.nn.Module, str, tuple]]
    class_attrs: list[tuple[torch.nn.Module, str, tuple]]
    hooked: list[tuple[torch.nn.Module, tuple]]

    @classmethod
    def of(cls, guards: "Guards") -> "_FastState | None":
        mods = [g.ref() for g in guards.modules]
        if any(m is None for m in mods):  # the model is gone: no fast path (the full check returns at once)
            return None
        mutable, class_attrs, hooked, seen = [], [], [], set()
        for g, mod in zip(guards.modules, mods):
            mutable += [(mod, attr, s) for attr, s in g.instance_attrs if _is_mutable(s)]
            for attr, s in g.class_attrs:  # one instance per class: the others read the same class attribute
                if (g.cls, attr) not in seen:
                    seen.add((g.cls, attr))
                    class_attrs.append((mod, attr, s))
            if g.hooks != _NO_HOOKS:
                hooked.append((mod, g.hooks))
        tensors = [a.obj for a in guards.attrs]
        return cls(state_watch.StateWatch(mods, tensors), mutable, class_attrs, hooked)

    def holds(self) -> bool:
        """True when nothing the full check reads can have moved since it last passed."""
        if not self.watch.unchanged():
            return False
        for mod, attr, s in self.mutable:
            if not _same(mod.__dict__.get(attr, _MISSING), s):
                return False
        for mod, attr, s in self.class_attrs:
            if not _same(getattr(mod, attr, _MISSING), s):
                return False
        for mod, hooks in self.hooked:
            if _hook_keys(mod) != hooks:
                return False
        return True


def variant_key(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> tuple:
    """A hashable key of what a call of ``model`` would specialise a capture on, to pick a variant:

    per argument of ``forward`` (defaults applied) its pytree structure and, per leaf, a tensor's
    ``(shape, dtype, device, layout, requires_grad, strides)`` or a value by type and value; then the
    grad mode, the autocast state (cpu, cuda) and ``model.training``. Two calls with equal keys may
    still differ in module state, parameters or globals: a variant's own guards (``check``) decide.

        >>> lin = torch.nn.Linear(4, 4)
        >>> key = variant_key(lin, (torch.randn(2, 4),))
        >>> key == variant_key(lin, (torch.randn(2, 4),)), key == variant_key(lin, (torch.randn(3, 4),))
        (True, False)
        >>> with torch.no_grad():
        ...     key == variant_key(lin, (torch.randn(2, 4),))
        False
    """
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **(kwargs or {}))
    except TypeError as e:
        raise GuardError(f"call does not match {type(model).__name__}.forward{signature}: {e}", "signature") from None
    bound.apply_defaults()
    return _key_of(bound, model.training)


def _key_of(bound: inspect.BoundArguments, training: bool) -> tuple:
    parts = []
    for name, value in bound.arguments.items():
        leaves, spec = pytree.tree_flatten(value)
        parts.append((name, str(spec), tuple(_leaf_key(v) for v in leaves)))
    autocast = tuple(sorted((d, e, str(t)) for d, (e, t) in autocast_state().items()))
    return (tuple(parts), torch.is_grad_enabled(), autocast, bool(training))


def _leaf_key(v: Any) -> tuple:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), str(v.dtype), str(v.device), str(v.layout), v.requires_grad, _strides(v))
    try:
        hash(v)
    except TypeError:
        return ("object", type(v).__qualname__, id(v))  # unhashable and opaque: by identity
    # the type too: 1, 1.0 and True are equal and hash alike but specialise differently
    return ("value", type(v).__qualname__, v)


def _fetch(obj: Any, target: str) -> Any:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _short(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"Tensor(shape={tuple(v.shape)}, dtype={v.dtype})"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def install_guards(gm: torch.fx.GraphModule, guards: Guards) -> None:
    """Attach ``guards`` to ``gm`` (``gm.guards``, ``gm.meta["guards"]``) and check them on every call.

    The pre-hook binds each call to the model's signature (filling defaults) and
    passes every argument on, so ``gm(x)`` works where the model's ``forward``
    has defaults for the rest.
    """
    gm.guards = guards
    gm.meta["guards"] = guards
    old = getattr(gm, "_foldcompile_guard_hook", None)
    if old is not None:
        old.remove()

    def _check(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = module.guards.check(args, kwargs, module)
        return bound.args, bound.kwargs

    gm._foldcompile_guard_hook = gm.register_forward_pre_hook(_check, with_kwargs=True)
    # GraphModule.__deepcopy__ rebuilds the module without its forward hooks, which would leave a
    # copy unguarded; fx makes a class per GraphModule instance, so patching it touches only ``gm``
    cls = type(gm)
    if cls.__qualname__.endswith("GraphModuleImpl") and "__deepcopy__" not in cls.__dict__:
        cls.__deepcopy__ = _deepcopy_keeping_guards


def _deepcopy_keeping_guards(self: torch.fx.GraphModule, memo: dict) -> torch.fx.GraphModule:
    res = super(type(self), self).__deepcopy__(memo)
    guards = getattr(self, "guards", None)
    if guards is not None:
        install_guards(res, guards)
    return res


def copy_guards(src: torch.fx.GraphModule, dst: torch.fx.GraphModule) -> None:
    """Carry the guards of ``src`` over to a GraphModule a pass built anew."""
    guards = getattr(src, "guards", None)
    if guards is None:
        raise GuardError("source graph module carries no guards (was it made by foldcompile.capture.trace?)")
    install_guards(dst, guards)
