"""The overlap of the collectives with compute, forward and backward, on gloo: each rank's compute
reordered by ``overlap_compute_pass`` and its collectives scheduled, run by an interpreter that logs
every compute node in forward and (a pre-hook on its autograd node) in backward, next to the
collectives' issue and wait events.

- Forward: the compute between a collective's issue and its wait is the schedule's window.
- Backward: between the transposed collective's issue (the wait's backward) and its wait (the
  start's backward) runs exactly the backward of the forward window's nodes that have one, in
  reverse order: the forward's overlap is the backward's.
- The share (stated below) of each collective's time hidden, of what the graph allows once the
  collectives issued before it have taken their windows (the time model at the training crop:
  ``passes/schedule_model.py``), in forward and backward.
"""
import pytest

import overlap_cases as O

SHARE = 0.9          # of what the graph allows each collective, forward and backward
NO_TRAFFIC = ("local_slice", "identity")


def _span(log, phase, name):
    events = [e for e in log if e[0] == phase]
    mine = [k for k, e in enumerate(events) if e[1] in ("issue", "wait") and e[2].split(":")[1] == name]
    assert len(mine) == 2, (phase, name, mine)
    i, j = mine
    assert events[i][1] == "issue" and events[j][1] == "wait"
    return events[i][2].split(":")[0], [e[2] for e in events[i + 1:j] if e[1] == "compute"]


def check_mirror(log, windows, with_backward):
    """Forward windows as scheduled; backward windows their reverse, nodes with a backward only."""
    checked = 0
    for name, window in windows.items():
        _, forward = _span(log, "forward", name)
        assert forward == window, name
        kind, backward = _span(log, "backward", name)
        if kind in NO_TRAFFIC:
            continue
        assert backward == [n for n in reversed(window) if n in with_backward], (name, backward, window)
        checked += 1
    return checked


@pytest.mark.parametrize("P", [2, 3])
def test_backward_overlaps_the_backward_of_the_forward_window(pools, P):
    """The hand-planned block (every kind of collective; tiny sizes, seconds)."""
    for log, windows, with_backward, sched, overlap, _ in pools.run(P, O.mini_overlap_case):
        assert check_mirror(log, windows, with_backward) >= 4
        assert overlap["moved"]                      # the pass moved compute into the windows
        assert any(len(w) > 0 for w in windows.values())


@pytest.mark.full
def test_evoformer_block_overlap_forward_and_backward(pools):
    """AlphaFold 2's Evoformer block (its channels; N_seq=7, N_res=11 run, the training crop costed)
    over 2 ranks: the mirror, and the stated share per collective in both directions."""
    plan = O.zoo_plan("evoformer_block", "af2", 2)
    for r, (log, windows, with_backward, sched, overlap, shares) in enumerate(
            pools.run(2, O.zoo_overlap_case, "evoformer_block", "af2", plan, timeout_s=600)):
        assert check_mirror(log, windows, with_backward) >= 5
        for name, s in shares.items():
            assert s["forward"] >= SHARE and s["backward"] >= SHARE, (r, name, s)
        assert sched["hidden_s"] >= SHARE * sched["hideable_s"], (r, sched["hidden_s"], sched["hideable_s"])
