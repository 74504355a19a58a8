"""The CLI's report, optimize and progress surface: --html/--card, `foldcompile optimize [--bench]`,
stage timings with -v, progress bars, and a --help that answers without importing torch."""
import io
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from foldcompile.cli import main
from foldcompile.progress import Bar, StageTimes, rules_with_progress

_GATE = textwrap.dedent('''
    import torch


    class Gate(torch.nn.Module):
        def __init__(self, c_z=6):
            super().__init__()
            self.norm = torch.nn.LayerNorm(c_z)
            self.proj = torch.nn.Linear(c_z, 2 * c_z)

        def forward(self, z):
            a, g = self.proj(self.norm(z)).chunk(2, dim=-1)
            return z + torch.softmax(a, dim=-1) * torch.sigmoid(g)


    def build(n_res=9):
        torch.manual_seed(0)
        return Gate(), (torch.randn(n_res, n_res, 6),)
''')


@pytest.fixture
def gate(tmp_path, monkeypatch):
    """A small user model: a layer norm and its projection, a softmax and a gated residual (three kernels),
    fast to optimize."""
    (tmp_path / "gate_model.py").write_text(_GATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "gate_model:build"
    sys.modules.pop("gate_model", None)


def test_help_and_version_do_not_import_torch():
    probe = ("import runpy, sys\n"
             "for argv in (['foldcompile', '--help'], ['foldcompile', '--version'], ['foldcompile', 'optimize', '-h']):\n"
             "    sys.argv = argv\n"
             "    try:\n"
             "        runpy.run_module('foldcompile', run_name='__main__', alter_sys=True)\n"
             "    except SystemExit as e:\n"
             "        assert e.code == 0, e.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("NO TORCH"), done.stderr
    assert "--bench" in done.stdout and "foldcompile 0" in done.stdout


def test_explain_html_at_the_size_with_a_roofline(gate, tmp_path, capsys):
    html = tmp_path / "gate.html"
    assert main(["explain", gate, "--at", "n_res=64", "--html", str(html), "--card", "h200"]) == 0
    assert f"wrote {html}" in capsys.readouterr().out
    page = html.read_text(encoding="utf-8")
    assert "Every number on this page is at <b>N_res=64</b>" in page
    assert "Roofline on NVIDIA H200" in page and "memory: 4.16 TB/s" in page  # the measured ceilings
    assert "compute: 50.72 TFLOP/s float32 matmul" in page  # the model's dtype: fp32 (no TF32) on the card


def test_card_and_html_arguments_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import foldcompile.cli as cli

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_target", no_work)
    assert main(["explain", "pairformer_block", "--html", str(tmp_path / "x.html"), "--card", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--card nope" in err and "NVIDIA H200" in err
    assert main(["explain", "pairformer_block", "--card", "h200"]) == 2
    assert "give --html" in capsys.readouterr().err
    assert main(["optimize", "pairformer_block", "--html", str(tmp_path / "no" / "x.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["optimize", "pairformer_block", "--at", "N_res=big"]) == 2
    assert "DIM=INT" in capsys.readouterr().err


def test_optimize_prints_what_was_fused_and_benches_with_a_spread(gate, capsys):
    assert main(["optimize", gate, "--device", "cpu", "--bench", "--reps", "3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {r: c["matched"] for r, c in d["fusion"]["counts"].items() if c["matched"]} == \
        {"softmax": 1, "ln_linear": 1, "elementwise": 1}
    assert d["fusion"]["at"] == {"N_res": 256}  # profitability at the training crop, not at the example's 9
    b = d["bench"]
    assert b["device"] == "cpu" and {k: len(v) for k, v in b["runs_ms"].items()} == {"eager": 3, "optimized": 3}
    assert b["spread_ms"]["eager"][0] <= b["median_ms"]["eager"] <= b["spread_ms"]["eager"][1]
    assert b["max_rel_error"] < 1e-5
    assert main(["optimize", gate, "--device", "cpu", "--bench", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "matches:" in out and "rejected candidates:" in out and "left unfused" in out
    assert "eager      median" in out and "optimized  median" in out and "fewer than 3 runs" in out


def test_optimize_html_is_the_before_after_at_the_size(gate, tmp_path, capsys):
    html = tmp_path / "opt.html"
    assert main(["optimize", gate, "--at", "n_res=32", "--html", str(html)]) == 0
    assert "fused at N_res=32" in capsys.readouterr().out
    page = html.read_text(encoding="utf-8")
    assert "(optimized)" in page and "Before / after optimize" in page and "N_res=32</b>" in page
    assert "fused_softmax" in page and "fused_layer_norm" in page and "fused_elementwise_" in page
    assert main(["optimize", gate, "--at", "N_x=3"]) == 2
    assert "--at N_x" in capsys.readouterr().err


def test_verbose_ends_with_stage_timings(gate, capsys):
    assert main(["explain", gate, "-v"]) == 0
    err = capsys.readouterr().err
    timings = err.split("stage timings:")[1]
    for stage in ("load the target", "capture (Dynamo)", "pass normalize", "pass shape_prop", "pass classify"):
        assert stage in timings
    assert main(["explain", gate]) == 0
    assert "stage timings" not in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_log_lines_elsewhere(caplog):
    log = logging.getLogger("foldcompile.test_progress")
    log.setLevel(logging.INFO)
    tty = _Terminal()
    bar = Bar(4, "fuse rules", log, stream=tty)
    bar.advance("attention")
    bar.advance("softmax")
    bar.close()
    assert "\rfuse rules [############            ] 2/4 softmax" in tty.getvalue() and tty.getvalue().endswith("\n")
    pipe = io.StringIO()
    with caplog.at_level(logging.INFO, logger="foldcompile.test_progress"):
        bar = Bar(2, "bench runs", log, stream=pipe)
        bar.advance("run 1")
        bar.close()
    assert pipe.getvalue() == "" and "bench runs 1/2: run 1" in caplog.text
    log.setLevel(logging.WARNING)
    quiet = _Terminal()
    Bar(3, "x", log, stream=quiet).advance("a")
    assert quiet.getvalue() == ""  # nothing unless INFO is on (-v)


def test_rules_report_progress_as_the_fuse_pass_runs_them():
    from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
    from foldcompile.passes.fuse import fuse_pass
    from foldcompile.passes.rules import all_rules

    def attend(q, k, v, key_mask):
        logits = q @ k.transpose(-1, -2) / 8 ** 0.5 + (key_mask - 1.0) * 1e9
        return torch.softmax(logits, dim=-1) @ v

    ex = (torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8), torch.ones(3, 1, 1, 5))
    gm = normalize_pass(torch.fx.symbolic_trace(attend)).graph_module
    shape_prop_pass(gm, ex, dims={})
    classify_pass(gm)
    log = logging.getLogger("foldcompile.test_rules")
    log.setLevel(logging.INFO)
    times = StageTimes()
    log.addHandler(times)
    tty = _Terminal()
    try:
        rules, bar = rules_with_progress(all_rules(), log)
        bar.stream, bar.tty = tty, True
        record = fuse_pass(gm, rules=rules).record
        bar.close()
    finally:
        log.removeHandler(times)
        log.setLevel(logging.NOTSET)
    n = len(all_rules())
    assert f"{n}/{n}" in tty.getvalue() and "attention" in tty.getvalue()
    assert record["counts"]["attention"] == {"matched": 1, "rejected": 0}  # the wrapped rules still fuse
    assert [name for name, _ in times.stages] == ["fuse rules"]
