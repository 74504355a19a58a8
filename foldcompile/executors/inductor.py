"""The Inductor executor: the rewritten graph, with our kernels as ``torch.library`` ops, compiled by Inductor.

Inductor fuses the glue between our kernels (layouts, casts, residual adds, the small
element-wise ops) well and, with ``mode="reduce-overhead"``, replays the whole call as CUDA
graphs (its own, with its own rules: see torch.compile's documentation). It cannot look into
our Triton wrappers, so :func:`to_library_ops` rewrites the graph first:

- the attention, layer-norm, softmax, outer-product-mean, triangle-multiplication and layer-norm-projection
  kernels become calls of
  their ``torch.library`` ops (``torch.ops.foldcompile.attention``, ``.layer_norm``, ``.softmax``, ...,
  :mod:`foldcompile.kernels.ops`):
  opaque to Dynamo and AOTAutograd, with fake implementations for shapes and backward ops of their
  own, so forward and backward keep our kernels and the graph has no break;
- each generated element-wise kernel is given back as the ops it fused (its fragment): Inductor
  generates its own fused kernel for them, and can fuse them further with their neighbours,
  which our generator, one group at a time, does not.

With ``mode="reduce-overhead"`` the outputs are cloned before they are returned: Inductor's CUDA
graphs overwrite a call's outputs on the next replay, and a caller holding them (a recycled
embedding, a logged loss) would read the next call's values or an error.

The compiled function is ``torch.compile(program, mode=..., fullgraph=True, dynamic=False)``:
``fullgraph`` makes any graph break an error, and an error on the first call (which compiles and runs
in one step) makes the executor run the graph eagerly from then on, with the reason in ``describe()``,
unless the graph writes an input or buffer in place: the failed call may already have written it, so
the error is raised (naming the write) rather than the call repeated. The
variant's guards are checked before every call, as the eager executor's graph checks them.

    >>> import torch
    >>> from foldcompile.passes.rules.layer_norm import fused_layer_norm
    >>> g = torch.fx.Graph()
    >>> x, w, b = g.placeholder("x"), g.placeholder("w"), g.placeholder("b")
    >>> _ = g.output(g.call_function(fused_layer_norm, (x, w, b, 1e-5)))
    >>> program = to_library_ops(torch.fx.GraphModule({}, g))
    >>> [n.target for n in program.graph.nodes if n.op == "call_function"]
    [<OpOverload(op='foldcompile.layer_norm', overload='default')>]
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

import foldcompile.kernels.ops  # noqa: F401  (defines torch.ops.foldcompile.*)
from foldcompile.executors.base import Executor
from foldcompile.kernels.elementwise import FusedElementwise
from foldcompile.kernels.philox import dropout as kernel_dropout
from foldcompile.passes.rules._dropout import dropout_args
from foldcompile.kernels.elementwise_sum import FusedElementwiseSum
from foldcompile.kernels.ops import TRIANGLE_MULTIPLICATION_PARAMS
from foldcompile.passes.rules.attention import fused_attention
from foldcompile.passes.rules.layer_norm import fused_layer_norm
from foldcompile.passes.rules.ln_multi_linear import fused_layer_norm_linear
from foldcompile.passes.rules.outer_product_mean import fused_outer_product_mean
from foldcompile.passes.rules.softmax import fused_softmax
from foldcompile.passes.registry import writes_in_place
from foldcompile.passes.rules._meta import source_line
from foldcompile.passes.rules.triangle_multiplication import fused_triangle_multiplication

__all__ = ["InductorExecutor", "to_library_ops", "softmax_via_op"]

log = logging.getLogger("foldcompile.executors.inductor")

_OPS = torch.ops.foldcompile


def softmax_via_op(x: torch.Tensor, dim: int, *, scale: float | None = None, bias: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`foldcompile.passes.rules.softmax.fused_softmax` with the kernel as its op: the same NaN in the
    rows where nothing is left."""
    y = _OPS.softmax.default(x, dim, scale, bias, mask)
    return y.masked_fill((y == 0).all(dim, keepdim=True), float("nan"))


def _bound(fn: Callable, node: torch.fx.Node) -> dict[str, Any]:
    b = inspect.signature(fn).bind(*node.args, **node.kwargs)
    b.apply_defaults()
    return dict(b.arguments)


def _attention_args(node: torch.fx.Node) -> tuple:
    a = _bound(fused_attention, node)
    return (a["q"], a["k"], a["v"], a["bias"], a["mask"], a["gate"], float(a["scale"]), a["key_bias"],
            a["empty_rows"])


def _layer_norm_args(node: torch.fx.Node) -> tuple:
    a = _bound(fused_layer_norm, node)
    return (a["x"], a["weight"], a["bias"], float(a["eps"]))


def _outer_product_mean_args(node: torch.fx.Node) -> tuple:
    a = _bound(fused_outer_product_mean, node)
    return (a["a"], a["b"], a["weight"], a["bias"], a["mask_a"], a["mask_b"], float(a["eps"]),
            bool(a["bias_divided"]))


def _triangle_multiplication_args(node: torch.fx.Node) -> tuple:
    a = _bound(fused_triangle_multiplication, node)
    return (a["z"], a["mask"], *(a[n] for n in TRIANGLE_MULTIPLICATION_PARAMS), float(a["eps_in"]),
            float(a["eps_out"]), bool(a["outgoing"]))


def _layer_norm_linear_args(node: torch.fx.Node) -> tuple:
    a = _bound(fused_layer_norm_linear, node)
    biases = list(a["biases"])  # the op takes the present biases and which projections have one
    return (a["x"], a["ln_weight"], a["ln_bias"], list(a["weights"]), [b for b in biases if b is not None],
            [b is not None for b in biases], float(a["eps"]), bool(a["return_normalized"]),
            a["product_dtype"] or a["x"].meta["dtype"])


def to_library_ops(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (and of the subgraphs it calls) that Dynamo can trace whole: kernels as their
    ``torch.library`` ops, generated element-wise kernels as the ops they fused (module docstring).
    The copy has no forward hooks (no guards): the executor checks them."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    env: dict[torch.fx.Node, Any] = {}
    subgraphs: dict[str, torch.fx.GraphModule] = {}

    def arg(a: Any) -> Any:
        return torch.fx.map_arg(a, lambda n: env[n])

    for node in gm.graph.nodes:
        target = node.target
        kernel = getattr(target, "kernel", None) if node.op == "call_function" else None
        if node.op == "call_function" and target in (fused_attention, fused_layer_norm, fused_softmax,
                                                     fused_outer_product_mean, fused_triangle_multiplication,
                                                     fused_layer_norm_linear):
            if target is fused_attention:
                new = graph.call_function(_OPS.attention.default, arg(_attention_args(node)))
            elif target is fused_outer_product_mean:
                new = graph.call_function(_OPS.outer_product_mean.default, arg(_outer_product_mean_args(node)))
            elif target is fused_layer_norm:
                new = graph.call_function(_OPS.layer_norm.default, arg(_layer_norm_args(node)))
            elif target is fused_triangle_multiplication:
                new = graph.call_function(_OPS.triangle_multiplication.default,
                                          arg(_triangle_multiplication_args(node)))
            elif target is fused_layer_norm_linear:
                new = graph.call_function(_OPS.layer_norm_linear.default, arg(_layer_norm_linear_args(node)))
            else:
                new = graph.call_function(softmax_via_op, arg(node.args), arg(node.kwargs))
            new.meta.update(node.meta)
        elif isinstance(kernel, FusedElementwise):
            new = _inline(graph, kernel.graph_module, [env[a] if isinstance(a, torch.fx.Node) else a
                                                       for a in node.args], arg(node.kwargs.get("seed")),
                          node.kwargs.get("offset"))
        elif isinstance(kernel, FusedElementwiseSum):  # the chain's ops, then the sum they feed
            chain = _inline(graph, kernel.chain.graph_module, [env[a] if isinstance(a, torch.fx.Node) else a
                                                               for a in node.args])
            dims = tuple(range(-kernel.n_summed, 0))
            new = graph.call_function(torch.sum, (chain, dims), {"keepdim": kernel.keepdim})
        else:
            new = graph.node_copy(node, lambda n: env[n])
            if node.op == "get_attr":
                obj: Any = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, torch.fx.GraphModule):
                    subgraphs[node.target] = to_library_ops(obj)
        env[node] = new
    program = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for name, sub in subgraphs.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = program.get_submodule(owner_name) if owner_name else program
        setattr(owner, leaf, sub)
    program.recompile()
    return program


def _inline(graph: torch.fx.Graph, fragment: torch.fx.GraphModule | torch.fx.Graph, inputs: list[Any],
            state: Any = None, offsets: Any = None) -> Any:
    """Copy an element-wise fragment's ops into ``graph``, its placeholders bound to ``inputs``. With the
    kernel's dropout ``state`` and per-dropout counter ``offsets``, each dropout it draws becomes
    ``kernels.dropout`` from that state (PyTorch ops Inductor compiles): the kernel's own masks."""
    frag = fragment.graph if isinstance(fragment, torch.fx.GraphModule) else fragment
    env: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in frag.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ValueError(f"element-wise fragment takes {len(placeholders)} inputs, the call passes {len(inputs)}")
    env.update(zip(placeholders, inputs))
    result: Any = None
    draws = iter(offsets) if isinstance(offsets, tuple) and state is not None else None
    for n in frag.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            result = torch.fx.map_arg(n.args[0], lambda a: env[a])
            break
        drawn = _drawn_dropout(n) if draws is not None else None
        if drawn is not None:
            x, p, shared_dims, rescale = drawn
            env[n] = graph.call_function(kernel_dropout, (env[x], p), {
                "shared_dims": shared_dims, "rescale": rescale, "seed": state, "offset": next(draws)})
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    return result


def _first_in_place_write(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The first node of ``gm`` (or of a graph it calls) that writes one of its inputs in place."""
    for n in gm.graph.nodes:
        if writes_in_place(n):
            return n
    for sub in gm.children():
        if isinstance(sub, torch.fx.GraphModule) and (found := _first_in_place_write(sub)) is not None:
            return found
    return None


def _drawn_dropout(n: torch.fx.Node) -> tuple[torch.fx.Node, float, tuple, bool] | None:
    """``(x, p, shared_dims, rescale)`` of a fragment node the kernel draws a mask for (in training, p != 0)."""
    if n.op != "call_function":
        return None
    if n.target is kernel_dropout:
        bound = dict(zip(("x", "p"), n.args)) | dict(n.kwargs)
        p = bound.get("p", 0.5)
        if not bound.get("training", True) or p == 0:
            return None
        return bound["x"], p, tuple(bound.get("shared_dims", ())), bound.get("rescale", True)
    found = dropout_args(n)
    if found is None or not found[2] or found[1] == 0:
        return None
    return found[0], found[1], (), True


class InductorExecutor(Executor):
    """Runs ``torch.compile(to_library_ops(graph), mode=mode, fullgraph=True, dynamic=False)``."""

    kind = "inductor"

    def __init__(self, graph: torch.fx.GraphModule, *, requested: str, reason: str, mode: str | None,
                 backend: str = "inductor"):
        super().__init__(graph, requested=requested, reason=reason)
        self.mode = mode
        self.program = to_library_ops(graph)
        self.compiled = torch.compile(self.program, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.fallback: str | None = None
        self.compiled_once = False
        # a first call that fails is run again eagerly only when that cannot repeat a write
        self.writes_in_place = _first_in_place_write(self.program)

    @property
    def name(self) -> str:
        return "eager" if self.fallback else self.kind

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["mode"] = self.mode or "default"
        if self.fallback:
            d["reason"] = f"{self.reason}; fell back to eager: {self.fallback}"
        return d

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        if self.fallback:
            return self._eager(args, kwargs)
        args, kwargs = self._bind(args, kwargs)
        if self.compiled_once:
            return self._own(self.compiled(*args, **kwargs))
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compile failure is a reason to run eagerly, not an error
            cause = getattr(e, "inner_exception", None) or e  # a backend's failure, unwrapped
            why = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}"
            if self.writes_in_place is not None:
                # The first call compiles and runs in one step, so a failure may come after the graph
                # began writing its inputs or buffers: running it again eagerly could apply those
                # writes twice. Refuse instead of guessing.
                n = self.writes_in_place
                raise RuntimeError(
                    f"foldcompile: the Inductor executor's first call failed ({why}); it is not re-run "
                    f"eagerly because the graph writes in place at node {n.name!r} ({source_line(n) or 'no source line'}), which "
                    f"the failed call may already have done. Optimize with executor='eager' for this "
                    f"model.") from e
            self.fallback = f"torch.compile failed: {why}"
            log.warning("foldcompile: Inductor executor off for this variant: %s", self.fallback)
            return self._eager(args, kwargs)
        self.compiled_once = True
        return self._own(out)

    def _own(self, out: Any) -> Any:
        """Outputs the next call cannot overwrite (copies, under Inductor's CUDA graphs)."""
        if self.mode != "reduce-overhead":
            return out
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
