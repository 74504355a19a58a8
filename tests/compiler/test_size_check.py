"""check_structure_at: costs at other sizes only where the captured structure holds there."""
import pytest
import torch

import foldcompile
from foldcompile.models import zoo
from foldcompile.passes import classify_pass, cost_totals, normalize_pass, shape_prop_pass
from foldcompile.size_check import SizeGuardError, check_structure_at


def _analysed(n_seq, n_res, chunk_size):
    module, inputs = zoo.get("evoformer_block", n_seq=n_seq, n_res=n_res)
    gm = normalize_pass(foldcompile.trace(module, *inputs, chunk_size=chunk_size)).graph_module
    values = list(inputs) + [chunk_size]
    shape_prop_pass(gm, values)
    classify_pass(gm)
    return module, gm, values


def test_unchunked_block_holds_at_other_sizes_and_costs_match_a_fresh_capture():
    module, gm, values = _analysed(5, 11, None)
    check_structure_at(module, gm, values, {"N_seq": 7, "N_res": 17})
    _, fresh, _ = _analysed(7, 17, None)
    predicted = cost_totals(gm).evaluate(N_seq=7, N_res=17)["classes"]
    measured = cost_totals(fresh).evaluate()["classes"]
    for op_class in ("GEMM", "REDUCTION", "ELEMENTWISE"):
        assert predicted[op_class]["flops"] == measured[op_class]["flops"]
        assert predicted[op_class]["bytes"] == measured[op_class]["bytes"]


def test_unrolled_chunk_loop_is_refused_with_the_node():
    module, gm, values = _analysed(5, 11, 4)
    with pytest.raises(SizeGuardError, match="depend on the sizes"):
        check_structure_at(module, gm, values, {"N_res": 17})


def test_chunk_branch_not_taken_at_capture_is_refused():
    """chunk_size=16 >= N_res=11: the capture took the unchunked path, N_res=40 would not."""
    module, gm, values = _analysed(5, 11, 16)
    check_structure_at(module, gm, values, {"N_res": 13})  # still unchunked: fine
    with pytest.raises(SizeGuardError):
        check_structure_at(module, gm, values, {"N_res": 40})


def test_same_sizes_need_no_check():
    module, gm, values = _analysed(5, 11, 4)
    check_structure_at(module, gm, values, {"N_seq": 5, "N_res": 11})


class _SizeBranch(torch.nn.Module):
    """Real code branches on sizes (``if q.shape[-2] <= 16`` in a popular implementation):
    the branch not taken at capture leaves no trace in the graph."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, z):
        if z.shape[0] <= 16:
            return self.linear(z)
        return torch.sigmoid(self.linear(z)) * z


def test_report_cost_checks_the_structure_where_the_rules_cannot_see_it():
    from foldcompile.explain import explain

    report = explain(_SizeBranch(), torch.randn(11, 11, 8))
    assert report.dims == {"N_res": 11} and not report.guarded_dims
    assert report.cost(N_res=13)["classes"]["GEMM"]["flops"] > report.cost()["classes"]["GEMM"]["flops"]
    with pytest.raises(SizeGuardError, match="depends on the sizes"):
        report.cost(N_res=40)


class _EquationBranch(torch.nn.Module):
    """A size branch that changes only a non-tensor argument: the einsum equation. Both equations take
    and give the same shapes ([N, N, c]), so op names and shapes agree at either size, but one contracts
    over N (2·N³·c FLOPs, a GEMM) and the other is an element-wise product (N²·c)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, z):
        a = self.linear(z)
        eq = "ijc,kjc->ikc" if z.shape[0] <= 12 else "ijc,ijc->ijc"
        return torch.einsum(eq, a, z)


def test_a_size_branch_on_a_non_tensor_argument_is_refused_or_costed_right():
    from foldcompile.explain import explain

    report = explain(_EquationBranch(), torch.randn(11, 11, 8))
    assert report.cost(N_res=12)["classes"] == explain(_EquationBranch(), torch.randn(12, 12, 8)).cost()["classes"]
    fresh = explain(_EquationBranch(), torch.randn(13, 13, 8)).cost()["classes"]
    try:
        at_13 = report.cost(N_res=13)["classes"]
    except SizeGuardError as e:
        assert "einsum" in str(e) and "ijc,kjc->ikc" in str(e) and "ijc,ijc->ijc" in str(e)
    else:
        assert at_13 == fresh
