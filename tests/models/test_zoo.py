"""The model zoo: names, sizes, seeded non-zero parameters, runnable examples."""
import pytest
import torch

from foldcompile.models import zoo

REQUIRED = {"evoformer_block", "evoformer_stack", "extra_msa_stack", "template_pair_stack", "structure_module",
            "alphafold2", "pairformer_stack"}


def _flat_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat_tensors(o)]


def test_names_cover_the_reference_models():
    assert REQUIRED <= set(zoo.names())
    assert zoo.names() == sorted(zoo.names())


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="evoformer_stack"):
        zoo.get("evoformer")


def test_unknown_size_lists_valid_sizes():
    with pytest.raises(ValueError, match="tiny, af2"):
        zoo.get("evoformer_block", size="huge")


@pytest.mark.parametrize("name", zoo.names())
def test_tiny_model_runs_and_is_seeded(name):
    module, inputs = zoo.get(name, size="tiny", seed=3)
    with torch.no_grad():
        out = _flat_tensors(module(*inputs))
        again = _flat_tensors(zoo.get(name, size="tiny", seed=3)[0](*inputs))
        other = _flat_tensors(zoo.get(name, size="tiny", seed=4)[0](*inputs))
    assert out and all(torch.isfinite(t).all() for t in out if t.is_floating_point())
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert any(not torch.equal(a, b) for a, b in zip(out, other))
    assert not module.training


@pytest.mark.parametrize("name", zoo.names())
def test_no_parameter_is_all_zero(name):
    """AlphaFold's zero-initialised final and gating layers are re-randomised."""
    module, _ = zoo.get(name, size="tiny")
    zero = [n for n, p in module.named_parameters() if not p.detach().abs().sum() > 0]
    assert zero == []


def test_af2_size_has_the_published_parameter_counts():
    block, _ = zoo.get("evoformer_block", size="af2", device="meta")
    assert sum(p.numel() for p in block.parameters()) == 1_829_952
    block, _ = zoo.get("pairformer_block", size="af2", device="meta")
    assert sum(p.numel() for p in block.parameters()) == 3_070_848
    stack, _ = zoo.get("evoformer_stack", size="af2", device="meta", n_blocks=2)
    assert len([m for m in stack.modules() if type(m).__name__ == "EvoformerBlock"]) == 2


def test_sizes_are_respected():
    _, (m, z, msa_mask, pair_mask) = zoo.get("evoformer_stack", size="af2", n_seq=7, n_res=9, device="meta")
    assert m.shape == (7, 9, 256) and z.shape == (9, 9, 128) and msa_mask.shape == (7, 9)
    _, inputs = zoo.get("alphafold2", size="tiny", n_extra=4, n_templ=2, n_res=8)
    assert inputs[3].shape[:2] == (4, 8) and inputs[4].shape[:3] == (2, 8, 8)
    _, (t, mask) = zoo.get("template_pair_stack", n_templ=2)
    assert t.shape[0] == 2 and mask.shape == t.shape[:-1]


def test_dtype_and_integer_inputs():
    module, inputs = zoo.get("alphafold2", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert inputs[1].dtype == torch.int64  # residue_index stays an index
    assert inputs[0].dtype == torch.float64


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="n_res"):
        zoo.get("evoformer_block", n_res=0)
