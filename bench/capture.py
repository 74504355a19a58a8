"""Capture time and per-call overhead of ``foldcompile.trace`` on the AF2 Evoformer stack (CPU).

For 4, 16 and 48 blocks of the zoo's Evoformer stack (tiny dims, N_seq=5, N_res=7), each row
in a fresh process (a cold capture: no Dynamo or fake-tensor cache warmed by an earlier row):

  capture_s       ``foldcompile.trace`` wall time, with identical blocks captured once
                  (foldcompile/regions.py) and, for comparison, with every block traced
                  (``regions_disabled``, the capture before regions)
  regions         the regions the capture made (blocks stamped from each)
  check_ms        one call's guard check (``Guards.check``) with the fast path
                  (foldcompile/state_watch.py), median of many calls
  full_check_ms   the same check with the fast path off (every module and parameter walked,
                  as before the fast path)
  call_ms         one forward call of the captured graph, guard check included, and of the
                  eager model (median; the difference is the graph's own overhead over eager)

Printed as it runs and written to bench/results/capture_cpu_<date>.md (and .json). One
intra-op thread: the numbers then measure the Python work they are about, not contention
for the cores. Run from the repository root:

    python -m bench.capture            # all rows (a few minutes)
    python -m bench.capture --blocks 4 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROW_TIMEOUT_S = 900


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(n_blocks: int, regions: bool) -> dict:
    """One row, in this process (run by :func:`main` in a fresh one per row)."""
    import torch

    torch.set_num_threads(1)
    from foldcompile import state_watch
    from foldcompile.capture import regions_disabled, trace
    from foldcompile.models import zoo

    model, inputs = zoo.get("evoformer_stack", n_blocks=n_blocks, n_seq=5, n_res=7)
    start = time.perf_counter()
    if regions:
        gm = trace(model, *inputs)
    else:
        with regions_disabled():
            gm = trace(model, *inputs)
    capture_s = time.perf_counter() - start
    row = {"blocks": n_blocks, "regions": "on" if regions else "off", "capture_s": capture_s,
           "nodes": len(gm.graph.nodes),
           "stamped": " + ".join(str(len(r["members"])) for r in gm.meta.get("regions", [])) or "-"}
    if not regions:
        return row
    guards = gm.guards
    guards.check(inputs, {}, gm)  # the first call runs the full check and takes the fast path's tags
    reps = 200 if n_blocks <= 16 else 100
    row["check_ms"] = 1e3 * _median_s(lambda: guards.check(inputs, {}, gm), reps)
    fast, reader = guards.fast, state_watch._dict_version
    guards.fast, state_watch._dict_version = None, None  # the check as it was: every module, every parameter
    try:
        row["full_check_ms"] = 1e3 * _median_s(lambda: guards.check(inputs, {}, gm), max(10, reps // 10))
    finally:
        guards.fast, state_watch._dict_version = fast, reader
    gm(*inputs), model(*inputs)  # warm-up (forward only, grad mode on: as captured)
    row["graph_call_ms"] = 1e3 * _median_s(lambda: gm(*inputs), 10)
    row["eager_call_ms"] = 1e3 * _median_s(lambda: model(*inputs), 10)
    row["full_checks"] = guards.fast.watch.full_checks if guards.fast is not None else "-"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 16, 48])
    parser.add_argument("--row", nargs=2, metavar=("BLOCKS", "REGIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.row:  # a child process: one row as JSON on the last line
        print(json.dumps(measure(int(args.row[0]), args.row[1] == "on")))
        return

    from bench.common import Results

    columns = ["blocks", "regions", "capture_s", "nodes", "stamped", "check_ms", "full_check_ms",
               "graph_call_ms", "eager_call_ms", "full_checks"]
    results = Results("foldcompile.trace: capture time and per-call guard check, AF2 Evoformer stack (tiny dims)",
                      columns)
    for n in args.blocks:
        for regions in ("on", "off"):
            cmd = [sys.executable, "-m", "bench.capture", "--row", str(n), regions]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=ROW_TIMEOUT_S, check=True)
                results.add(**json.loads(done.stdout.strip().splitlines()[-1]))
            except (subprocess.SubprocessError, ValueError, IndexError) as exc:
                tail = getattr(exc, "stderr", "") or ""
                results.notes.append(f"{n} blocks, regions {regions}: {type(exc).__name__} {tail[-300:]}")
                print(results.notes[-1], flush=True)
    results.notes += [
        "each row in a fresh process (cold capture), one intra-op thread; N_seq=5, N_res=7, fp32, eval mode",
        "regions on: identical blocks captured once (foldcompile/regions.py); off: every block traced (before)",
        "stamped: blocks stamped from each region (block 0 reads inputs that do not require grad: its own region); "
        "'-': no regions (fewer than foldcompile.regions.MIN_MEMBERS = 6 identical blocks: the same capture as 'off')",
        "check_ms: Guards.check per call with the fast path (foldcompile/state_watch.py); full_check_ms: the same "
        "check walking every module and parameter (the check before the fast path)",
        "graph_call_ms / eager_call_ms: one forward call, grad mode on as captured (graph: guard check included)",
        f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs share the machine)",
    ]
    print("wrote", results.save(args.out, "capture"))


if __name__ == "__main__":
    main()
