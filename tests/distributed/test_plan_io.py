"""A plan made elsewhere (``make_plan``, or rank 0's) is applied only to what it was made for:
``import_plan`` refuses another world size, inputs of other names, shapes, dtypes or values, and a
capture whose nodes differ in their keyword arguments (before, those were taken from the plan
unchecked: a softmax over another dim computed the plan's). Single process, except the last test
(through ``optimize`` on 2 gloo ranks, no graph run)."""
import pytest
import torch

from foldcompile.capture import flat_inputs, trace
from foldcompile.distributed.sharded import make_plan
from foldcompile.passes.base import PassError
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.plan_io import import_plan

import hand_plans as H
import sharded_input_cases as C


class Rows(torch.nn.Module):
    """An MSA-shaped input [N_seq, N_res, c] (split on N_seq by the planner's seeds); ``dim``: the
    softmax's and the sum's, a keyword argument in the captured graph."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.w = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, m):
        return torch.softmax(m @ self.w, dim=self.dim).sum(dim=self.dim)


def capture(model, *inputs):
    return normalize_pass(trace(model, *inputs)).graph_module


@pytest.fixture(scope="module")
def plan():
    return make_plan(Rows(-1), torch.randn(5, 7, 8), world_size=2)


def test_the_plan_applies_to_what_it_was_made_for(plan):
    x = torch.randn(5, 7, 8)
    gm = capture(Rows(-1), x)
    assert plan.world_size == 2 and plan.inputs == [("l_m_", "tensor", (5, 7, 8), "torch.float32")]
    planned = import_plan(gm, plan, world_size=2, example_inputs=flat_inputs(gm, (x,)))
    assert any(n.meta.get("shard") is not None for n in planned.graph.nodes)


def test_other_keyword_arguments_are_refused(plan):
    with pytest.raises(PassError, match=r"node softmax has other keyword arguments here \(\{'dim': 1\}\) than in "
                                        r"the plan \(\{'dim': -1\}\)"):
        import_plan(capture(Rows(1), torch.randn(5, 7, 8)), plan)


def test_another_world_size_is_refused(plan):
    with pytest.raises(PassError, match="the plan was made for world_size=2, it is applied to 3 ranks"):
        import_plan(capture(Rows(-1), torch.randn(5, 7, 8)), plan, world_size=3)


@pytest.mark.parametrize("value,message", [
    (torch.randn(5, 7, 8, dtype=torch.float64), r"input 0 \(l_m_\) has dtype torch.float64 here, torch.float32 in "
                                                "the plan"),
    (torch.randn(6, 7, 8), r"input 0 \(l_m_\) has shape \(6, 7, 8\) here, \(5, 7, 8\) in the plan"),
    (None, r"input 0 \(l_m_\) is a value here, a tensor in the plan"),
])
def test_other_inputs_are_refused(plan, value, message):
    with pytest.raises(PassError, match=message):
        import_plan(capture(Rows(-1), torch.randn(5, 7, 8)), plan, example_inputs=[value])


def test_optimize_refuses_a_plan_made_for_other_ranks_or_inputs(pools):
    model = H.MiniDAP(H.MINI_DIMS["N_seq"], H.MINI_DIMS["N_res"])
    inputs = H.mini_inputs()
    plans = {"world": make_plan(model, *inputs, world_size=3, planner=H.hand_planner(H.MINI_SEEDS)),
             "dtype": make_plan(model.float(), *(x.float() for x in inputs), world_size=2,
                                planner=H.hand_planner(H.MINI_SEEDS))}
    for r, errors in enumerate(pools.run(2, C.foreign_plan_case, plans)):
        assert errors["world"] == "PassError: import_plan: the plan was made for world_size=3, it is applied to 2 ranks"
        assert errors["dtype"].startswith("PassError: import_plan: input 0 (l_m_) has dtype torch.float64 here, "
                                          "torch.float32 in the plan"), errors["dtype"]
