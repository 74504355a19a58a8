"""A DAP rank's graph runs optimize's fusion pipeline (``fuse_annotated``): the chunk-loop merge is
tried there too. A rank's lowered graph takes its sizes from the plan and cannot be annotated again
after a merge, so the loop stays (each chunk fused on its own) and the fusion record lists it as a
rejected ``chunk_loop`` with that reason, on every rank; the result is the model's."""
import chunk_loop_cases as C


def test_a_rank_graph_lists_its_chunk_loop_with_the_reason(pools):
    for counts, reasons, max_diff in pools.run(2, C.sharded_chunk_loop_case, timeout_s=300):
        assert counts == {"matched": 0, "rejected": 1}
        assert len(reasons) == 1 and reasons[0].startswith("not merged: a rank's lowered graph takes its sizes "
                                                           "from the DAP plan"), reasons
        assert max_diff < 1e-5
