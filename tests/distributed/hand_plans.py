"""Planned graphs written by hand, for testing the lowering without the planning pass.

A model written here calls ``move(x, src, dst)`` where its placement changes and
``placed(x, placement)`` where a dim-changing op (an einsum, a reduction) gives its output a
placement the simple propagation below cannot know; placements are spelled ``"s0"`` (Shard(0)),
``"r"`` (Replicate), ``"p"`` (Partial). Both are the identity, kept as calls by either tracer
(``torch.fx.wrap`` for ``symbolic_trace``, ``torch.compiler.allow_in_graph`` for the Dynamo
capture of ``optimize``). :func:`hand_plan` (or :func:`hand_planner`, the planning-pass
interface ``optimize`` calls) writes ``meta["shard"]`` on every node of a traced graph:

- inputs: the ``seeds`` (by name; default Replicate); parameters: Replicate;
- ``move`` (placed at ``src``) is followed by a ``redistribute(x, src, dst)`` its users read;
  ``placed``: it and its input get the placement given (a planner only inserts redistributes:
  both markers stay, the identity);
- any other op: Replicate if every tensor input is; otherwise the inputs' one non-Replicate
  placement, a Shard dim right-aligned to the output's rank for element-wise ops (broadcasting),
  moved by the index for ``x[...]``, kept for the rest (views of trailing dims, linear); two
  that differ are an error asking for ``placed``.

Run as it is, the model is the single-process reference.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F

from foldcompile.distributed import split_sizes
from foldcompile.passes.base import PassResult
from foldcompile.passes.classify import classify_pass
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.placement import Partial, Placed, Replicate, Shard, redistribute
from foldcompile.passes.shape_prop import shape_prop_pass


def move(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """The identity; a planned change of placement (``"s0"`` -> ``"r"``, ...)."""
    return x


def placed(x: torch.Tensor, placement: str) -> torch.Tensor:
    """The identity; tells the hand planner the placement of ``x``."""
    return x


torch.fx.wrap("move")
torch.fx.wrap("placed")
torch.compiler.allow_in_graph(move)
torch.compiler.allow_in_graph(placed)


def parse(spec: str) -> Any:
    if spec == "r":
        return Replicate()
    if spec == "p":
        return Partial()
    m = re.fullmatch(r"s(\d+)", spec)
    if not m:
        raise ValueError(f"hand_plan: placement {spec!r} is not 'r', 'p' or 's<dim>'")
    return Shard(int(m.group(1)))


def _clean(name: str) -> str:
    return re.sub(r"^l_+", "", name.lower()).strip("_")


def hand_plan(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], world_size: int, *,
              seeds: Mapping[str, str], dims: Mapping[str, int]) -> torch.fx.GraphModule:
    """The planned graph of ``module`` traced by ``symbolic_trace`` (see the module docstring)."""
    gm = torch.fx.symbolic_trace(module)
    gm = normalize_pass(gm).graph_module
    shape_prop_pass(gm, list(example_inputs), dims=dict(dims))
    gm = place_by_hand(gm, world_size, seeds)
    classify_pass(gm)
    return gm


def hand_planner(seeds: Mapping[str, str]):
    """A planning pass with ``shard_pass``'s interface for ``optimize(..., planner=...)``."""
    def plan(gm: torch.fx.GraphModule, world_size: int, dap_axes=None, at=None) -> PassResult:
        return PassResult(place_by_hand(gm, world_size, seeds), True, {"hand": True})
    return plan


def place_by_hand(gm: torch.fx.GraphModule, world_size: int, seeds: Mapping[str, str]) -> torch.fx.GraphModule:
    """Write ``meta["shard"]`` on an annotated graph holding ``move`` / ``placed`` calls."""
    places: dict[torch.fx.Node, Any] = {}
    for n in list(gm.graph.nodes):
        if n.op == "output":
            continue
        shape = n.meta.get("shape")
        if n.op == "placeholder":
            p = parse(seeds.get(_clean(n.name), "r"))
        elif n.op == "get_attr":
            p = Replicate()
        elif n.target is move:        # stays (the identity, at src); a redistribute after it moves it
            src, dst = parse(n.args[1]), parse(n.args[2])
            places[n] = src
            _set(n, src, world_size)
            users = list(n.users)
            with gm.graph.inserting_after(n):
                r = gm.graph.call_function(redistribute, (n, src, dst))
            r.meta.update({k: n.meta[k] for k in ("shape", "dtype", "sym_shape") if k in n.meta})
            for u in users:
                u.replace_input_with(n, r)
            places[r] = dst
            _set(r, dst, world_size)
            continue
        elif n.target is placed:      # stays (the identity); it and its input have the placement given
            p = parse(n.args[1])
            places[n.args[0]] = p
            _set(n.args[0], p, world_size)
        else:
            p = _propagate(n, places)
        if shape is not None or n.meta.get("multi_output"):
            places[n] = p
            _set(n, p, world_size)
    gm.graph.lint()
    gm.recompile()
    return gm


def _propagate(n: torch.fx.Node, places: dict) -> Any:
    found = []
    out_rank = len(n.meta["shape"]) if isinstance(n.meta.get("shape"), tuple) and not n.meta.get("multi_output") \
        else None
    for a in n.all_input_nodes:
        p = places.get(a)
        if p is None or isinstance(p, Replicate):
            continue
        if isinstance(p, Shard) and n.target is operator.getitem and a is n.args[0]:
            p = Shard(_indexed_dim(n.args[1], p.dim, len(a.meta["shape"])))
        elif isinstance(p, Shard) and out_rank is not None and n.meta.get("op_class") == "ELEMENTWISE":
            p = Shard(p.dim + out_rank - len(a.meta["shape"]))   # broadcasting aligns the last dims
        found.append(p)
    if not found:
        return Replicate()
    if any(f != found[0] for f in found):
        raise ValueError(f"hand_plan: {n.name} has inputs placed {found}: say its placement with placed()")
    return found[0]


def _indexed_dim(index: Any, d: int, rank: int) -> int:
    """Where input dim ``d`` lands after ``x[index]`` (slices keep a dim, None adds one)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        i = items.index(Ellipsis)
        fill = rank - sum(1 for x in items if x is not None and x is not Ellipsis)
        items = items[:i] + [slice(None)] * fill + items[i + 1:]
    items += [slice(None)] * (rank - sum(1 for x in items if x is not None))
    src = out = 0
    for x in items:
        if x is None:
            out += 1
            continue
        if src == d:
            if not isinstance(x, slice) or x != slice(None):
                raise ValueError(f"hand_plan: indexing {index} cuts the sharded dim {d}")
            return out
        src += 1
        out += isinstance(x, slice)
    raise ValueError(f"hand_plan: dim {d} not found in index {index}")


def _set(n: torch.fx.Node, p: Any, world: int) -> None:
    if n.meta.get("multi_output"):
        n.meta["shard"] = tuple(_one(s, y, p, world) for s, y in zip(n.meta["shape"], n.meta["sym_shape"]))
    else:
        n.meta["shard"] = _one(n.meta["shape"], n.meta["sym_shape"], p, world)


def _one(shape, sym, p, world) -> Placed:
    if isinstance(p, Shard):
        return Placed(p, tuple(split_sizes(int(shape[p.dim]), world)), sym[p.dim])
    return Placed(p)


# --------------------------------------------------------------------------- the test model

class MiniDAP(torch.nn.Module):
    """A DAP-shaped block exercising every part of the lowering.

    m [S, R, 8] and z [R, R, 6] sharded on their first dim, msa_mask [S, R] too. Row attention
    over m with a pair bias gathered from z (the bias also feeds a replicated statistic: a
    Replicate value with both kinds of consumers), views with literal sizes along the sharded
    dim, a replicated random mask and a dropout on a shard, an all_to_all to columns and an
    outer product with a gathered operand (a literal local size in its reshape), a Partial sum
    reduce-scattered into z and another all-reduced, a replicated value computed from a parameter sliced into z, an
    ``arange`` along the sharded dim, and ``w_b`` used both on z's rows and on a replicated value.
    """

    def __init__(self, S: int, R: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.S, self.R = S, R
        g = torch.Generator().manual_seed(7)

        def p(*shape, scale=0.4):
            return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=dtype) * scale)

        self.w_b, self.w_q, self.w_o = p(2, 6), p(8, 8), p(8, 8)
        self.w_a, self.w_oz, self.w_t = p(3, 8), p(6, 9), p(6, 8)
        self.w_pos = p(6)

    def forward(self, m, z, msa_mask):
        S, R = self.S, self.R
        b = F.linear(z, self.w_b)                                   # [R/P, R, 2]
        b = move(b, "s0", "r")                  # all_gather
        b_stat = (b * b).mean()                                     # replicated consumer of b
        q = F.linear(m, self.w_q).view(S, R, 2, 4)                  # literal S along the sharded dim
        logits = torch.einsum("sihc,sjhc->shij", q, q) * 0.5
        logits = placed(logits, "s0") + b.permute(2, 0, 1)
        logits = logits + (msa_mask[:, None, None, :] - 1) * 1e9
        a = torch.softmax(logits, -1)
        o = placed(torch.einsum("shij,sjhc->sihc", a, q), "s0").reshape(S, R, 8)
        m = m + F.linear(o, self.w_o)
        keep = torch.bernoulli(torch.full([1, R, 8], 0.8, dtype=m.dtype))     # a replicated mask
        m = m * keep / 0.8
        m = F.dropout(m, 0.25, self.training)                                 # dropout of a shard
        t = placed(torch.einsum("sic,sjc->ij", m, m), "p")          # contracts the sharded s
        z = z + F.linear(move(t, "p", "s0")[:, :, None], self.w_t[:, :1])
        m_c = move(m, "s0", "s1")                             # all_to_all: rows -> columns
        x = F.linear(m_c, self.w_a)                                           # [S, R/P, 3]
        y = move(x, "s1", "r")                            # all_gather
        outer = placed(torch.einsum("sic,sjd->ijcd", x, y), "s0").reshape(R, R, 9) / S
        z = z + F.linear(placed(outer, "s0"), self.w_oz)
        pos = torch.linspace(0.0, 1.0, R, dtype=z.dtype)[:, None] * self.w_pos  # replicated [R, 6]
        z = z + move(pos, "r", "s0")[:, None, :]
        idx = torch.arange(R, dtype=z.dtype)
        z = z + placed(idx, "s0")[:, None, None] * 0.01
        zs = placed(z.sum((0, 1)), "p") / (R * R)
        zs = move(zs, "p", "r")                         # all_reduce
        r = F.linear(zs, self.w_b)                                            # w_b used replicated too
        return m, z, r, b_stat


MINI_DIMS = {"N_seq": 5, "N_res": 7}
MINI_SEEDS = {"m": "s0", "z": "s0", "msa_mask": "s0"}


def mini_inputs(dtype: torch.dtype = torch.float64, seed: int = 11) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    S, R = MINI_DIMS["N_seq"], MINI_DIMS["N_res"]
    m = torch.randn(S, R, 8, generator=g, dtype=dtype)
    z = torch.randn(R, R, 6, generator=g, dtype=dtype)
    mask = (torch.rand(S, R, generator=g) > 0.2).to(dtype)
    mask[:, 0] = 1
    return m, z, mask


def mini_plan(world_size: int, training: bool = True, dtype: torch.dtype = torch.float64):
    model = MiniDAP(MINI_DIMS["N_seq"], MINI_DIMS["N_res"], dtype).train(training)
    inputs = mini_inputs(dtype)
    return model, inputs, hand_plan(model, inputs, world_size, seeds=MINI_SEEDS, dims=MINI_DIMS)
