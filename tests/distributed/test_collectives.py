"""Every collective across processes (gloo, float64): forward equal to the single-process
reference, gradients equal to the single-process gradients for a loss on replicated
outputs (catches P-times gradients) and on sharded outputs (catches 1/P or dropped
contributions); uneven shards (13, 7, 5 over 3 ranks; 5 over 8 gives empty shards)."""
import pytest
import torch

import dist_cases as C

RTOL, ATOL = 1e-10, 1e-12


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def worlds(*full):
    """World sizes 2 and 3, and the given ones (8) in the full tier."""
    return [2, 3] + [pytest.param(w, marks=pytest.mark.full) for w in full]


# --------------------------------------------------------------------------- all_to_all

@pytest.mark.parametrize("P", worlds(8))
@pytest.mark.parametrize("loss", ["sharded", "replicated"])
@pytest.mark.parametrize("shape,split_dim,cat_dim", [
    ((13, 7, 5), 1, 0),      # rows -> columns, both uneven over 3
    ((12, 6, 2), 1, 0),      # even over 2 and 3
    ((7, 13, 5), 0, 1),      # columns -> rows
    ((5, 3, 13), 2, 0),      # split the last dim
    ((3, 13, 7), -1, 1),     # negative dim, cat not first
])
def test_all_to_all(pools, P, loss, shape, split_dim, cat_dim):
    res = pools.run(P, C.a2a_case, shape, split_dim, cat_dim, loss)
    X, G = C.a2a_ref(shape)
    for r, (y, g) in enumerate(res):
        close(y, C.piece(X, split_dim, r, P), f"rank {r} output")
        close(g, C.piece(G, cat_dim, r, P), f"rank {r} input gradient")


# --------------------------------------------------------------------------- all_gather

@pytest.mark.parametrize("P", worlds(8))
@pytest.mark.parametrize("shape,dim", [((13, 3, 2), 0), ((3, 7, 2), 1), ((2, 3, 5), -1),
                                       ((12, 3, 2), 0), ((3, 6, 2), 1)])   # the last two even over 2, 3
def test_all_gather_replicated_consumers(pools, P, shape, dim):
    res = pools.run(P, C.gather_replicate_case, shape, dim)
    X, G = C.gather_replicate_ref(shape)
    for r, (y, g) in enumerate(res):
        close(y, X, f"rank {r} output")
        close(g, C.piece(G, dim, r, P), f"rank {r} input gradient")


@pytest.mark.parametrize("P", worlds(8))
@pytest.mark.parametrize("dim", [0, 1])
def test_all_gather_sharded_consumers(pools, P, dim):
    n, k, m = 13, 4, 7
    res = pools.run(P, C.gather_partial_case, n, k, m, dim)
    out, gA, gB = C.gather_partial_ref(n, k, m, dim)
    for r, (o, ga, gb) in enumerate(res):
        close(o, C.piece(out, 0, r, P), f"rank {r} output")
        close(ga, C.piece(gA, 0, r, P), f"rank {r} gradient of the sharded operand")
        close(gb, C.piece(gB, dim, r, P), f"rank {r} gradient of the gathered operand")


@pytest.mark.parametrize("P", [3])
def test_all_gather_wrong_declaration_is_caught(pools, P):
    """The comparisons above have teeth: declaring 'partial' for replicated consumers gives
    exactly P-times gradients; declaring 'replicate' for sharded consumers (FastFold's
    plain-split backward) drops the other ranks' contributions."""
    res = pools.run(P, C.gather_replicate_case, (13, 3, 2), 0, "partial")
    _, G = C.gather_replicate_ref((13, 3, 2))
    for r, (_, g) in enumerate(res):
        close(g, P * C.piece(G, 0, r, P), f"rank {r}: P-times gradient")
    res = pools.run(P, C.gather_partial_case, 13, 4, 7, 0, "replicate")
    _, _, gB = C.gather_partial_ref(13, 4, 7, 0)
    for r, (_, _, gb) in enumerate(res):
        assert not torch.allclose(gb, C.piece(gB, 0, r, P), rtol=1e-3), f"rank {r}: bug not visible"


# --------------------------------------------------------------------------- reduce_scatter

@pytest.mark.parametrize("P", worlds(8))
@pytest.mark.parametrize("loss", ["sharded", "replicated"])
@pytest.mark.parametrize("shape,dim", [((13, 3), 0), ((2, 7, 3), 1), ((3, 5), -1), ((2, 6, 3), 1)])
def test_reduce_scatter(pools, P, loss, shape, dim):
    res = pools.run(P, C.reduce_scatter_case, shape, dim, loss)
    Y, grads = C.reduce_scatter_ref(shape, P)
    for r, (y, g) in enumerate(res):
        close(y, C.piece(Y, dim, r, P), f"rank {r} output")
        close(g, grads[r], f"rank {r} gradient of its summand")


# --------------------------------------------------------------------------- all_reduce

@pytest.mark.parametrize("P", worlds(8))
@pytest.mark.parametrize("mode", ["replicate", "partial"])
def test_all_reduce(pools, P, mode):
    m, k, n = 13, 3, 5
    res = pools.run(P, C.all_reduce_case, m, k, n, mode)
    out, grads, gA = C.all_reduce_ref(m, k, n, mode, P)
    for r, (o, gx, ga) in enumerate(res):
        close(o, out if mode == "replicate" else C.piece(out, 0, r, P), f"rank {r} output")
        close(gx, grads[r], f"rank {r} gradient of its summand")
        if mode == "partial":
            close(ga, C.piece(gA, 0, r, P), f"rank {r} gradient of the sharded operand")


# --------------------------------------------------------------------------- shard (Replicate -> Shard)

@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("mode", ["partial", "replicate"])
def test_shard(pools, P, mode):
    shape, dim = (13, 2, 3), 0
    res = pools.run(P, C.shard_case, shape, dim, mode)
    X, G = C.shard_ref(shape)
    total = torch.zeros_like(G)
    for r, (y, g) in enumerate(res):
        close(y, C.piece(X, dim, r, P), f"rank {r} output")
        if mode == "replicate":
            close(g, G, f"rank {r}: the whole gradient")
        else:  # this rank's rows only; the sum over ranks is the whole gradient
            rest = g.clone()
            C.piece(rest, dim, r, P).zero_()
            assert torch.count_nonzero(rest) == 0, f"rank {r} gradient outside its shard"
            total += g
    if mode == "partial":
        close(total, G, "sum of the partial gradients")


# --------------------------------------------------------------------------- P = 1, forced

def test_forced_collectives_at_world_size_one(pools):
    """force=True runs the real collective (gloo here, NCCL on a GPU) at world size 1: a new
    tensor with an autograd node, equal to the identity, forward and backward."""
    (res,) = pools.run(1, C.forced_p1_case)
    X, W = C.rand(14, 5, 3, 2), C.rand(15, 5, 3, 2)
    assert len(res) == 7
    for name, (y, g, same_object, has_node) in res.items():
        assert not same_object and has_node, f"{name}: the collective was elided despite force=True"
        close(y, X, f"{name} output")
        close(g, W * torch.cos(X), f"{name} gradient")


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("P", [3])
def test_errors_name_the_tensor_and_the_rank(pools, P):
    res = pools.run(P, C.error_messages_case)
    for r, msgs in enumerate(res):
        assert f"all_to_all 'm' on rank {r}" in msgs["sizes"] and "shard size 9" in msgs["sizes"]
        assert msgs["dim"].startswith("ValueError") and "'bias'" in msgs["dim"] and "dim=3" in msgs["dim"]
        assert "grad_placement must be 'partial'" in msgs["placement"] and "'sharded'" in msgs["placement"]
        assert "split_dim and cat_dim must differ" in msgs["same_dims"] and "'z'" in msgs["same_dims"]
        assert msgs["not_tensor"].startswith("TypeError") and "'g'" in msgs["not_tensor"]
        # cross-rank checks: every rank raises, and the error names the rank at fault
        assert "all_gather 'pair_bias' on rank 1" in msgs["validate_sizes"], msgs["validate_sizes"]
        assert "all_to_all 'msa' on rank 1" in msgs["validate_dtype"]
        assert "torch.float32" in msgs["validate_dtype"]
        assert msgs["after"] == [float(P)] * 2  # the ranks stayed in step


# --------------------------------------------------------------------------- overlap evidence

@pytest.mark.parametrize("kind,backward_kind", [
    ("all_to_all", "all_to_all"), ("all_gather", "reduce_scatter"),
    ("reduce_scatter", "all_gather"), ("all_reduce", "all_reduce"),
])
def test_overlap_order(pools, kind, backward_kind):
    """Compute placed between start and wait runs while the collective is in flight, in
    forward and, mirrored by autograd, in backward: the log of what was issued, computed
    and waited, in order (no timing involved)."""
    for log in pools.run(2, C.overlap_case, kind):
        assert log == [
            ("forward", "issue", f"{kind}:t"),
            ("forward", "compute", "independent"),
            ("forward", "wait", f"{kind}:t"),
            ("backward", "issue", f"{backward_kind}:t"),
            ("backward", "compute", "independent"),
            ("backward", "wait", f"{backward_kind}:t"),
        ], log


def test_results_are_fresh_tensors_usable_in_place(pools):
    for r, res in enumerate(pools.run(2, C.inplace_case)):
        assert set(res) == {"all_to_all", "all_gather", "reduce_scatter", "all_reduce"}
        for kind, (is_view, g) in res.items():
            assert not is_view, f"rank {r} {kind}: the result is a view"
            close(g, torch.full((5, 4), 3.0, dtype=torch.float64), f"rank {r} {kind} gradient")


@pytest.mark.parametrize("cat_list,split_list", [([1, 6], [4, 0]), ([3, 0, 4], [2, 5, 1])])
def test_explicit_split_sizes(pools, cat_list, split_list):
    """Shards that do not follow split_sizes (even empty ones), given as lists."""
    P = len(cat_list)
    X, W = C.rand(80, sum(cat_list), sum(split_list), 2), C.rand(81, sum(cat_list), sum(split_list), 2)
    for r, (y, back, g) in enumerate(pools.run(P, C.explicit_sizes_case, cat_list, split_list)):
        close(y, C.custom_piece(X, 1, split_list, r), f"rank {r} output")
        close(back, C.custom_piece(X, 0, cat_list, r), f"rank {r} round trip")
        close(g, C.custom_piece(W * torch.cos(X), 0, cat_list, r), f"rank {r} gradient")


@pytest.mark.parametrize("sizes", [[6, 1], [0, 5, 2]])
def test_reduce_scatter_explicit_sizes(pools, sizes):
    P = len(sizes)
    Y = sum(C.rand(90 + q, sum(sizes), 3) for q in range(P))
    W = C.rand(91, sum(sizes), 3)
    for r, (y, g) in enumerate(pools.run(P, C.explicit_rs_case, sizes)):
        close(y, C.custom_piece(Y, 0, sizes, r), f"rank {r} output")
        # each summand's gradient is the whole dL/dY: W cos(Y)
        close(g, W * torch.cos(Y), f"rank {r} gradient")
