"""The package's layering (docs/DESIGN.md, "Repository layout"), read from the source with ``ast``:
no import cycle between ``explain`` and ``report_html``, ``kernels/`` never importing ``passes/``,
``models/`` never importing ``foldcompile``, ``flat_inputs`` living in capture, and docs that cite
nothing outside the repository."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imports(path: pathlib.Path, *, runtime_only: bool = False) -> list[tuple[str, int]]:
    """``(module, line)`` of every absolute import in ``path``; with ``runtime_only`` those under
    ``if TYPE_CHECKING:`` are left out (annotations only: they never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
    return out


def _violations(folder: str, allowed: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module, line in _imports(path):
            if module.startswith("foldcompile") and not module.startswith(allowed):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


def test_kernels_import_only_kernels():
    assert _violations("kernels", ("foldcompile.kernels",)) == []


def test_models_never_import_the_compiler():
    assert _violations("models", ("foldcompile.models",)) == []


def test_report_html_never_imports_explain_at_run_time():
    """explain draws its report with report_html; report_html reads the Report it is given, and
    both take their table helpers from foldcompile/tables.py: no cycle."""
    html_imports = [m for m, _ in _imports(ROOT / "foldcompile" / "report_html.py", runtime_only=True)]
    assert "foldcompile.explain" not in html_imports and "foldcompile.tables" in html_imports
    assert "foldcompile.report_html" not in [m for m, _ in _imports(ROOT / "foldcompile" / "tables.py")]


def test_the_layering_check_sees_a_violation(tmp_path):
    """The checks above can fail: an import under TYPE_CHECKING is skipped, one outside it is not."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from foldcompile.explain import Report\n"
                   "import foldcompile.passes.registry\n")
    assert _imports(src, runtime_only=True) == [("typing", 1), ("foldcompile.passes.registry", 4)]
    assert ("foldcompile.explain", 3) in _imports(src)


def test_flat_inputs_belongs_to_capture():
    """The placeholders' values of a captured graph are the capture's contract (its signature and
    input spec); every caller imports it from there."""
    from foldcompile.capture import flat_inputs

    assert flat_inputs.__module__ == "foldcompile.capture"
    callers = [f"{p.relative_to(ROOT)}:{line}" for folder in ("foldcompile", "passes", "tests")
               for p in sorted((ROOT / folder).rglob("*.py"))
               for line, text in enumerate(p.read_text().splitlines(), 1)
               if re.search(r"from foldcompile\.explain import .*\bflat_inputs\b", text)]
    assert callers == []


# ----------------------------------------------------------------------------- docs stand alone

# a package index is an install step, not a citation
_ALLOWED_URLS = {"https://download.pytorch.org/whl/cpu"}
_CITATION = re.compile(r"https?://\S+|\barxiv\b|\bdoi\b|\bet al\.", re.IGNORECASE)


def _doc_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.name)
def test_docs_cite_nothing_outside_the_repository(path):
    cited = [f"{path.name}:{i}: {m.group(0)}" for i, line in enumerate(path.read_text().splitlines(), 1)
             for m in _CITATION.finditer(line) if m.group(0).rstrip(").,`'\"") not in _ALLOWED_URLS]
    assert cited == []


def test_the_citation_check_sees_one():
    line = "FastFold (Cheng et al., arXiv 2203.00854), see https://example.org/paper"
    assert [m.group(0) for m in _CITATION.finditer(line)] == ["et al.", "arXiv", "https://example.org/paper"]
