"""The CUDA-graph executor: a static-shape variant's forward and backward replayed as CUDA graphs.

A variant is specialised on its inputs' shapes, dtypes and devices, so its kernels, their
grids and their memory are the same on every call: one ``cudaGraphLaunch`` can replace the
hundreds of launches (and their Python) of a forward, and another those of its backward.

How a call runs:

1. The first call runs eagerly and is watched: the kernels compile and autotune on it, and
   a forward that writes one of its inputs or a parameter/buffer in place is refused (a
   graph would write its own copy of an input; a buffer update would be repeated by the
   warm-up). The executor then runs eagerly for good, and says why.
2. The second call captures: the inputs are copied into static buffers (the graph reads
   those addresses), one forward and backward run eagerly on the capture stream (nothing
   left to compile or autotune inside the capture, and no host synchronisation there), then
   the forward is captured and, when the call needs gradients, the backward too: the
   gradients of every input that requires one and of every parameter, written by the
   graph into one buffer per dtype. Both graphs share one private memory pool.
3. Every call from then on copies its inputs into the static buffers and replays. Outputs
   are cloned out of the pool before they are returned, and so are gradients (one copy of
   each per-dtype buffer), so nothing the caller holds is overwritten by the next replay:
   gradient accumulation over micro-batches, outputs fed back in as inputs (AlphaFold's
   recycling), optimizer steps between calls all see what eager would give.

Autograd: a forward under grad mode returns outputs whose ``grad_fn`` replays the backward
graph. The pool holds that forward's saved activations until its backward ran (or its outputs
were dropped): a second forward before that backward (two micro-batches forwarded, one loss)
captures a second graph pair with its own pool (``max_slots`` of them, then calls run
eagerly, logged), never overwriting a pending forward's state. A second backward through the
same forward (``retain_graph=True``), or a parameter changed in place between a forward and
its backward (eager would refuse saved tensors changed in place too), raises a RuntimeError;
a parameter whose ``.data`` was replaced (another address) makes the executor capture again
(``max_recaptures``, then eagerly).

Randomness: torch's own random ops (dropout, ``bernoulli``) draw from the CUDA generator's
graph-safe Philox state: each replay advances the offset, so every replay draws new masks
(not the masks an eager run would draw). Our generated element-wise kernels draw their dropout
masks from a device state (``draw_dropout_seed``: ``torch.randint`` on the device, loaded by the
kernel), so they are graph-safe too: no seed is read on the host. Refused before the first call
(:func:`cuda_graph_unsafe_reason`): host synchronisations in the graph, activation
checkpointing around random ops (the recomputation's RNG replay is not checked under graphs)
and autocast with its weight cache on. A capture that fails for any other reason is caught:
the variant runs eagerly and the reason is in ``describe()``.

Tensors made from Python data (``x.new_tensor([1e8])``, ``torch.tensor([...], device=...)``):
building one copies host memory to the device, which a capture cannot hold. Such a node reads
nothing but literals and its arguments' dtypes and devices, which the variant fixes: it is
made once, before the capture, and every call then clones that tensor on the device
(:func:`hoist_host_literals`), so a caller still gets a fresh tensor of the same values.

Memory: each pool keeps its forward's and backward's working memory between calls (that is
what makes replays possible); the warm-up's cached blocks are returned (``empty_cache``)
after each capture.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from foldcompile.executors.base import Executor, graph_tensors
from foldcompile.passes.registry import (draws_random, enters_autocast, exits_autocast, host_data_position, op_name,
                                         reads_device_on_host, writes_in_place)

__all__ = ["CudaGraphExecutor", "CudaGraphCapture", "cuda_graph_unsafe_reason", "hoist_host_literals"]

log = logging.getLogger("foldcompile.executors.cuda_graph")

_CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint

def _subgraphs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.fx.GraphModule]:
    out = []
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            obj: Any = gm
            for part in a.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.fx.GraphModule):
                out.append(obj)
    return out


def cuda_graph_unsafe_reason(gm: torch.fx.GraphModule) -> str | None:
    """Why replaying ``gm`` as a CUDA graph would not compute what running it computes, or None.

    >>> import torch
    >>> cuda_graph_unsafe_reason(torch.fx.symbolic_trace(lambda x: torch.nn.functional.dropout(x, 0.1) * 2)) is None
    True
    >>> print(cuda_graph_unsafe_reason(torch.fx.symbolic_trace(lambda x: x * x.sum().item())))
    node 'item' (item) reads a device value on the host, which a CUDA graph cannot replay
    """
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if reads_device_on_host(node):
            return (f"node {node.name!r} ({op_name(node)}) reads a device value on the host, which a CUDA graph "
                    "cannot replay")
        if node.target is torch.utils.checkpoint.checkpoint or node.target is _CHECKPOINT_HOP:
            for body in _subgraphs(gm, node):
                # torch's random ops are graph-safe; inside a checkpointed region the recomputation
                # replays the RNG state, which is not checked under CUDA graphs
                random = [n for n in body.graph.nodes if n.op in ("call_function", "call_method") and draws_random(n)]
                if random:
                    return (f"node {node.name!r}: activation checkpointing around a random op "
                            f"({op_name(random[0])}): the recomputation's RNG replay is not checked under CUDA graphs")
        for body in _subgraphs(gm, node):
            why = cuda_graph_unsafe_reason(body)
            if why:
                return why
    cached = _runs_under_cached_autocast(gm)
    if cached is not None:
        return (f"node {cached.name!r} ({op_name(cached)}) runs under autocast with its weight cache on: cached casts "
                "made before a capture would be read by every replay after they are freed "
                "(torch.autocast(..., cache_enabled=False) is graph-safe)")
    return None


class _HostLiteral:
    """A graph node's ``fn(*args, **kwargs)`` whose data are Python literals, made once per
    (dtype, device) of its tensor arguments and cloned on the device at every later call."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__name__ = f"host_literal_{getattr(fn, '__name__', 'tensor')}"
        self.made: dict[tuple, torch.Tensor] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = tuple((a.dtype, a.device) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor))
        made = self.made.get(key)
        if made is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return self.fn(*args, **kwargs)  # not made before the capture: let it fail as it would
            with torch.no_grad():
                made = self.made[key] = self.fn(*args, **kwargs)
        return made.clone()


def hoist_host_literals(gm: torch.fx.GraphModule) -> int:
    """Rewrite, in place, every node of ``gm`` that builds a tensor from Python data alone
    (``x.new_tensor([1e8])``, ``torch.tensor([0.5], device=d)``) into a call that makes it once per
    dtype and device and clones it on the device afterwards (module docstring); returns how many.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(lambda x: x * x.new_tensor([2.0]))
    >>> hoist_host_literals(gm), gm(torch.ones(2)).tolist()
    (1, [2.0, 2.0])
    >>> hoist_host_literals(torch.fx.symbolic_trace(lambda x, y: x.new_tensor(y)))  # data from an input
    0
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":  # a checkpoint body, or another graph the node calls
            obj: Any = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.fx.GraphModule):
                count += hoist_host_literals(obj)
            continue
        fn = getattr(torch.Tensor, str(node.target), None) if node.op == "call_method" else node.target
        position = host_data_position(fn) if node.op in ("call_function", "call_method") else None
        if position is None:
            continue
        data = node.args[position] if len(node.args) > position else node.kwargs.get("data")
        from_literals = data is not None and not any(isinstance(a, (torch.fx.Node, torch.Tensor))
                                                     for a in pytree.tree_leaves(data))
        if not from_literals or node.kwargs.get("requires_grad") \
                or any(isinstance(a, torch.fx.Node) for a in pytree.tree_leaves(dict(node.kwargs))):
            continue
        node.op, node.target = "call_function", _HostLiteral(fn)
        count += 1
    if count:
        gm.recompile()
    return count


def _runs_under_cached_autocast(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The first op of ``gm`` that runs under an enabled autocast whose weight cache is on, or None.

    The state starts from the caller's (ambient) autocast and follows the graph's own
    ``_enter_autocast`` / ``_exit_autocast`` nodes: a graph whose casts were made explicit
    (:mod:`foldcompile.passes.explicit_autocast`) runs its ops inside ``autocast(enabled=False)``,
    so no cast of it is cached whatever the caller's autocast."""
    enabled = {d: torch.is_autocast_enabled(d) for d in ("cuda", "cpu")}
    cache = torch.is_autocast_cache_enabled()
    stack: list[tuple[dict[str, bool], bool]] = []
    for node in gm.graph.nodes:
        if enters_autocast(node):
            device, _dtype, on, cache_on = (list(node.args) + [None] * 4)[:4]
            on = node.kwargs.get("enabled", on)
            cache_on = node.kwargs.get("cache_enabled", cache_on)
            stack.append((dict(enabled), cache))
            if not isinstance(device, str) or not isinstance(on, bool) or device not in enabled:
                return node  # a region the executor cannot read: assume the worst
            enabled[device] = on
            if isinstance(cache_on, bool):
                cache = cache_on
        elif exits_autocast(node):
            if stack:
                enabled, cache = stack.pop()
        elif node.op in ("call_function", "call_method") and cache and any(enabled.values()):
            return node
    return None


class _Pending:
    """One forward replay whose backward has not run yet: its slot's pool holds its saved state."""

    __slots__ = ("done", "__weakref__")

    def __init__(self) -> None:
        self.done = False


@dataclass
class _Slot:
    """One captured forward (and backward) with its static inputs, outputs and private pool."""

    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph | None
    static_inputs: list[torch.Tensor]  # per tensor leaf of the call
    out_leaves: list[Any]  # the graph's flattened outputs (tensors static, other leaves as captured)
    out_spec: Any
    out_tensors: list[int]  # positions of the tensors among out_leaves
    differentiable: list[int]  # indices into out_tensors of the outputs the backward takes gradients of
    static_grad_outputs: list[torch.Tensor]
    grad_of_input: list[int | None]  # per Function input (tensor leaves, then params): index into the targets
    flats: list[tuple[torch.Tensor, list[int], list[tuple[int, ...]], list[int]]]  # per dtype: buffer, numels,
    #                                                                                shapes, target indices
    n_targets: int
    addresses: list[int]  # data pointers of the parameters/buffers the graphs read, at capture
    owner: Any = None  # weakref to the _Pending forward whose state the pool holds

    def busy(self) -> bool:
        if self.owner is None:
            return False
        token = self.owner()
        return token is not None and not token.done

    def load(self, tensors: list[torch.Tensor]) -> None:
        for static, x in zip(self.static_inputs, tensors):
            if static.data_ptr() != x.data_ptr():
                static.copy_(x)

    def outputs(self) -> list[torch.Tensor]:
        return [self.out_leaves[i].clone() for i in self.out_tensors]

    def unflatten(self, tensors: list[torch.Tensor]) -> Any:
        leaves = list(self.out_leaves)
        for i, t in zip(self.out_tensors, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.out_spec)

    def gradients(self) -> list[torch.Tensor | None]:
        """Fresh copies of the backward graph's gradients, one per Function input (None where none)."""
        by_target: list[torch.Tensor | None] = [None] * self.n_targets
        for flat, numels, shapes, targets in self.flats:
            pieces = flat.clone().split(numels)
            for piece, shape, t in zip(pieces, shapes, targets):
                by_target[t] = piece.view(shape)
        return [None if t is None else by_target[t] for t in self.grad_of_input]


class _Replay(torch.autograd.Function):
    """Forward: copy the inputs in, replay, clone the outputs out. Backward: copy the upstream
    gradients in, replay the backward graph, clone the gradients out."""

    @staticmethod
    def forward(ctx: Any, slot: _Slot, executor: "CudaGraphExecutor", *tensors: torch.Tensor) -> tuple:
        slot.load(list(tensors[:len(slot.static_inputs)]))
        slot.fwd.replay()
        executor.replays += 1
        outs = slot.outputs()
        token = _Pending()
        slot.owner = weakref.ref(token)
        ctx.slot, ctx.token, ctx.executor = slot, token, executor
        ctx.versions = [(t._version, t.data_ptr()) for _, t in executor.params]
        not_differentiable = [o for k, o in enumerate(outs) if k not in slot.differentiable]
        if not_differentiable:
            ctx.mark_non_differentiable(*not_differentiable)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        slot, token, executor = ctx.slot, ctx.token, ctx.executor
        if token.done:
            raise RuntimeError("foldcompile (executor='cuda_graph'): backward ran twice through one forward "
                               "(retain_graph=True); the backward graph's memory no longer holds that forward's "
                               "state. Use executor='eager' for double backward passes.")
        if slot.owner is None or slot.owner() is not token:
            raise RuntimeError("foldcompile (executor='cuda_graph'): internal error, a pending forward's graph "
                               "memory was given to another call")
        token.done = True
        for (name, t), (version, ptr) in zip(executor.params, ctx.versions):
            if t._version != version or t.data_ptr() != ptr:
                raise RuntimeError(f"foldcompile (executor='cuda_graph'): parameter {name!r} was modified between "
                                   "this forward and its backward (an optimizer step in between?); the backward "
                                   "graph would read its new values. Eager refuses saved tensors modified in place "
                                   "too: run backward before changing parameters.")
        for static, k in zip(slot.static_grad_outputs, slot.differentiable):
            static.copy_(grads[k])
        slot.bwd.replay()
        return (None, None, *slot.gradients())


class CudaGraphExecutor(Executor):
    """Replays a static-shape variant as CUDA graphs (module docstring); eager where it cannot."""

    kind = "cuda_graph"

    def __init__(self, graph: torch.fx.GraphModule, *, requested: str, reason: str, max_slots: int = 3,
                 max_recaptures: int = 2, capture: "CudaGraphCapture | None" = None):
        super().__init__(graph, requested=requested, reason=reason)
        self.capture = capture if capture is not None else CudaGraphCapture()
        self.max_slots, self.max_recaptures = max_slots, max_recaptures
        self.tensors = graph_tensors(graph)  # read by address by the captured graphs
        self.host_literals = hoist_host_literals(graph)  # made before any capture (module docstring)
        self.params = [(n, t) for n, t in self.tensors if t.requires_grad]
        self.fallback: str | None = None  # why every call now runs eagerly
        self.observed = False  # the first call ran eagerly, watched (module docstring)
        self.captures = 0
        self.recaptures = 0
        self.replays = 0
        self.eager_calls = 0  # calls run eagerly while graphs exist (every slot busy)
        self._slots: list[_Slot] = []

    @property
    def name(self) -> str:
        return "eager" if self.fallback else self.kind

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.fallback:
            d["reason"] = f"{self.reason}; fell back to eager: {self.fallback}"
        slots = self._slots
        d.update(captures=self.captures, replays=self.replays, graphs=len(slots),
                 backward_graphs=sum(1 for s in slots if s.bwd is not None), eager_calls=self.eager_calls)
        return d

    def give_up(self, why: str) -> None:
        """Run every call eagerly from now on (``why`` goes into :meth:`describe`)."""
        self.fallback = why
        self._slots = []
        log.warning("foldcompile: CUDA graphs off for this variant: %s", why)

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        if self.fallback:
            return self._eager(args, kwargs)
        args, kwargs = self._bind(args, kwargs)
        if not self.observed:
            return self._observe(args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        current = [t.data_ptr() for _, t in self.tensors]
        stale = [s for s in self._slots if s.addresses != current]
        if stale:
            # parameters moved (``p.data = ...``): graphs captured before read the old memory. They are
            # never replayed again; one with a pending backward stays until it ran (that backward then
            # refuses, as the parameter changed since its forward)
            self._slots = [s for s in self._slots if s.addresses == current or s.busy()]
            if not any(s.addresses == current for s in self._slots):
                moved = [n for (n, t), p in zip(self.tensors, stale[0].addresses) if t.data_ptr() != p]
                self.recaptures += 1
                if self.recaptures > self.max_recaptures:
                    self.give_up(f"parameters/buffers moved to new memory {self.recaptures} times "
                                 f"({', '.join(moved[:3])})")
                    return self._eager(args, kwargs)
                log.info("foldcompile: %s moved to new memory: capturing again", ", ".join(moved[:3]))
        slot = next((s for s in self._slots if s.addresses == current and not s.busy()), None)
        if slot is None:
            if len(self._slots) >= self.max_slots:
                self.eager_calls += 1
                log.info("foldcompile: all %d CUDA-graph slots hold a forward whose backward has not run: this "
                         "call runs eagerly", len(self._slots))
                return self._eager(args, kwargs)
            try:
                slot = self._capture(args, kwargs, leaves, spec)
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly, say why
                log.debug("foldcompile: CUDA-graph capture failed", exc_info=True)
                self.give_up(f"capture failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
                return self._eager(args, kwargs)
        return self._replay(slot, leaves)

    # -- internals ------------------------------------------------------------------------

    def _observe(self, args: tuple, kwargs: dict) -> Any:
        """The first call, eagerly: kernels compile and autotune; in-place writes to what a graph would
        read by address or copy are found."""
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        watched = [(f"input {i}", t) for i, t in enumerate(leaves)] + self.tensors
        unwatchable = [n for n, t in watched if t.is_inference()]  # inference tensors have no version counter
        watched = [(n, t) for n, t in watched if not t.is_inference()]
        before = [t._version for _, t in watched]
        out = self._eager(args, kwargs)
        self.observed = True
        written = [n for (n, t), v in zip(watched, before) if t._version != v]
        if not written and unwatchable and any(writes_in_place(n) for n in self.graph.graph.nodes):
            written = [f"{unwatchable[0]} (an inference tensor, whose writes cannot be watched) or another tensor"]
        if written:
            self.give_up(f"the forward writes {', '.join(written[:3])} in place (a graph would write its static "
                         "copy, or repeat the write in its warm-up)")
        return out

    def _replay(self, slot: _Slot, leaves: list[Any]) -> Any:
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if slot.bwd is None:
            slot.load(tensors)
            slot.fwd.replay()
            self.replays += 1
            return slot.unflatten(slot.outputs())
        outs = _Replay.apply(slot, self, *tensors, *[t for _, t in self.params])
        return slot.unflatten(list(outs))

    def _capture(self, args: tuple, kwargs: dict, leaves: list[Any], spec: Any) -> _Slot:
        positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        devices = {leaves[i].device for i in positions} | {t.device for _, t in self.tensors}
        capture = self.capture
        device = capture.device_of(devices)
        with capture.on(device):
            # plain tensors even under inference_mode: later calls outside it copy into them; no_grad
            # inside, as inference_mode(False) turns grad mode on (a static input must be a leaf)
            with torch.inference_mode(False), torch.no_grad():
                statics = [torch.empty_like(leaves[i]).copy_(leaves[i]) for i in positions]
            for s, i in zip(statics, positions):
                if _layout(s) != _layout(leaves[i]):  # an expanded or overlapping view: a copy cannot keep it
                    raise RuntimeError(f"input leaf {i} has strides {tuple(leaves[i].stride())} of no dense tensor: "
                                       "a static copy cannot keep its layout (pass it contiguous)")
                s.requires_grad_(leaves[i].requires_grad)
            static_leaves = list(leaves)
            for s, i in zip(statics, positions):
                static_leaves[i] = s
            s_args, s_kwargs = pytree.tree_unflatten(static_leaves, spec)
            # the captured graphs differentiate detached aliases of the parameters (the same memory), not
            # the parameters themselves: a parameter's AccumulateGrad node is created on the stream that
            # first needed it and kept alive by any pending forward (a second forward before one
            # backward, recycling), and the engine syncing with it from the capture stream invalidates the
            # capture ("operation would make the legacy stream depend on a capturing blocking stream",
            # seen on an H200). The replay's autograd Function hands these gradients to the parameters.
            with torch.inference_mode(False), torch.no_grad():
                aliases = {n: t.detach().requires_grad_(t.requires_grad) for n, t in self.tensors}
            params = [aliases[n] for n, _ in self.params]
            targets = [s for s in statics if s.requires_grad] + params
            grad_mode = torch.is_grad_enabled()
            latest: dict[str, list[torch.Tensor]] = {}  # the differentiable outputs of the forward in the pool

            def forward() -> Any:
                out = torch.func.functional_call(self.graph, aliases, s_args, s_kwargs)
                latest["diff"] = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
                return out

            def backward() -> list:
                # every gradient written into one buffer per dtype, so that cloning them out of the
                # pool after a replay is one copy per dtype
                grads = torch.autograd.grad(latest["diff"], targets, static_grads, allow_unused=True)
                return _flatten_by_dtype(grads)

            def warm_up() -> None:  # one eager forward and backward: compiled, autotuned, lazily initialised
                forward()
                if grad_mode and latest["diff"] and targets:
                    torch.autograd.grad(latest["diff"], targets, [torch.zeros_like(o) for o in latest["diff"]],
                                        allow_unused=True)
                latest.clear()

            capture.warm_up(warm_up)
            pool = capture.new_pool()
            fwd, out = capture.capture(forward, pool)
            out_leaves, out_spec = pytree.tree_flatten(out)
            out_tensors = [i for i, o in enumerate(out_leaves) if isinstance(o, torch.Tensor)]
            differentiable = [k for k, i in enumerate(out_tensors) if out_leaves[i].requires_grad]
            bwd, static_grads, flats = None, [], []
            grad_of_input: list[int | None] = []
            if grad_mode and differentiable and targets:
                static_grads = [torch.empty_like(o) for o in latest["diff"]]
                bwd, flats = capture.capture(backward, pool)
                target_of = {id(t): j for j, t in enumerate(targets)}
                grad_of_input = [target_of.get(id(t)) for t in statics + params]
            capture.finish()
        # the static outputs keep their memory, not the capture's autograd graph
        out_leaves = [o.detach() if isinstance(o, torch.Tensor) else o for o in out_leaves]
        slot = _Slot(fwd, bwd, statics, out_leaves, out_spec, out_tensors, differentiable, static_grads,
                     grad_of_input, flats, len(targets), [t.data_ptr() for _, t in self.tensors])
        self._slots.append(slot)
        self.captures += 1
        log.info("foldcompile: captured CUDA graph %d (forward%s)", self.captures, " and backward" if bwd else "")
        return slot


class CudaGraphCapture:
    """How :class:`CudaGraphExecutor` captures: CUDA graphs on one side stream per executor, one private
    memory pool per slot (its forward and backward graphs share it). A seam: the CPU tests give the
    executor a capture that records a replayable closure instead, to check its bookkeeping."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None

    def device_of(self, devices: set[torch.device]) -> torch.device:
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise RuntimeError(f"a CUDA graph needs every tensor on one CUDA device, got {sorted(map(str, devices))}")
        return next(iter(devices))

    def on(self, device: torch.device) -> Any:
        return torch.cuda.device(device)

    def warm_up(self, fn: Any) -> None:
        """Run ``fn`` on the capture stream (its first use outside a capture), then wait for it."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            fn()
        torch.cuda.current_stream().wait_stream(self._stream)
        torch.cuda.synchronize()

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Any, pool: Any) -> tuple[torch.cuda.CUDAGraph, Any]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=self._stream):
            result = fn()
        return graph, result

    def finish(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's blocks, cached for the capture stream, back to the device


def _layout(t: torch.Tensor) -> tuple:
    """The strides the guards compare (those of dims longer than 1)."""
    return tuple(st for st, n in zip(t.stride(), t.shape) if n > 1)


def _flatten_by_dtype(grads: tuple) -> list[tuple[torch.Tensor, list[int], list[tuple[int, ...]], list[int]]]:
    """``(buffer, numels, shapes, gradient indices)`` per dtype: the gradients concatenated."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j, g in enumerate(grads):
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(j)
    out = []
    for members in by_dtype.values():
        flat = torch.cat([grads[j].reshape(-1) for j in members])
        out.append((flat, [grads[j].numel() for j in members], [tuple(grads[j].shape) for j in members], members))
    return out

