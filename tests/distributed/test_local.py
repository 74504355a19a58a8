"""One process, no process group: the split-size convention, the world-size-1 elision
(the input itself comes back: no copy, no autograd node, no event) and argument errors."""
import pytest
import torch
import torch.distributed as dist

from foldcompile.distributed import (
    PartialGradReducer, all_gather, all_gather_start, all_reduce_start, all_to_all, all_to_all_start,
    reduce_scatter_start, shard, split_offsets, split_sizes, wait, world_and_rank,
)


def test_split_sizes():
    assert split_sizes(13, 3) == [5, 4, 4]
    assert split_sizes(7, 3) == [3, 2, 2]
    assert split_sizes(5, 3) == [2, 2, 1]
    assert split_sizes(12, 3) == [4, 4, 4]
    assert split_sizes(5, 8) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert split_sizes(0, 2) == [0, 0]
    assert split_offsets([5, 4, 4]) == [0, 5, 9]
    for n in range(0, 30):
        for p in range(1, 9):
            s = split_sizes(n, p)
            assert sum(s) == n and max(s) - min(s) <= 1 and s == sorted(s, reverse=True)
    with pytest.raises(ValueError, match="parts must be an int >= 1"):
        split_sizes(4, 0)
    with pytest.raises(ValueError, match="length must be an int >= 0"):
        split_sizes(-1, 2)


def test_world_size_one_elides_everything():
    assert not dist.is_initialized()
    assert world_and_rank() == (1, 0)
    events = []
    x = torch.randn(5, 7, 3, requires_grad=True)
    starts = [
        all_to_all_start(x, 1, 0, name="z", hook=events.append),
        all_gather_start(x, 0, grad_placement="partial", hook=events.append),
        all_gather_start(x, 2, grad_placement="replicate", hook=events.append),
        reduce_scatter_start(x, 1, hook=events.append),
        all_reduce_start(x, grad_placement="replicate", hook=events.append),
    ]
    for h in starts:
        assert h.elided and "elided" in repr(h)
        assert wait(h) is x
    assert shard(x, 0, grad_placement="partial") is x
    assert all_to_all(x, 1, 0) is x and all_gather(x, 1, grad_placement="partial") is x
    x.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert events == []  # nothing issued, nothing waited


def test_force_needs_a_process_group():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="all_to_all 'm': force=True needs an initialized process group"):
        all_to_all_start(x, 1, 0, name="m", force=True)
    with pytest.raises(RuntimeError, match="force=True needs an initialized process group"):
        PartialGradReducer([torch.nn.Parameter(torch.ones(2))], force=True)


def test_handle_is_waited_once_and_arguments_are_checked():
    x = torch.randn(3, 4)
    h = all_to_all_start(x, 1, 0, name="m")
    wait(h)
    with pytest.raises(RuntimeError, match="all_to_all 'm': this handle was already waited"):
        wait(h)
    with pytest.raises(TypeError, match="expected a Handle"):
        wait(x)
    with pytest.raises(TypeError, match="all_gather 'b': expected a torch.Tensor"):
        all_gather_start([1.0], 0, grad_placement="partial", name="b")
    with pytest.raises(ValueError, match="grad_placement must be 'partial'"):
        all_reduce_start(x, grad_placement="sum")
    with pytest.raises(TypeError):  # grad_placement has no default: the caller must state it
        all_gather_start(x, 0)


def test_reducer_at_world_size_one_registers_nothing():
    lin = torch.nn.Linear(3, 2)
    red = PartialGradReducer(lin.parameters())
    assert red.buckets == []
    lin(torch.randn(4, 3)).sum().backward()
    g = lin.weight.grad.clone()
    red.wait()
    assert torch.equal(lin.weight.grad, g)
