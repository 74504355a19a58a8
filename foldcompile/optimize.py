"""``foldcompile.optimize``: the user's model, with its attentions, softmaxes and layer norms in fused kernels.

``optimize(model, *example_inputs, **example_kwargs)`` captures the model on the examples
(:func:`foldcompile.trace`), runs normalize -> shape_prop -> classify -> merge chunk loops
(:mod:`foldcompile.passes.merge_chunk_loops`, annotating a merged graph again) -> fuse
(:func:`foldcompile.passes.fuse.fuse_pass`) and returns an :class:`OptimizedModule`::

    >>> import torch, foldcompile
    >>> class Attend(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.qkv = torch.nn.Linear(16, 48, bias=False)
    ...     def forward(self, x, key_mask):
    ...         q, k, v = self.qkv(x).view(*x.shape[:-1], 3, 2, 8).permute(2, 0, 3, 1, 4)   # [S, H, L, 8]
    ...         w = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + (key_mask[:, None, None, :] - 1) * 1e9, -1)
    ...         return (w @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)
    >>> model, x, mask = Attend(), torch.randn(3, 7, 16), torch.ones(3, 7)
    >>> fast = foldcompile.optimize(model, x, mask)
    >>> fast.report.counts()["attention"]
    {'matched': 1, 'rejected': 0}
    >>> "fused_attention(" in fast.code
    True
    >>> torch.allclose(fast(x, mask), model(x, mask), atol=1e-5)
    True
    >>> list(fast.parameters())[0] is model.qkv.weight        # the model's own parameters
    True

What it promises: the returned module computes what ``model`` computes. A pattern the
rules do not match exactly is left as it was; a model the front end cannot capture gets its
:class:`~foldcompile.CaptureError` (naming the construct and the source line), never a
silently different function.

The :class:`OptimizedModule` holds ``model`` itself: ``parameters()``, ``state_dict()``,
``train()``/``eval()`` are the model's, so an optimizer built on ``model.parameters()``
trains it and each step is seen by the next call. Every call is keyed by what a capture is
specialised on (shapes, dtypes, devices, grad mode, autocast, training mode;
:mod:`foldcompile.variants`): a call with another key builds (or reuses) another variant,
logging which guard differed; past ``max_builds`` builds calls run the model eagerly with a
warning (``strict=True``: :class:`~foldcompile.variants.VariantLimitError`). A call whose
captured guards fail although the key matched (the model's attributes changed) rebuilds
that variant once.

``at`` (default the training crop, ``N_seq=128, N_res=256``) is the size every rule's
profitability is judged at; the example inputs can be tiny.

``executor`` (``"auto"``, ``"eager"``, ``"cuda_graph"``, ``"inductor"``) picks what runs each
variant's graph; ``"auto"`` is eager on CPU and CUDA graphs on CUDA where they are safe (the rule:
:mod:`foldcompile.executors.select`). ``.report.executor`` says which one runs and why.
"""
from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree

from foldcompile.capture import flat_inputs, trace
from foldcompile.executors import EXECUTOR_NAMES, select_executor
from foldcompile.guards import GuardError
from foldcompile.pass_manager import copy_graph_module
from foldcompile.passes.base import PassError
from foldcompile.passes.classify import classify_pass
from foldcompile.passes.explicit_autocast import explicit_autocast_pass
from foldcompile.passes.fuse import DEFAULT_AT, fuse_pass
from foldcompile.passes.merge_chunk_loops import RULE as MERGE_RULE
from foldcompile.passes.merge_chunk_loops import merge_chunk_loops_pass
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.shape_prop import calls_checkpoint_body, shape_prop_pass
from foldcompile.variants import EAGER, VariantCache, VariantKey, call_key

__all__ = ["optimize", "OptimizedModule", "OptimizeReport", "Variant", "build_variant", "fuse_graph", "fuse_annotated",
           "readable_code"]


@dataclass
class Variant:
    """One compiled specialisation: the traced (classified, unfused) graph and the fused one."""

    traced: torch.fx.GraphModule
    graph: torch.fx.GraphModule
    record: dict[str, Any]
    build_seconds: float
    disabled: tuple[str, ...] = ()
    executor: Any = None  # what runs ``graph`` (foldcompile.executors); None: the graph itself, eagerly

    def run(self, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        """One call of the fused graph through the variant's executor."""
        if self.executor is None:
            return self.graph(*args, **kwargs)
        return self.executor(args, dict(kwargs))


@dataclass
class OptimizeReport:
    """What the fusion pass did on one variant: every match per rule, every rejected candidate with
    its reason, and every REDUCTION/ELEMENTWISE node left unfused with its reason."""

    record: dict[str, Any]
    model_name: str = ""
    dims: dict[str, int] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)  # the executor's describe()

    @property
    def executor(self) -> str:
        """The executor running the variant's calls (``"eager"``, ``"cuda_graph"``, ``"inductor"``)."""
        return self.execution.get("executor", "eager")

    @property
    def executor_reason(self) -> str:
        """Why that executor runs (the selection rule's words, and any fallback)."""
        return self.execution.get("reason", "no executor: the graph runs itself, eagerly")

    def counts(self) -> dict[str, dict[str, int]]:
        """Per rule: ``{"matched": n, "rejected": m}``."""
        return {k: dict(v) for k, v in self.record["counts"].items()}

    @property
    def matches(self) -> list[dict[str, Any]]:
        return list(self.record["matches"])

    @property
    def rejections(self) -> list[dict[str, Any]]:
        return list(self.record["rejections"])

    @property
    def unfused(self) -> list[dict[str, Any]]:
        return list(self.record["unfused"])

    def to_dict(self) -> dict[str, Any]:
        return dict(self.record)

    def __str__(self) -> str:
        r = self.record
        at = ", ".join(f"{k}={v}" for k, v in r["at"].items()) or "the example size (the graph has no named dims)"
        cov = r["coverage"]
        lines = [f"{self.model_name}: fused at {at} (example dims {self.dims})"]
        if r.get("not_fused_because"):
            lines.append(f"note: {r['not_fused_because']}")
        ac = r.get("explicit_autocast") or {}
        if ac.get("regions"):
            lines.append(f"autocast made explicit: {len(ac['changed'])} op(s) with {ac['casts']} cast(s) in "
                         f"{len(ac['regions'])} region(s)" + (f"; {len(ac['refused'])} op(s) kept under autocast: "
                         + "; ".join(f"{x['node']} ({x['op']}): {x['reason']}" for x in ac["refused"][:4])
                         if ac["refused"] else ""))
        lines.append(f"executor: {self.executor} ({self.executor_reason})")
        lines += [
                 f"reduction + element-wise bytes in kernels at that size: {cov['fraction']:.1%}", "",
                 "rule            matched  rejected"]
        for rule, c in r["counts"].items():
            lines.append(f"{rule:<15} {c['matched']:>7}  {c['rejected']:>8}")
        lines += ["", "matches:"]
        lines += [f"  {m['id']:<18} at {m['site']}" + (f"  ({'; '.join(m['notes'])})" if m["notes"] else "")
                  for m in r["matches"]] or ["  (none)"]
        lines += ["", "rejected candidates:"]
        lines += [f"  {x['rule']} at {x['site']} ({x['node']}): {x['reason']}" for x in r["rejections"]] or ["  (none)"]
        if r.get("disabled"):
            lines += ["", "disabled matches: " + ", ".join(d["id"] for d in r["disabled"])]
        lines += ["", "left unfused (reduction / element-wise):"]
        by_reason: dict[str, list[str]] = {}
        for u in r["unfused"]:
            by_reason.setdefault(u["reason"], []).append(f"{u['op']}@{u['site']}")
        for reason, items in by_reason.items():
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            lines.append(f"  {reason}: {shown}")
        if not by_reason:
            lines.append("  (none)")
        return "\n".join(lines)


def _annotate(gm: torch.fx.GraphModule, values: list[Any], dims: Mapping[str, int] | None) -> None:
    """shape_prop then classify. shape_prop's named dims come from argument names; on code whose
    names it cannot read (third-party models) its ambiguity error is kept in the meta and the
    graph is annotated with no named dims (every size a constant): rules then judge
    profitability at the example size, which the report says."""
    try:
        shape_prop_pass(gm, values, dims=dict(dims) if dims else None)
    except PassError as e:
        gm.meta["named_dims_unavailable"] = str(e)
        _ConcreteShapes(gm).run(*values)
        gm.meta["dims"] = {}
    classify_pass(gm)


class _ConcreteShapes(torch.fx.Interpreter):
    """The meta shape_prop writes, with every size a constant (no named dims). An activation-checkpoint
    body (``checkpoint(wrap_body_0, *args)``) is annotated too, node by node, as shape_prop does, so
    classify and the rules see inside it on this path as well."""

    def run_node(self, n: torch.fx.Node) -> Any:
        with torch.no_grad():
            if calls_checkpoint_body(n):
                args, _ = self.fetch_args_kwargs_from_env(n)
                out = _ConcreteShapes(args[0]).run(*args[1:])
            else:
                out = super().run_node(n)
        n.meta.pop("multi_output", None)
        if isinstance(out, torch.Tensor):
            n.meta["shape"], n.meta["dtype"] = tuple(out.shape), out.dtype
            n.meta["sym_shape"] = tuple(sympy.Integer(c) for c in out.shape)
            if n.op == "call_function":
                ptrs = {a.untyped_storage().data_ptr() for a in self.fetch_args_kwargs_from_env(n)[0]
                        if isinstance(a, torch.Tensor)}
                n.meta["aliases_input"] = out.untyped_storage().data_ptr() in ptrs
        elif isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
            n.meta["shape"] = tuple(tuple(t.shape) for t in out)
            n.meta["dtype"] = tuple(t.dtype for t in out)
            n.meta["sym_shape"] = tuple(tuple(sympy.Integer(c) for c in t.shape) for t in out)
            n.meta["multi_output"] = True
        else:
            n.meta["shape"] = n.meta["dtype"] = n.meta["sym_shape"] = None
        return out


def build_variant(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any], *,
                  at: Mapping[str, int] | None = None, disabled: Iterable[str] = (),
                  dims: Mapping[str, int] | None = None, rules: list | None = None) -> Variant:
    """Capture ``model`` on ``(args, kwargs)`` under the current modes and fuse it."""
    t0 = time.perf_counter()
    gm = trace(model, *args, **kwargs)
    variant = fuse_graph(gm, flat_inputs(gm, args, kwargs), at=at, disabled=disabled, dims=dims, rules=rules,
                         buffers=list(model.buffers()))
    # both graphs rename a value that took an argument's name to the same fresh name: fresh among the
    # traced graph's names too, which fusion may have freed in the fused graph (verify pairs nodes by name)
    traced_names = {n.name for n in variant.traced.graph.nodes}
    _name_inputs_after_the_model(variant.graph, model, taken=traced_names)
    _name_inputs_after_the_model(variant.traced, model, taken=traced_names)
    variant.graph.recompile()
    variant.build_seconds = time.perf_counter() - t0
    return variant


def fuse_graph(gm: torch.fx.GraphModule, values: list[Any], *, at: Mapping[str, int] | None = None,
               disabled: Iterable[str] = (), dims: Mapping[str, int] | None = None, rules: list | None = None,
               buffers: Iterable[torch.Tensor] = ()) -> Variant:
    """normalize -> shape_prop -> classify -> merge chunk loops -> fuse on a captured graph whose
    placeholders take ``values`` (the tensors and numbers of one call, flattened), under the current
    modes; shared by :func:`build_variant` and the Dynamo backend (:mod:`foldcompile.dynamo_backend`).

    The variant's ``traced`` graph is the capture as annotated (the truth ``verify`` compares with),
    checkpoint bodies included: the fused graph gets its own copies of them."""
    t0 = time.perf_counter()
    gm = normalize_pass(gm).graph_module
    saved = [(b, b.detach().clone()) for b in buffers]

    def annotate(g: torch.fx.GraphModule) -> None:
        # shape propagation runs the graph on real data: on copies of the inputs, with the model's
        # buffers put back afterwards, so a forward that writes in place (x += 1 on a view of an input,
        # a buffer counter) is not applied by the build itself
        copies = [v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                  for v in values]
        try:
            _annotate(g, copies, dims)
        finally:
            with torch.no_grad():
                for b, old in saved:
                    b.copy_(old)

    annotate(gm)
    traced = copy_graph_module(gm)
    fused, record = fuse_annotated(gm, annotate, at=at, disabled=disabled, rules=rules)
    return Variant(traced, fused, record, time.perf_counter() - t0, tuple(disabled))


def fuse_annotated(gm: torch.fx.GraphModule, annotate: Callable[[torch.fx.GraphModule], None], *,
                   at: Mapping[str, int] | None = None, disabled: Iterable[str] = (), rules: list | None = None
                   ) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """The fusion pipeline every path runs (``optimize``, the Dynamo backend, a DAP rank's graph, the HTML
    report's plan): on a copy of the annotated (shape_prop + classify) graph ``gm``, checkpoint bodies
    included, merge the chunk loops of whole layers (:mod:`foldcompile.passes.merge_chunk_loops`), annotate
    the merged graph again with ``annotate`` (a merged graph it cannot annotate keeps its loops, each
    listed with the reason), then ``fuse_pass``. Returns the fused copy and its record (the merges first,
    as one more rule, ``chunk_loop``). First of all autocast's casts are made explicit
    (:mod:`foldcompile.passes.explicit_autocast`; ``record["explicit_autocast"]`` says which regions were made
    explicit and which nodes were kept under autocast, and why); an ambient autocast whose casts cannot be
    made explicit leaves the variant unfused (``record["not_fused_because"]`` says why).

        >>> import torch, foldcompile
        >>> from foldcompile.capture import flat_inputs, trace
        >>> from foldcompile.passes.normalize import normalize_pass
        >>> class Chunked(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.up = torch.nn.LayerNorm(8), torch.nn.Linear(8, 16)
        ...     def forward(self, x):
        ...         return torch.cat([self.up(self.norm(x[i:i + 3])) for i in range(0, x.shape[0], 3)], dim=0)
        >>> x = torch.randn(7, 5, 8)
        >>> gm = normalize_pass(trace(Chunked(), x)).graph_module
        >>> annotate = lambda g: _annotate(g, [x], None)
        >>> annotate(gm)
        >>> fused, record = fuse_annotated(gm, annotate)
        >>> record["counts"]["chunk_loop"], record["counts"]["ln_linear"]
        ({'matched': 1, 'rejected': 0}, {'matched': 1, 'rejected': 0})
    """
    autocast_on = _ambient_autocast()
    fused = _copy_with_bodies(gm)
    # autocast's casts written into the graph (x.to(dtype)), which then runs with autocast off: our kernels
    # compute in their inputs' dtypes, so only an explicit graph can be fused; nodes the pass refused stay
    # under autocast in regions of their own, which fuse_pass treats as barriers
    made = explicit_autocast_pass(fused)
    explicit = made.record
    casting = bool(autocast_on) and not explicit["explicit"]  # the ambient autocast still casts the graph
    merged: dict[str, Any] = {}
    if not casting and rules != []:
        # a merge that does not run falls back to the graph before it (the explicit one)
        fused, merged = _merge_chunk_loops(_copy_with_bodies(fused) if made.changed else gm, fused, disabled, annotate)
    result = fuse_pass(fused, at=at, disabled=disabled, rules=[] if casting else rules)
    if merged:
        _add_record(result.record, merged)
    result.record["explicit_autocast"] = explicit
    if casting:
        result.record["not_fused_because"] = (f"autocast is active ({autocast_on}) and its casts could not be "
                                              f"made explicit ({explicit['refused_graph']}), so nothing is fused "
                                              "in this variant")
    fused.recompile()
    return fused, result.record


def _copy_with_bodies(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``copy_graph_module`` with copies of the checkpoint bodies too (it shares submodules), so fusing
    the copy leaves the original's bodies as they were."""
    new = copy_graph_module(gm)
    for name, child in list(new.named_children()):
        if isinstance(child, torch.fx.GraphModule):
            setattr(new, name, _copy_with_bodies(child))
    return new


def _merge_chunk_loops(gm: torch.fx.GraphModule, fused: torch.fx.GraphModule, disabled: Iterable[str],
                       annotate) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """The chunk loops of whole layers merged (:mod:`foldcompile.passes.merge_chunk_loops`) and the graph
    annotated again at the full row counts; a merged graph that does not run keeps the loops."""
    result = merge_chunk_loops_pass(fused, disabled=disabled)
    record = result.record
    if not result.changed:
        return fused, record
    try:
        annotate(fused)
    except CannotAnnotate as e:  # this path cannot annotate a graph again: its own reason
        why = f"not merged: {e}"
        return _copy_with_bodies(gm), _all_rejected(record, why)
    except (PassError, RuntimeError, ValueError, TypeError, IndexError) as e:
        why = f"the merged layer does not run at the full row count ({type(e).__name__}: {str(e).splitlines()[0]})"
        return _copy_with_bodies(gm), _all_rejected(record, why)
    return fused, record


class CannotAnnotate(PassError):
    """Raised by a pipeline's ``annotate`` that cannot annotate a merged graph again (a DAP rank's graph):
    the chunk loops stay, listed with this reason."""


def _all_rejected(record: dict[str, Any], why: str) -> dict[str, Any]:
    """The merge record with every merge turned into a rejection for ``why``."""
    record["rejections"] += [{"rule": m["rule"], "site": m["site"], "node": m["origin"][-1], "reason": why,
                              "source": m["source"]} for m in record["matches"]]
    counts = record["counts"][MERGE_RULE]
    counts["rejected"] += counts["matched"]
    counts["matched"] = 0
    record["matches"] = []
    return record


def _add_record(record: dict[str, Any], merged: dict[str, Any]) -> None:
    """The chunk-loop merges in the fusion record, as one more rule (first: they ran first)."""
    record["matches"][:0] = merged["matches"]
    record["rejections"][:0] = merged["rejections"]
    record["disabled"][:0] = merged["disabled"]
    record["counts"] = {**merged["counts"], **record["counts"]}


def _ambient_autocast() -> str:
    """The devices on which autocast is active for this call (``""`` for none)."""
    on = []
    for device in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device):
                on.append(device)
        except TypeError:  # an older signature without the device argument
            if device == "cuda" and torch.is_autocast_enabled():
                on.append(device)
    return ", ".join(on)


def _name_inputs_after_the_model(gm: torch.fx.GraphModule, model: torch.nn.Module,
                                 taken: Iterable[str] = ()) -> None:
    """Placeholders named like ``forward``'s parameters (``m``, not Dynamo's ``l_m_`` or ``arg4``); a value
    that had such a name gets a fresh one, not in ``gm`` nor in ``taken``."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(phs) == len(params):  # else a container argument flattened to several: the tracer's names
        _rename_placeholders(gm, [p.name for p in params], taken)
    _name_body_inputs_after_callers(gm)
    gm.recompile()


def _rename_placeholders(gm: torch.fx.GraphModule, wanted: list[str | None], taken: Iterable[str] = ()) -> None:
    """Give the placeholders of ``gm`` the names ``wanted`` (None, or a non-identifier: keep it); a
    value already holding a wanted name takes a fresh one, not in ``gm`` nor in ``taken`` (``m = norm(m)``
    re-binds the argument's)."""
    names = {n.name for n in gm.graph.nodes} | set(taken)

    def fresh(base: str) -> str:
        i = 1
        while f"{base}_{i}" in names:
            i += 1
        return f"{base}_{i}"

    by_name = {n.name: n for n in gm.graph.nodes}
    for ph, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], wanted):
        if name is None or ph.name == name or not name.isidentifier() or name in ("self", "torch", "operator"):
            continue
        other = by_name.get(name)
        if other is not None:
            if other.op == "placeholder":
                continue  # two arguments passed the same value: keep the tracer's name for the second
            other.name = fresh(name)
            # a kernel's record of the traced nodes it stands for names them as they were (verify reads this)
            gm.meta.setdefault("renamed", {})[name] = other.name
            names.add(other.name)
            by_name[other.name] = other
        names.discard(ph.name)
        # set directly: fx's renaming keeps retired names reserved; codegen keeps names unique anyway
        ph.name = name
        names.add(name)
        by_name[name] = ph


def _name_body_inputs_after_callers(gm: torch.fx.GraphModule) -> None:
    """An activation-checkpoint body's inputs named like the values its caller passes
    (``wrap_body_0(x, ln_weight, mask, ...)``, not Dynamo's ``l_x_``, ``l__self___ln_weight``), and
    their fake-tensor type annotations dropped; nested bodies likewise."""
    for n in gm.graph.nodes:
        if not calls_checkpoint_body(n):
            continue
        body = gm.get_submodule(str(n.args[0].target))
        wanted = [a.name if isinstance(a, torch.fx.Node) else None for a in n.args[1:]]
        _rename_placeholders(body, wanted)
        for ph in body.graph.nodes:
            if ph.op == "placeholder":  # called positionally: the parameter may take the value's name
                ph.type, ph.target = None, ph.name
        _name_body_inputs_after_callers(body)
        body.recompile()


def readable_code(gm: torch.fx.GraphModule) -> str:
    """``gm.code`` with the inserted kernels named for what they do (``fused_attention(...)``,
    not the module-qualified global fx writes), followed by each activation-checkpoint body the graph
    calls (``def wrap_body_0(self, x, ln_weight, ...)``, its own fused calls inside)."""
    parts = [("", _readable(gm))]
    for path, body in gm.named_modules():
        if isinstance(body, torch.fx.GraphModule) and body is not gm:
            name = path.rsplit(".", 1)[-1]
            inside = f", inside {path.rsplit('.', 1)[0]}" if "." in path else ""
            text = _readable(body).replace("def forward(self", f"def {name}(self", 1)
            parts.append((f"\n# {path}: an activation-checkpoint region{inside} (its ops run again in backward)\n",
                          text))
    # a body's input may carry the name of a kernel another body calls: numbered with the same rule
    kernels = set().union(*(re.findall(r"\b(fused_\w+)\(", text) for _, text in parts))
    return "".join(head + _number_kernel_values(text, kernels) for head, text in parts)


def _number_kernel_values(code: str, kernels: set[str]) -> str:
    # fx names a kernel's value after the kernel (``fused_layer_norm = fused_layer_norm(x, ...)``): read
    # as Python that rebinds the kernel's name, so its values are numbered instead (``fused_layer_norm_0``)
    for kernel in kernels:
        if re.search(rf"\b{kernel}\b(?!\()", code) and not re.search(rf"\b{kernel}_0\b", code):
            code = re.sub(rf"\b{kernel}\b(?!\()", f"{kernel}_0", code)
    return code


def _readable(gm: torch.fx.GraphModule) -> str:
    """One graph's own code, readable (see :func:`readable_code`)."""
    code = re.sub(r"\bfoldcompile_passes_rules_[a-z_]+?_(fused_\w+?)(_\d+)?\(", r"\1(", gm.code)
    code = re.sub(r"\bfoldcompile_kernels_philox_(draw_dropout_seed)\(", r"\1(", code)  # the kernels' dropout state
    # the DAP runtime's calls by their own names: ``h = all_to_all_start(m, ...)`` ... ``m_s1 = wait(h)``
    code = re.sub(r"\bfoldcompile_distributed_[a-z]+(?:_[a-z]+)*?_((?:all_to_all|all_gather|reduce_scatter|all_reduce)"
                  r"_start|wait|shard|keep_grad_on_rank|sum_grad|sharded_dropout|draw_global(?:_like)?)\(", r"\1(", code)
    code = re.sub(r"\btorch_Tensor_(\w+)\(", r"torch.Tensor.\1(", code).replace("torch._C._nn.linear(", "F.linear(")
    # the pytree prologue (``arg0, arg1 = fx_pytree.tree_flatten_spec(([m, z], {}), ...)`` then
    # ``m = arg0``) only re-binds the arguments: show the arguments' own names instead
    m = re.search(r"\n(\s+)((?:arg\d+, )+)= fx_pytree\.tree_flatten_spec\(\(\[([^\]]*)\], \{\}\), self\._in_spec\)\n",
                  code)
    if m:
        flat = [a.strip() for a in m.group(2).split(",") if a.strip()]
        names = [a.strip() for a in m.group(3).split(",")]
        if len(flat) == len(names):
            code = code.replace(m.group(0), "\n")
            for arg, name in zip(flat, names):
                code = re.sub(rf"\n\s+{name} = {arg}\n", "\n", code)
    return re.sub(r"\n{3,}", "\n\n", code).strip() + "\n"


def _tensors(args: Any, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(args)
    walk(dict(kwargs))
    return out


class OptimizedModule(torch.nn.Module):
    """The user's model with a cache of fused graphs; see the module docstring of ``foldcompile.optimize``."""

    def __init__(self, model: torch.nn.Module, *, at: Mapping[str, int] | None = None,
                 max_variants: int = 8, max_builds: int = 32, strict: bool = False,
                 dims: Mapping[str, int] | None = None, rules: list | None = None, executor: str = "auto"):
        super().__init__()
        if executor not in EXECUTOR_NAMES:
            raise ValueError(f"executor={executor!r}: expected one of {', '.join(map(repr, EXECUTOR_NAMES))}")
        self.model = model
        self.executor = executor
        self.at = {**DEFAULT_AT, **dict(at or {})}
        self.dims = dict(dims) if dims else None
        self.rules = rules
        self._signature = inspect.signature(model.forward)
        self._cache = VariantCache(max_variants=max_variants, max_builds=max_builds, strict=strict)
        self._last: Variant | None = None
        self.train(model.training)

    # the model's own state, not a wrapper's ------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.model.load_state_dict(*args, **kwargs)

    @property
    def variants(self) -> VariantCache:
        """The variant cache (``len``, ``misses``: which guard differed on each build)."""
        return self._cache

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def _build(self, args: tuple, kwargs: dict) -> Variant:
        # capture and shape propagation run the model's random ops (dropout): building a variant
        # must not move the user's generators, or the call that built it would draw other masks
        devices = sorted({t.device.index or 0 for t in _tensors(args, kwargs) if t.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            variant = build_variant(self.model, args, kwargs, at=self.at, dims=self.dims, rules=self.rules)
        variant.executor = select_executor(variant.graph, self.executor, pytree.tree_leaves((args, kwargs)))
        return variant

    def variant_for(self, *args: Any, **kwargs: Any) -> Variant | object:
        """The variant a call with these inputs runs (building it if needed), or ``variants.EAGER``."""
        key = call_key(self._bind(args, kwargs), self.model.training)
        return self._cache.get(key, lambda: self._build(args, kwargs))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key = call_key(self._bind(args, kwargs), self.model.training)
        variant = self._select(key, args, kwargs)
        if variant is EAGER:
            return self._run_eager(args, kwargs)
        self._before_run(variant, args, kwargs)
        try:
            out = variant.run(args, kwargs)
        except GuardError as e:
            # the key matched but a captured guard did not (module attributes, hooks, globals):
            # that variant no longer computes the model; build it again, once (on every rank alike
            # for a sharded module: each sees the same model state)
            self._cache.misses.append(f"guard failed on a cached variant: {str(e).splitlines()[0]}")
            self._cache.drop(key)
            variant = self._select(key, args, kwargs)
            if variant is EAGER:
                return self._run_eager(args, kwargs)
            out = variant.run(args, kwargs)
        self._last = variant
        return self._finish(out)

    # the steps of ``forward`` a subclass adapts (the sharded module: its gradient reducer, its
    # generator check, the hook on its outputs)
    def _select(self, key: VariantKey, args: tuple, kwargs: dict) -> Variant | object:
        """The cached variant of ``key``, built on a miss (or ``EAGER`` past the build limit)."""
        return self._cache.get(key, lambda: self._build(args, kwargs))

    def _run_eager(self, args: tuple, kwargs: dict) -> Any:
        """A call past the build limit: the user's model itself."""
        return self.model(*args, **kwargs)

    def _before_run(self, variant: Variant, args: tuple, kwargs: dict) -> None:
        """Checks before a cached variant runs (none for one process)."""

    def _finish(self, out: Any) -> Any:
        """The outputs of a variant's run as the caller receives them."""
        return out

    def _current(self) -> Variant:
        if self._last is None:
            raise RuntimeError("no variant built yet: call the module first")
        return self._last

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The fused graph of the most recent call."""
        return self._current().graph

    @property
    def code(self) -> str:
        """The fused graph of the most recent call as readable Python."""
        return readable_code(self._current().graph)

    @property
    def report(self) -> OptimizeReport:
        """What the fusion did on the most recent call's variant."""
        v = self._current()
        execution = v.executor.describe() if v.executor is not None else {}
        return OptimizeReport(v.record, type(self.model).__name__, dict(v.traced.meta.get("dims", {})), execution)


def optimize(model: torch.nn.Module, *example_inputs: Any, world_size: int = 1,
             at: Mapping[str, int] | None = None, strict: bool = False, max_variants: int = 8,
             max_builds: int = 32, dims: Mapping[str, int] | None = None, rules: list | None = None,
             executor: str = "auto", outputs: str = "full", inputs: str = "full",
             dap_axes: Mapping[str, Any] | None = None, group: Any = None, mesh: Any = None, **example_kwargs: Any) -> OptimizedModule:
    """Compile ``model`` for calls like ``model(*example_inputs, **example_kwargs)``.

    Args:
        model: any ``torch.nn.Module`` (not modified; the result holds it).
        example_inputs, example_kwargs: one call's inputs; the first variant is built from
            them now, under the current grad / autocast mode and ``model.training``.
        world_size: ``P > 1`` shards the model by DAP over the process group (``group``, default
            the default group), which must have ``P`` ranks; every rank calls ``optimize`` with the
            same parameters and whole inputs (:mod:`foldcompile.distributed.sharded`). ``outputs``:
            ``"full"`` (every output whole on every rank) or ``"sharded"`` (each in its planned
            placement); ``inputs``: ``"full"`` (every rank passes the whole inputs) or ``"sharded"``
            (every rank passes its own shard of each input the plan shards, ``module.input_placements``,
            cut by ``module.shard_inputs``; the example inputs stay whole); ``dap_axes``: the planning
            pass's seeds (input name -> dim, or None);
            ``mesh``: a 2-D ``DeviceMesh`` ``("dp", "dap")`` instead of ``group``: sharded over the
            ``"dap"`` group, gradients averaged over the ``"dp"`` replicas after each backward.
        at: sizes (``{"N_seq": 128, "N_res": 256}``, the default) at which each rule's
            profitability is judged.
        strict: raise instead of falling back to eager past ``max_builds`` variants.
        dims: named dims for shape propagation when the argument names do not tell them.
        rules: the fusion rules (default: every family's, ``passes.rules.all_rules()``).
        executor: ``"auto"`` (default), ``"eager"``, ``"cuda_graph"`` or ``"inductor"``: what runs each
            variant (:mod:`foldcompile.executors.select` has the rule).
    """
    if world_size != 1:
        from foldcompile.distributed.sharded import optimize_sharded  # DAP: the runtime's side of the package
        return optimize_sharded(model, *example_inputs, world_size=world_size, group=group, mesh=mesh, outputs=outputs,
                                inputs=inputs,
                                dap_axes=dap_axes, at=at, strict=strict, max_variants=max_variants,
                                max_builds=max_builds, dims=dims, rules=rules, executor=executor, **example_kwargs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    if inputs not in ("full", "sharded"):   # one rank's shard is the whole input: either works at world_size=1
        raise ValueError(f"optimize: inputs must be 'full' or 'sharded', got {inputs!r}")
    if mesh is not None:   # its data-parallel average would be skipped: refuse rather than train otherwise
        raise ValueError("optimize(world_size=1, mesh=...): a mesh is for DAP over world_size > 1 ranks; with "
                         "one DAP rank per replica, wrap the model in DistributedDataParallel instead")
    opt = OptimizedModule(model, at=at, max_variants=max_variants, max_builds=max_builds, strict=strict, dims=dims,
                          rules=rules, executor=executor)
    variant = opt.variant_for(*example_inputs, **example_kwargs)
    if variant is not EAGER:
        opt._last = variant
    return opt
