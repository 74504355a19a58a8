"""Golden test: the DAP plan against FastFold's hand-placed DAP, on AlphaFold's Evoformer (block and
stack) and AlphaFold 3's Pairformer block, at the papers' channel sizes.

FastFold's table was derived by reading its code (hpcaitech/FastFold, ``fastfold/model/fastnn/``:
``evoformer.py``, ``msa.py``, ``ops.py``, ``triangle.py``; nothing is copied). Its ``Evoformer.forward``
(monomer) enters every block with the MSA representation ``m`` split on N_seq (rows) and the pair
representation ``z`` split on its first N_res (rows), and issues, in this order:

====  ==========  ======================================================  =================================
 #    kind        tensor                                                  where (FastFold's code)
====  ==========  ======================================================  =================================
 1    all_gather  MSA row attention's pair bias ``Linear(LN(z))`` [N_res,   ``MSARowAttentionWithPairBias``:
                  N_res, H_msa]                                           ``gather_async(b, dim=1)``
 2    all_to_all  ``m`` rows -> columns [N_seq, N_res, c_m]                ``MSACore``: ``row_to_col`` between
                                                                          row and column attention
 3    all_gather  outer product mean's right projection [N_seq, N_res,    ``OutProductMean``:
                  c_opm]                                                  ``gather_async(right_act, dim=2)``
 4    all_to_all  ``m`` columns -> rows, for the next block               ``Evoformer``: ``All_to_All_Async``
                                                                          after the outer product mean
 5    all_gather  outgoing triangle multiplication's right projection     ``...TriangleMultiplicationOutgoing``:
                  [N_res, N_res, c_mul]                                   ``gather_async(right_proj_act, 1)``
 6    all_to_all  ``z`` rows -> columns                                    ``PairCore``: ``row_to_col``
 7    all_gather  incoming triangle multiplication's left projection      ``...TriangleMultiplicationIncoming``:
                  [N_res, N_res, c_mul]                                   ``gather_async(left_proj_act, 2)``
 8    all_to_all  ``z`` columns -> rows                                    ``PairCore``: ``col_to_row``
 9    all_gather  starting-node triangle attention's bias [N_res, N_res,   ``ChunkTriangleAttentionStartingNode``:
                  H_pair]                                                 ``gather_async(b, dim=1)``
 10   all_to_all  ``z`` rows -> columns                                    ``PairCore``: ``row_to_col``
 11   all_gather  ending-node triangle attention's bias [N_res, N_res,     ``ChunkTriangleAttentionEndingNode``:
                  H_pair]                                                 ``gather_async(b, dim=1)``
 12   all_to_all  ``z`` columns -> rows, for the next block               ``PairCore``: ``col_to_row``
====  ==========  ======================================================  =================================

(The masks are scattered, a local slice; the first block scatters ``m`` and ``z``, the last gathers them.)

The plan reproduces 1, 2, 3, 5, 9, 10 and 11 (the same collective of the same tensor between the same
sub-modules; the model here orders some ops differently, so tensors are matched by what they are,
not by name). Where it differs, it is cheaper, and the test pins the difference down:

- 6, 7, 8: the plan keeps ``z`` on rows through the incoming triangle multiplication, whose sum over
  ``k`` then runs over the local rows: each rank's product is a partial sum, reduce-scattered onto
  rows (one collective as large as FastFold's gather of the left projection) instead of FastFold's
  all_to_all, gather and all_to_all back;
- 4 and 12 belong to the next block: a lone block hands its outputs to the lowering, which gathers
  them; in the stack, each next block's row attention gets ``m`` back on rows (4), and ``z`` is
  turned where the next block needs it (12).

The forward volume per rank (the objective's per-collective formulas for both) is no larger than FastFold's.
"""
from functools import lru_cache

import torch

import foldcompile
from foldcompile.capture import flat_inputs
from foldcompile.models import zoo
from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
from foldcompile.passes.shape_prop import dim_symbol
from foldcompile.passes.shard import DEFAULT_AT, _volume_factor, check_plan, shard_pass
from _one_thread import one_thread  # noqa: F401  (autouse fixture)

N_SEQ, N_RES = dim_symbol("N_seq"), dim_symbol("N_res")
AF2 = dict(c_m=256, c_z=128, h_msa=8, c_opm=32, c_mul=128, h_pair=4)     # zoo "af2" sizes (AF2 suppl. 1.5-1.8)
AF3 = dict(c_s=384, c_z=128, h_single=16, c_mul=128, h_pair=4)
ITEMSIZE = 4                                                              # the models run in float32 here
WORLD = 4


def fastfold_evoformer_block(d=AF2):
    """FastFold's collectives in one Evoformer block: (number, kind, global element count)."""
    m, z = N_SEQ * N_RES * d["c_m"], N_RES ** 2 * d["c_z"]
    return [(1, "all_gather", N_RES ** 2 * d["h_msa"]), (2, "all_to_all", m), (3, "all_gather", N_SEQ * N_RES * d["c_opm"]),
            (4, "all_to_all", m), (5, "all_gather", N_RES ** 2 * d["c_mul"]), (6, "all_to_all", z),
            (7, "all_gather", N_RES ** 2 * d["c_mul"]), (8, "all_to_all", z), (9, "all_gather", N_RES ** 2 * d["h_pair"]),
            (10, "all_to_all", z), (11, "all_gather", N_RES ** 2 * d["h_pair"]), (12, "all_to_all", z)]


def fastfold_style_pairformer_block(d=AF3):
    """FastFold's pair core (5-12) and, for AF3's single attention with pair bias (FastFold has no
    Pairformer), its MSA row attention's treatment: the pair bias gathered."""
    z = N_RES ** 2 * d["c_z"]
    return [(1, "all_gather", N_RES ** 2 * d["h_single"]), (5, "all_gather", N_RES ** 2 * d["c_mul"]),
            (6, "all_to_all", z), (7, "all_gather", N_RES ** 2 * d["c_mul"]), (8, "all_to_all", z),
            (9, "all_gather", N_RES ** 2 * d["h_pair"]), (10, "all_to_all", z),
            (11, "all_gather", N_RES ** 2 * d["h_pair"]), (12, "all_to_all", z)]


def volume_at(table, world=WORLD):
    """Forward bytes per rank of a table of collectives at the training crop."""
    at = {N_SEQ: DEFAULT_AT["N_seq"], N_RES: DEFAULT_AT["N_res"]}
    return sum(int((n * ITEMSIZE * _volume_factor(kind, world)).subs(at)) for _, kind, n in table)


@lru_cache(maxsize=None)
def planned(name, n_blocks=None, world=WORLD):
    kw = {"n_blocks": n_blocks} if n_blocks else {}
    model, ex = zoo.get(name, size="af2", n_seq=7, n_res=11, **kw)
    gm = normalize_pass(foldcompile.trace(model, *ex)).graph_module
    flat = flat_inputs(gm, ex)
    shape_prop_pass(gm, flat)
    classify_pass(gm)
    result = shard_pass(gm, world)
    return gm, result.record, model, ex


class Plan:
    """The plan's transitions, findable by what they move and between which sub-modules."""

    def __init__(self, gm, record):
        self.gm, self.record = gm, record
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.moves = [t for t in record["transitions"] if t["kind"] != "slice"]

    def span(self, module):
        """(first, last) graph positions of the nodes of a sub-module."""
        at = [i for n, i in self.pos.items() if str(n.meta.get("module_path") or "").startswith(module)]
        assert at, f"no nodes in {module}"
        return min(at), max(at)

    def shape(self, t):
        return tuple(self.nodes[t["tensor"]].meta["sym_shape"])

    def consumers_in(self, t, module):
        return all(str(self.nodes[c].meta.get("module_path") or "").startswith(module) for c in t["consumers"])

    def between(self, t, after, before):
        """Produced at or after the start of ``after``, first read before the end of ``before``."""
        produced = self.pos[self.nodes[t["tensor"]]]
        read = min(self.pos[self.nodes[c]] for c in t["consumers"])
        return produced >= self.span(after)[0] and read <= self.span(before)[1]

    def find(self, kind, shape, *, inside=None, after=None, before=None, src_dim=None, dst_dim=None):
        found = [t for t in self.moves if t["kind"] == kind and self.shape(t) == shape
                 and (inside is None or self.consumers_in(t, inside))
                 and (after is None or self.between(t, after, before))
                 and (src_dim is None or t["src"].startswith(f"Shard({src_dim},"))
                 and (dst_dim is None or t["dst"].startswith(f"Shard({dst_dim},"))]
        return found


def assert_evoformer_block(plan, p, d=AF2, first=True):
    """FastFold's 1, 2, 3, 5, 9, 10, 11 in block prefix ``p``; 6-8 as one reduce-scatter."""
    m_shape, z_shape = (N_SEQ, N_RES, d["c_m"]), (N_RES, N_RES, d["c_z"])
    # 1: the pair bias, gathered for the MSA row attention
    assert plan.find("all_gather", (N_RES, N_RES, d["h_msa"]), inside=p + "msa_att_row"), p
    # 2: m from rows (N_seq split) to columns (N_res split) between row and column attention
    row_to_col = plan.find("all_to_all", m_shape, after=p + "msa_att_row", before=p + "msa_att_col",
                           src_dim=0, dst_dim=1)
    assert len(row_to_col) == 1, (p, row_to_col)
    # no all_to_all of a query, key or value: one of m suffices (a greedy planner makes three)
    assert not [t for t in plan.moves if t["kind"] == "all_to_all" and t["module"].startswith(p + "msa_att_col.mha")]
    # 3: one projection of the outer product mean gathered
    assert len(plan.find("all_gather", (N_SEQ, N_RES, d["c_opm"]), inside=p + "outer_product_mean")) == 1, p
    # 5: one projection of the outgoing triangle multiplication gathered
    assert len(plan.find("all_gather", (N_RES, N_RES, d["c_mul"]), inside=p + "tri_mul_out")) == 1, p
    # 6-8: the incoming product reduce-scattered onto z's rows, with no all_to_all of z around it
    assert len(plan.find("reduce_scatter", (N_RES, N_RES, d["c_mul"]), inside=p + "tri_mul_in")) == 1, p
    assert not [t for t in plan.moves if t["module"].startswith(p + "tri_mul_in") and t["kind"] != "reduce_scatter"]
    if first:
        assert not plan.find("all_to_all", z_shape, after=p + "tri_mul_out", before=p + "tri_att_start")
    # 9, 11: the triangle attentions' biases gathered
    assert len(plan.find("all_gather", (N_RES, N_RES, d["h_pair"]), inside=p + "tri_att_start")) == 1, p
    assert len(plan.find("all_gather", (N_RES, N_RES, d["h_pair"]), inside=p + "tri_att_end")) == 1, p
    # 10: z from rows to columns between the two triangle attentions
    assert plan.find("all_to_all", z_shape, after=p + "tri_att_start", before=p + "tri_att_end"), p


def test_evoformer_block_reproduces_fastfold():
    gm, record, model, ex = planned("evoformer_block")
    plan = Plan(gm, record)
    assert_evoformer_block(plan, "")
    # nothing else moves (4 and 12 serve a next block; the outputs are the lowering's to gather)
    assert len(plan.moves) == 8, [(t["kind"], t["tensor"], t["module"]) for t in plan.moves]
    ours, fastfold = record["objective"]["comm_bytes_at"], volume_at(fastfold_evoformer_block())
    assert ours <= fastfold, (ours, fastfold)
    # FastFold's 6-8 (all_to_all, gather, all_to_all) cost more than the one reduce-scatter
    assert fastfold - ours == volume_at([t for t in fastfold_evoformer_block() if t[0] in (4, 6, 8, 12)])
    check_plan(gm)
    assert all(torch.equal(a, b) for a, b in zip(gm(*flat_inputs(gm, ex)), model(*ex)))


def test_evoformer_stack_reproduces_fastfold_in_every_block():
    gm, record, model, ex = planned("evoformer_stack", n_blocks=2)
    plan = Plan(gm, record)
    m_shape = (N_SEQ, N_RES, AF2["c_m"])
    for b in range(2):
        assert_evoformer_block(plan, f"blocks.{b}.", first=b == 0)
    # 4: m back on rows before the next block's row attention
    assert plan.find("all_to_all", m_shape, after="blocks.0.msa_att_col", before="blocks.1.msa_att_row",
                     src_dim=1, dst_dim=0)
    ours, fastfold = record["objective"]["comm_bytes_at"], 2 * volume_at(fastfold_evoformer_block())
    assert ours <= fastfold, (ours, fastfold)
    check_plan(gm)


def test_pairformer_block_reproduces_fastfolds_pair_core():
    gm, record, model, ex = planned("pairformer_block")
    plan = Plan(gm, record)
    z_shape = (N_RES, N_RES, AF3["c_z"])
    assert len(plan.find("all_gather", (N_RES, N_RES, AF3["c_mul"]), inside="tri_mul_out")) == 1
    assert len(plan.find("reduce_scatter", (N_RES, N_RES, AF3["c_mul"]), inside="tri_mul_in")) == 1
    assert len(plan.find("all_gather", (N_RES, N_RES, AF3["h_pair"]), inside="tri_att_start")) == 1
    assert len(plan.find("all_gather", (N_RES, N_RES, AF3["h_pair"]), inside="tri_att_end")) == 1
    assert plan.find("all_to_all", z_shape, after="tri_att_start", before="tri_att_end")
    # the single attention: its queries follow z's split, so its pair bias (or the logits it is
    # added to, [H, N_res, N_res]) is turned by an all_to_all, cheaper than FastFold's gather
    single = [t for t in plan.moves if t["module"].startswith("attention_pair_bias")]
    assert single and sum(t["volume_at"] for t in single) <= volume_at(fastfold_style_pairformer_block()[:1])
    ours, fastfold = record["objective"]["comm_bytes_at"], volume_at(fastfold_style_pairformer_block())
    assert ours <= fastfold, (ours, fastfold)
    check_plan(gm)
    assert all(torch.equal(a, b) for a, b in zip(gm(*flat_inputs(gm, ex)), model(*ex)))


def test_fastfold_table_volume_at_the_training_crop():
    """The numbers the report quotes: FastFold's forward bytes per rank per Evoformer block (fp32, P=4)."""
    assert volume_at(fastfold_evoformer_block()) == 94_371_840
    gm, record, *_ = planned("evoformer_block")
    assert record["objective"]["comm_bytes_at"] == 69_206_016
