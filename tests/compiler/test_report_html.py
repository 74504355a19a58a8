"""The HTML report (foldcompile/report_html.py) and the card ceilings it reads (foldcompile/ceilings.py).

The page's numbers are checked against the report's own costs at the requested size; the page
itself is rendered in a real headless browser (Chromium from the distribution's packages:
`./run test` installs it). Under CI=true a missing Chromium fails that test instead of skipping it.
"""
import doctest
import importlib
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

import foldcompile
from foldcompile.ceilings import CeilingsError, find_ceilings
from foldcompile.models import zoo
from foldcompile.passes.base import PassError
from foldcompile.report_html import page_data, render_html
from foldcompile.tables import human

AT = {"N_res": 64}


@pytest.fixture(scope="module")
def pairformer():
    block, ex = zoo.get("pairformer_block")
    return foldcompile.explain(block, *ex)


@pytest.fixture(scope="module")
def evoformer():
    block, ex = zoo.get("evoformer_block")
    return block, ex, foldcompile.explain(block, *ex)


@pytest.fixture
def results_dir(tmp_path):
    """Measured results of two made-up cards, in the formats foldcompile/ceilings.py reads."""
    ceil = {"card": "Test Card X1", "date": "2026-12-03", "rows": [
        {"ceiling": "copy", "dtype": "", "value": 2000.0, "unit": "GB/s"},
        {"ceiling": "matmul", "dtype": "float32", "value": 50.0, "unit": "TFLOP/s"},
        {"ceiling": "matmul", "dtype": "bfloat16", "value": 700.0, "unit": "TFLOP/s"}], "notes": []}
    (tmp_path / "ceilings_Test_Card_X1_2026-12-03.json").write_text(json.dumps(ceil))
    older = {"card": "Test Card X1", "date": "2026-11-01", "rows": [{"ceiling": "copy", "value": 1.0}], "notes": []}
    (tmp_path / "ceilings_Test_Card_X1_2026-11-01.json").write_text(json.dumps(older))
    noted = {"card": "Test Card X2", "date": "2026-11-27", "rows": [{"fragment": "a"}],
             "notes": ["device-to-device copy bandwidth measured: 2968 GB/s"]}
    (tmp_path / "kernels_elementwise_Test_Card_X2_2026-11-27.json").write_text(json.dumps(noted))
    return str(tmp_path)


# ----------------------------------------------------------------------------- numbers at the size asked

def test_every_number_is_at_the_requested_size(pairformer):
    page = page_data(pairformer, depth=1, at=AT)
    cost = pairformer.cost(depth=1, **AT)
    assert page["dims"] == {"N_res": 64} and page["captured"] == {"N_res": 11}
    assert [m["path"] for m in page["modules"]] == list(cost["modules"])
    for m in page["modules"]:
        classes = cost["modules"][m["path"]]
        assert m["flops"] == sum(e["flops"] for e in classes.values())
        assert m["bytes"] == sum(e["bytes"] for e in classes.values())
    assert page["total"]["flops"] == cost["total"]["flops"] and page["total"]["bytes"] == cost["total"]["bytes"]
    # fusion: each chain's saving is its bytes unfused minus the kernel's, all at N_res=64
    assert page["chains"] and all(c["saved"] == c["bytes_before"] - c["bytes_after"] for c in page["chains"])
    saved = sum(c["saved"] for c in page["chains"])
    assert page["total"]["bytes"] - page["total"]["bytes_after"] == pytest.approx(saved)
    softmax = next(c for c in page["chains"] if c["kernel"] == "fused_softmax" and c["module"] == "tri_att_start")
    # the logits [1, H=4, 64, 64] fp32: add + softmax read and write them (plus the bias), the kernel once each
    assert softmax["bytes_before"] > 2 * 4 * 64 * 64 * 4 and softmax["bytes_after"] < softmax["bytes_before"]
    page_small = page_data(pairformer, depth=1)
    assert page_small["total"]["flops"] < page["total"]["flops"]  # the example size is another size
    # the rendered page shows these numbers, not the example size's
    html = render_html(pairformer, depth=1, at=AT)
    assert "N_res=64</b>" in html and human(cost["total"]["flops"], "FLOP") in html
    assert f"data-value='{page['modules'][1]['flops']}'" in html


def test_bars_are_by_flops_and_bytes_not_node_counts(pairformer):
    html = render_html(pairformer, depth=1, at=AT)
    page = page_data(pairformer, depth=1, at=AT)
    widest = max(page["modules"], key=lambda m: m["flops"])
    row = re.search(rf"<tr data-order='{widest['order']}'.*?</tr>", html, re.S).group(0)
    flops_cell = re.findall(r"<td class='barcell'.*?</td>", row, re.S)[0]
    widths = [float(w) for w in re.findall(r"width:([0-9.]+)%", flops_cell)]
    assert sum(widths) == pytest.approx(100.0, abs=0.05)  # the largest module fills its bar
    layout_only = [m for m in page["modules"] if m["flops"] == 0]
    for m in layout_only:  # zero-FLOP layout work draws no FLOP bar at all
        row = re.search(rf"<tr data-order='{m['order']}'.*?</tr>", html, re.S).group(0)
        assert "width:" not in re.findall(r"<td class='barcell'.*?</td>", row, re.S)[0]


def test_unknown_or_guarded_dims_are_refused(pairformer):
    with pytest.raises(PassError, match="unknown dims"):
        page_data(pairformer, depth=1, at={"N_x": 3})


def test_the_plan_is_what_optimize_fuses_and_no_tracer_names_leak(evoformer):
    block, ex, report = evoformer
    plan = page_data(report, depth=1, at={"N_seq": 32, "N_res": 64})
    fast = foldcompile.optimize(block, *ex, at={"N_seq": 32, "N_res": 64})
    done = page_data(report, depth=1, at={"N_seq": 32, "N_res": 64}, optimized=fast.variant_for(*ex))
    assert done["mode"] == "optimized" and plan["mode"] == "plan"
    # the Evoformer rebinds its arguments (m = layer_norm(m)): optimize renames the op node `m` when it
    # names the input `m`; the chains must still be found node for node
    assert done["chains"] == plan["chains"] and done["modules"] == plan["modules"]
    assert done["total"]["kernels"] == sum(c["matched"] for c in fast.report.counts().values())
    assert any(c["kernel"] == "fused_layer_norm_linear" and c["module"] == "msa_att_row.layer_norm_m"
               and c["bytes_before"] > 0 for c in done["chains"])
    html = render_html(report, depth=1, at={"N_seq": 32, "N_res": 64}, optimized=fast.variant_for(*ex))
    assert "Before / after optimize" in html and "(optimized)" in html
    assert "def forward(self, m, z, msa_mask, pair_mask, chunk_size)" in html
    for leak in ("l_m_", "l_z_", "arg4", "(root) #"):
        assert leak not in html
    # self-contained: no URL but the SVG namespace, no external script or style
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}
    assert "<script src" not in html and "<link" not in html
    # a legend that is a legend: a list of swatches with their meaning, no buttons in it
    legend = re.search(r"<ul class='legend'.*?</ul>", html, re.S).group(0)
    assert "button" not in legend and legend.count("<li>") == 7 and "matrix products" in legend


def test_a_variant_of_another_capture_is_refused(pairformer, evoformer):
    block, ex, _ = evoformer
    fast = foldcompile.optimize(block, *ex)
    with pytest.raises(ValueError, match="not the report's graph"):
        page_data(pairformer, depth=1, optimized=fast.variant_for(*ex))


# ----------------------------------------------------------------------------- ceilings and roofline

def test_ceilings_read_from_results(results_dir):
    c = find_ceilings("x1", results_dir)
    assert c.card == "Test Card X1" and c.copy_gbs == 2000.0  # the newest file wins
    assert c.matmul_tflops == {"float32": 50.0, "bfloat16": 700.0}
    assert "2026-12-03" in c.sources["copy"]
    assert find_ceilings("Test Card X2", results_dir).copy_gbs == 2968.0  # a benchmark's measured note
    with pytest.raises(CeilingsError, match="several match"):
        find_ceilings("test card", results_dir)
    with pytest.raises(CeilingsError, match="none matches.*Test Card X1, Test Card X2"):
        find_ceilings("a100", results_dir)


def test_the_repository_records_the_h200_copy_bandwidth():
    c = find_ceilings("H200")
    # python -m bench.ceilings on the card (bench/results/ceilings_NVIDIA_H200_2026-12-02.md)
    assert c.card == "NVIDIA H200" and c.copy_gbs == pytest.approx(4164.9, abs=0.1)
    assert c.matmul_tflops["bfloat16"] == pytest.approx(787.4, abs=0.1)
    assert "ceilings_NVIDIA_H200_2026-12-02" in c.sources["copy"]


def test_roofline_floors_are_each_op_at_its_roof(pairformer, results_dir):
    c = find_ceilings("x1", results_dir)
    page = page_data(pairformer, depth=1, at=AT, ceilings=c)
    r = page["roofline"]
    assert r["card"] == "Test Card X1" and r["peak_tflops"] == 50.0 and r["peak_dtype"] == "float32"
    assert r["ridge"] == pytest.approx(50e12 / 2000e9)
    expect = sum(max(f / 50e12, b / 2000e9) for _, _, _, f, b in pairformer.node_costs(**AT))
    assert r["floor_before"] == pytest.approx(expect, rel=1e-9)
    assert 0 < r["floor_after"] < r["floor_before"]
    assert {p["path"] for p in r["points"]} == {m["path"] for m in page["modules"] if m["flops"] > 0}
    html = render_html(pairformer, depth=1, at=AT, ceilings=c)
    assert "<svg id='roofline'" in html and "Roofline on Test Card X1" in html and "2 TB/s" in html


def test_a_card_without_a_matmul_rate_says_so(pairformer, results_dir):
    html = render_html(pairformer, depth=1, at=AT, ceilings=find_ceilings("x2", results_dir))
    assert "memory: 2.97 TB/s" in html
    assert "no float32 matmul rate is recorded for Test Card X2" in html  # said, not guessed
    assert "one roof only: memory" in html


def test_profile_times_become_bars_at_the_profiled_size(pairformer):
    block, ex = zoo.get("pairformer_block")
    with torch.no_grad():
        prof = foldcompile.profile(block, *ex, warmup=0, reps=1)
    page = page_data(pairformer, depth=1, profile=prof)
    by_module = prof.by_module(1)
    assert all(m["ms"] == by_module[m["path"]]["ms"] for m in page["modules"])
    assert "time (measured)" in render_html(pairformer, depth=1, profile=prof)
    with pytest.raises(ValueError, match="profile at the size the page shows"):
        page_data(pairformer, depth=1, at=AT, profile=prof)


@pytest.mark.parametrize("name", ["foldcompile.report_html", "foldcompile.ceilings", "foldcompile.progress",
                                  "foldcompile.tables"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- a real browser

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _dump_dom(browser: str, url: str, tmp_path) -> tuple[str, str]:
    """The DOM after the page's scripts ran, and the browser's log (console messages included)."""
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def test_the_page_renders_in_a_headless_browser(pairformer, results_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Chromium is not installed: `./run test` installs it (apt-get install chromium); "
                        "under CI=true the browser test must run")
        pytest.skip("no Chromium here (`./run test` installs it with apt-get where it can)")
    path = tmp_path / "report.html"
    c = find_ceilings("x1", results_dir)
    pairformer.to_html(str(path), depth=1, at=AT, ceilings=c)
    cost = pairformer.cost(depth=1, **AT)

    dom, log = _dump_dom(browser, path.as_uri() + "#sort=bytes", tmp_path)
    assert 'data-fc-ready="1"' in dom, "the page's script did not run to its end"
    assert re.search(r'<div id="fc-errors" hidden="">\s*</div>', dom), "the page recorded JavaScript errors"
    assert ":CONSOLE" not in log, [line for line in log.splitlines() if ":CONSOLE" in line]
    assert "Every number on this page is at <b>N_res=64</b>" in dom
    assert human(cost["total"]["flops"], "FLOP") in dom and human(cost["total"]["bytes"], "B") in dom
    assert '<svg id="roofline"' in dom
    # the script sorted the module rows by bytes, as the address asked
    rows = re.findall(r'<tr data-order="\d+" data-flops="\d+" data-bytes="(\d+)"', dom)
    assert len(rows) == len(cost["modules"]) and [int(b) for b in rows] == sorted((int(b) for b in rows), reverse=True)

    # and the error catcher works: a page whose script fails shows it in the dumped DOM
    broken = tmp_path / "broken.html"
    broken.write_text(path.read_text(encoding="utf-8").replace("</body>", "<script>notAFunction();</script></body>"),
                      encoding="utf-8")
    dom, _ = _dump_dom(browser, broken.as_uri(), tmp_path)
    assert "JavaScript errors on this page" in dom and "notAFunction" in dom
