"""AlphaFold 2 with recycling (Alg. 2): embedders and the full model at tiny sizes."""

import pytest
import torch

from foldcompile.models.zoo import randomize_parameters
from foldcompile.models.alphafold2.embedders import InputEmbedder, RecyclingEmbedder, RelativePosition
from foldcompile.models.alphafold2.model import AlphaFold2

TINY = dict(n_evoformer_blocks=2, n_extra_blocks=1, n_template_blocks=1, c_m=16, c_z=8, c_s=16, c_e=8, c_t=8,
            n_recycle=1, c_hidden_msa_att=4, n_heads_msa=2, c_hidden_opm=4, c_hidden_mul=8, c_hidden_pair_att=4,
            n_heads_pair=2, transition_n=2, c_hidden_extra_msa_att=4, n_heads_extra_msa=2,
            c_hidden_template_att=4, n_heads_template=2, c_hidden_template_mul=8,
            c_hidden_template_pointwise=4, n_heads_template_pointwise=2, c_ipa=4, n_heads_ipa=2,
            n_query_points=2, n_value_points=2, c_resnet=8, n_structure_layers=2)
N_SEQ, N_EXTRA, N_TEMPL = 3, 4, 2


def make_model(dtype=torch.float32, **overrides) -> AlphaFold2:
    torch.manual_seed(0)
    model = AlphaFold2(**{**TINY, **overrides}).to(dtype)
    randomize_parameters(model)
    return model.eval()


def make_features(n_res: int, dtype=torch.float32, seed: int = 0, templates: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    aatype = torch.randint(0, 21, (n_res,), generator=gen)
    aatype[0] = 7  # one glycine: its pseudo-beta is CA
    target_feat = torch.zeros(n_res, 22, dtype=dtype)
    target_feat[torch.arange(n_res), 1 + aatype] = 1.0
    feats = dict(
        target_feat=target_feat,
        residue_index=torch.arange(n_res),
        msa_feat=torch.randn(N_SEQ, n_res, 49, generator=gen, dtype=dtype),
        extra_msa_feat=torch.randn(N_EXTRA, n_res, 25, generator=gen, dtype=dtype),
    )
    if templates:
        feats["template_pair_feat"] = torch.randn(N_TEMPL, n_res, n_res, 88, generator=gen, dtype=dtype)
        feats["template_angle_feat"] = torch.randn(N_TEMPL, n_res, 57, generator=gen, dtype=dtype)
        # channels 50..56 are AF2's torsion-angle masks (0/1); psi's (52) masks the template rows
        feats["template_angle_feat"][..., 50:] = (torch.rand(N_TEMPL, n_res, 7, generator=gen) > 0.2).to(dtype)
    return feats


def flat_outputs(out: dict) -> dict:
    flat = {}
    for key, value in out.items():
        if isinstance(value, tuple):
            for i, v in enumerate(value):
                flat[f"{key}[{i}]"] = v
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------- embedders

def test_relative_position_clips_at_32():
    relpos = RelativePosition(c_z=4)
    # 65 bins; a one-hot times the weight picks one column, so equal clipped offsets give equal rows
    idx = torch.tensor([0, 1, 40, 100])
    out = relpos(idx)
    assert relpos.linear.in_features == 65 and out.shape == (4, 4, 4)
    torch.testing.assert_close(out[0, 2], out[0, 3])  # -40 and -100 both clip to -32
    torch.testing.assert_close(out[0, 2], relpos.linear.bias + relpos.linear.weight[:, 0])
    torch.testing.assert_close(out[1, 0], relpos.linear.bias + relpos.linear.weight[:, 33])  # +1
    torch.testing.assert_close(out[3, 0], relpos.linear.bias + relpos.linear.weight[:, 64])  # +100 -> +32


def test_input_embedder_shapes_and_bad_input():
    emb = InputEmbedder(c_m=6, c_z=5)
    m, z = emb(torch.randn(7, 22), torch.arange(7), torch.randn(3, 7, 49))
    assert m.shape == (3, 7, 6) and z.shape == (7, 7, 5)
    with pytest.raises(ValueError, match="msa_feat"):
        emb(torch.randn(7, 22), torch.arange(7), torch.randn(3, 7, 48))


def test_recycling_distogram_bins():
    emb = RecyclingEmbedder(c_m=4, c_z=3)
    with torch.no_grad():
        emb.linear.weight.copy_(torch.arange(15.0).repeat(3, 1))  # output = index of the hit bin
        emb.linear.bias.zero_()
        emb.layer_norm_z.weight.zero_()  # drop the z_prev term
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 50.0]])
    _, z = emb(torch.randn(4, 4), torch.randn(4, 4, 3), x)
    # 3 Å: below the first bin (all zero); 4 Å: bin 0 (3.25-4.5); 5 Å: bin 1; 50 Å: the last, open bin
    assert z[0, 1, 0] == 0 and z[0, 0, 0] == 0
    assert z[0, 2, 0] == 0 and z[1, 2, 0] == 1  # |(3,0,0)-(0,4,0)| = 5
    assert z[0, 3, 0] == 14


# ---------------------------------------------------------------- the full model

def test_shapes_and_eval_determinism():
    model = make_model()
    n = 6
    feats = make_features(n)
    out = model(**feats)
    again = model(**feats)
    assert out["single"].shape == (n, 16) and out["sm_single"].shape == (n, 16)
    assert out["pair"].shape == (n, n, 8) and out["msa_first_row"].shape == (n, 16)
    assert out["positions"].shape == (n, 3, 3)
    assert out["frames"][0].shape == (2, n, 3, 3) and out["frames"][1].shape == (2, n, 3)
    assert out["angles"].shape == (2, n, 7, 2)
    assert out["distogram_logits"].shape == (n, n, 64)
    torch.testing.assert_close(out["distogram_logits"], out["distogram_logits"].transpose(0, 1))
    again = flat_outputs(again)
    for key, value in flat_outputs(out).items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(again[key], value, atol=0, rtol=0, msg=key)


def test_recycling_and_templates_change_the_output():
    model = make_model()
    feats = make_features(5)
    base = model(**feats, n_recycle=1)
    assert (model(**feats, n_recycle=0)["positions"] - base["positions"]).abs().max() > 1e-4
    no_templ = {k: v for k, v in feats.items() if not k.startswith("template")}
    assert (model(**no_templ, n_recycle=1)["pair"] - base["pair"]).abs().max() > 1e-4
    # a fully masked template set contributes nothing through the point-wise attention, but its
    # rows stay in the MSA (masked by their psi masks, not by template_mask, as in AF2)
    masked = model(**feats, template_mask=torch.zeros(N_TEMPL), n_recycle=1)
    assert (masked["pair"] - base["pair"]).abs().max() > 1e-4


def test_chunk_size_gives_the_same_function():
    model = make_model(torch.float64)
    feats = make_features(5, torch.float64)
    ref = flat_outputs(model(**feats))
    chunked = flat_outputs(model(**feats, chunk_size=2))
    for key in ref:
        torch.testing.assert_close(chunked[key], ref[key], atol=1e-10, rtol=0, msg=key)


def test_padded_residues_leave_real_residues_unchanged():
    model = make_model(torch.float64)
    n, pad = 5, 3
    feats = make_features(n, torch.float64)
    padded = make_features(n + pad, torch.float64, seed=1)  # random values in the padding
    for key, value in feats.items():
        if key == "target_feat" or key == "residue_index":
            padded[key][:n] = value
        elif key == "template_pair_feat":
            padded[key][:, :n, :n] = value
        else:
            padded[key][:, :n] = value
    seq_mask = torch.cat([torch.ones(n), torch.zeros(pad)]).double()
    ref = model(**feats, n_recycle=2)
    out = model(**padded, seq_mask=seq_mask, n_recycle=2)
    torch.testing.assert_close(out["single"][:n], ref["single"], atol=1e-9, rtol=0)
    torch.testing.assert_close(out["sm_single"][:n], ref["sm_single"], atol=1e-9, rtol=0)
    torch.testing.assert_close(out["pair"][:n, :n], ref["pair"], atol=1e-9, rtol=0)
    torch.testing.assert_close(out["msa_first_row"][:n], ref["msa_first_row"], atol=1e-9, rtol=0)
    torch.testing.assert_close(out["positions"][:n], ref["positions"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["angles"][:, :n], ref["angles"], atol=1e-5, rtol=0)
    # the check has teeth: without the mask the padding changes the real residues
    leak = model(**padded, n_recycle=2)
    assert (leak["positions"][:n] - ref["positions"]).abs().max() > 1e-3


def test_every_parameter_gets_a_gradient_with_recycling():
    model = make_model()
    feats = make_features(6)
    out = model(**feats, n_recycle=2)
    loss = sum(v.square().mean() + v.mean() for v in flat_outputs(out).values())
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing, f"no gradient reaches {missing}"
    # the recycled inputs are real: the distogram of the previous positions hit some bins
    assert model.recycling_embedder.linear.weight.grad.abs().sum() > 0


def test_earlier_recycling_iterations_run_without_grad(monkeypatch):
    model = make_model()
    grad_modes = []
    original = model.iteration

    def spy(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "iteration", spy)
    model(**make_features(4, templates=False), n_recycle=2)
    assert grad_modes == [False, False, True]


def test_bad_inputs_are_named():
    model = make_model()
    feats = make_features(5)
    feats["msa_feat"] = feats["msa_feat"][:, :4]
    with pytest.raises(ValueError, match="msa_feat"):
        model(**feats)
    with pytest.raises(ValueError, match="n_recycle"):
        model(**make_features(5), n_recycle=-1)
    with pytest.raises(ValueError, match="unbatched"):
        model(**{k: v.unsqueeze(0) for k, v in make_features(5).items()})


def test_training_mode_with_checkpointing_matches_plain_training():
    feats = make_features(5)
    grads = []
    for checkpoint in (False, True):
        model = make_model(checkpoint=checkpoint).train()
        torch.manual_seed(3)
        out = model(**feats, n_recycle=1)
        sum(v.square().mean() for v in flat_outputs(out).values()).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)
    # dropout is active in training mode
    model = make_model()
    eval_out = model(**feats, n_recycle=1)
    model.train()
    torch.manual_seed(3)
    assert (model(**feats, n_recycle=1)["single"] - eval_out["single"]).abs().max() > 1e-4
