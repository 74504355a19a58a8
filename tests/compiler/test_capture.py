"""foldcompile.capture.trace + passes.normalize on modules written like real AlphaFold code.

Dynamo capture costs a second or so per module: every module is captured once
(module-scoped fixture) and the tests share the result.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch.utils import _pytree as pytree

from foldcompile.capture import CaptureError, trace
from foldcompile.guards import GuardError
from foldcompile.passes.normalize import normalize_pass

sys.path.insert(0, os.path.dirname(__file__))
import af_style_modules as af  # noqa: E402


def _rel_err(out, ref) -> float:
    outs, refs = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    assert len(outs) == len(refs)
    errs = [0.0]
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype
        errs.append(((o.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item())
    return max(errs)


def _g(*shape):
    return torch.randn(*shape)


def _cases():
    torch.manual_seed(0)
    return {
        "flag_if": (af.FlagIf(mask_trans=True), (_g(3, 5, 8), torch.rand(3, 5)), {}),
        "optional_mask": (af.OptionalMaskAttention(), (_g(3, 5, 8),), {}),
        "chunk_loop": (af.ChunkLoop(chunk_size=2), (_g(5, 4, 8),), {}),
        "permute_helper": (af.PermuteHelper(), (_g(5, 4, 8),), {}),
        "dtype_branch": (af.DtypeBranch(), (_g(5, 4, 8),), {}),
        "checkpoint": (af.Checkpointed(), (_g(5, 4, 8),), {}),
        "training_branch": (af.TrainingBranch(), (_g(5, 4, 8),), {}),
        "evoformerish": (af.EvoformerishBlock(), (_g(3, 5, 8), _g(5, 5, 6)), {"msa_mask": (torch.rand(3, 5) > 0.2).float()}),
    }


@pytest.fixture(scope="module")
def captured():
    out = {}
    for name, (model, args, kwargs) in _cases().items():
        gm = trace(model, *args, **kwargs)
        raw_code = gm.code
        res = normalize_pass(gm)
        out[name] = (model, args, kwargs, gm, res, raw_code)
    return out


NAMES = list(_cases())


def _nodes(gm):
    for _, mod in gm.named_modules():
        if isinstance(mod, torch.fx.GraphModule):
            yield from mod.graph.nodes


@pytest.mark.parametrize("name", NAMES)
def test_one_graph_no_leaves_equal_to_eager(captured, name):
    model, args, kwargs, gm, res, _ = captured[name]
    assert gm.meta["capture"] == {"graphs": 1, "leaves": 0, "tracer": "dynamo"}
    ops = {n.op for n in _nodes(gm)}
    assert "call_module" not in ops and "call_method" not in ops
    for n in _nodes(gm):
        if n.op == "call_function":
            mod = getattr(n.target, "__module__", "") or ""
            assert not str(n.target).startswith("aten."), n.format_node()
            assert n.target.__class__.__name__ != "OpOverload", n.format_node()
            is_method = getattr(torch.Tensor, getattr(n.target, "__name__", ""), None) is n.target
            assert mod.startswith(("torch", "_operator")) or is_method, n.format_node()
    seed = torch.seed()
    torch.manual_seed(seed)
    ref = model(*args, **kwargs)
    torch.manual_seed(seed)
    out = gm(*args, **kwargs)
    assert _rel_err(out, ref) <= 1e-6


def test_signature_kept_and_defaults_applied(captured):
    model, args, kwargs, gm, _, raw = captured["optional_mask"]
    # forward keeps the model's argument names, defaults come from the model's signature
    assert "def forward(self, x, mask, bias)" in gm.code
    torch.testing.assert_close(gm(args[0]), model(args[0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(gm(x=args[0], bias=None), model(args[0]), rtol=1e-6, atol=0)
    # pytree outputs: the mixed block returns a tuple, controlled by a flag argument
    model, args, kwargs, gm, _, _ = captured["evoformerish"]
    out = gm(*args, **kwargs)
    assert isinstance(out, tuple) and len(out) == 2


def test_dict_and_kwargs_outputs():
    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, *, scale: float = 2.0):
            y = self.lin(x)
            return {"y": y * scale, "pair": (x, y.sum(-1))}

    model, x = DictOut(), torch.randn(3, 4)
    gm = trace(model, x, scale=3.0)
    out = gm(x, scale=3.0)
    assert set(out) == {"y", "pair"} and isinstance(out["pair"], tuple)
    assert _rel_err(out, model(x, scale=3.0)) <= 1e-6
    with pytest.raises(GuardError, match=r"input 'scale' = 2.0 != captured 3.0"):
        gm(x)


def test_module_paths_and_stack_traces(captured):
    _, _, _, gm, _, _ = captured["evoformerish"]
    paths = {n.meta["module_path"] for n in _nodes(gm)}
    assert {"row_att.att.q", "opm.out", "tri.a", "row_att.ln_z"} <= paths
    lin = [n for n in gm.graph.nodes if n.target is torch.nn.functional.linear
           and n.meta["module_path"] == "opm.out"]
    assert len(lin) == 2  # chunk loop over 5 rows by 3: unrolled into two chunks
    assert "af_style_modules.py" in lin[0].meta["stack_trace"]


def test_parameters_are_the_models(captured):
    model, args, kwargs, gm, _, _ = captured["permute_helper"]
    assert gm.get_parameter("a.weight") is model.a.weight
    before = gm(*args)
    with torch.no_grad():
        model.a.weight.mul_(2.0)  # an optimizer-like in-place update on the model
    after = gm(*args)
    assert not torch.allclose(before, after)
    assert _rel_err(after, model(*args)) <= 1e-6
    with torch.no_grad():
        model.a.weight.div_(2.0)


def test_gradients_equal_eager_through_checkpoint(captured):
    for name in ("checkpoint", "evoformerish"):
        model, args, kwargs, gm, _, _ = captured[name]
        hops = [n for n in gm.graph.nodes if n.target is torch.utils.checkpoint.checkpoint]
        assert hops, "checkpoint region must stay a checkpoint"
        seed = torch.seed()
        params = list(model.parameters())
        torch.manual_seed(seed)
        ref = pytree.tree_leaves(model(*args, **kwargs))
        g_ref = torch.autograd.grad(sum((r * r).sum() for r in ref), params)
        torch.manual_seed(seed)
        out = pytree.tree_leaves(gm(*args, **kwargs))
        g_out = torch.autograd.grad(sum((o * o).sum() for o in out), params)
        for a, b in zip(g_out, g_ref):
            assert _rel_err(a, b) <= 1e-6


def test_checkpoint_recomputes_in_backward(captured):
    """The body runs again in backward, as in eager: count forward ops seen during backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.native_layer_norm):
                self.n += 1
            return func(*args, **(kwargs or {}))

    model, args, _, _, _, _ = captured["checkpoint"]
    gm = trace(model, args[0].clone().requires_grad_(True))  # captured as it is called: input requires grad
    counts = []
    for f in (gm, model):
        out = f(args[0].clone().requires_grad_(True))
        with Count() as c:
            out.sum().backward()
        counts.append(c.n)
    # 2 blocks, each recomputing its layer norm and linear (addmm) in backward
    assert counts[0] == counts[1] == 4


def test_guards_reject_other_inputs(captured):
    model, args, _, gm, _, _ = captured["chunk_loop"]
    assert "input 'z'" in str(gm.guards) and gm.meta["guards"] is gm.guards
    with pytest.raises(GuardError, match=r"input 'z' shape \(7, 4, 8\) != captured \(5, 4, 8\)"):
        gm(torch.randn(7, 4, 8))
    with pytest.raises(GuardError, match="dtype torch.float64"):
        gm(args[0].double())
    model.chunk_size = 4
    try:
        with pytest.raises(GuardError, match="module attribute 'chunk_size' = 4 != captured 2"):
            gm(args[0])
    finally:
        model.chunk_size = 2
    with pytest.raises(GuardError, match="grad mode"):
        with torch.no_grad():
            gm(args[0])
    with pytest.raises(GuardError, match="autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gm(args[0])


def test_training_and_optional_guards(captured):
    model, args, _, gm, _, _ = captured["training_branch"]
    model.eval()
    try:
        with pytest.raises(GuardError, match="training=False != captured True"):
            gm(*args)
    finally:
        model.train()
    gm.eval()
    try:
        with pytest.raises(GuardError, match="graph module training=False"):
            gm(*args)
    finally:
        gm.train()
    # eval capture has no dropout and equals eager exactly
    eval_gm = trace(model.eval(), *args)
    model.train()
    assert not any(n.target is torch.bernoulli for n in eval_gm.graph.nodes)
    model.eval()
    try:
        assert _rel_err(eval_gm(*args), model(*args)) <= 1e-6
    finally:
        model.train()
    _, args, _, gm, _, _ = captured["optional_mask"]
    with pytest.raises(GuardError, match="input 'mask'"):
        gm(args[0], torch.ones(3, 5))


def test_autocast_bf16_equals_eager_dtypes_and_values():
    torch.manual_seed(1)
    model, z = af.DtypeBranch(), torch.randn(5, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = trace(model, z)
        out, ref = gm(z), model(z)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    # the fp32 island of the dtype branch is kept: autocast disabled around an fp32 einsum
    island = [n for n in gm.graph.nodes if "enter_autocast" in str(n.target)]
    assert island and island[0].args[2] is False
    ein = next(n for n in gm.graph.nodes if "einsum" in str(n.target))
    assert ein.meta["example_value"].dtype == torch.float32
    with pytest.raises(GuardError, match="autocast"):
        gm(z)  # captured under autocast, called outside it


def test_uncapturable_constructs_name_the_line():
    with pytest.raises(CaptureError, match=r"(?s)DataDependentIf.*af_style_modules\.py:\d+.*if y.sum\(\) > 0"):
        trace(af.DataDependentIf(), torch.randn(2, 8))
    with pytest.raises(CaptureError, match=r"(?s)ItemLoop.*af_style_modules\.py:\d+"):
        trace(af.ItemLoop(), torch.randn(2, 8))
    with pytest.raises(CaptureError, match="example inputs do not match"):
        trace(af.ChunkLoop(), torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(TypeError, match="nn.Module"):
        trace(lambda x: x, torch.randn(2))


def test_normalize_is_idempotent_and_einsums_match(captured):
    from foldcompile.passes.normalize import gemm_operands

    _, args, kwargs, gm, res, raw = captured["evoformerish"]
    assert "permute(" in raw  # the raw capture had method calls, normalisation removed them
    assert res.changed and res.record["gemms"]["einsum"] >= 3
    again = normalize_pass(gm)
    assert not again.changed
    # every annotated equation reproduces its node's product (bias excluded) on the real values
    env = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            env[n] = super().run_node(n)
            return env[n]

    Rec(gm).run(*gm.guards.bind(args, kwargs).args)
    checked = 0
    for n in gm.graph.nodes:
        if "einsum" in n.meta:
            ops = [env[o] for o in gemm_operands(n)]
            want = env[n]
            if n.target is torch.nn.functional.linear and len(n.args) > 2 and n.args[2] is not None:
                want = want - env[n.args[2]]
            torch.testing.assert_close(torch.einsum(n.meta["einsum"], *ops), want, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize("train", [False])
def test_zoo_evoformer_stack(train):
    evo = importlib.import_module("foldcompile.models.alphafold2.evoformer")
    torch.manual_seed(0)
    model = evo.EvoformerStack(1, c_m=8, c_z=6, c_s=5, c_hidden_msa_att=4, n_heads_msa=2, c_hidden_opm=3,
                               c_hidden_mul=4, c_hidden_pair_att=4, n_heads_pair=2, transition_n=2).train(train)
    m, z = torch.randn(3, 7, 8), torch.randn(7, 7, 6)
    gm = trace(model, m, z)
    normalize_pass(gm)
    assert gm.meta["capture"]["leaves"] == 0
    assert not any(n.op in ("call_module", "call_method") for n in _nodes(gm))
    assert _rel_err(gm(m, z), model(m, z)) <= 1e-6


def test_zoo_pairformer_stack():
    pf = importlib.import_module("foldcompile.models.pairformer")
    torch.manual_seed(0)
    model = pf.PairformerStack(1, c_s=8, c_z=6, n_heads_single=2, c_hidden_single=4, n_heads_pair=2,
                               c_hidden_pair=4, c_hidden_mul=4, transition_n=2).eval()
    s, z = torch.randn(7, 8), torch.randn(7, 7, 6)
    gm = trace(model, s, z)
    normalize_pass(gm)
    assert not any(n.op in ("call_module", "call_method") for n in _nodes(gm))
    assert _rel_err(gm(s, z), model(s, z)) <= 1e-6


def test_a_model_that_fails_eagerly_is_reported_as_its_own_error(caplog):
    """A wrong channel size is the user's bug, not a capture limitation: the CaptureError says the
    model fails eagerly, with the model's own error and line, and Dynamo's fake-tensor traceback
    is not logged."""
    class WrongChannels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x).relu()  # x has 7 channels: fails in eager too

    model = WrongChannels()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("ERROR"):
        with pytest.raises(CaptureError) as e:
            trace(model, torch.randn(3, 7))
    msg = str(e.value)
    assert "fails when run eagerly" in msg and "RuntimeError" in msg
    assert "test_capture.py" in msg and "self.lin(x).relu()" in msg
    assert len(msg.splitlines()) <= 3
    assert not [r for r in caplog.records if r.name.startswith("torch._subclasses")]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_capture_failure_of_a_model_that_runs_eagerly_still_names_the_construct():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # a branch on a tensor value: eager runs, one graph cannot hold it
                return x * 2
            return x

    with pytest.raises(CaptureError) as e:
        trace(DataDependent(), torch.ones(3))
    assert "fails when run eagerly" not in str(e.value) and "x.sum() > 0" in str(e.value)
