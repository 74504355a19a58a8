"""A fixture for the DAP planning tests: one torch thread while they run.

They run hundreds of tiny ops (and capture models, which runs them too); with two threads on a
busy two-core machine each op waits for the other thread (a [5, 11, 16] linear took 77 ms), with
one they take microseconds.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
