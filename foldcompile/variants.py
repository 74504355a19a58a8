"""The variant cache of :class:`foldcompile.OptimizedModule`: one compiled graph per call signature.

A captured graph is specialised on what it saw: input shapes, dtypes, devices, strides'
contiguity, grad mode, autocast state and the model's training flag. A call that differs in
any of these needs another graph. :func:`call_key` writes those facts as a
:class:`VariantKey` (named fields, so a miss can say which one differed), and
:class:`VariantCache` keeps up to ``max_variants`` graphs, least recently used evicted
first. Building is bounded too: past ``max_builds`` builds (a model called with ever new
shapes would otherwise recompile forever) the cache warns once and answers
:data:`EAGER` — the caller then runs the user's model itself, unoptimized, which computes
the same function; with ``strict=True`` it raises :class:`VariantLimitError` instead.

    >>> cache = VariantCache(max_variants=2, max_builds=3)
    >>> k1 = VariantKey((("x", ((2, 3), "torch.float32", "cpu", False, True)),), True, (), False)
    >>> cache.get(k1, lambda: "graph for (2, 3)")
    'graph for (2, 3)'
    >>> cache.get(k1, lambda: "never built").startswith("graph")   # a hit
    True
    >>> k2 = VariantKey((("x", ((4, 3), "torch.float32", "cpu", False, True)),), True, (), False)
    >>> cache.get(k2, lambda: "graph for (4, 3)"), cache.misses[-1]
    ('graph for (4, 3)', "input 'x': shape (2, 3) -> (4, 3)")
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = ["VariantKey", "VariantCache", "VariantLimitError", "call_key", "EAGER"]

log = logging.getLogger("foldcompile.variants")

EAGER = object()  # what VariantCache.get answers past its build limit (run the model itself)


class VariantLimitError(RuntimeError):
    """A call needed a new variant past the cache's build limit and the cache is strict."""


@dataclass(frozen=True)
class VariantKey:
    """The facts a captured graph is specialised on, per call.

    ``inputs``: ``(name, spec)`` per bound argument; a tensor's spec is ``(shape, dtype,
    device, requires_grad, contiguous)``, a nested container's the tuple of its leaves'
    specs, any other value its ``repr`` (flags and chunk sizes are specialised on by value).
    """

    inputs: tuple
    grad_enabled: bool
    autocast: tuple  # (device type, dtype) of each enabled autocast
    training: bool

    def diff(self, other: "VariantKey") -> str:
        """Which guard differs from ``other`` (the first one), as one readable line."""
        if self.training != other.training:
            return f"training mode {other.training} -> {self.training}"
        if self.grad_enabled != other.grad_enabled:
            return f"grad mode {other.grad_enabled} -> {self.grad_enabled}"
        if self.autocast != other.autocast:
            return f"autocast {list(other.autocast) or 'off'} -> {list(self.autocast) or 'off'}"
        mine, theirs = dict(self.inputs), dict(other.inputs)
        for name in mine:
            a, b = mine[name], theirs.get(name)
            if a == b:
                continue
            if _is_tensor_spec(a) and _is_tensor_spec(b):
                for i, field in enumerate(("shape", "dtype", "device", "requires_grad", "contiguity")):
                    if a[i] != b[i]:
                        return f"input {name!r}: {field} {b[i]} -> {a[i]}"
            return f"input {name!r}: {b!r} -> {a!r}"
        return "inputs differ"


def _is_tensor_spec(s: Any) -> bool:
    return isinstance(s, tuple) and len(s) == 5 and isinstance(s[0], tuple) and isinstance(s[1], str)


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), str(x.dtype), str(x.device), bool(x.requires_grad), bool(x.is_contiguous()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_spec(v) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple((k, _spec(x[k])) for k in sorted(x, key=str))
    return repr(x)


def _autocast_state() -> tuple:
    state = []
    for dev in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(dev):
                state.append((dev, str(torch.get_autocast_dtype(dev))))
        except (RuntimeError, TypeError, AttributeError):  # device type unknown to this build
            continue
    return tuple(state)


def call_key(bound: Mapping[str, Any], training: bool) -> VariantKey:
    """The key of one call: ``bound`` maps the model's argument names to the values passed."""
    return VariantKey(tuple((k, _spec(v)) for k, v in bound.items()), torch.is_grad_enabled(),
                      _autocast_state(), bool(training))


class VariantCache:
    """Least-recently-used graphs by :class:`VariantKey`, with a bound on builds (module docstring)."""

    def __init__(self, max_variants: int = 8, max_builds: int = 32, strict: bool = False):
        if max_variants < 1 or max_builds < 1:
            raise ValueError("max_variants and max_builds must be >= 1")
        self.max_variants, self.max_builds, self.strict = max_variants, max_builds, strict
        self.entries: OrderedDict[VariantKey, Any] = OrderedDict()
        self.builds = 0
        self.misses: list[str] = []  # why each build happened (which guard differed)
        self._warned = False
        self._last: VariantKey | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: VariantKey, build: Callable[[], Any]) -> Any:
        """The variant for ``key``, built by ``build()`` on a miss; :data:`EAGER` past the build limit."""
        if key in self.entries:
            self.entries.move_to_end(key)
            self._last = key
            return self.entries[key]
        why = "first call" if self._last is None else key.diff(self._last)
        if self.builds >= self.max_builds:
            msg = (f"foldcompile: {self.builds} variants built, the limit (max_builds={self.max_builds}); "
                   f"this call differs by {why}")
            if self.strict:
                raise VariantLimitError(msg + "; raise the limit or keep the guarded facts fixed")
            if not self._warned:
                warnings.warn(msg + ": running the model eagerly (unoptimized) for such calls", stacklevel=3)
                self._warned = True
            return EAGER
        log.info("foldcompile: building a variant (%s)", why)
        self.misses.append(why)
        value = build()
        self.builds += 1
        self.entries[key] = value
        self._last = key
        while len(self.entries) > self.max_variants:
            self.entries.popitem(last=False)
        return value

    def drop(self, key: VariantKey) -> None:
        """Forget the variant of ``key`` (its graph no longer holds, e.g. the model's state changed)."""
        self.entries.pop(key, None)
