"""Triton source of an element-wise fragment's forward and backward kernels, and its import.

``_gen_kernel`` writes one kernel as Python source from the fragment, its layout and
geometry (the backward by reverse-mode accumulation over the rules' adjoints);
``_compile`` imports it (``triton.jit`` needs a real file). Part of the generator behind
``foldcompile.kernels.elementwise`` (see ``elementwise_codegen`` for the map).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from typing import Any

import triton

from foldcompile.kernels import _dispatch
from foldcompile.kernels.elementwise_layout import _Layout, _Operand
from foldcompile.kernels.elementwise_lowering import _Fragment
from foldcompile.kernels.elementwise_rules import _ROUNDING_CASTS, _RULES



def _convert(expr: str, have: str, need: str) -> str:
    if need == "f" and have == "b":
        return f"{expr}.to(tl.float32)"
    if need == "b" and have != "b":
        return f"({expr} != 0)"
    return expr


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "", indent: int = 1) -> None:
        self.lines.append("    " * indent + line if line else "")


def _gen_kernel(frag: _Fragment, lay: _Layout, sizes: list[int], loaded: list[int], ops: list[_Operand],
                int64: bool, backward: bool, grad_inputs: list[int], name: str,
                split: int | None = None, reduced: tuple[bool, ...] = (), row_sum: bool = False) -> str:
    """Source of one kernel.

    ``loaded``: value ids of the tensor inputs it reads (then, in backward, the
    upstream gradients of the outputs that need one); ``ops``: their geometry,
    then one per live dropout mask. Forward stores the outputs; backward stores
    the adjoints of ``grad_inputs``.

    ``split``: when set, the kernel walks the output as a 2-D tile grid, rows =
    the collapsed dims before ``split`` and columns = those from it on, and every
    grad input flagged in ``reduced`` (broadcast over all the row dims, a bias) is
    summed over the tile's rows in registers and stored as one partial row per
    program: a [row blocks, C] float32 buffer instead of a full-size one.

    ``row_sum`` (forward, with ``split``; one column block holds every column): the
    fragment's one output is summed over the tile's columns in registers and stored as
    one value per row (``foldcompile.kernels.elementwise_sum``): the [R, C] values are
    never written.
    """
    rank = len(sizes)
    vals = frag.vals
    n_in = len(loaded)
    scalars = [i for i in lay.live if vals[i].kind in ("input", "const") and lay.kinds[i] == "s"]
    gouts = _live_gouts(frag, lay, grad_inputs) if backward else []
    w = _Writer()
    out_ptrs = ([f"gin{k}" for k in range(len(grad_inputs))] if backward
                else [f"out{k}" for k in range(len(frag.outputs))])
    in_ptrs = [f"in{k}" for k in range(n_in)] + [f"gout{k}" for k in range(len(gouts))]
    scalar_args = [f"s{i}" for i in scalars]
    drop_args = (["state"] + [f"doff{i}" for i in lay.dropouts]) if lay.dropouts else []
    size_args = [f"n{d}" for d in range(1, rank)]
    stride_args = []
    operand_names = [f"in{k}" for k in range(n_in)] + [f"gout{k}" for k in range(len(gouts))] + \
        [f"mask{i}" for i in lay.dropouts]
    for nm, op in zip(operand_names, ops):
        if not op.dense:
            stride_args += [f"{nm}_s{d}" for d in range(rank) if op.pattern[d]]
    if split is None:
        args = out_ptrs + in_ptrs + scalar_args + drop_args + ["N"] + size_args + stride_args + ["BLOCK: tl.constexpr"]
    else:
        args = (out_ptrs + in_ptrs + scalar_args + drop_args + ["R", "C"] + size_args + stride_args
                + ["BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr"])
    w("@triton.jit", 0)
    w(f"def {name}(", 0)
    for a in args:
        w(f"{a},", 2)
    w("):", 0)
    w(f"# {'backward' if backward else 'forward'}: output shape {list(lay.out_shape)} collapsed to {sizes}")
    if split is None:
        w("pid = tl.program_id(0)")
        w(f"offs = pid{'.to(tl.int64)' if int64 else ''} * BLOCK + tl.arange(0, BLOCK)")
        w("valid = offs < N")
    else:
        w(f"# tiles: rows = dims {list(range(split))}, columns = dims {list(range(split, rank))}; "
          "bias-like gradients are summed over the tile's rows")
        w(f"pid_r = tl.program_id(0){'.to(tl.int64)' if int64 else ''}")
        w("rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)")
        w("cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)")
        w("offs = rows[:, None] * C + cols[None, :]")
        w("valid = (rows < R)[:, None] & (cols < C)[None, :]")
    if lay.dropouts:
        # the dropout state [seed, base] lives on the device (drawn there once per forward): loaded,
        # never passed from the host, so a CUDA-graph replay reads the replay's own seed
        w("seed = tl.load(state)")
        w("base = tl.load(state + 1)")
    if rank == 1:
        w("i0 = offs")
    else:
        w("rem = offs")
        for d in range(rank - 1, 0, -1):
            w(f"i{d} = rem % n{d}")
            w(f"rem = rem // n{d}")
        w("i0 = rem")

    def offset_expr(nm: str, op: _Operand) -> str:
        if op.dense:
            return "offs"
        terms = [f"i{d} * {nm}_s{d}" for d in range(rank) if op.pattern[d]]
        return " + ".join(terms) if terms else "offs * 0"

    names: dict[int, str] = {}
    for k, vid in enumerate(loaded):
        w(f"# {vals[vid].name}: {lay.dtypes[vid]} {list(lay.shapes[vid])}")
        load = f"tl.load(in{k} + ({offset_expr(f'in{k}', ops[k])}), mask=valid, other=0)"
        if lay.kinds[vid] == "b":
            w(f"x{vid} = {load} != 0")
        else:
            w(f"x{vid} = {load}.to(tl.float32)")
        names[vid] = f"x{vid}"
    for i in scalars:
        names[i] = f"s{i}"
    mask_ops = {vid: ops[n_in + len(gouts) + j] for j, vid in enumerate(lay.dropouts)}
    for i in lay.live:
        v = vals[i]
        if v.kind != "op":
            continue
        rule = _RULES[v.op]
        operands = [_convert(names[a], lay.kinds[a], need) for a, need in zip(v.args, rule.arg_kinds)]
        fmt = {}
        if v.op == "dropout":
            w(f"# dropout '{v.name}': mask shape {list(lay.mask_shapes[i])}, counter = mask index + base + doff{i}")
            cnt = offset_expr(f"mask{i}", mask_ops[i])
            w(f"keep{i} = tl.rand(seed, ({cnt}).to(tl.int64) + base + doff{i}) >= {names[v.args[1]]}")
            fmt["keep"] = f"keep{i}"
        expr = rule.triton.format(*operands, **fmt)
        if v.op == "cast" and v.dtype in _ROUNDING_CASTS:
            # Values live in fp32 registers; a cast to a 16-bit float must still round like
            # eager's ``.half()`` / ``.bfloat16()`` (``a.half().float() - a`` is not 0).
            expr = f"({expr}).to({_ROUNDING_CASTS[v.dtype]}).to(tl.float32)"
        w(f"v{i} = {expr}  # {v.name} = {v.op}("
          f"{', '.join(vals[a].name for a in v.args)})")
        names[i] = f"v{i}"
    if not backward:
        if row_sum:
            (o,) = frag.outputs
            w(f"tl.store(out0 + rows, tl.sum(tl.where(valid, {names[o]}, 0.0), axis=1).to(out0.dtype.element_ty), "
              "mask=rows < R)")
            return "\n".join(w.lines)
        for k, o in enumerate(frag.outputs):
            w(f"tl.store(out{k} + offs, {names[o]}.to(out{k}.dtype.element_ty), mask=valid)")
        return "\n".join(w.lines)
    # Reverse sweep: adjoints of every value between the inputs that need a gradient and the outputs.
    diff = _differentiable_set(frag, lay, grad_inputs)
    adj: dict[int, str] = {}
    for k, o in enumerate(gouts):
        op = ops[n_in + k]
        expr = f"tl.load(gout{k} + ({offset_expr(f'gout{k}', op)}), mask=valid, other=0).to(tl.float32)"
        if o in adj:
            w(f"{adj[o]} = {adj[o]} + {expr}")
        else:
            w(f"g{o} = {expr}")
            adj[o] = f"g{o}"
    for i in reversed(lay.live):
        v = vals[i]
        if v.kind != "op" or i not in adj:
            continue
        rule = _RULES[v.op]
        operands = [_convert(names[a], lay.kinds[a], need) for a, need in zip(v.args, rule.arg_kinds)]
        fmt = {"g": adj[i], "y": names[i]}
        if v.op == "dropout":
            fmt["keep"] = f"keep{i}"
        for pos, (a, tmpl) in enumerate(zip(v.args, rule.grads)):
            if tmpl is None or a not in diff:
                continue
            contrib = tmpl.format(*operands, **fmt)
            if v.op == "cast" and v.dtype in _ROUNDING_CASTS:
                # Eager holds the gradient of a 16-bit value in that dtype (the cast's backward
                # rounds it): round the adjoint the same way before passing it on.
                contrib = f"({contrib}).to({_ROUNDING_CASTS[v.dtype]}).to(tl.float32)"
            if a in adj:
                w(f"{adj[a]} = {adj[a]} + {contrib}  # d{v.name}/d{vals[a].name}")
            else:
                w(f"g{a} = {contrib}  # d{v.name}/d{vals[a].name}")
                adj[a] = f"g{a}"
    for k, vid in enumerate(grad_inputs):
        if split is not None and reduced[k]:
            w(f"tl.store(gin{k} + pid_r * C + cols, tl.sum(tl.where(valid, {adj[vid]}, 0.0), axis=0), "
              "mask=cols < C)")
        else:
            w(f"tl.store(gin{k} + offs, {adj[vid]}.to(gin{k}.dtype.element_ty), mask=valid)")
    return "\n".join(w.lines)


def _adjoint_set(frag: _Fragment, lay: _Layout, grad_inputs: list[int]) -> set[int]:
    """Values that receive an adjoint in the reverse sweep (a subset of the differentiable set)."""
    diff = _differentiable_set(frag, lay, grad_inputs)
    adj = {o for o in frag.outputs if o in diff}
    for i in reversed(lay.live):
        v = frag.vals[i]
        if v.kind == "op" and i in adj:
            adj.update(a for a, g in zip(v.args, _RULES[v.op].grads) if g is not None and a in diff)
    return adj


def _live_gouts(frag: _Fragment, lay: _Layout, grad_inputs: list[int]) -> list[int]:
    """The distinct outputs whose upstream gradient the backward kernel reads, in output order."""
    diff = _differentiable_set(frag, lay, grad_inputs)
    return list(dict.fromkeys(o for o in frag.outputs if o in diff))


def _differentiable_set(frag: _Fragment, lay: _Layout, grad_inputs: list[int]) -> set[int]:
    """Values that depend differentiably on one of ``grad_inputs`` (those need adjoints)."""
    dep = set(grad_inputs)
    for i in lay.live:
        v = frag.vals[i]
        if v.kind == "op" and lay.kinds[i] == "f":
            rule = _RULES[v.op]
            if any(a in dep and g is not None for a, g in zip(v.args, rule.grads)):
                dep.add(i)
    return dep


# ---------------------------------------------------------------------------------
# Compiling generated source
# ---------------------------------------------------------------------------------

_COMPILED: dict[str, Any] = {}
_COMPILE_LOCK = threading.Lock()
_SOURCE_DIR: str | None = None


def _compile(source: str, name: str) -> Any:
    """Import the generated source as a module (triton.jit needs a real file to read)."""
    global _SOURCE_DIR
    with _COMPILE_LOCK:
        fn = _COMPILED.get(source)
        if fn is not None:
            return fn
        if _SOURCE_DIR is None:
            _SOURCE_DIR = tempfile.mkdtemp(prefix="foldcompile_elementwise_")
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        mod_name = f"foldcompile_ew_{digest}"
        path = os.path.join(_SOURCE_DIR, mod_name + ".py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        fn = getattr(module, name)
        _COMPILED[source] = fn
        return fn


_HEADER = '''"""Generated by foldcompile.kernels.elementwise: do not edit.

Fragment:
{code}
"""
import triton
import triton.language as tl


@triton.jit
def _fc_tanh(x):
    # |x| < 0.55: x + x^3 P(x^2) (a least-squares fit to tanh's relative error, about 1 ulp
    # in fp32 down to the smallest x); elsewhere 1 - 2 / (exp(2|x|) + 1), whose cancellation
    # is bounded there because tanh >= 0.5. NaN falls through to the exp branch and stays NaN.
    a = tl.abs(x)
    t = x * x
    p = (((-0.006264359237691209 * t + 0.021064131235418473) * t - 0.053850295059224396) * t
         + 0.13332564438021324) * t - 0.3333331679863419
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(a < 0.55, x + x * t * p, tl.where(x < 0.0, -big, big))


'''


def _block_config(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps): one config, chosen by size (no autotuning: it fails in the interpreter)."""
    if _dispatch.interpreting() or numel < (1 << 20):
        return 1024, 4
    return 2048, 8


def _tile_config(cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the backward's tile mode: ~4K elements a tile."""
    block_c = min(triton.next_power_of_2(cols), 256)
    return max(1, 4096 // block_c), block_c, 8 if not _dispatch.interpreting() else 4


def _leading_false(pattern: tuple[bool, ...]) -> int:
    n = 0
    for used in pattern:
        if used:
            break
        n += 1
    return n
