"""The foldcompile command, through main([...])."""
import json
import sys
import textwrap

import pytest

from foldcompile.cli import load_target, main
from foldcompile.models import zoo

_USER_MODULE = textwrap.dedent('''
    """A user's model, outside the zoo, loaded by `foldcompile explain user_af_model:ATTR`."""
    import torch


    class PairUpdate(torch.nn.Module):
        def __init__(self, c_z=6):
            super().__init__()
            self.norm = torch.nn.LayerNorm(c_z)
            self.proj = torch.nn.Linear(c_z, 2 * c_z)
            self.out = torch.nn.Linear(c_z, c_z)

        def forward(self, z):
            a, b = self.proj(self.norm(z)).chunk(2, dim=-1)
            return z + self.out(torch.einsum("ikc,jkc->ijc", a, b.sigmoid()))

        def example_inputs(self, n_res=9):
            return (torch.randn(n_res, n_res, 6),)


    def build(n_res=9):
        torch.manual_seed(0)
        return PairUpdate(), (torch.randn(n_res, n_res, 6),)


    def no_inputs():
        return torch.nn.Linear(3, 3)


    NOT_CALLABLE = 3
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_af_model.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_af_model"
    sys.modules.pop("user_af_model", None)


def test_zoo_lists_every_model(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    for name in zoo.names():
        assert name in out


def test_explain_zoo_name_json(capsys):
    assert main(["explain", "pairformer_block", "--json", "--at", "N_res=64"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["capture"] == {"graphs": 1, "leaves": 0, "tracer": "dynamo"}
    assert d["dims"] == {"N_res": 11}
    assert d["classes"]["GEMM"]["count"] > 0
    assert d["at"]["dims"] == {"N_res": 64}
    assert d["at"]["classes"]["GEMM"]["flops"] > d["classes"]["GEMM"]["flops"]


def test_explain_module_attr_callable_and_factory(user_module, tmp_path, capsys):
    html = tmp_path / "user.html"
    assert main(["explain", f"{user_module}:build", "--n-res", "7", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "N_res=7" in out and "GEMM" in out and "proj" in out and f"wrote {html}" in out
    assert "ELEMENTWISE" in html.read_text()
    # an nn.Module subclass with example_inputs, used as a factory
    assert main(["explain", f"{user_module}:PairUpdate", "--n-res", "5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dims"] == {"N_res": 5} and d["classes"]["GEMM"]["count"] == 3


def test_load_target_errors(user_module):
    with pytest.raises(Exception, match="without an example_inputs"):
        load_target(f"{user_module}:no_inputs")
    with pytest.raises(Exception, match="must be a callable"):
        load_target(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(Exception, match="does not take --size"):
        load_target(f"{user_module}:build", size="af2")


def test_clear_errors_exit_2(user_module, capsys):
    assert main(["explain", "no_such_model"]) == 2
    captured = capsys.readouterr()
    assert "no_such_model" in captured.err and captured.out == ""
    assert main(["explain", "no_such_pkg.mod:attr"]) == 2
    assert "cannot import" in capsys.readouterr().err
    # ambiguous sizes: the shape analysis asks for distinct ones, no traceback
    assert main(["explain", "evoformer_block", "--n-seq", "9", "--n-res", "9"]) == 2
    assert "ambiguous" in capsys.readouterr().err
    assert main(["explain", "pairformer_block", "--at", "N_res:4"]) == 2
    assert "DIM=INT" in capsys.readouterr().err


def test_demo_on_one_tiny_model(capsys):
    assert main(["demo", "--models", "evoformer_block", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "captured as 1 graph, 0 leaves" in out
    assert "max rel error" in out and "MISMATCH" not in out
    assert "GEMM" in out and "FLOP/B" in out
    # the AF2-dims evoformer block, captured at 11 x 13, read at the training crop and at 1024
    assert "GEMM 216.09 GFLOP" in out and "GEMM 3702.26 GFLOP" in out
    summary = out.split("== summary")[1]
    assert "evoformer_block" in summary and "ok" in summary
    # the kernel section: under the test suite's TRITON_INTERPRET=1 the Triton kernels themselves run
    kernels = out.split("== kernels")[1].split("== summary")[0]
    assert kernels.count("triton (interpreter)") == 4 and "TOO LARGE" not in kernels
    assert "kernels              ok" in summary


def test_demo_rejects_unknown_model(capsys):
    assert main(["demo", "--models", "nope"]) == 2
    assert "unknown models" in capsys.readouterr().err


def test_profile_command_on_cpu(capsys):
    assert main(["profile", "pairformer_block", "--device", "cpu", "--reps", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["timing"] == "cpu_wall" and d["model"] == "pairformer_block"
    assert abs(sum(e["ms"] for e in d["classes"].values()) - d["profiled_ms"]) < 1e-9
