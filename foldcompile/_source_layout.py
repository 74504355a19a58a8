"""Make ``foldcompile.passes/kernels/models`` importable from a plain source checkout.

An installed foldcompile (``pip install -e .``) maps the repository's top-level
folders into the ``foldcompile`` namespace through pyproject.toml. On a machine
where the package cannot be installed (the GPU machines have no network), running
from the repository root with ``PYTHONPATH=.`` should behave the same, so this
module registers the same mapping when the installed one is absent. Either way
each module is loaded once, under its ``foldcompile.*`` name.
"""
from __future__ import annotations

import importlib.util
import os
import sys

# kernels first: the op registry (passes) keys entries by kernel callables (draw_dropout_seed), and no
# kernel module imports passes
_SUBPACKAGES = {"kernels": "kernels", "passes": "passes", "models": "models"}


def ensure_subpackages(package_name: str, package_dir: str) -> None:
    root = os.path.dirname(os.path.abspath(package_dir))
    for name, folder in _SUBPACKAGES.items():
        full = f"{package_name}.{name}"
        if full in sys.modules:
            continue
        path = os.path.join(root, folder)
        installed = _installed_spec(full)
        if installed is not None or not os.path.isfile(os.path.join(path, "__init__.py")):
            continue
        spec = importlib.util.spec_from_file_location(
            full, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(sys.modules[package_name], name, module)


def _installed_spec(full_name: str):
    try:
        return importlib.util.find_spec(full_name)
    except (ImportError, ValueError):
        return None
