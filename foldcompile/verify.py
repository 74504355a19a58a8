"""``foldcompile.verify``: does the optimized graph compute what the model computes, and if not, where not?

``verify(model, *inputs, optimized=None, bisect=False)`` runs three graphs on the same inputs:

- the **truth**: the traced graph (normalized, before fusion) in float64 — parameters,
  inputs and every float dtype the graph names (``x.to(torch.float32)``) widened;
- the **traced** graph in the run dtype: eager's own rounding;
- the **optimized** graph (the variant ``optimized`` runs for these inputs).

Random ops (dropout, ``bernoulli``, ``rand*``) draw their values once and every run replays
them, so training-mode graphs are compared with identical masks. For each output, each
parameter gradient (of a fixed random projection of the outputs) and each traced node, the
report holds the relative error against the truth of the optimized run next to eager's own
(the traced run's), and names the **first node in traced order** where

    optimized error > factor × eager error + floor + resolution × u      (defaults: 4, 1e-6, 4)

with its op, module path and source line; ``u`` is the unit roundoff of the compared tensor's
dtype (2^-11 for fp16, 2^-24 for fp32), relative to the tensor's own size.

Two things make a gradient comparison degenerate in a low precision, both measured on the zoo
Evoformer block in fp16 training (``tests/optimize/test_zoo_fp16.py``):

- **Kinks.** A gradient is the derivative of the piece of a piecewise function a run is on. One
  pre-activation of the pair transition one rounding from 0 (6.5e-4 in float64, <= 0 in the
  optimized fp16 run) puts ``relu`` on its zero piece there: the forward moves by 6.5e-4, but that
  element's gradient loses the whole upstream gradient, and every parameter before it inherits
  the jump (``linear_1.bias`` 150x eager's error, everything upstream 5-60x, with any one rule
  family fused: each changes the rounding). So each run's gradients are compared with the float64
  truth's backward **on the pieces that run took** (relu, leaky_relu, clamp, hardtanh, and
  comparisons feeding a ``where``: ``passes.registry.piecewise``, read off the run's own value of
  the node); values are compared with the plain truth. ``report.crossed`` names the nodes where a
  run took other pieces, and how many elements. A kink inside a fused kernel has no value of its
  own in the optimized run: there the truth's pieces stand.
- **Eager's own error is one sample.** For one gradient and one mask draw eager fp16 can be
  unusually accurate (1.3 u for a triangle multiplication's layer-norm weight whose siblings are
  at 4-8 u; the optimized one is at 7 u): ``factor`` × eager then sits below the dtype's
  resolution. ``resolution`` units of roundoff of the run dtype, relative to the tensor's own size,
  are always allowed (in fp32 that is 2.4e-7, under ``floor``). Nodes a rule replaced are compared through the
node that took over their value (``meta["replaces"]``). ``bisect=True`` then rebuilds the
variant with halves of the matches disabled (``fuse_pass(disabled=...)``) until one match
is left whose rewrite alone breaks the bound: the culprit rule and site::

    >>> import torch, foldcompile
    >>> class Attend(torch.nn.Module):
    ...     def forward(self, q, k, v):
    ...         return torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1) @ v
    >>> q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    >>> report = foldcompile.verify(Attend(), q, k, v)
    >>> report.ok, report.first_bad is None
    (True, True)
    >>> report.outputs[0]["optimized"] < 1e-6
    True

Caveat: float64 is not always the function fp32 computes. AlphaFold's additive masks
(``1e9 * (mask - 1)``) make a fully masked row's logits exactly equal in fp32 (uniform
weights) but not in float64; eager's own error there is then large, and so is the bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx

from foldcompile.capture import flat_inputs
from foldcompile.optimize import OptimizedModule, Variant, build_variant, optimize
from foldcompile.passes.registry import draws_random, piecewise, writes_in_place
from foldcompile.passes.rules import _meta as M
from foldcompile.variants import EAGER

__all__ = ["verify", "VerifyReport"]

_WIDEN = {torch.float16: torch.float64, torch.bfloat16: torch.float64, torch.float32: torch.float64}


def _widen(x: Any) -> Any:
    if isinstance(x, torch.dtype):
        return _WIDEN.get(x, x)
    if isinstance(x, (list, tuple)):
        return type(x)(_widen(v) for v in x)
    if isinstance(x, dict):
        return {k: _widen(v) for k, v in x.items()}
    return x


class _Run(torch.fx.Interpreter):
    """Runs a graph, keeping every node's value; replays recorded random values; optionally in float64,
    and optionally with the piecewise ops on given pieces (``pieces``: node name -> the pieces another
    run took, :func:`foldcompile.passes.registry.piecewise`)."""

    def __init__(self, gm: torch.fx.GraphModule, random: dict[str, torch.Tensor], wide: bool = False,
                 params: dict[str, torch.Tensor] | None = None, pieces: dict[str, torch.Tensor] | None = None):
        super().__init__(gm)
        self.random, self.wide, self.params, self.pieces = random, wide, params or {}, pieces or {}
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "get_attr" and n.target in self.params:
            out = self.params[n.target]
        elif n.op == "call_function" and draws_random(n):
            out = self._random(n)
        elif n.op == "call_function" and n.name in self.pieces:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = (_widen(args), _widen(kwargs)) if self.wide else (args, kwargs)
            out = piecewise(n, args, kwargs).on_piece(args, kwargs, self.pieces[n.name])
        elif n.op == "call_function" and self.wide:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = n.target(*_widen(args), **_widen(kwargs))
        else:
            out = super().run_node(n)
        self.values[n.name] = out
        return out

    def _random(self, n: torch.fx.Node) -> torch.Tensor:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        name = M.op_name(n)
        if name == "dropout":
            x = args[0]
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if not training or p == 0:
                return x
            if n.name not in self.random:
                self.random[n.name] = torch.rand(x.shape, device=x.device) >= p
            keep = self.random[n.name]
            return torch.where(keep, x / (1 - p), torch.zeros((), dtype=x.dtype, device=x.device))
        if n.name not in self.random:
            drawn = n.target(*args, **kwargs)
            # an in-place draw (x.uniform_()) returns x itself, which later ops may overwrite: keep a copy
            self.random[n.name] = drawn.clone() if writes_in_place(n) else drawn
        rec = self.random[n.name]
        like = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        dt = like.dtype if like is not None else (torch.float64 if self.wide and rec.is_floating_point() else rec.dtype)
        out = rec.to(dt) if rec.is_floating_point() else rec
        return args[0].copy_(out) if writes_in_place(n) else out


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    if isinstance(x, dict):
        return [t for k in sorted(x, key=str) for t in _flat(x[k])]
    return []


def _rel(a: torch.Tensor, truth: torch.Tensor, scale: float = 0.0) -> float:
    """‖a − truth‖ / max(‖truth‖, scale); NaN positions must match (else inf)."""
    a, b = a.detach().double(), truth.detach().double()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return float("inf")
    a, b = a[~nan_b], b[~nan_b]
    num = torch.linalg.vector_norm(a - b).item()
    den = max(torch.linalg.vector_norm(b).item(), scale)
    return num / den if den else (0.0 if num == 0 else float("inf"))


@dataclass
class VerifyReport:
    """Errors against the float64 truth: per output, per parameter gradient, and the first bad node."""

    outputs: list[dict[str, Any]]
    gradients: list[dict[str, Any]]
    first_bad: dict[str, Any] | None
    factor: float
    floor: float
    resolution: float = 4.0
    culprit: dict[str, Any] | None = None
    bisect_steps: list[dict[str, Any]] = field(default_factory=list)
    # per run ("eager", "optimized"): the piecewise nodes where it took other pieces than the float64
    # truth, with how many elements crossed (its gradients are compared on its own pieces)
    crossed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.first_bad is None and all(r["ok"] for r in self.outputs + self.gradients)

    def __str__(self) -> str:
        lines = [f"verify: optimized error vs the float64 truth must be <= {self.factor:g} x eager's own + "
                 f"{self.floor:g} + {self.resolution:g} units of roundoff: {'OK' if self.ok else 'FAILED'}", "",
                 "what                                       optimized     eager   ok"]
        for r in self.outputs + self.gradients:
            lines.append(f"{r['name'][:42]:<42} {r['optimized']:>9.2e} {r['eager']:>9.2e}   {'y' if r['ok'] else 'N'}")
        for run, nodes in self.crossed.items():
            if nodes:
                lines += ["", f"{run} crossed a kink (gradients compared on its pieces): "
                              + ", ".join(f"{k} ({v} element{'s' if v > 1 else ''})" for k, v in nodes.items())]
        if self.first_bad:
            b = self.first_bad
            lines += ["", f"first node past the bound: {b['node']} ({b['op']}) at {b['module_path'] or '(root)'}"
                          f"{' — ' + b['source'] if b['source'] else ''}: optimized {b['optimized']:.2e} vs eager "
                          f"{b['eager']:.2e}"]
        if self.culprit:
            lines += ["", f"bisect: culprit {self.culprit['id']} at {self.culprit['site']}"]
        return "\n".join(lines)


def _check(variant: Variant, model: torch.nn.Module, flat: list[Any], factor: float, floor: float,
           nodes: bool = True, random: dict[str, torch.Tensor] | None = None, resolution: float = 4.0
           ) -> tuple[list, list, dict | None, dict[str, dict[str, int]]]:
    """Run the three graphs; ``random``: the random values drawn so far, by traced node name (drawn on
    first use and replayed after: every graph, and every bisect step, sees the same dropout masks).
    Returns the output rows, the gradient rows, the first bad node and, per run, the piecewise nodes
    where it took other pieces than the truth (node -> how many elements)."""
    traced, fused = variant.traced, variant.graph
    random = {} if random is None else random
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    own = dict(model.named_parameters())
    params = [own[n] for n in names]
    wide_params = {n: p.detach().double().requires_grad_(p.requires_grad)
                   for n, p in list(model.named_parameters()) + list(model.named_buffers())}
    leaves64 = [wide_params[n] for n in names]
    x64 = [x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in flat]
    # the fused graph's node for each traced node: itself where no rule took it, else the node that took
    # over its value (``meta["replaces"]``); a node inside a fused kernel has none
    by_name = {n.name: n for n in fused.graph.nodes if not n.meta.get("fused_by")}
    for n in fused.graph.nodes:
        if n.meta.get("replaces"):
            by_name[n.meta["replaces"]] = n

    with torch.enable_grad():
        r32 = _Run(traced, random)
        o32 = _flat(r32.run(*flat))
        rf = _Run(fused, random)
        of = _flat(rf.run(*flat))
        r64 = _Run(traced, random, wide=True, params=wide_params)
        o64 = _flat(r64.run(*x64))
        gen = torch.Generator().manual_seed(0)
        proj = [torch.randn(o.shape, generator=gen, dtype=torch.float64) if o.is_floating_point() else None for o in o64]

        def grads(outs, leaves):
            loss = sum((o.nan_to_num() * w.to(o.dtype)).sum() for o, w in zip(outs, proj)
                       if w is not None and o.requires_grad)
            if not torch.is_tensor(loss) or not leaves:
                return [None] * len(leaves)
            return torch.autograd.grad(loss, leaves, allow_unused=True)

        g32, gf, g64 = grads(o32, params), grads(of, params), grads(o64, leaves64)
        # A gradient is the derivative of the piece a run is on: relu(h) at an h one rounding from 0 is on
        # the zero piece in fp16 and on the identity in float64, and the gradients there differ by the
        # whole upstream gradient (the value by one rounding). Each run's gradients are compared with the
        # float64 truth's on that run's pieces, where it took others at all (values keep the plain truth)
        crossed: dict[str, dict[str, int]] = {}
        truth_grads = {}
        for run, values, rename in (("eager", r32.values, None), ("optimized", rf.values, by_name)):
            pieces, crossed[run] = _pieces_taken(traced, values, rename, r64.values)
            truth_grads[run] = g64
            if crossed[run]:
                on_pieces = _Run(traced, random, wide=True, params=wide_params, pieces=pieces)
                truth_grads[run] = grads(_flat(on_pieces.run(*x64)), leaves64)
    runs = r32, rf, r64

    # A gradient that is zero in exact arithmetic (a layer-norm bias feeding only a softmax over
    # the same dim shifts a whole row of logits) is rounding noise in fp32, different noise in
    # every implementation: relative to its own tiny float64 value that noise is arbitrarily
    # large. Gradients are measured against the larger of their own size and the model's typical
    # gradient size (the root mean square of the float64 gradients' norms).
    norms = [torch.linalg.vector_norm(t.detach().double()).item() for t in g64 if t is not None]
    typical = (sum(x * x for x in norms) / len(norms)) ** 0.5 if norms else 0.0

    def err(got, truth, scale):
        if truth is None:
            return 0.0 if got is None else float("inf")
        return _rel(got if got is not None else torch.zeros_like(truth), truth, scale)

    def row(name, got, eager, truth, truth_eager=None, scale=0.0):
        e_opt, e_eager = err(got, truth, scale), err(eager, truth if truth_eager is None else truth_eager, scale)
        bound = factor * e_eager + floor + _resolution(got, truth, scale, resolution)
        return {"name": name, "optimized": e_opt, "eager": e_eager, "ok": e_opt <= bound}

    outputs = [row(f"output {i} {tuple(t.shape)}", a, b, t) for i, (a, b, t) in enumerate(zip(of, o32, o64))
               if t.is_floating_point()]
    gradients = [row(f"grad {n}", a, b, t, te, typical)
                 for n, a, b, t, te in zip(names, gf, g32, truth_grads["optimized"], truth_grads["eager"])]
    first_bad = None
    if nodes:
        r32, rf, r64 = runs
        for n in traced.graph.nodes:
            if n.op != "call_function" or n.name not in by_name:
                continue
            t, e, g = r64.values.get(n.name), r32.values.get(n.name), rf.values.get(by_name[n.name].name)
            if not all(isinstance(v, torch.Tensor) for v in (t, e, g)) or not t.is_floating_point() or g.shape != t.shape:
                continue
            e_opt, e_eager = _rel(g, t), _rel(e, t)
            if e_opt > factor * e_eager + floor + _resolution(g, t, 0.0, resolution):
                first_bad = {"node": n.name, "op": M.op_name(n), "module_path": M.module_path(n),
                             "source": M.source_line(n), "optimized": e_opt, "eager": e_eager,
                             "optimized_node": by_name[n.name].name,
                             "match": by_name[n.name].meta.get("match_id")}
                break
    return outputs, gradients, first_bad, crossed


def _resolution(got: Any, truth: Any, scale: float, units: float) -> float:
    """``units`` units of roundoff of ``got``'s dtype, relative to ``truth``'s own size, in the units of
    ``_rel(got, truth, scale)`` (which divides by ``max(‖truth‖, scale)``)."""
    if not (isinstance(got, torch.Tensor) and got.is_floating_point() and isinstance(truth, torch.Tensor)):
        return 0.0
    own = torch.linalg.vector_norm(truth.detach().double()).item()
    den = max(own, scale)
    return units * torch.finfo(got.dtype).eps / 2 * (own / den if den else 1.0)


def _pieces_taken(traced: torch.fx.GraphModule, values: dict[str, Any], rename: dict[str, torch.fx.Node] | None,
                  truth: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The pieces one run took at each piecewise node of the traced graph whose value it kept (``rename``:
    the run's node for each traced node, None for the traced graph itself; a node inside a fused kernel
    has none: the truth's own pieces stand there), and the nodes where they are not the truth's, with
    the number of elements that crossed."""
    pieces: dict[str, torch.Tensor] = {}
    crossed: dict[str, int] = {}
    for n in traced.graph.nodes:
        pw = piecewise(n, n.args, n.kwargs)
        if pw is None:
            continue
        if rename is not None and n.name not in rename:
            continue
        mine = values.get(n.name if rename is None else rename[n.name].name)
        exact = truth.get(n.name)
        if not (isinstance(mine, torch.Tensor) and isinstance(exact, torch.Tensor)) or mine.shape != exact.shape:
            continue
        pieces[n.name] = pw.piece(mine.detach(), n.args, n.kwargs)
        differ = int((pieces[n.name] != pw.piece(exact.detach(), n.args, n.kwargs)).sum())
        if differ:
            crossed[n.name] = differ
    return pieces, crossed


def verify(model: torch.nn.Module, *inputs: Any, optimized: OptimizedModule | None = None, bisect: bool = False,
           factor: float = 4.0, floor: float = 1e-6, resolution: float = 4.0, **kwargs: Any) -> VerifyReport:
    """Compare the optimized graph with eager against the float64 truth (see the module docstring).

    ``optimized`` defaults to ``foldcompile.optimize(model, *inputs, **kwargs)``; the variant it runs
    for these inputs is checked. ``bisect=True`` on a failure finds the match that breaks the bound.
    """
    if optimized is None:
        optimized = optimize(model, *inputs, **kwargs)
    if optimized.model is not model:
        raise ValueError("verify: `optimized` does not hold this model")
    variant = optimized.variant_for(*inputs, **kwargs)
    if variant is EAGER:
        raise RuntimeError("verify: these inputs run eagerly (the variant cache is past its build limit)")
    flat = flat_inputs(variant.traced, inputs, kwargs)
    random: dict[str, torch.Tensor] = {}  # one draw of every random op, for every run and bisect step
    outputs, gradients, first_bad, crossed = _check(variant, model, flat, factor, floor, random=random,
                                                    resolution=resolution)
    report = VerifyReport(outputs, gradients, first_bad, factor, floor, resolution, crossed=crossed)
    if bisect and not report.ok:
        report.culprit, report.bisect_steps = _bisect(
            variant, lambda disabled: build_variant(model, inputs, kwargs, at=optimized.at, dims=optimized.dims,
                                                    rules=optimized.rules, disabled=disabled),
            model, flat, factor, floor, random, resolution)
    return report


def _bisect(variant: Variant, rebuild: Callable[[Iterable[str]], Variant], model: torch.nn.Module,
            flat: list[Any], factor: float, floor: float, random: dict[str, torch.Tensor] | None = None,
            resolution: float = 4.0) -> tuple[dict | None, list[dict]]:
    """Halve the set of enabled matches while the failure persists; the last one standing is the culprit."""
    matches = {m["id"]: m for m in variant.record["matches"]}
    suspects = list(matches)
    steps: list[dict] = []

    def fails(enabled: list[str]) -> bool:
        v = rebuild([m for m in matches if m not in enabled])
        outs, grads, bad, _ = _check(v, model, flat, factor, floor, nodes=True, random=random, resolution=resolution)
        failed = bad is not None or not all(r["ok"] for r in outs + grads)
        steps.append({"enabled": list(enabled), "fails": failed})
        return failed

    while len(suspects) > 1:
        half = suspects[: len(suspects) // 2]
        suspects = half if fails(half) else suspects[len(half):]
    if suspects and fails(suspects):
        return dict(matches[suspects[0]]), steps
    return None, steps  # no single match breaks it alone (an interaction): reported as such

