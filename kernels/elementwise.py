"""Generated element-wise fusion kernels, forward and backward.

``fuse_elementwise`` takes a fragment of element-wise graph nodes (a ``torch.fx``
Graph or GraphModule, or a plain function that ``symbolic_trace`` turns into one)
and generates ONE Triton kernel for its forward and one for its backward. The
kernels are written as Python source from a table of op rules (``_RULES``): each
rule gives the op's Triton expression, its plain-PyTorch meaning and the adjoint
expression of each operand, so the backward is derived by reverse-mode
accumulation over the fragment at generation time. The backward kernel recomputes
the forward intermediates from the inputs (they are cheap; saving them would cost
a write and a read each), so only the inputs are kept for backward::

    >>> fused = fuse_elementwise(lambda x, b, r: r + torch.sigmoid(x + b))
    >>> x, r, b = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    >>> torch.allclose(fused(x, b, r), r + torch.sigmoid(x + b))
    True
    >>> src = fused.source           # the generated Triton kernels
    >>> "@triton.jit" in src, "tl.sigmoid(" in src
    (True, True)

How a launch reads memory: the output is written once, contiguously, one element
per lane; each tensor input is read once through index arithmetic on its own
strides (a broadcast dim has stride 0), so a bias or a shared mask is never
expanded in memory. Adjacent dims that every operand walks contiguously are merged
first, so the usual case (same-shape inputs) is a flat 1-D loop, and a bias of
shape [c] on [N, M, c] a 2-D one. Compute is float32 whatever the input dtype; the
output takes the dtype PyTorch's promotion gives the fragment (the input dtype).

Dropout: ``torch.nn.functional.dropout`` / ``nn.Dropout`` (an unshared mask), or
:func:`dropout` with ``shared_dims`` (AlphaFold's row- and column-wise dropout:
the mask has size 1 along the shared dims). The mask is drawn in the kernel as
``tl.rand(seed, flat_index_into_mask_shape + offset)``; the reference regenerates
exactly the same mask with a PyTorch Philox (``foldcompile.kernels.philox``), so
training-mode results can be compared exactly. The seed is a DEVICE state, an int64
tensor ``[seed, base]`` the kernel loads (:func:`draw_dropout_seed` draws one with
torch's generator on the device), so no call reads a value on the host and a CUDA-graph
replay draws new masks; a Python int seed is accepted too (copied to the device). The
backward regenerates the same masks from the same state (no mask is stored). Several
dropouts in one fragment use consecutive counter ranges after ``offset``, or the counter
bases given per dropout (``offset=(b0, b1, ...)``); ``FusedElementwise.random_numel``
says how many counters a call consumes. Like torch's, the dropout is ``x * mask * scale``:
a dropped NaN or ±inf is NaN, not 0.

Special values follow eager PyTorch, values and gradients (relu(NaN) = NaN with gradient
g, abs's gradient g * sign(x), a 16-bit cast rounds its gradient): the property tests
(tests/kernels/test_properties_elementwise.py) check every op spelling against eager on
NaN, ±inf, ±0, -1e9 and 1e-20, in the inputs and in the upstream gradient.

Gradients of broadcast inputs: when every broadcast input that needs a gradient is
broadcast over the same leading (collapsed) dims, as a bias is, the backward kernel
walks the output in 2-D tiles and sums each tile's rows in registers, writing one
float32 partial row per tile (a few MB), which ``torch.sum`` finishes. Any other
broadcast (e.g. [N, 1, c] on [N, M, c]) gets a full-size float32 buffer summed by
``torch.sum``: one extra write and read, the documented cost of that rare case.
Both are deterministic (no atomics). float64 inputs run the PyTorch reference (the
kernels compute in float32), as do CPU tensors unless ``TRITON_INTERPRET=1``.
Non-contiguous inputs are read through their strides, never copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
import triton

from foldcompile.kernels import _dispatch
from foldcompile.kernels.elementwise_codegen import (
    _HEADER,
    _RULES,
    UnsupportedElementwiseOp,
    _adjoint_set,
    _aligned_strides,
    _block_config,
    _compile,
    _contiguous_strides,
    _gen_kernel,
    _geometry,
    _Layout,
    _layout,
    _leading_false,
    _live_gouts,
    _lower,
    _Operand,
    _tile_config,
    unsupported_reason,
)
from foldcompile.kernels.philox import as_dropout_state, draw_dropout_seed, dropout, dropout_mask_reference

__all__ = [
    "FusedElementwise",
    "UnsupportedElementwiseOp",
    "draw_dropout_seed",
    "dropout",
    "dropout_mask_reference",
    "fuse_elementwise",
    "fused_elementwise_reference",
    "unsupported_reason",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------
# The fused callable
# ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A compiled forward or backward kernel and how to call it."""

    kernel: Any
    source: str
    sizes: list[int]
    ops: list[_Operand]
    split: int | None = None  # backward tile mode: see _gen_kernel
    reduced: tuple[bool, ...] = ()  # per grad input: summed over rows in the kernel


@dataclass
class _Prepared:
    lay: _Layout
    tensor_inputs: list[int]  # value ids of the live tensor inputs, in load order
    scalars: list[int]


class FusedElementwise:
    """A fragment of element-wise ops compiled to one Triton kernel, forward and backward.

    Call it with the fragment's inputs (tensors that broadcast together, or Python
    numbers) and, when it holds dropout, ``seed`` / ``offset``. CUDA tensors (or CPU
    tensors under ``TRITON_INTERPRET=1``) of dtype float16/bfloat16/float32 run the
    generated kernels with autograd; everything else runs :meth:`reference`.
    Kernels are cached per (fragment, dtypes, broadcast pattern, index width).
    """

    def __init__(self, graph: torch.fx.GraphModule | torch.fx.Graph, name: str = "fused_elementwise"):
        self.graph_module = graph
        self.name = name
        self._frag = _lower(graph)
        self._plans: dict[tuple, _Plan] = {}  # compiled kernels by structural key
        self._calls: dict[tuple, _ForwardCall] = {}  # call plans by input signature (_signature)
        self._last_sources: dict[str, str] = {}

    def __repr__(self) -> str:
        ops = [v.op for v in self._frag.vals if v.kind == "op"]
        return f"FusedElementwise({self.name}: {', '.join(self._frag.input_names)} -> {' . '.join(ops)})"

    def __deepcopy__(self, memo: dict) -> "FusedElementwise":
        # Immutable once built (the plans are only a cache): copies of a graph share it.
        return self

    # -- public API -----------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        """The fragment's placeholder names, in call order."""
        return list(self._frag.input_names)

    @property
    def source(self) -> str:
        """The most recently generated forward (and backward, once run) Triton source."""
        if not self._last_sources:
            raise RuntimeError("no kernel generated yet: call the fused fragment, or use source_for(*inputs)")
        return "\n\n".join(self._last_sources[k] for k in ("forward", "backward") if k in self._last_sources)

    def source_for(self, *inputs: Any, grad: bool = True) -> str:
        """Generate (without running) the forward and, if ``grad``, backward source for these inputs."""
        prep = self._prepare(inputs)
        fwd = self._plan(prep, inputs, backward=False, grad_inputs=[], gouts=None)
        parts = [fwd.source]
        gi = [v for v in prep.tensor_inputs if prep.lay.kinds[v] == "f"] if grad else []
        gi = [v for v in gi if v in _adjoint_set(self._frag, prep.lay, gi)]
        if gi:
            parts.append(self._plan(prep, inputs, backward=True, grad_inputs=gi, gouts=None).source)
        return "\n\n".join(parts)

    @property
    def has_dropout(self) -> bool:
        """Whether the fragment holds a dropout (a call without ``seed`` then draws a device state)."""
        return any(v.op == "dropout" for v in self._frag.vals)

    @property
    def n_dropouts(self) -> int:
        """How many dropouts the fragment holds: the length of a per-dropout ``offset`` tuple."""
        return sum(v.op == "dropout" for v in self._frag.vals)

    def output_dtypes(self, *inputs: Any) -> list[torch.dtype]:
        """The dtype of each output for a call on ``inputs`` (tensors of any device, ``meta`` included,
        or Python numbers), as eager PyTorch's promotion gives it; a ``ValueError`` / ``TypeError``
        says why such a call cannot run (eager computes an integer there, shapes do not broadcast, an
        input dtype the kernels do not take). Nothing is computed: a caller checks a fragment before
        it puts it in a graph, so a call never fails later::

            >>> fused = fuse_elementwise(lambda x, m: x + torch.where(m, 0.0, float("-inf")))
            >>> fused.output_dtypes(torch.empty(4, 8, dtype=torch.float16, device="meta"),
            ...                     torch.empty(4, 8, dtype=torch.bool, device="meta"))
            [torch.float32]
        """
        lay = _layout(self._frag, inputs)
        return [lay.dtypes[o] for o in self._frag.outputs]

    def random_numel(self, *inputs: Any) -> int:
        """How many Philox counters one call on these inputs consumes (advance ``offset`` by it)."""
        lay = _layout(self._frag, inputs)
        return sum(math.prod(lay.mask_shapes[i]) for i in lay.dropouts)

    def __call__(self, *inputs: Any, seed: int | torch.Tensor | None = None,
                 offset: int | Sequence[int] = 0) -> Any:
        """Run the fragment. ``seed``: the dropouts' device state (an int64 ``[seed, base]`` tensor on the
        inputs' device, :func:`draw_dropout_seed`), a Python int, or None (a state is drawn on the device);
        ``offset``: the first counter (the dropouts use consecutive ranges after it) or one counter base
        per dropout of the fragment, in its order."""
        inputs = self._one_device(inputs)
        state, offsets = self._seed(seed, offset, inputs)
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        if not _dispatch.use_triton(*tensors) or any(t.dtype == torch.float64 for t in tensors):
            return fused_elementwise_reference(self, *inputs, seed=state, offset=offsets)
        outs = _FusedFunction.apply(self, state, offsets, *inputs)
        return outs if self._frag.multi_output else outs[0]

    def reference(self, *inputs: Any, seed: int | torch.Tensor | None = None,
                  offset: int | Sequence[int] = 0) -> Any:
        """The same fragment in plain PyTorch, with the same dropout masks as the kernels."""
        inputs = self._one_device(inputs)
        state, offsets = self._seed(seed, offset, inputs)
        return fused_elementwise_reference(self, *inputs, seed=state, offset=offsets)

    # -- internals --------------------------------------------------------------

    def _one_device(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """The inputs with every tensor on one device, or a ValueError naming each input's device.

        Checked before dispatch: with tensors on two devices neither path can run, and the
        reference would fail inside PyTorch without naming the input. As in eager PyTorch, a
        0-dim CPU tensor may join tensors on another device; it is moved there (a scalar copy)."""
        names = self._frag.input_names
        placed = [(names[i] if i < len(names) else f"#{i}", x) for i, x in enumerate(inputs)
                  if isinstance(x, torch.Tensor)]
        movable = [x.dim() == 0 and x.device.type == "cpu" for _, x in placed]
        devices = {x.device for (_, x), m in zip(placed, movable) if not m}
        if len(devices) > 1:
            desc = ", ".join(f"'{n}' on {x.device}" for n, x in placed)
            raise ValueError(f"{self.name}: fused fragment inputs must share one device, got {desc}")
        if not devices:
            return tuple(inputs)
        (device,) = devices
        return tuple(x.to(device) if isinstance(x, torch.Tensor) and x.dim() == 0 and x.device != device else x
                     for x in inputs)

    def _seed(self, seed: int | torch.Tensor | None, offset: int | Sequence[int],
              inputs: Sequence[Any]) -> tuple[torch.Tensor | None, int | tuple[int, ...]]:
        """The dropouts' device state and counter offsets (None, offset without a dropout). Nothing is
        read on the host: a missing seed is drawn on the inputs' device."""
        if isinstance(offset, (list, tuple)):
            if len(offset) != self.n_dropouts or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                                                         for o in offset):
                raise ValueError(f"{self.name}: offset must be a non-negative int or {self.n_dropouts} of them "
                                 f"(one per dropout), got {offset!r}")
            offset = tuple(offset)
        elif not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        if not self.has_dropout:
            if seed is not None and not isinstance(seed, torch.Tensor):
                as_dropout_state(seed, "meta")  # the same error for a bad seed, dropout or not
            return None, offset
        like = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
        if like is None:
            raise ValueError(f"{self.name}: a dropout needs a tensor input")
        state = draw_dropout_seed(like) if seed is None else as_dropout_state(seed, like.device)
        return state, offset

    def _prepare(self, inputs: Sequence[Any]) -> _Prepared:
        lay = _layout(self._frag, inputs)
        vals = self._frag.vals
        tensor_inputs = [i for i in lay.live if vals[i].kind == "input" and lay.kinds[i] != "s"]
        scalars = [i for i in lay.live if vals[i].kind in ("input", "const") and lay.kinds[i] == "s"]
        devices = {inputs[vals[i].index].device for i in tensor_inputs}
        if len(devices) > 1:
            desc = ", ".join(f"{vals[i].name} on {inputs[vals[i].index].device}" for i in tensor_inputs)
            raise ValueError(f"fused fragment inputs are on different devices: {desc}")
        for i in tensor_inputs:
            x = inputs[vals[i].index]
            if x.dtype not in _TRITON_DTYPES + (torch.bool,):
                raise TypeError(f"input '{vals[i].name}' has dtype {x.dtype}; the kernels take float16, bfloat16, "
                                "float32 or bool")
        return _Prepared(lay, tensor_inputs, scalars)

    def _plan(self, prep: _Prepared, inputs: Sequence[Any], backward: bool, grad_inputs: list[int],
              gouts: list[torch.Tensor | None] | None) -> _Plan:
        lay, vals, frag = prep.lay, self._frag.vals, self._frag
        operand_strides = [_aligned_strides(inputs[vals[i].index], lay.out_shape) for i in prep.tensor_inputs]
        live_gouts = _live_gouts(frag, lay, grad_inputs) if backward else []
        for k in range(len(live_gouts)):
            g = gouts[k] if gouts is not None else None
            operand_strides.append(_contiguous_strides(lay.out_shape) if g is None
                                   else _aligned_strides(g, lay.out_shape))
        operand_strides += [_contiguous_strides(lay.mask_shapes[i]) for i in lay.dropouts]
        sizes, ops, int64 = _geometry(lay.out_shape, operand_strides)
        split, reduced = None, ()
        if backward:
            # Broadcast grad inputs (a False in their pattern) are reduced. If every one of them is
            # broadcast over a common run of leading dims, those become tile rows summed in-kernel.
            # Whether an input is broadcast (its gradient summed) follows from its SHAPE (dims
            # missing or of size 1), not its strides: an expanded input (stride 0, size > 1)
            # gets a full-size gradient, which autograd's expand backward then sums.
            groups = _collapsed_groups(lay.out_shape, operand_strides)
            patterns = [_shape_pattern(tuple(inputs[vals[v].index].shape), lay.out_shape, groups)
                        for v in grad_inputs]
            bcast = [not all(p) for p in patterns]
            leading = [_leading_false(p) for p, b in zip(patterns, bcast) if b]
            if leading and min(leading) > 0:
                split, reduced = min(leading), tuple(bcast)
        key = (backward, tuple(grad_inputs), tuple(lay.kinds), tuple(map(str, lay.dtypes)),
               tuple((o.pattern, o.dense) for o in ops), len(sizes), int64, split, reduced)
        plan = self._plans.get(key)
        if plan is None:
            kind = "bwd" if backward else "fwd"
            body = _gen_kernel(frag, lay, sizes, prep.tensor_inputs, ops, int64, backward, grad_inputs,
                               f"{self.name}_{kind}", split, reduced)
            source = _HEADER.format(code=frag.code.strip()) + body + "\n"
            fn_name = f"{self.name}_{kind}"
            plan = _Plan(_compile(source, fn_name), source, sizes, ops, split, reduced)
            self._plans[key] = plan
        else:
            plan = _Plan(plan.kernel, plan.source, sizes, ops, split, reduced)
        self._last_sources["backward" if backward else "forward"] = plan.source
        return plan

    # -- cached call plans ------------------------------------------------------

    def _forward_call(self, inputs: Sequence[Any]) -> "_ForwardCall":
        """The forward launch for inputs of this (shape, stride, dtype, device) signature, derived
        once and reused: the layout, strides, kernel, grid and argument order depend on nothing else
        (Python-number inputs by their type only; their values are read at each launch)."""
        key = _signature(inputs)
        call = self._calls.get(key)
        if call is None:
            call = self._build_forward_call(inputs)
            if len(self._calls) >= _MAX_CALL_PLANS:  # a model called with ever new shapes: drop the oldest
                self._calls.pop(next(iter(self._calls)))
            self._calls[key] = call
        return call

    def _build_forward_call(self, inputs: Sequence[Any]) -> "_ForwardCall":
        frag = self._frag
        prep = self._prepare(inputs)
        lay = prep.lay
        device = inputs[frag.vals[prep.tensor_inputs[0]].index].device
        plan = self._plan(prep, inputs, backward=False, grad_inputs=[], gouts=None)
        out_dtypes = [lay.dtypes[o] for o in frag.outputs]
        return _ForwardCall(prep, tuple(lay.out_shape), out_dtypes, device,
                            _launch_plan(plan, prep, frag, "fused_elementwise_fwd"),
                            [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)],
                            [k for k, d in enumerate(out_dtypes) if d == torch.bool])

    def _build_backward_call(self, call: "_ForwardCall", inputs: Sequence[Any], needs: Sequence[bool],
                             gouts: Sequence[torch.Tensor]) -> "_BackwardCall":
        frag, prep = self._frag, call.prep
        lay = prep.lay
        grad_inputs = [v for v in prep.tensor_inputs if lay.kinds[v] == "f" and needs[frag.vals[v].index]]
        # Inputs no output depends on differentiably (only through a comparison, say) get zeros, no kernel.
        adjoints = _adjoint_set(frag, lay, grad_inputs)
        reaching = [v for v in grad_inputs if v in adjoints]
        zeros = [frag.vals[v].index for v in grad_inputs if v not in reaching]
        if not reaching:
            return _BackwardCall(zeros, [], [], [], None)
        # The same value returned twice gets the sum of both upstream gradients.
        groups = [[k for k, oo in enumerate(frag.outputs) if oo == o] for o in _live_gouts(frag, lay, reaching)]
        gin = _gather_gouts(groups, gouts)
        plan = self._plan(prep, inputs, backward=True, grad_inputs=reaching, gouts=gin)
        out_shape = tuple(lay.out_shape)
        numel = math.prod(out_shape)
        buffers, finish = [], []
        for k, v in enumerate(reaching):
            x = inputs[frag.vals[v].index]
            rows_summed = plan.split is not None and plan.reduced[k]
            if rows_summed:
                # One float32 partial sum per (row block, column); summed after the launch.
                rows, cols = _tile_extent(plan)
                buffers.append(((triton.cdiv(rows, _tile_config(cols)[0]), cols), torch.float32))
            elif x.numel() == numel:
                buffers.append((out_shape, x.dtype))
            else:  # broadcast in a way tiles do not cover: full-size float32, summed after the launch
                buffers.append((out_shape, torch.float32))
            finish.append((frag.vals[v].index, rows_summed, tuple(x.shape), x.dtype))
        return _BackwardCall(zeros, groups, buffers, finish, _launch_plan(plan, prep, frag, "fused_elementwise_bwd"))


_MAX_CALL_PLANS = 64  # signatures remembered per fused fragment


def _signature(inputs: Sequence[Any]) -> tuple:
    """What a call plan depends on: each tensor's shape, strides, dtype and device; a number's type."""
    return tuple((x.shape, x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x)
                 for x in inputs)


def _gather_gouts(groups: list[list[int]], gouts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The upstream gradient of each live output (summed where one value is returned several times)."""
    gin = []
    for idx in groups:
        g = gouts[idx[0]]
        for k in idx[1:]:
            g = g + gouts[k]
        gin.append(g)
    return gin


@dataclass
class _Launch:
    """One kernel launch with everything fixed but the tensors, the numbers' values and the seed.

    Arguments go in the generated kernel's order: outputs, loaded tensor inputs, extra tensors
    (the backward's upstream gradients), scalar values, dropout seed and offsets, then the
    geometry (element count or rows/columns, collapsed sizes, strides)."""

    kernel: Any
    name: str
    grid: tuple[int, ...]
    tensors: list[int]  # input positions of the loaded tensors, in load order
    scalars: list[tuple[int | None, Any]]  # (input position, None) for an input number, (None, value) for a constant
    dropout_bases: list[int]  # first Philox counter of each live dropout after an int offset
    dropout_order: list[int]  # each live dropout's place among the fragment's dropouts (a per-dropout offset)
    geometry: tuple
    meta: dict[str, int]
    empty: bool  # zero elements: nothing to launch

    def __call__(self, outs: Sequence[torch.Tensor], inputs: Sequence[Any], extra: Sequence[torch.Tensor],
                 state: torch.Tensor | None, offset: int | tuple[int, ...]) -> None:
        if self.empty:
            return
        scalars = [float(inputs[i]) if i is not None else value for i, value in self.scalars]
        drop = [state] + _counter_bases(offset, self.dropout_bases, self.dropout_order) if self.dropout_bases else []
        _dispatch.note_launch(self.name)
        self.kernel[self.grid](*outs, *[inputs[i] for i in self.tensors], *extra, *scalars, *drop, *self.geometry,
                               **self.meta)


def _launch_plan(plan: _Plan, prep: _Prepared, frag: Any, name: str) -> _Launch:
    lay, vals = prep.lay, frag.vals
    numel = math.prod(lay.out_shape)
    strides = []
    for op in plan.ops:
        if not op.dense:
            strides += [s for s, used in zip(op.strides, op.pattern) if used]
    if plan.split is None:
        block, warps = _block_config(numel)
        grid = (triton.cdiv(numel, block),)
        geometry = (numel, *plan.sizes[1:], *strides)
        meta = dict(BLOCK=block, num_warps=warps)
    else:
        rows, cols = _tile_extent(plan)
        block_r, block_c, warps = _tile_config(cols)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        geometry = (rows, cols, *plan.sizes[1:], *strides)
        meta = dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    scalars = [(vals[i].index, None) if vals[i].kind == "input" else (None, vals[i].value) for i in prep.scalars]
    return _Launch(plan.kernel, name, grid, [vals[i].index for i in prep.tensor_inputs], scalars,
                   [lay.mask_base[i] for i in lay.dropouts], _dropout_order(frag, lay), geometry, meta, numel == 0)


def _dropout_order(frag: Any, lay: _Layout) -> list[int]:
    """Each live dropout's place among all the fragment's dropouts (the index into a per-dropout offset)."""
    every = [i for i, v in enumerate(frag.vals) if v.op == "dropout"]
    return [every.index(i) for i in lay.dropouts]


def _counter_bases(offset: int | tuple[int, ...], mask_bases: Sequence[int], order: Sequence[int]) -> list[int]:
    """First Philox counter of each live dropout (added to the state's base in the kernel)."""
    if isinstance(offset, tuple):
        return [offset[k] for k in order]
    return [offset + b for b in mask_bases]


@dataclass
class _BackwardCall:
    """The backward of one forward call plan for one set of needed gradients and upstream strides."""

    zeros: list[int]  # input positions whose gradient is zero (no differentiable path to an output)
    gout_groups: list[list[int]]  # per live output: the output indices whose gradients are summed
    buffers: list[tuple[tuple[int, ...], torch.dtype]]  # the kernel's gradient outputs (shape, dtype)
    finish: list[tuple[int, bool, tuple[int, ...], torch.dtype]]  # per buffer: input position, rows summed?,
    #                                                               the input's shape and dtype
    launch: _Launch | None


@dataclass
class _ForwardCall:
    """A forward call plan (see :meth:`FusedElementwise._forward_call`) and its backward plans."""

    prep: _Prepared
    out_shape: tuple[int, ...]
    out_dtypes: list[torch.dtype]
    device: torch.device
    launch: _Launch
    tensor_positions: list[int]  # which inputs are tensors (saved for backward)
    bool_outputs: list[int]  # outputs that are not differentiable
    backward: dict[tuple, _BackwardCall] = field(default_factory=dict)


def _collapsed_groups(out_shape: tuple[int, ...], operand_strides: list[tuple[int, ...]]) -> list[list[int]]:
    """The output dims making up each dim of ``_geometry``'s collapsed shape (same merge rule)."""
    dims = [d for d in range(len(out_shape)) if out_shape[d] != 1]
    if not dims:
        return [[]]
    groups = [[dims[0]]]
    last = [op[dims[0]] for op in operand_strides]
    for d in dims[1:]:
        if all(st == op[d] * out_shape[d] for st, op in zip(last, operand_strides)):
            groups[-1].append(d)
        else:
            groups.append([d])
        last = [op[d] for op in operand_strides]
    return groups


def _shape_pattern(shape: tuple[int, ...], out_shape: tuple[int, ...], groups: list[list[int]]) -> tuple[bool, ...]:
    """Per collapsed dim: True where the input has a full-size dim (by shape), False where
    it is broadcast over every output dim of that collapsed dim (missing or size 1)."""
    aligned = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    return tuple(any(aligned[d] != 1 for d in g) for g in groups)


def _tile_extent(plan: _Plan) -> tuple[int, int]:
    """(rows, columns) of a tile-mode plan's output, in elements."""
    return math.prod(plan.sizes[:plan.split]), math.prod(plan.sizes[plan.split:])


class _FusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fused: FusedElementwise, seed: int, offset: int, *inputs: Any):
        call = fused._forward_call(inputs)
        outs = [torch.empty(call.out_shape, dtype=dt, device=call.device) for dt in call.out_dtypes]
        call.launch(outs, inputs, [], seed, offset)
        ctx.fused, ctx.call, ctx.seed, ctx.offset = fused, call, seed, offset
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.save_for_backward(*[inputs[i] for i in call.tensor_positions])
        if call.bool_outputs:
            ctx.mark_non_differentiable(*[outs[k] for k in call.bool_outputs])
        return tuple(outs)

    @staticmethod
    @_dispatch.once_differentiable  # not itself differentiable: a double backward raises
    def backward(ctx, *gouts: torch.Tensor):
        fused: FusedElementwise = ctx.fused
        call: _ForwardCall = ctx.call
        inputs = list(ctx.others)
        for pos, t in zip(call.tensor_positions, ctx.saved_tensors):
            inputs[pos] = t
        needs = ctx.needs_input_grad[3:]
        key = (needs, tuple((g.stride(), g.dtype) for g in gouts))
        bwd = call.backward.get(key)
        if bwd is None:
            bwd = call.backward[key] = fused._build_backward_call(call, inputs, needs, gouts)
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        for pos in bwd.zeros:
            grads[pos] = torch.zeros_like(inputs[pos])
        if bwd.launch is None:
            return (None, None, None, *grads)
        gin = _gather_gouts(bwd.gout_groups, gouts)
        bufs = [torch.empty(shape, dtype=dtype, device=call.device) for shape, dtype in bwd.buffers]
        bwd.launch(bufs, inputs, gin, ctx.seed, ctx.offset)
        for (pos, rows_summed, shape, dtype), buf in zip(bwd.finish, bufs):
            if rows_summed:
                buf = _unflatten_columns(buf.sum(0), call.out_shape)
            grads[pos] = _reduce_to(buf, shape).to(dtype)
        return (None, None, None, *grads)


def _unflatten_columns(cols: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """View C column sums as a tensor of the output's rank: leading dims 1, trailing dims whose product is C."""
    j, acc = len(out_shape), 1
    while j > 0 and acc < cols.numel():
        j -= 1
        acc *= out_shape[j]
    return cols.reshape((1,) * j + tuple(out_shape[j:]))


def _reduce_to(grad: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum a gradient computed at the broadcast shape back to an input's ``shape``."""
    if tuple(grad.shape) == shape:
        return grad
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [lead + d for d, s in enumerate(shape) if s == 1 and grad.shape[lead + d] != 1]
    return grad.sum(dim=dims, keepdim=True).reshape(shape) if dims else grad.reshape(shape)


# ---------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------


def fused_elementwise_reference(fused: FusedElementwise, *inputs: Any, seed: int | torch.Tensor = 0,
                                offset: int | Sequence[int] = 0) -> Any:
    """Run ``fused``'s fragment in plain PyTorch (eager dtypes), with the kernels' dropout masks.

    Differentiable by autograd; feed float64 inputs for a high-precision reference.
    """
    frag = fused._frag
    lay = _layout(frag, inputs)
    offset = tuple(offset) if isinstance(offset, (list, tuple)) else offset
    bases = dict(zip(lay.dropouts, _counter_bases(offset, [lay.mask_base[i] for i in lay.dropouts],
                                                  _dropout_order(frag, lay))))
    env: dict[int, Any] = {}
    for i in lay.live:
        v = frag.vals[i]
        if v.kind == "input":
            env[i] = inputs[v.index]
            continue
        if v.kind == "const":
            env[i] = v.value
            continue
        rule = _RULES[v.op]
        args = []
        for a, need in zip(v.args, rule.arg_kinds):
            x = env[a]
            if isinstance(x, torch.Tensor):
                if need == "f" and x.dtype == torch.bool:
                    # as eager promotes it: to the op's result dtype (bool [4] * fp16 0-dim is fp16)
                    x = x.to(lay.dtypes[i] if lay.dtypes[i] is not None else torch.get_default_dtype())
                elif need == "b" and x.dtype != torch.bool:
                    x = x != 0
            args.append(x)
        if lay.shapes[i] is None:  # all operands Python numbers: compute in float64
            args = [torch.tensor(a, dtype=torch.float64) for a in args]
        if v.op == "dropout":
            x, p, scale = args
            full = lay.mask_shapes[i]
            keep = dropout_mask_reference(seed, bases[i], full, p, device=x.device)
            keep = keep.reshape(full[len(full) - x.dim():])  # drop the leading 1s of the output's rank
            # x * keep * scale, as the eager dropout (and torch's) computes it: a dropped NaN or
            # ±inf is NaN, not 0, exactly as in the kernels.
            env[i] = x * keep * scale
        elif v.op == "cast":
            env[i] = args[0].to(v.dtype)
        else:
            env[i] = rule.torch(*args)
    outs = tuple(env[o] for o in frag.outputs)
    return outs if frag.multi_output else outs[0]


# ---------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------


def fuse_elementwise(fn: Callable | torch.fx.GraphModule | torch.fx.Graph, example_inputs: Sequence[Any] | None = None,
                     *, name: str = "fused_elementwise") -> FusedElementwise:
    """Compile a fragment of element-wise ops into one generated Triton kernel (forward and backward).

    ``fn``: an ``fx.GraphModule`` / ``fx.Graph`` whose non-placeholder nodes are all
    supported element-wise ops, or a function / module that ``torch.fx.symbolic_trace``
    turns into one. Raises :class:`UnsupportedElementwiseOp` naming the first node
    whose op is outside the supported set. With ``example_inputs`` the kernels
    for those inputs are generated at once (their source is then in ``.source``).
    """
    if not name.isidentifier():
        raise ValueError(f"name must be a Python identifier, got {name!r}")
    if isinstance(fn, (torch.fx.GraphModule, torch.fx.Graph)):
        graph = fn
    elif callable(fn):
        try:
            graph = torch.fx.symbolic_trace(fn)
        except Exception as exc:  # report what could not be traced
            raise UnsupportedElementwiseOp(f"could not trace {fn!r} with torch.fx.symbolic_trace: {exc}") from exc
    else:
        raise TypeError(f"fuse_elementwise takes a function, fx.GraphModule or fx.Graph, got {type(fn).__name__}")
    fused = FusedElementwise(graph, name=name)
    if example_inputs is not None:
        fused.source_for(*example_inputs)
    return fused
