"""What a capture specialised on, and the check that runs before every call.

A captured graph is specialised on its example inputs: Python branches on
shapes, dtypes, flags and ``self.training`` were decided once, at capture time,
and chunk loops over tensor sizes were unrolled. Running it on inputs for which
those decisions differ would compute a different function silently, so the
capture records a :class:`Guards` set and installs a forward pre-hook that
checks it on every call, raising :class:`GuardError` that names the failed
guard::

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
  device and layout; everything else (flags, ``None``, numbers, strings,
  nested containers) by structure and value;
- the ``training`` flag of every module of the model and of the graph module;
- plain Python attributes (bool/int/float/str/None) of every submodule, e.g.
  ``chunk_size`` or ``_mask_trans`` flags the code may branch on;
- the autocast state (enabled, dtype) for cpu and cuda, and grad mode.

The hook also binds the call to the model's signature and fills in defaults,
so the graph module accepts the same calls as the model (``gm(x)`` with
``mask=None`` defaulted). A pass that builds a new GraphModule must carry the
guards over with :func:`install_guards` (or :func:`copy_guards`).
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch.utils import _pytree as pytree

__all__ = ["GuardError", "Guards", "TensorSpec", "install_guards", "copy_guards", "autocast_state"]

_PRIMITIVES = (bool, int, float, str, type(None), torch.dtype, torch.device)
_AUTOCAST_DEVICES = ("cpu", "cuda")
# nn.Module's own bookkeeping (hooks, training flag, ...): not model configuration
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) | {"_compiled_call_impl", "_is_full_backward_hook"}


class GuardError(RuntimeError):
    """A captured graph was called where one of its capture-time assumptions does not hold."""


@dataclass(frozen=True)
class TensorSpec:
    """The properties of an input tensor that the capture specialised on."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    layout: torch.layout

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(int(s) for s in t.shape), t.dtype, t.device, t.layout)

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
        return None

    def __str__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    """``{device_type: (enabled, dtype)}`` of the ambient autocast for cpu and cuda."""
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES}


def _leaf_spec(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorSpec.of(v)
    return v


def _module_attrs(model: torch.nn.Module) -> dict[str, Any]:
    """Plain Python attributes of every submodule: the flags code may branch on."""
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


@dataclass
class Guards:
    """Everything a capture specialised on; :meth:`check` raises :class:`GuardError` on a mismatch.

    ``signature`` is the model's ``forward`` signature (without ``self``);
    ``inputs`` maps each argument name to its pytree structure and leaf specs
    (:class:`TensorSpec` for tensors, the value itself otherwise).
    """

    signature: inspect.Signature
    inputs: dict[str, tuple[Any, list[Any]]]
    training: dict[str, bool]
    module_attrs: dict[str, Any]
    autocast: dict[str, tuple[bool, torch.dtype]]
    grad_enabled: bool
    model_ref: Callable[[], torch.nn.Module | None] | None = field(default=None, repr=False, compare=False)
    root_training: bool = True

    @classmethod
    def record(cls, model: torch.nn.Module, bound: inspect.BoundArguments) -> "Guards":
        """Record the guards of a capture of ``model`` on the (defaults-applied) ``bound`` arguments."""
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
        )

    def bind(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        """Bind a call to the model's signature with defaults applied; a bad call is a GuardError."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise GuardError(f"call does not match the captured signature {self.signature}: {e}") from None
        bound.apply_defaults()
        return bound

    def check(self, args: tuple, kwargs: dict, graph_module: torch.nn.Module | None = None) -> inspect.BoundArguments:
        """Check a call against every guard; return the bound arguments or raise GuardError."""
        bound = self.bind(args, kwargs)
        for name, (spec, leaf_specs) in self.inputs.items():
            value = bound.arguments[name]
            leaves, got_spec = pytree.tree_flatten(value)
            if got_spec != spec:
                raise GuardError(
                    f"input {name!r} structure {_short(value)} != captured {pytree.tree_unflatten(leaf_specs, spec)!r}"
                )
            for i, (leaf, want) in enumerate(zip(leaves, leaf_specs)):
                where = f"input {name!r}" + (f" leaf {i}" if len(leaves) > 1 else "")
                if isinstance(want, TensorSpec):
                    if not isinstance(leaf, torch.Tensor):
                        raise GuardError(f"{where} is {_short(leaf)}, captured a tensor {want}")
                    why = want.mismatch(leaf)
                    if why:
                        raise GuardError(f"{where} {why}")
                else:
                    if isinstance(leaf, torch.Tensor) or type(leaf) is not type(want) or leaf != want:
                        raise GuardError(f"{where} = {_short(leaf)} != captured {want!r}")
        state = autocast_state()
        for dev, want in self.autocast.items():
            if state[dev] != want:
                raise GuardError(
                    f"autocast({dev!r}) (enabled, dtype) = {state[dev]} != captured {want}; "
                    "capture again under the autocast state you run in"
                )
        if torch.is_grad_enabled() != self.grad_enabled:
            raise GuardError(f"grad mode {torch.is_grad_enabled()} != captured {self.grad_enabled}")
        if graph_module is not None and graph_module.training != self.root_training:
            raise GuardError(
                f"graph module training={graph_module.training} != captured {self.root_training}; "
                "capture again after model.train()/model.eval()"
            )
        model = self.model_ref() if self.model_ref is not None else None
        if model is not None:
            for mod_name, flag in _training_flags(model).items():
                if self.training.get(mod_name, flag) != flag:
                    raise GuardError(f"module {mod_name!r} training={flag} != captured {self.training[mod_name]}")
            for attr, value in _module_attrs(model).items():
                if attr in self.module_attrs and (
                    type(value) is not type(self.module_attrs[attr]) or value != self.module_attrs[attr]
                ):
                    raise GuardError(f"module attribute {attr!r} = {value!r} != captured {self.module_attrs[attr]!r}")
        return bound

    def __str__(self) -> str:
        lines = ["Guards:"]
        for name, (spec, leaf_specs) in self.inputs.items():
            shown = pytree.tree_unflatten([str(s) if isinstance(s, TensorSpec) else s for s in leaf_specs], spec)
            lines.append(f"  input {name!r}: {shown}")
        lines.append(f"  autocast: {self.autocast}")
        lines.append(f"  grad_enabled: {self.grad_enabled}")
        n_train = sum(self.training.values())
        lines.append(f"  training: {n_train}/{len(self.training)} modules in training mode (root {self.root_training})")
        lines.append(f"  module attributes: {len(self.module_attrs)} plain values")
        return "\n".join(lines)


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


def copy_guards(src: torch.fx.GraphModule, dst: torch.fx.GraphModule) -> None:
    """Carry the guards of ``src`` over to a GraphModule a pass built anew."""
    guards = getattr(src, "guards", None)
    if guards is None:
        raise GuardError("source graph module carries no guards (was it made by foldcompile.capture.trace?)")
    install_guards(dst, guards)
