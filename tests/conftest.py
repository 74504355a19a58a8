"""Test-suite wide setup.

With no GPU, the Triton kernels run through Triton's CPU interpreter, so CI checks
the real kernels rather than only their references. The flag must be set before
triton is first imported (``triton.jit`` reads it at decoration time).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# --------------------------------------------------------------------------- hypothesis profiles
# "ci" (the default) is derandomized and small, so every run of the suite draws the same cases
# and CI stays within its budget; FOLDCOMPILE_HYPOTHESIS=large (or tests marked `slow`, run with
# `-m slow`) draws many more. A failing example is printed with the code that reproduces it.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("large", max_examples=400, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("FOLDCOMPILE_HYPOTHESIS", "ci"))
except ImportError:  # hypothesis is in the [test] extras; `./run test` installs it
    pass


# --------------------------------------------------------------------------- test tiers
import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the markers
def pytest_collection_modifyitems(config, items):
    """Every test not marked ``full``, ``slow`` or ``gpu`` belongs to the quick tier (``-m quick``)."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("full", "slow", "gpu")):
            item.add_marker(pytest.mark.quick)
