"""Autocast made explicit: the casts ``torch.autocast`` makes, written into the graph as ``x.to(dtype)``.

Under autocast every op computes as "cast each floating-point, non-float64 tensor argument to the dtype
autocast runs that op in, then run the op with autocast off". ``explicit_autocast_pass(gm)`` writes those
casts into the graph, so that it computes the same with autocast off and the fusion rules (whose kernels
compute in their inputs' dtypes) can take it.

Which ops autocast changes is not listed here (the lists differ per device and torch version): it is read
off the graph's own annotation. shape_prop ran the graph under the autocast it is built for (the caller's
ambient autocast, and the graph's own ``with torch.autocast(...)`` regions, whose ``_enter_autocast`` /
``_exit_autocast`` nodes its interpreter runs), so a node's ``meta["dtype"]`` is its dtype under autocast:
the *observed* dtype. For each call node in a casting region (ambient or in-graph; not inside an
``enabled=False`` one) whose floating-point arguments do not all have the observed dtype already, the op is
run on fake tensors of its inputs' observed dtypes and shapes, once in the node's autocast state and once
with autocast off, recording the ATen ops each dispatches:

- the same ops on the same dtypes: autocast did nothing to the node (``add(bf16, fp32)`` is plain type
  promotion, CPU ``layer_norm(bf16, fp32 weight)`` a mixed-dtype kernel);
- else autocast changed it (``linear(fp32, fp32)`` ran in bf16; ``linear(bf16, fp32)`` does not even run
  without autocast, which a fake tensor does not show but its dispatched ops do): each floating-point,
  non-float64 tensor argument whose dtype differs from the observed output dtype gets a cast to it, and the
  explicit op is checked: without autocast it gives the observed dtype, autocast would change nothing more
  on it, and every cast autocast made went to that dtype;
- anything else (several outputs of mixed dtypes, a non-floating output, an op fake tensors cannot run, an
  argument whose value the meta does not hold) is refused: that node stays under autocast, in a region of its
  own (``_enter_autocast`` before it, ``_exit_autocast`` after), which fusion treats as a barrier. The record
  names it with its op, source line and the reason.

Then the regions go: every in-graph ``_enter_autocast`` / ``_exit_autocast`` pair is dropped (its ops are
explicit now), and for an ambient autocast the whole graph is wrapped in ``autocast(device, enabled=False)``
(entered after the inputs, left before the output), so that running the graph under the caller's autocast
computes exactly the explicit graph. Gradients through ``x.to(dtype)`` land in ``x``'s dtype, as under
autocast. The casts are ``x.to(torch.bfloat16)`` as a user writes it, in normalize's spelling
(``torch.Tensor.to(x, torch.bfloat16)``); one cast of a value serves every op after it that needs it (until
an in-place write or a grad-mode change), as autocast's weight cache does.

A graph whose regions the pass cannot read (``enabled`` or the dtype computed at run time, a device other
than cpu / cuda) is left as it is, with ``record["refused_graph"]`` saying why.

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from foldcompile.passes import normalize_pass, shape_prop_pass, classify_pass
    >>> def f(x, w):
    ...     return torch.softmax(F.linear(x, w), -1) * x.sum(-1, keepdim=True)
    >>> x, w = torch.randn(4, 8), torch.randn(8, 8)
    >>> gm = normalize_pass(torch.fx.symbolic_trace(f)).graph_module
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     ref = f(x, w)
    ...     _ = shape_prop_pass(gm, (x, w), dims={}); _ = classify_pass(gm)
    ...     result = explicit_autocast_pass(gm)
    ...     out = gm(x, w)
    >>> result.record["changed"]
    [{'node': 'linear', 'op': 'linear', 'casts': [('x', 'torch.bfloat16'), ('w', 'torch.bfloat16')]}]
    >>> print(gm.code.strip())  # doctest: +NORMALIZE_WHITESPACE
    def forward(self, x, w):
        _enter_autocast = torch.amp.autocast_mode._enter_autocast('cpu', None, False, None)
        to = torch_Tensor_to(x, torch.bfloat16)
        to_1 = torch_Tensor_to(w, torch.bfloat16);  w = None
        linear = torch._C._nn.linear(to, to_1);  to = to_1 = None
        softmax = torch.softmax(linear, -1);  linear = None
        sum_1 = torch.sum(x, -1, keepdim = True);  x = None
        mul = softmax * sum_1;  softmax = sum_1 = None
        _exit_autocast = torch.amp.autocast_mode._exit_autocast(_enter_autocast);  _enter_autocast = _exit_autocast = None
        return mul
    >>> out.dtype == ref.dtype and torch.equal(out, ref)
    True
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_arg
from torch.utils._python_dispatch import TorchDispatchMode

from foldcompile.passes.base import PassResult, declare, describe_node
from foldcompile.passes.cost_model import node_cost, op_class_of
from foldcompile.passes.meta import DTYPE, OP_CLASS, SHAPE
from foldcompile.passes.normalize import _method_to_function
from foldcompile.passes.registry import changes_mode, enters_autocast, exits_autocast, op_name, writes_in_place
from foldcompile.passes.shape_prop import calls_checkpoint_body, dim_symbol

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["explicit_autocast_pass", "ambient_autocast"]

# the devices whose autocast state a variant is guarded on (foldcompile.guards)
_DEVICES = ("cpu", "cuda")

# device -> (enabled, dtype, cache_enabled)
State = dict[str, tuple[bool, torch.dtype, bool]]


def ambient_autocast() -> State:
    """The calling thread's autocast state for cpu and cuda."""
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d), torch.is_autocast_cache_enabled())
            for d in _DEVICES}


def _casts(state: State) -> bool:
    return any(enabled for enabled, _, _ in state.values())


class _Unreadable(Exception):
    """A region the pass cannot read: the whole graph is left as it is."""


class _Refused(Exception):
    """One node the pass does not make explicit (it stays under autocast)."""


@dataclass
class _Region:
    """A casting autocast region: the ambient one, or an in-graph ``_enter_autocast``."""

    id: str
    kind: str  # "ambient" | "in-graph"
    device: str
    dtype: torch.dtype
    source: str = ""
    changed: int = 0
    casts: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        status = "explicit" if not self.refused else "partly explicit"
        return {"region": self.id, "kind": self.kind, "device": self.device, "dtype": str(self.dtype),
                "source": self.source, "status": status, "changed": self.changed, "cast_args": self.casts,
                "refused": [r["node"] for r in self.refused]}


def _enter_args(n: torch.fx.Node) -> tuple[Any, Any, Any, Any]:
    names = ("device_type", "dtype", "enabled", "cache_enabled")
    defaults = (None, None, True, None)
    return tuple(n.args[i] if i < len(n.args) else n.kwargs.get(k, d)
                 for i, (k, d) in enumerate(zip(names, defaults)))  # type: ignore[return-value]


def _entered(n: torch.fx.Node, state: State) -> State:
    """The autocast state after the ``_enter_autocast`` node ``n``."""
    device, dtype, enabled, cache = _enter_args(n)
    if device not in _DEVICES:
        raise _Unreadable(f"{describe_node(n)} enters autocast on device {device!r} (only cpu and cuda are read)")
    if not isinstance(enabled, bool):
        raise _Unreadable(f"{describe_node(n)} enters autocast with enabled={enabled!r}, computed at run time")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise _Unreadable(f"{describe_node(n)} enters autocast with dtype={dtype!r}, computed at run time")
    if cache is not None and not isinstance(cache, bool):
        raise _Unreadable(f"{describe_node(n)} enters autocast with cache_enabled={cache!r}, computed at run time")
    old = state[device]
    return {**state, device: (enabled, dtype if dtype is not None else torch.get_autocast_dtype(device),
                              old[2] if cache is None else cache)}


def _source(n: torch.fx.Node) -> str:
    where = describe_node(n)
    return where.split(" at ", 1)[1] if " at " in where else ""


@dataclass
class _Site:
    """A call node in a casting state, with the graph that holds it."""

    owner: torch.fx.GraphModule
    node: torch.fx.Node
    state: State
    region: _Region


def _walk(owner: torch.fx.GraphModule, state: State, region: _Region | None, regions: list[_Region],
          sites: list[_Site], enters: list[tuple[torch.fx.GraphModule, torch.fx.Node]], prefix: str = "") -> None:
    """Every call node of ``owner`` (and of the checkpoint bodies it calls) in a casting state, each with its
    state and innermost casting region; every in-graph enter node."""
    stack: list[tuple[torch.fx.Node, State, _Region | None]] = []
    for n in owner.graph.nodes:
        if enters_autocast(n):
            enters.append((owner, n))
            new = _entered(n, state)
            stack.append((n, state, region))
            device = _enter_args(n)[0]
            if new[device][0]:
                region = _Region(prefix + n.name, "in-graph", device, new[device][1], _source(n))
                regions.append(region)
            state = new
        elif exits_autocast(n):
            if not stack or n.args[0] is not stack[-1][0]:
                raise _Unreadable(f"{describe_node(n)} leaves an autocast region that is not the innermost one")
            _, state, region = stack.pop()
        elif calls_checkpoint_body(n):
            body = owner.get_submodule(str(n.args[0].target))
            _walk(body, state, region, regions, sites, enters, prefix=f"{prefix}{n.args[0].target}.")
        elif n.op in ("call_function", "call_method") and not changes_mode(n) and _casts(state):
            assert region is not None
            sites.append(_Site(owner, n, state, region))
    if stack:
        raise _Unreadable(f"{describe_node(stack[-1][0])} enters an autocast region the graph never leaves")


# ----------------------------------------------------------------------------- one node on fake tensors

def _eligible(dt: Any) -> bool:
    """A dtype autocast casts: floating point, not float64."""
    return isinstance(dt, torch.dtype) and dt.is_floating_point and dt != torch.float64


def _tensor_meta(a: torch.fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    sh, dt = a.meta.get(SHAPE), a.meta.get(DTYPE)
    if isinstance(dt, torch.dtype) and isinstance(sh, tuple) and not a.meta.get("multi_output"):
        return sh, dt
    return None


def _arg_dtypes(n: torch.fx.Node) -> list[tuple[torch.fx.Node, Any]]:
    """(argument node, its observed dtype or dtypes) for every node among the arguments."""
    found: list[tuple[torch.fx.Node, Any]] = []
    map_arg((n.args, n.kwargs), lambda a: found.append((a, a.meta.get(DTYPE))))
    return found


def _single(observed: Any) -> torch.dtype | None:
    """The one dtype of a node's output(s), or None."""
    if isinstance(observed, torch.dtype):
        return observed
    if isinstance(observed, tuple) and observed and all(d == observed[0] for d in observed):
        return observed[0]
    return None


# ops that only move or copy their input's elements: a cast of their result is a cast of the input's elements
_MOVES = {torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.contiguous.default}


class _Dispatched(TorchDispatchMode):
    """Records the ATen ops a call dispatches (tensors as dtype and shape), the casts of its inputs and the
    casts of values computed from them (``einsum("ij,ij,jk->ik")`` multiplies two operands in fp32 and
    autocast casts the product: casting the operands first would round elsewhere). A view or copy of an
    input counts as the input."""

    def __init__(self, inputs: dict[int, torch.fx.Node]):
        super().__init__()
        self.inputs = inputs
        self.of_input: dict[int, torch.fx.Node] = dict(inputs)  # id -> the input whose elements it holds
        self.alive: list[Any] = []  # keeps the tensors whose ids are in of_input (ids are not reused)
        self.ops: list[Any] = []
        self.input_casts: list[tuple[str, Any]] = []
        self.all_casts: list[tuple[Any, Any, tuple, bool]] = []  # (from, to, shape, of an input's elements)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        out = func(*args, **kwargs)
        if not name.startswith("prim."):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if func is torch.ops.aten._to_copy.default and first is not None:
                source = self.of_input.get(id(first))
                if source is not None:
                    self.input_casts.append((source.name, kwargs.get("dtype")))
                self.all_casts.append((first.dtype, kwargs.get("dtype"), tuple(first.shape), source is not None))
            elif (first is not None and id(first) in self.of_input and isinstance(out, torch.Tensor)
                  and (getattr(func, "is_view", False) or func in _MOVES)):
                self.of_input[id(out)] = self.of_input[id(first)]
                self.alive.append(out)
            self.ops.append(_describe_call(name, args, kwargs))
        return out


def _describe_call(name: str, args: tuple, kwargs: dict) -> tuple:
    def one(x: Any) -> Any:
        return ("tensor", x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else x
    first = next((x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)), None)
    # ``sum(x, dtype=x.dtype)`` is ``sum(x)``: CUDA autocast passes dtype=float32 on float32 inputs too
    kw = {k: v for k, v in kwargs.items() if not (k == "dtype" and first is not None and v == first.dtype)}
    return (name, pytree.tree_map(one, tuple(args)), tuple(sorted((k, pytree.tree_map(one, v)) for k, v in kw.items())))


@contextlib.contextmanager
def _autocast_in(state: State) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device, (enabled, dtype, _) in state.items():
            if device == "cuda" and not torch.cuda.is_available():
                continue  # no CUDA tensors here: CUDA autocast can change nothing
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=False))
        yield


_OFF: State = {d: (False, torch.float32, False) for d in _DEVICES}


@dataclass
class _Ran:
    out: Any = None  # dtype, tuple of dtypes, or None for a non-tensor result
    ops: list[Any] = field(default_factory=list)
    input_casts: list[tuple[str, Any]] = field(default_factory=list)
    all_casts: list[tuple[Any, Any, tuple, bool]] = field(default_factory=list)
    error: str | None = None


class _Evaluator:
    """Runs one node's op on fake tensors of given argument dtypes, in a given autocast state."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.device = _device_of(gm)
        self.subs = {dim_symbol(k): v for k, v in dict(gm.meta.get("dims", {})).items()}

    def value(self, a: torch.fx.Node, dtype: torch.dtype | None = None) -> Any:
        tm = _tensor_meta(a)
        if tm is not None:
            return torch.empty(tm[0], dtype=dtype or tm[1], device=self.device)
        sh, dt = a.meta.get(SHAPE), a.meta.get(DTYPE)
        if a.meta.get("multi_output") and isinstance(sh, tuple) and isinstance(dt, tuple):
            return tuple(torch.empty(s, dtype=d, device=self.device) for s, d in zip(sh, dt))
        ev = a.meta.get("example_value")
        if ev is not None and not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(ev)):
            return ev
        sv = a.meta.get("sym_value")
        if sv is not None:
            try:
                return pytree.tree_map(lambda e: int(sympy.sympify(e).subs(self.subs)), sv)
            except (TypeError, ValueError) as e:
                raise _Refused(f"the value of argument {a.name!r} ({sv}) is not known at the example sizes") from e
        if a.op == "placeholder" and a.args:
            return a.args[0]
        raise _Refused(f"the meta does not hold the value of argument {a.name!r}")

    def run(self, n: torch.fx.Node, state: State, dtypes: dict[torch.fx.Node, torch.dtype]) -> _Ran:
        """``n``'s op on fake arguments (``dtypes``: the arguments cast to another dtype) in ``state``."""
        from foldcompile.capture import _quiet_fake_tensor_log  # capture imports the passes: import at use

        with self.mode, _quiet_fake_tensor_log():
            values = {a: self.value(a, dtypes.get(a)) for a, _ in _arg_dtypes(n)}
            args, kwargs = map_arg((n.args, n.kwargs), lambda a: values[a])
            inputs = {id(v): a for a, v in values.items() if isinstance(v, torch.Tensor)}
            log = _Dispatched(inputs)
            try:
                with _autocast_in(state), log:
                    if n.op == "call_method":
                        out = getattr(args[0], str(n.target))(*args[1:], **kwargs)
                    else:
                        out = n.target(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (any failure is an answer: the op does not run so)
                return _Ran(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                            ops=log.ops, input_casts=log.input_casts)
        if isinstance(out, torch.Tensor):
            dt: Any = out.dtype
        elif isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
            dt = tuple(t.dtype for t in out)
        else:
            dt = None
        return _Ran(dt, log.ops, log.input_casts, log.all_casts)


def _device_of(gm: torch.fx.GraphModule) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    for n in gm.graph.nodes:
        ev = n.meta.get("example_value")
        if isinstance(ev, torch.Tensor):
            return ev.device
    return torch.device("cuda" if torch.is_autocast_enabled("cuda") and torch.cuda.is_available() else "cpu")


def _decide(ev: _Evaluator, site: _Site) -> dict[torch.fx.Node, torch.dtype] | None:
    """The casts that make ``site``'s node explicit (None: autocast did not change it); raises
    :class:`_Refused`."""
    n = site.node
    observed = n.meta.get(DTYPE)
    args = _arg_dtypes(n)
    floats = [(a, d) for a, dts in args for d in (dts if isinstance(dts, tuple) else (dts,)) if _eligible(d)]
    one = _single(observed)
    if observed is None or not floats or (one is not None and all(d == one for _, d in floats)):
        return None  # no tensor result, or every floating argument in its dtype already: autocast casts nothing
    on = ev.run(n, site.state, {})
    if on.error:
        raise _Refused(f"on fake tensors the op fails under autocast ({on.error})")
    if on.out != observed:
        raise _Refused(f"on fake tensors autocast gives {on.out}, the annotation says {observed}")
    off = ev.run(n, _OFF, {})
    if off.error is None and off.out == observed and off.ops == on.ops:
        return None  # the same ATen ops on the same dtypes: autocast changed nothing
    if one is None or not _eligible(one):
        raise _Refused(f"autocast changed an op whose output dtype is {observed}: casting its arguments to it "
                       "is not what autocast did")
    # only the arguments autocast cast (an op may read some in their own dtype: a 0-dim fp32 scale of a
    # product autocast ran in bf16)
    cast_by_autocast = {name for name, _ in on.input_casts}
    casts: dict[torch.fx.Node, torch.dtype] = {}
    for a, dts in args:
        if a.name not in cast_by_autocast:
            continue
        if isinstance(dts, tuple) and any(_eligible(d) and d != one for d in dts):
            raise _Refused(f"argument {a.name!r} holds several tensors ({dts}): cannot cast it")
        if _eligible(dts) and dts != one:
            casts[a] = one
    other = sorted({str(d) for _, d in on.input_casts if d != one})
    if other:
        raise _Refused(f"autocast cast arguments to {', '.join(other)}, not to the output dtype {one}")
    e_off = ev.run(n, _OFF, casts)
    if e_off.error or e_off.out != observed:
        raise _Refused(f"with its arguments cast to {one}, the op without autocast gives "
                       f"{e_off.error or e_off.out}, not {observed}")
    # autocast's casts of the arguments (or of views of them) aside, the op must cast as the explicit op does
    # (SDPA's math kernel casts bf16 to fp32 inside either way); a cast of a value computed inside the op
    # (``einsum("ij,ij,jk->ik")`` multiplies a and b in fp32, autocast casts the product for the bmm) is
    # rounding that casting the arguments first would put elsewhere
    own = [(f, t, sh) for f, t, sh, of_input in on.all_casts if not (of_input and t == one and f != one)]
    if own != [(f, t, sh) for f, t, sh, _ in e_off.all_casts]:
        raise _Refused(f"autocast cast a value computed inside the op (not only its arguments) to {one}: casting "
                       "the arguments first would round elsewhere")
    e_on = ev.run(n, site.state, casts)
    if e_on.ops != e_off.ops or e_on.out != e_off.out:
        raise _Refused(f"with its arguments cast to {one}, autocast would still change the op")
    return casts


# ----------------------------------------------------------------------------- the rewrite

def _meta_for(new: torch.fx.Node, like: torch.fx.Node, **meta: Any) -> None:
    """A new node's meta: ``meta`` (shape, dtype, ...), where it comes from (``like``'s module path and
    source), then its op class and cost as classify writes them."""
    new.meta.update(meta)
    for key in ("module_path", "stack_trace", "region"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    new.meta[OP_CLASS] = op_class_of(new)
    new.meta["cost"] = node_cost(new, new.meta[OP_CLASS])


class _CastCache:
    """One cast of a value per dtype, reused by the ops after it, until an in-place write or a grad-mode
    change (a cast made under ``no_grad`` carries no gradient; one made before a write holds the old value)."""

    def __init__(self) -> None:
        self.casts: dict[tuple[int, torch.fx.Node, torch.dtype], torch.fx.Node] = {}

    def forget(self, owner: torch.fx.GraphModule) -> None:
        self.casts = {k: v for k, v in self.casts.items() if k[0] != id(owner)}

    def get(self, owner: torch.fx.GraphModule, a: torch.fx.Node, dtype: torch.dtype,
            consumer: torch.fx.Node) -> torch.fx.Node:
        key = (id(owner), a, dtype)
        if key not in self.casts:
            with owner.graph.inserting_before(consumer):
                cast = owner.graph.call_method("to", (a, dtype))
            _method_to_function(cast)  # the spelling normalize gives a user's ``x.to(torch.bfloat16)``
            meta = {SHAPE: a.meta.get(SHAPE), "sym_shape": a.meta.get("sym_shape"), DTYPE: dtype,
                    "aliases_input": False, "origin": [consumer.name], "autocast_cast_for": consumer.name}
            if "shard" in a.meta:
                meta["shard"] = a.meta["shard"]
            _meta_for(cast, consumer, **meta)
            self.casts[key] = cast
        return self.casts[key]


def _mode_meta(n: torch.fx.Node, like: torch.fx.Node) -> None:
    _meta_for(n, like, **{SHAPE: None, DTYPE: None, "sym_shape": None})


def _keep_under_autocast(owner: torch.fx.GraphModule, n: torch.fx.Node, state: State) -> None:
    """``n`` in an autocast region of its own, in the state it was annotated in."""
    graph = owner.graph
    entered = []
    for device, (enabled, dtype, cache) in state.items():
        if not enabled:
            continue
        with graph.inserting_before(n):
            enter = graph.call_function(torch.amp.autocast_mode._enter_autocast, (device, dtype, True, cache))
        _mode_meta(enter, n)
        entered.append(enter)
    after = n
    for enter in reversed(entered):
        with graph.inserting_after(after):
            leave = graph.call_function(torch.amp.autocast_mode._exit_autocast, (enter,))
        _mode_meta(leave, n)
        after = leave


def _wrap_disabled(gm: torch.fx.GraphModule, devices: list[str]) -> None:
    """The whole graph in ``autocast(device, enabled=False)`` for each device: entered after the inputs, left
    before the output."""
    graph = gm.graph
    nodes = list(graph.nodes)
    first = next((n for n in nodes if n.op != "placeholder"), None)
    output = next(n for n in reversed(nodes) if n.op == "output")
    for device in devices:
        with graph.inserting_before(first):
            enter = graph.call_function(torch.amp.autocast_mode._enter_autocast, (device, None, False, None))
        _mode_meta(enter, output)
        with graph.inserting_before(output):
            leave = graph.call_function(torch.amp.autocast_mode._exit_autocast, (enter,))
        _mode_meta(leave, output)
        first = enter.next  # the next device's region nests inside this one


@declare(requires=(SHAPE, DTYPE, OP_CLASS), ensures=())
def explicit_autocast_pass(gm: torch.fx.GraphModule, *, ambient: State | None = None) -> PassResult:
    """Write autocast's casts into ``gm`` (see the module docstring). ``ambient``: the autocast state the
    graph runs under (default: the calling thread's, which shape_prop annotated it in).

    Record: ``regions`` (each casting region: ``region`` id — ``"ambient"`` or the enter node's name —,
    ``kind``, ``device``, ``dtype``, ``source``, ``status`` ``"explicit"`` / ``"partly explicit"``, how many
    ops autocast ``changed`` and the arguments cast (``cast_args``), the ``refused`` nodes), ``changed`` (per op made
    explicit: its node, op and the casts of its arguments), ``refused`` (per node kept under autocast: node,
    op, source line, region, reason), ``casts`` (cast nodes inserted), ``wrapped`` (the devices the graph was
    wrapped in ``autocast(enabled=False)`` for), ``dropped`` (in-graph regions removed), ``explicit`` (True
    when no region is left casting except the refused nodes' own) and, when the pass left the graph alone,
    ``refused_graph`` (why).
    """
    state = dict(ambient) if ambient is not None else ambient_autocast()
    record: dict[str, Any] = {"regions": [], "changed": [], "refused": [], "casts": 0, "wrapped": [], "dropped": [],
                              "explicit": True, "refused_graph": None}
    regions: list[_Region] = []
    ambient_region = None
    if _casts(state):
        device = next(d for d in _DEVICES if state[d][0])
        ambient_region = _Region("ambient", "ambient", device, state[device][1])
        regions.append(ambient_region)
    sites: list[_Site] = []
    enters: list[tuple[torch.fx.GraphModule, torch.fx.Node]] = []
    try:
        _walk(gm, state, ambient_region, regions, sites, enters)
    except _Unreadable as e:
        record.update(explicit=not regions, refused_graph=str(e))
        _log.info("explicit_autocast: graph left as it is: %s", e)
        return PassResult(gm, False, record)
    if not regions:
        return PassResult(gm, False, record)  # no casting autocast anywhere: nothing to make explicit

    ev = _Evaluator(gm)
    decisions: list[tuple[_Site, dict[torch.fx.Node, torch.dtype] | None, str | None]] = []
    for site in sites:
        try:
            decisions.append((site, _decide(ev, site), None))
        except _Refused as e:
            decisions.append((site, None, str(e)))

    cache = _CastCache()
    decided = {site.node: (casts, why) for site, casts, why in decisions}
    site_of = {site.node: site for site in sites}
    owners = [gm] + [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]
    for owner in owners:
        for n in list(owner.graph.nodes):
            if writes_in_place(n) or changes_mode(n):
                cache.forget(owner)
            if n not in decided:
                continue
            casts, why = decided[n]
            site = site_of[n]
            if why is not None:
                entry = {"node": n.name, "op": op_name(n), "source": _source(n), "region": site.region.id,
                         "reason": why}
                record["refused"].append(entry)
                site.region.refused.append(entry)
                _keep_under_autocast(owner, n, site.state)
                continue
            if not casts:
                continue
            made = {a: cache.get(owner, a, d, n) for a, d in casts.items()}
            n.args, n.kwargs = map_arg((n.args, n.kwargs), lambda a: made.get(a, a))
            site.region.changed += 1
            site.region.casts += len(casts)
            record["changed"].append({"node": n.name, "op": op_name(n),
                                      "casts": [(a.name, str(d)) for a, d in casts.items()]})
    record["casts"] = sum(1 for owner in owners for n in owner.graph.nodes if "autocast_cast_for" in n.meta)
    for owner, enter in enters:
        for leave in list(enter.users):
            owner.graph.erase_node(leave)
        record["dropped"].append(enter.name)
        owner.graph.erase_node(enter)
    record["wrapped"] = [d for d in _DEVICES if state[d][0]]
    _wrap_disabled(gm, record["wrapped"])
    record["regions"] = [r.as_record() for r in regions]
    for owner in owners:
        owner.graph.lint()
        owner.recompile()
    _log.info("explicit_autocast: %d casting region(s), %d op(s) made explicit with %d cast(s), %d kept under "
              "autocast", len(regions), len(record["changed"]), record["casts"], len(record["refused"]))
    return PassResult(gm, True, record)
