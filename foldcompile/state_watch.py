"""Has anything the guards read moved since they last passed? A per-call test costing a few C-level loops.

The full module-state check of :class:`foldcompile.guards.Guards` walks every submodule's
attributes, hooks, children and every parameter the graph reads: about 7 ms a call for a
48-block Evoformer stack. Between two calls nothing usually changes, so
:class:`StateWatch` records, right after a full check passed, cheap *tags* of everything
that check reads, and a call re-runs the full check only where a tag moved:

- **dict version tags** (CPython's ``ma_version_tag``, read through
  ``torch._C._dynamo.guards.dict_version``, which Dynamo's own guards use): a dict's tag
  changes on every insertion, deletion and replacement of a value, however it is written
  (``setattr``, ``vars(m)[k] = v``, ``object.__setattr__``, ``m._parameters[k] = p``). Tagged:
  every module's ``__dict__`` (read afresh each call, so a replaced ``__dict__`` shows too:
  plain attributes, ``training``, the hook/parameter dicts themselves), the ``_parameters``
  and ``_buffers`` dicts that hold something and the ``_modules`` dict of every module with
  children and of every torch container (``ModuleList.insert`` writes it directly);
- **counters of registrations**: dicts that were empty at capture (a leaf's ``_modules``, a
  module's hooks) are not tagged; what can fill them is counted instead: every hook handle
  torch creates (``torch.utils.hooks.RemovableHandle.next_id``) and every parameter, buffer
  and submodule registration (torch's global registration hooks, one counter);
- **module classes** (``m.__class__ = ...``, as parametrizations do), by identity;
- **tensor metadata** of every parameter, buffer and constant the graph reads (dtype, shape,
  strides, device, ``requires_grad``: ``.data =``, ``requires_grad_()`` and ``model.double()``
  change it in place, touching no dict), by Dynamo's C++ tensor check where this torch has
  it, else by one tuple per tensor.

What no tag can see is checked on every call as before (the caller does it): mutable values
(lists, dicts, plain config objects, deques and sets) by content, class attributes once per
class, the hooks of modules that had hooks at capture, and globals.

Not seen (as by the full check, or by nothing): a hook written into a module's hook dict
without ``register_*_hook`` (no handle), a parameter, buffer or submodule written directly
into a dict that was empty at capture (not through ``register_*`` or ``setattr``).

    >>> lin = torch.nn.Linear(4, 4)
    >>> watch = StateWatch([lin], [lin.weight, lin.bias])
    >>> watch.unchanged()
    True
    >>> lin.weight.requires_grad_(False)
    Parameter containing:...
    >>> watch.unchanged()
    False
    >>> watch = StateWatch([lin], [lin.weight, lin.bias]); lin.tag = 1; watch.unchanged()
    False
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.nn.modules import module as _nn_module
from torch.utils.hooks import RemovableHandle

__all__ = ["StateWatch", "available"]

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict,
               torch.nn.ParameterList, torch.nn.ParameterDict)
# the instance-dict slot itself (a user class's __dict__ property cannot hide the real one), read a little
# faster than by attribute lookup
_get_dict = torch.nn.Module.__dict__["__dict__"].__get__
_tensor_spec = operator.attrgetter("dtype", "shape", "device", "requires_grad", "layout")


def _probe_dict_version() -> Callable[[dict], int] | None:
    """Dynamo's reader of a dict's version tag, if it exists here and changes on every kind of write."""
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:
        return None
    try:
        class _Probe:
            pass

        d: dict = {}
        seen = [dict_version(d)]
        d["a"] = 1
        seen.append(dict_version(d))
        d["a"] = 2
        seen.append(dict_version(d))
        del d["a"]
        seen.append(dict_version(d))
        p = _Probe()
        p.x = 1
        v = dict_version(p.__dict__)
        object.__setattr__(p, "x", 2)
        if dict_version(p.__dict__) == v or len(set(seen)) != len(seen):
            return None
        if dict_version(dict(d)) == dict_version(d):  # a copy (a replaced __dict__) must read differently
            return None
    except Exception:  # a build where the reader misbehaves: no fast path
        return None
    return dict_version


def _probe_tensor_check() -> Callable[[Sequence[torch.Tensor]], Callable[..., bool]] | None:
    """A builder of Dynamo's C++ check of many tensors' dtype, device, requires_grad, sizes and
    strides (``TensorGuards``), if it exists here and behaves; else None (the tuple fallback)."""
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:
        return None

    def build(tensors: Sequence[torch.Tensor]) -> Callable[..., bool]:
        check = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                             dynamic_dims_strides=[list(t.stride()) for t in tensors]).check
        return check

    try:
        t = torch.nn.Parameter(torch.zeros(2, 3))
        check = build([t])
        ok = check(t)
        t.requires_grad_(False)
        caught_grad = not check(t)
        t.requires_grad_(True)
        t.data = torch.zeros(3, 2)
        caught_shape = not check(t)
        t.data = torch.zeros(2, 3, dtype=torch.float64)
        caught_dtype = not check(t)
        if not (ok and caught_grad and caught_shape and caught_dtype):
            return None
    except Exception:  # a build whose TensorGuards takes other arguments: the fallback
        return None
    return build


_dict_version = _probe_dict_version()
_tensor_check_builder = _probe_tensor_check()


def available() -> bool:
    """Whether this torch build gives the dict version tags the fast path needs (else every call
    runs the full check)."""
    return _dict_version is not None


# ------------------------------------------------------------------ registration counter
#
# torch's global registration hooks run on every register_parameter / register_buffer /
# register_module (and the setattr paths that call them), process-wide. One counter for all.

_registrations = 0


def _count_registration(*_args: Any) -> None:
    global _registrations
    # a forward that makes modules (``self.blocks[:2]`` builds a ModuleList) runs this hook while Dynamo
    # traces it: counting there would be a side effect of the forward, and a graph registers nothing
    if torch.compiler.is_compiling():
        return
    _registrations += 1


_registration_hooks_installed = False


def _install_registration_hooks() -> None:
    global _registration_hooks_installed
    if _registration_hooks_installed:
        return
    for name in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
                 "register_module_module_registration_hook"):
        register = getattr(_nn_module, name, None)
        if register is None:  # a torch without them: registrations into empty dicts go unseen
            continue
        register(_count_registration)
    _registration_hooks_installed = True


class StateWatch:
    """Tags of ``modules`` and ``tensors`` taken now; :meth:`unchanged` is True while none moved.

    Take it right after a full check passed: "unchanged" then means "still as the full check saw it".
    """

    def __init__(self, modules: Iterable[torch.nn.Module], tensors: Iterable[torch.Tensor]):
        if _dict_version is None:
            raise RuntimeError("this torch build has no dict version tags (torch._C._dynamo.guards.dict_version)")
        _install_registration_hooks()
        self.modules = list(modules)
        self.tensors = list(tensors)
        self.full_checks = 0  # how often a moved tag sent a call to the full check (for tests and reports)
        self._take()

    def _take(self) -> None:
        self.classes = list(map(type, self.modules))
        # the dicts that held something (a deletion or replacement there matters) and every container's
        # children; taken afresh each time (a module's dicts may have been replaced since)
        tagged = []
        for m in self.modules:
            if m._parameters:
                tagged.append(m._parameters)
            if m._buffers:
                tagged.append(m._buffers)
            if m._modules or isinstance(m, _CONTAINERS):
                tagged.append(m._modules)
        self.tagged = tagged
        self.module_tags = list(map(_dict_version, map(_get_dict, self.modules)))
        self.dict_tags = list(map(_dict_version, self.tagged))
        self.handles = RemovableHandle.next_id
        self.registrations = _registrations
        if _tensor_check_builder is not None:
            self._tensor_ok = _tensor_check_builder(self.tensors) if self.tensors else (lambda: True)
        else:
            self._specs = list(map(_tensor_spec, self.tensors))
            self._tensor_ok = lambda *ts: list(map(_tensor_spec, ts)) == self._specs

    def unchanged(self) -> bool:
        """True when no tag moved since the watch was taken (or last :meth:`retake`)."""
        return (RemovableHandle.next_id == self.handles
                and _registrations == self.registrations
                and list(map(type, self.modules)) == self.classes
                and list(map(_dict_version, map(_get_dict, self.modules))) == self.module_tags
                and list(map(_dict_version, self.tagged)) == self.dict_tags
                and self._tensor_ok(*self.tensors))

    def retake(self) -> None:
        """Take the tags again (after a full check passed on the moved state)."""
        self.full_checks += 1
        self._take()
