"""The foldcompile command, through main([...])."""
import json
import sys
import textwrap

import pytest
import torch

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


# ----------------------------------------------------------------------------- targets a user types

def test_module_attr_found_from_the_working_directory(tmp_path, monkeypatch, capsys):
    # a console script does not put the working directory on sys.path: the CLI must
    (tmp_path / "cwd_model.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert main(["explain", "cwd_model:build", "--n-res", "5", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["dims"] == {"N_res": 5}
    finally:
        sys.modules.pop("cwd_model", None)


def test_file_path_target(tmp_path, monkeypatch, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my_file_model.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "./sub/my_file_model.py:build", "--n-res", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dims"] == {"N_res": 7}
    assert main(["explain", "sub/missing.py:build"]) == 2
    assert "no file 'sub/missing.py'" in capsys.readouterr().err


def test_a_builder_that_raises_is_reported_with_its_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "raising_model.py").write_text("def build():\n    raise ValueError('c_z must be even')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "raising_model.py:build"]) == 2
    err = capsys.readouterr().err
    assert "raised ValueError: c_z must be even" in err
    assert "raising_model.py:2" in err and "Traceback" not in err


def test_import_error_hint(capsys):
    assert main(["explain", "not_a_module_here:build"]) == 2
    err = capsys.readouterr().err
    assert "No module named 'not_a_module_here'" in err and "path/to/not_a_module_here.py:ATTR" in err


def test_user_model_keeps_its_dtype_unless_dtype_is_given(user_module, capsys):
    from foldcompile import explain

    module, inputs, _, _ = load_target(f"{user_module}:build")
    module, inputs = module.to(torch.bfloat16), tuple(x.to(torch.bfloat16) for x in inputs)
    api_bytes = explain(module, *inputs).to_dict()["total"]["bytes"]
    made = load_target(f"{user_module}:build")
    assert made[0].proj.weight.dtype == torch.float32 and made[1][0].dtype == torch.float32
    cast = load_target(f"{user_module}:build", dtype=torch.bfloat16)
    assert cast[0].proj.weight.dtype == torch.bfloat16 and cast[1][0].dtype == torch.bfloat16
    assert main(["explain", f"{user_module}:build", "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["bytes"] == api_bytes


def test_at_accepts_the_flag_spelling_and_names_the_dims(user_module, capsys):
    assert main(["explain", f"{user_module}:build", "--n-res", "7", "--json", "--at", "n_res=64"]) == 0
    assert json.loads(capsys.readouterr().out)["at"]["dims"] == {"N_res": 64}
    assert main(["explain", f"{user_module}:build", "--n-res", "7", "--at", "N_x=3"]) == 2
    err = capsys.readouterr().err
    assert "--at N_x=3" in err and "N_res" in err


def test_bad_arguments_refused_before_any_work(user_module, tmp_path, capsys, monkeypatch):
    import foldcompile.cli as cli

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_target", no_work)
    assert main(["explain", f"{user_module}:build", "--html", str(tmp_path / "no_dir" / "x.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["explain", f"{user_module}:build", "--at", "N_res=x"]) == 2
    assert "DIM=INT" in capsys.readouterr().err
    for bad in (["--depth", "0"], ["--n-res", "-3"], ["--n-seq", "two"]):
        with pytest.raises(SystemExit) as e:
            main(["explain", f"{user_module}:build", *bad])
        assert e.value.code == 2
        assert "positive integer" in capsys.readouterr().err


def test_ambiguous_sizes_advice_names_flags_not_python(capsys):
    assert main(["explain", "evoformer_block", "--n-seq", "9", "--n-res", "9"]) == 2
    err = capsys.readouterr().err
    assert "--n-seq" in err and "--at" in err and "report.cost" not in err and "l_" not in err


def test_version_help_and_python_dash_m(capsys):
    import subprocess

    from foldcompile import __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"foldcompile {__version__}"
    for cmd in ("explain", "profile", "demo", "zoo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert capsys.readouterr().out.count("--") >= 1
    done = subprocess.run([sys.executable, "-m", "foldcompile", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"foldcompile {__version__}"


def test_verbose_progress_on_stderr(user_module, capsys):
    assert main(["explain", f"{user_module}:build", "-v"]) == 0
    captured = capsys.readouterr()
    assert "capturing and analysing" in captured.err and "explained" in captured.err
    assert "[foldcompile" not in captured.out
    assert main(["explain", f"{user_module}:build", "-q"]) == 0
    assert "[foldcompile" not in capsys.readouterr().err


def test_profile_reports_the_spread_of_runs(capsys):
    assert main(["profile", "pairformer_block", "--device", "cpu", "--reps", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {k: len(v) for k, v in d["runs_ms"].items()} == {"profiled": 2, "graph": 2, "eager": 2}
    assert main(["profile", "pairformer_block", "--device", "cpu", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "spread over runs (min-max)" in out and "fewer than 3 runs" in out
