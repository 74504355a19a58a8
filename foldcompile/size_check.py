"""Does a captured graph's structure hold at other sizes? Checked, not assumed.

A capture specialises on its example sizes: a chunk loop over ``range(0, N_res, c)``
is unrolled into ``ceil(N_res / c)`` pieces, ``if n <= chunk_size`` picks one path,
``min(N, 64)`` becomes a constant. The symbolic costs written by ``classify_pass``
are then right at the captured sizes but may be wrong at others. Before a cost is
evaluated at other sizes, :func:`check_structure_at` captures the model again at
those sizes on the ``meta`` device (no memory, no arithmetic) and requires that

- the new graph has the same nodes, in the same order, with the same targets,
- with the same arguments, tensors abstracted to the position of the node that makes
  them and numbers to "a number" (sizes move; their effect shows in the shapes): a
  size branch that only picks another einsum equation, ``dim``, flag or dtype is seen
  here, where op names and shapes agree, and
- every tensor's concrete shape (and dtype) there equals the captured graph's symbolic
  shape evaluated at the new sizes, for ops with several outputs too.

If either fails, the graph's structure depends on the sizes and the cost is refused
with the first node where the two graphs part.

    >>> from foldcompile.capture import trace
    >>> from foldcompile.capture import flat_inputs
    >>> from foldcompile.models import zoo
    >>> from foldcompile.passes import normalize_pass, shape_prop_pass
    >>> block, ex = zoo.get("evoformer_block")              # N_seq=5, N_res=11
    >>> gm = normalize_pass(trace(block, *ex, chunk_size=4)).graph_module   # chunk loops unrolled
    >>> placeholder_values = flat_inputs(gm, ex, {"chunk_size": 4})
    >>> shape_prop_pass(gm, placeholder_values).record["dims"]
    {'N_seq': 5, 'N_res': 11}
    >>> check_structure_at(block, gm, placeholder_values, {"N_res": 13})
    Traceback (most recent call last):
        ...
    foldcompile.size_check.SizeGuardError: the graph's shapes depend on the sizes in a way the capture cannot see: at {'N_res': 13} (captured at {'N_seq': 5, 'N_res': 11}), node 'narrow_8' has shape (4, 5, 16), ...
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import sympy
import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from foldcompile.passes.base import PassError


class SizeGuardError(PassError):
    """The captured graph's structure differs at the requested sizes (a ``PassError``, as every
    other refusal of ``Report.cost``)."""


def _dim_symbols(expr: Any) -> set[str]:
    return {str(s) for s in sympy.sympify(expr).free_symbols} if expr is not None else set()


def _evaluate_shape(sym_shape: Sequence[Any], subs: Mapping[sympy.Symbol, int]) -> tuple[int, ...]:
    return tuple(int(sympy.sympify(s).subs(subs)) for s in sym_shape)


def _resized_inputs(gm: torch.fx.GraphModule, values: Sequence[Any], subs: Mapping[sympy.Symbol, int]) -> list[Any]:
    """The example inputs with every named dim set to its new size, as meta tensors."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    resized = []
    for node, value in zip(placeholders, values):
        if isinstance(value, torch.Tensor):
            sym_shape = node.meta.get("sym_shape")
            if sym_shape is None:
                raise SizeGuardError(f"input {node.name!r} has no symbolic shape: run shape_prop_pass first")
            resized.append(torch.empty(_evaluate_shape(sym_shape, subs), dtype=value.dtype, device="meta"))
        else:
            resized.append(value)
    return resized


def _structure(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _target_name(node: torch.fx.Node) -> str:
    return f"{node.op}:{getattr(node.target, '__name__', node.target)}"


def _arg_form(a: Any, position: Mapping[torch.fx.Node, int]) -> Any:
    """An argument with every node replaced by its position in its graph and every number by one marker:
    what must agree between two captures of one structure at different sizes."""
    if isinstance(a, torch.fx.Node):
        return ("node", position.get(a))
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, (int, float, torch.SymInt, torch.SymFloat)):
        return ("number",)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_arg_form(x, position) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple((k, _arg_form(v, position)) for k, v in a.items()))
    if isinstance(a, slice):
        return ("slice", _arg_form(a.start, position), _arg_form(a.stop, position), _arg_form(a.step, position))
    if isinstance(a, (str, torch.dtype, torch.device, torch.layout, torch.memory_format, type(...))):
        return a
    return ("object", type(a).__name__)  # callables, subgraph modules: their identity differs between captures


def _first_argument_difference(a: torch.fx.Node, b: torch.fx.Node, pos_a: Mapping, pos_b: Mapping) -> str | None:
    """``"argument 0 'ijc,ijc->ijc' where the capture has 'ijc,kjc->ikc'"``, or None if they agree."""
    items = [(str(i), x, y) for i, (x, y) in enumerate(zip(a.args, b.args))]
    if len(a.args) != len(b.args):
        return f"{len(b.args)} positional arguments where the capture has {len(a.args)}"
    if a.kwargs.keys() != b.kwargs.keys():
        return f"keyword arguments {sorted(b.kwargs)} where the capture has {sorted(a.kwargs)}"
    items += [(repr(k), a.kwargs[k], b.kwargs[k]) for k in a.kwargs]
    for name, x, y in items:
        if _arg_form(x, pos_a) != _arg_form(y, pos_b):
            return f"argument {name} {_shown_arg(y)} where the capture has {_shown_arg(x)}"
    return None


def _shown_arg(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return f"node {a.name!r}"
    r = repr(a)
    return r if len(r) <= 120 else r[:117] + "..."


def _metas(tensor_meta: Any) -> list[Any] | None:
    """The TensorMetadata of a node's output(s), one per tensor; None if not (only) tensors."""
    if hasattr(tensor_meta, "shape"):
        return [tensor_meta]
    if isinstance(tensor_meta, (list, tuple)) and tensor_meta and all(hasattr(t, "shape") for t in tensor_meta):
        return list(tensor_meta)
    return None


def check_structure_at(model: torch.nn.Module, gm: torch.fx.GraphModule, placeholder_values: Sequence[Any],
                       sizes: Mapping[str, int]) -> None:
    """Raise :class:`SizeGuardError` unless ``gm``'s structure and symbolic shapes hold at ``sizes``.

    ``gm`` is the captured, normalised and shape-propagated graph of ``model`` and
    ``placeholder_values`` the example values of its placeholders (as given to
    ``shape_prop_pass``); ``sizes`` maps dim names (``N_res``) to the sizes asked for.
    """
    # imported here: foldcompile.capture imports the guards, which must not import passes eagerly
    from foldcompile.capture import CaptureError, trace
    from foldcompile.passes.normalize import normalize_pass
    from foldcompile.passes.shape_prop import dim_symbol

    dims = dict(gm.meta.get("dims", {}))
    subs = {dim_symbol(k): v for k, v in {**dims, **sizes}.items()}
    if all(dims.get(k) == v for k, v in sizes.items()):
        return
    meta_model = copy.deepcopy(model).to("meta")
    inputs = _resized_inputs(gm, placeholder_values, subs)
    try:
        probe = normalize_pass(trace(meta_model, *inputs)).graph_module
        ShapeProp(probe).propagate(*[v for v in inputs])
    except (CaptureError, RuntimeError, NotImplementedError) as e:
        raise SizeGuardError(f"cannot check the graph's structure at {dict(sizes)}: capturing the model there "
                             f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    ours, theirs = _structure(gm), _structure(probe)
    pos_ours = {n: i for i, n in enumerate(gm.graph.nodes)}
    pos_theirs = {n: i for i, n in enumerate(probe.graph.nodes)}
    where = f"at {dict(sizes)} (captured at {dims})"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if _target_name(a) != _target_name(b):
            raise SizeGuardError(f"the graph's structure depends on the sizes: {where}, node {i} is "
                                 f"{_target_name(b)} ({b.name}) where the capture has {_target_name(a)} ({a.name}); "
                                 f"capture at these sizes to get their cost")
        why = _first_argument_difference(a, b, pos_ours, pos_theirs)
        if why is not None:
            raise SizeGuardError(f"the graph's structure depends on the sizes: {where}, node {i} "
                                 f"({_target_name(a)}, {a.name!r}) has {why} (a branch on a size that only changes "
                                 f"an argument); capture at these sizes to get their cost")
        sym_shape, metas = a.meta.get("sym_shape"), _metas(b.meta.get("tensor_meta"))
        if sym_shape is None or metas is None:
            continue
        sym_shapes = list(sym_shape) if a.meta.get("multi_output") else [sym_shape]
        dtypes = a.meta.get("dtype")
        dtypes = list(dtypes) if isinstance(dtypes, (list, tuple)) else [dtypes]
        if len(sym_shapes) != len(metas):
            raise SizeGuardError(f"the graph's structure depends on the sizes: {where}, node {a.name!r} gives "
                                 f"{len(metas)} tensors, the capture {len(sym_shapes)}")
        for k, (s_k, meta) in enumerate(zip(sym_shapes, metas)):
            expected = _evaluate_shape(s_k, subs)
            label = repr(a.name) + (f" (output {k})" if len(metas) > 1 else "")
            if tuple(meta.shape) != expected:
                raise SizeGuardError(f"the graph's shapes depend on the sizes in a way the capture cannot see: "
                                     f"{where}, node {label} has shape {tuple(meta.shape)}, its symbolic shape "
                                     f"{tuple(str(x) for x in s_k)} gives {expected}")
            if k < len(dtypes) and isinstance(dtypes[k], torch.dtype) and meta.dtype != dtypes[k]:
                raise SizeGuardError(f"the graph's dtypes depend on the sizes: {where}, node {label} is "
                                     f"{meta.dtype}, the capture {dtypes[k]}")
    if len(ours) != len(theirs):
        raise SizeGuardError(f"the graph's structure depends on the sizes: {where} it has {len(theirs)} nodes, "
                             f"the capture {len(ours)}; capture at these sizes to get their cost")
