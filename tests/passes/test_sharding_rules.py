"""The DAP sharding rules, one family at a time, each on a small hand-built graph and on a near miss.

A rule lists every legal strategy of a node (output placement <- input placements); each test
asserts that the placements the family allows are there and the ones it forbids are not.
"""
import torch
import torch.fx as fx
import torch.nn.functional as F

from foldcompile.passes.classify import classify_pass
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.placement import Partial, Placed, Replicate
from foldcompile.passes.registry import lookup
from foldcompile.passes.shape_prop import shape_prop_pass
from foldcompile.distributed import split_sizes
from foldcompile.passes.sharding_rules import PARTIAL, reachable, strategies, tensor_inputs
from _one_thread import one_thread  # noqa: F401  (autouse fixture)

P = 2
DIMS = {"N_seq": 5, "N_res": 7}


def annotated(fn, *inputs, dims=DIMS, params=None):
    """fn traced (its keyword arguments ``params`` as parameters), normalized, shape-propagated, classified."""
    params = params or {}
    names = ", ".join(f"x{i}" for i in range(len(inputs)))
    kw = ", ".join(f"{k}=self.{k}" for k in params)
    scope = {"fn": fn}
    exec(f"def forward(self, {names}):\n    return fn({names}{', ' if kw else ''}{kw})", scope)
    module = type("Probe", (torch.nn.Module,), {"forward": scope["forward"]})()
    for k, v in params.items():
        module.register_parameter(k, torch.nn.Parameter(v))
    gm = normalize_pass(fx.symbolic_trace(module)).graph_module
    shape_prop_pass(gm, inputs, dims=dims)
    classify_pass(gm)
    return gm


def node(gm, name_or_index=-1):
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return calls[name_or_index] if isinstance(name_or_index, int) else next(n for n in calls if n.name == name_or_index)


def table(n, candidates=None):
    """{(out, inputs)} with each Placed written as 'R', 'P' or ('S', dim, split sizes)."""
    def short(p):
        if p is None:
            return None
        if isinstance(p, tuple):
            return tuple(short(q) for q in p)
        if p.placement == Replicate():
            return "R"
        if isinstance(p.placement, Partial):
            return "P"
        return ("S", p.dim, p.split_sizes)
    return {(short(s.out), tuple(short(i) for i in s.inputs)) for s in strategies(n, P, candidates)}


def sh(d, n):
    """Shard(d) of a dim of example size n over P ranks, as ``table`` writes it."""
    return ("S", d, tuple(split_sizes(n, P)))


def with_partial(n, *which):
    """Candidates of n's inputs where the inputs in ``which`` may also be Partial."""
    ins = [u for _, u in tensor_inputs(n)]
    return [reachable(u, P) + ([PARTIAL] if i in which else []) for i, u in enumerate(ins)]


# ----------------------------------------------------------------------------- contractions

def test_einsum_batch_free_contracted():
    gm = annotated(lambda a, b: torch.einsum("sij,sjk->sik", a, b), torch.randn(5, 7, 7), torch.randn(5, 7, 7))
    t = table(node(gm))
    assert (sh(0, 5), (sh(0, 5), sh(0, 5))) in t                  # batch letter: both operands split
    assert (sh(1, 7), (sh(1, 7), "R")) in t                        # free letter of a: b replicated
    assert (sh(2, 7), ("R", sh(2, 7))) in t                        # free letter of b
    assert ("P", (sh(2, 7), sh(1, 7))) in t                        # contracted j split in both: Partial
    # near misses: a contracted letter split in one operand only, a batch letter split in one only
    assert not any(out == "P" and "R" in ins for out, ins in t if ins != ("P", "R") and ins != ("R", "P"))
    assert (sh(0, 5), (sh(0, 5), "R")) not in t


def test_partial_through_linear_ops_only():
    w, b = torch.randn(3, 4), torch.randn(3)
    gm = annotated(lambda x, w: F.linear(x, w), torch.randn(7, 4), params={"w": w})
    assert ("P", ("P", "R")) in table(node(gm), with_partial(node(gm), 0))
    gm = annotated(lambda x, w, b: F.linear(x, w, b), torch.randn(7, 4), params={"w": w, "b": b})
    # near miss: with a bias, a Partial input would add the bias once per rank
    assert not any(out == "P" for out, _ in table(node(gm), with_partial(node(gm), 0)))


def test_partial_arithmetic():
    gm = annotated(lambda x, y: (x + y, x * y, x * 2.0, x + 1.0, torch.sigmoid(x), x / y, y / x),
                   torch.randn(7, 3), torch.randn(7, 3))
    add, mul, scale, shift, sig, div, rdiv = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert ("P", ("P", "P")) in table(add, with_partial(add, 0, 1))
    assert ("P", ("P", "R")) in table(mul, with_partial(mul, 0, 1))        # P times R
    assert ("P", ("P", "P")) not in table(mul, with_partial(mul, 0, 1))    # near miss: P times P
    assert ("P", ("P",)) in table(scale, with_partial(scale, 0))
    assert not any(o == "P" for o, _ in table(shift, with_partial(shift, 0)))  # P + 1 adds 1 on every rank
    assert not any(o == "P" for o, _ in table(sig, with_partial(sig, 0)))
    assert ("P", ("P", "R")) in table(div, with_partial(div, 0, 1))
    assert not any(o == "P" for o, _ in table(rdiv, with_partial(rdiv, 1)))  # R / P is not linear in P


def test_attention_splits_batch_and_queries_not_keys():
    gm = annotated(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                   torch.randn(5, 2, 7, 4), torch.randn(5, 2, 7, 4), torch.randn(5, 2, 7, 4))
    t = table(node(gm))
    assert (sh(0, 5), (sh(0, 5), sh(0, 5), sh(0, 5))) in t          # batch (N_seq)
    assert (sh(2, 7), (sh(2, 7), "R", "R")) in t                    # queries: keys and values whole
    assert not any(ins[1] not in ("R", sh(0, 5)) for _, ins in t)   # near miss: keys never split on N_res


# ----------------------------------------------------------------------------- element-wise

def test_broadcasting():
    gm = annotated(lambda x, y: x + y, torch.randn(5, 7), torch.randn(1, 7))
    t = table(node(gm))
    assert (sh(0, 5), (sh(0, 5), "R")) in t                         # y broadcasts over N_seq: Replicate
    assert (sh(1, 7), (sh(1, 7), sh(1, 7))) in t
    assert (sh(0, 5), (sh(0, 5), sh(0, 5))) not in t                # near miss: y has no N_seq to split


def test_broadcast_against_lower_rank():
    gm = annotated(lambda x, y: x * y, torch.randn(5, 7), torch.randn(7))
    t = table(node(gm))
    assert (sh(0, 5), (sh(0, 5), "R")) in t and (sh(1, 7), (sh(1, 7), sh(0, 7))) in t


# ----------------------------------------------------------------------------- reductions

def test_reductions_need_the_reduced_dim_whole():
    gm = annotated(lambda x: (x.sum(1), x.mean(1), torch.softmax(x, -1), x.amax(0)), torch.randn(5, 7))
    s, m, sm, mx = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert ("P", (sh(1, 7),)) in table(s)                           # sum over a split dim: Partial
    assert (sh(0, 5), (sh(0, 5),)) in table(s)
    assert not any(o == "P" for o, _ in table(m))                   # near miss: mean divides by the global count
    assert ("P", ("P",)) in table(m, with_partial(m, 0))            # but the mean of a Partial is Partial
    assert all(ins != (sh(1, 7),) for _, ins in table(sm))          # softmax over N_res: never split there
    assert (sh(0, 5), (sh(0, 5),)) in table(sm)
    assert (sh(0, 7), (sh(1, 7),)) in table(mx) and all(ins[0] != sh(0, 5) for _, ins in table(mx))


def test_layer_norm():
    gm = annotated(lambda x, w: F.layer_norm(x, (3,), w), torch.randn(5, 7, 3), params={"w": torch.randn(3)})
    t = table(node(gm))
    assert (sh(0, 5), (sh(0, 5), "R")) in t and (sh(1, 7), (sh(1, 7), "R")) in t
    gm = annotated(lambda x: F.layer_norm(x, (5, 7)), torch.randn(3, 5, 7))
    assert not any(ins[0] in (sh(1, 5), sh(2, 7)) for _, ins in table(node(gm)))  # the normalised dims whole


# ----------------------------------------------------------------------------- layout

def test_view_merge_keeps_the_outer_split_in_blocks():
    gm = annotated(lambda x: x.reshape(35, 3), torch.randn(5, 7, 3))
    t = table(node(gm))
    assert (("S", 0, (21, 14)), (sh(0, 5),)) in t                   # N_seq's split, in blocks of N_res
    assert not any(ins == (sh(1, 7),) for _, ins in t)              # near miss: the inner dim of a merge


def test_view_split_puts_it_on_the_outer_new_dim():
    gm = annotated(lambda x: x.reshape(35, 3).reshape(5, 7, 3), torch.randn(5, 7, 3))
    merge, split = [n for n in gm.graph.nodes if n.op == "call_function"]
    t = table(split, [[s.out for s in strategies(merge, P)]])
    assert (sh(0, 5), (("S", 0, (21, 14)),)) in t                  # needs the merged dim split in blocks
    assert not any(o == sh(1, 7) for o, _ in t)                     # never on the inner new dim


def test_view_with_minus_one_takes_no_empty_shard():
    gm = annotated(lambda x: x.view(3, -1), torch.randn(3, 7), dims={"N_res": 3})
    empty = [s for s in strategies(node(gm), 8) if isinstance(s.out, Placed) and s.out.dim == 0]
    assert empty == []                                             # 3 over 8 ranks: torch cannot infer -1 at 0
    assert [s.out.dim for s in strategies(node(gm), 2) if s.divided] == [0]


def test_permute_moves_the_dim():
    gm = annotated(lambda x: x.permute(2, 0, 1), torch.randn(5, 7, 3))
    t = table(node(gm))
    assert (sh(1, 5), (sh(0, 5),)) in t and (sh(2, 7), (sh(1, 7),)) in t
    assert (sh(0, 5), (sh(0, 5),)) not in t                         # near miss: dim 0 is now the channel


def test_cat_and_slices_need_their_dim_whole():
    gm = annotated(lambda x, y: (torch.cat([x, y], 1), x[:, 1:], x[:, :], x[2]),
                   torch.randn(5, 7), torch.randn(5, 7))
    cat, sliced, full, indexed = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert (sh(0, 5), (sh(0, 5), sh(0, 5))) in table(cat)
    assert not any(ins[0] == sh(1, 7) for _, ins in table(cat))     # along the joined dim: whole
    assert not any(ins[0] == sh(1, 7) for _, ins in table(sliced))  # sliced with bounds: whole
    assert (sh(1, 7), (sh(1, 7),)) in table(full)                   # near miss: `:` keeps the split
    assert (sh(0, 7), (sh(1, 7),)) in table(indexed) and not any(ins[0] == sh(0, 5) for _, ins in table(indexed))


def test_narrow_spanning_the_dim_keeps_it():
    gm = annotated(lambda x: (x.narrow(0, 0, 5), x.narrow(0, 1, 3)), torch.randn(5, 7))
    whole, part = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert (sh(0, 5), (sh(0, 5),)) in table(whole)
    assert not any(ins[0] == sh(0, 5) for _, ins in table(part))


def test_split_outputs_and_getitem():
    gm = annotated(lambda x: x.split([2, 1], -1)[0], torch.randn(5, 7, 3))
    split, pick = [n for n in gm.graph.nodes if n.op == "call_function"]
    t = table(split)
    assert ((sh(0, 5), sh(0, 5)), (sh(0, 5),)) in t                 # every piece split alike
    assert not any(ins[0] == ("S", 2, (2, 1)) for _, ins in t)
    outs = [s.out for s in strategies(split, P)]
    assert {s.out for s in strategies(pick, P, [outs])} == {o[0] for o in outs}


def test_expand_from_replicate():
    gm = annotated(lambda x: x.expand(5, 7), torch.randn(1, 7))
    assert (sh(0, 5), ("R",)) in table(node(gm))                    # each rank expands to its part


# ----------------------------------------------------------------------------- creation, no rule

def test_creation_is_replicated():
    gm = annotated(lambda x: torch.arange(x.shape[1]) + x.new_ones(x.shape) * x, torch.randn(5, 7))
    made = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.arange, torch.Tensor.new_ones)]
    assert [table(n) for n in made] == [{("R", ())}, {("R", (None,))}]   # new_ones reads x for its dtype only


def test_op_without_rule_runs_replicated():
    gm = annotated(lambda x: torch.diagonal(x, 0, 0, 1), torch.randn(7, 7, 3), dims={"N_res": 7})
    diag = node(gm)
    assert lookup(diag.target).sharding is None
    assert table(diag) == {("R", ("R",))}


# ----------------------------------------------------------------------------- foldcompile's kernel ops

def test_kernel_ops():
    import foldcompile.kernels.ops  # noqa: F401  (torch.ops.foldcompile.*)
    from foldcompile.passes.sharding_rules import ensure_kernel_rules
    K = torch.ops.foldcompile
    ensure_kernel_rules()

    def f(q, k, v, bias, x):
        return K.attention.default(q, k, v, bias), K.layer_norm.default(x), K.softmax.default(x, 1)

    gm = normalize_pass(fx.symbolic_trace(f)).graph_module
    args = (torch.randn(5, 2, 7, 4), torch.randn(5, 2, 7, 4), torch.randn(5, 2, 7, 4), torch.randn(1, 2, 7, 7),
            torch.randn(5, 7, 3))
    shape_prop_pass(gm, args, dims=DIMS, fake=True)
    attn, ln, sm = [n for n in gm.graph.nodes if n.op == "call_function" and "foldcompile" in str(n.target)]
    t = table(attn)
    assert (sh(0, 5), (sh(0, 5), sh(0, 5), sh(0, 5), "R")) in t          # batch: the bias is shared (size 1)
    assert (sh(2, 7), (sh(2, 7), "R", "R", sh(2, 7))) in t               # queries: the bias split alike
    assert not any(ins[1] not in ("R", sh(0, 5)) for _, ins in t)        # near miss: keys never split on N_res
    assert (sh(1, 7), (sh(1, 7),)) in table(ln) and not any(ins[0] == ("S", 2, (2, 1)) for _, ins in table(ln))
    assert (sh(0, 5), (sh(0, 5),)) in table(sm) and not any(ins[0] == sh(1, 7) for _, ins in table(sm))


def test_every_registered_op_has_a_rule_or_is_known_not_to():
    """A new op in the registry gets a sharding rule, or joins this list (it then runs replicated)."""
    from foldcompile.passes.registry import entries
    from foldcompile.passes.sharding_rules import ensure_kernel_rules
    ensure_kernel_rules()
    def builtin(target):  # torch's and Python's ops and the planned graph's redistribute; not the
        # functions other tests and doctests register (``twice``, ``my_gate``)
        if isinstance(target, torch._ops.OpOverload):
            return True
        module = getattr(target, "__module__", None) or getattr(getattr(target, "__objclass__", None), "__module__", "")
        return module is None or module.split(".")[0] in ("torch", "operator", "_operator", "builtins") \
            or module == "foldcompile.passes.placement"
    ours = [e for e in entries(kernels=True) if all(builtin(t) for t in e.targets)]
    without = {e.name for e in ours if e.sharding is None}
    assert without == {"size", "getattr", "dim", "numel",           # Python values, not tensors
                       "gather", "diagonal",                         # not covered: replicated
                       # random draws the lowering cannot draw whole and slice: replicated
                       "uniform_", "normal_", "exponential_", "random_", "cauchy_", "geometric_", "log_normal_",
                       "randint_like", "bernoulli_", "poisson", "rrelu", "rrelu_", "feature_dropout", "alpha_dropout_",
                       "feature_alpha_dropout_", "dropout1d", "dropout2d", "dropout3d", "binomial", "normal",
                       "randint", "randperm", "multinomial",
                       "redistribute", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor",
                       "wait_tensor", "broadcast", "all_reduce"}     # collectives: a planned graph is not planned again
