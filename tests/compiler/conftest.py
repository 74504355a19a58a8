"""Fixtures shared by the tests of the foldcompile/ folder."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs many tiny ops (48-block stacks): two threads on a loaded
    2-core machine spin-wait on every op and make such tests minutes instead of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
