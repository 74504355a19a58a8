"""``foldcompile verify TARGET``: the fusion report and the verification, exit status 0 when it verifies."""
from foldcompile.cli import _demo_optimize, main


def test_verify_command_on_a_zoo_model(capsys):
    assert main(["verify", "pairformer_block"]) == 0
    out = capsys.readouterr().out
    assert "rule            matched  rejected" in out
    assert "attention at attention_pair_bias (weights_2): head dim 4 < 8" in out
    assert "verify: optimized error vs the float64 truth" in out and ": OK" in out


def test_demo_prints_match_counts(capsys):
    assert _demo_optimize(["pairformer_block"], "tiny", "cpu")  # the demo's optimize section
    out = capsys.readouterr().out.split("== optimize + verify")[1]
    assert "pairformer_block" in out and "ln_linear 6" in out and "triangle_multiplication 2" in out and "rejected: head dim 4 < 8" in out
