"""What every pass promises (docs/DESIGN.md, "The pipeline"): it declares the node-meta keys it
``requires`` and ``ensures`` (schema keys, checked by the pass manager) and logs its progress under
``foldcompile.passes.<its module>``."""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from functools import partial

import pytest
import torch
import torch.fx as fx

import foldcompile.passes as passes_pkg
from foldcompile.pass_manager import PassManager
from foldcompile.passes.base import PassError, declared
from foldcompile.passes.meta import NODE_KEYS


def _pass_functions() -> list[tuple[str, object]]:
    found = []
    for info in pkgutil.iter_modules(passes_pkg.__path__):
        module = importlib.import_module(f"foldcompile.passes.{info.name}")
        for name, fn in vars(module).items():
            if name.endswith("_pass") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
                found.append((f"{info.name}.{name}", fn))
    return found


PASSES = _pass_functions()


def test_the_passes_are_found():
    names = {n.split(".")[-1] for n, _ in PASSES}
    assert {"normalize_pass", "shape_prop_pass", "classify_pass", "fuse_pass", "shard_pass", "localize_pass",
            "local_shape_check_pass", "schedule_collectives_pass"} <= names


@pytest.mark.parametrize("name,fn", PASSES, ids=[n for n, _ in PASSES])
def test_every_pass_declares_schema_keys_and_has_its_logger(name, fn):
    assert hasattr(fn, "requires") and hasattr(fn, "ensures"), f"{name} has no @declare(requires=..., ensures=...)"
    requires, ensures = declared(fn)
    assert requires | ensures <= NODE_KEYS, f"{name}: keys outside the schema {sorted((requires | ensures) - NODE_KEYS)}"
    module = name.split(".")[0]
    assert f"foldcompile.passes.{module}" in logging.Logger.manager.loggerDict, f"{name} logs nothing"


def _attention_graph():
    def attend(q, k, v, key_mask):
        logits = q @ k.transpose(-1, -2) / 8 ** 0.5 + (key_mask - 1.0) * 1e9
        return torch.softmax(logits, dim=-1) @ v

    ex = (torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8), torch.ones(3, 1, 1, 5))
    return fx.symbolic_trace(attend), ex


def test_each_pass_logs_its_progress_under_its_module(caplog):
    from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
    from foldcompile.passes.fuse import fuse_pass

    gm, ex = _attention_graph()
    pm = PassManager([normalize_pass, ("shape_prop", partial(shape_prop_pass, example_inputs=ex, dims={})),
                      classify_pass, fuse_pass])
    with caplog.at_level(logging.INFO, logger="foldcompile"):
        pm.run(gm)
    loggers = {r.name for r in caplog.records}
    assert {f"foldcompile.passes.{p}" for p in ("normalize", "shape_prop", "classify", "fuse")} <= loggers
    fuse_lines = [r.getMessage() for r in caplog.records if r.name == "foldcompile.passes.fuse"]
    assert fuse_lines == ["fuse: 2 matches, 0 rejections, 0 element-wise/reduction nodes left unfused, "
                          "100% of their bytes fused"]


def test_the_pass_manager_refuses_fuse_before_classify():
    from foldcompile.passes import normalize_pass, shape_prop_pass
    from foldcompile.passes.fuse import fuse_pass

    gm, ex = _attention_graph()
    pm = PassManager([normalize_pass, ("shape_prop", partial(shape_prop_pass, example_inputs=ex, dims={})),
                      fuse_pass])
    with pytest.raises(PassError, match=r"pass 'fuse' requires node meta 'cost' \(and \['op_class'\]\)"):
        pm.run(gm)
    assert list(pm.history) == ["normalize", "shape_prop"]  # refused before it ran
