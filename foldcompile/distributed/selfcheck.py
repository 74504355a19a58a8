"""Check the collectives on this machine's backend: every collective, forward and
backward, on uneven shards, against the same math done locally; plus the order of issue
and wait. With ``--world-size 1`` the collectives are forced (``force=True``), so the real
NCCL path and the async pairs run on one GPU.

    python -m foldcompile.distributed.selfcheck --backend nccl --world-size 1   # one GPU
    python -m foldcompile.distributed.selfcheck --backend gloo --world-size 3   # CPU

Prints one line per check and the event log of rank 0; exits 1 if any check fails.

    >>> from foldcompile.distributed.selfcheck import run
    >>> report = run(world_size=2, backend="gloo")
    >>> report["ok"], len(report["checks"])
    (True, 8)
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch
import torch.distributed as dist

from foldcompile.distributed.collectives import (
    all_gather_start, all_reduce_start, all_to_all_start, reduce_scatter_start, split_offsets,
    split_sizes, wait,
)
from foldcompile.distributed.spawn import spawn

__all__ = ["run", "main"]


def _rand(seed: int, *shape: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)


def _piece(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    s = split_sizes(x.shape[dim], world)
    return x.narrow(dim, split_offsets(s)[rank], s[rank])


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def _rank_checks(rank: int, n: int) -> dict:
    """On each rank: each collective's forward and backward on a length-n sharded dim,
    against the local math on the full tensors (every rank draws the same ones)."""
    P = dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    force = P == 1
    log: list = []

    def hook(ev):
        log.append(f"{ev.phase} {ev.action} {ev.collective}:{ev.name}")

    out: dict = {}
    X, W = _rand(1, n, n + 2, 3, device=dev), _rand(2, n, n + 2, 3, device=dev)

    # all_to_all: rows -> columns (column count n + 2), loss on the sharded result
    x = _piece(X, 0, rank, P).clone().requires_grad_()
    h = all_to_all_start(x, 1, 0, cat_sizes=n, name="z", hook=hook, force=force)
    y = wait(h)
    (_piece(W, 1, rank, P) * y.sin()).sum().backward()
    out["all_to_all forward"] = _err(y, _piece(X, 1, rank, P))
    out["all_to_all backward"] = _err(x.grad, _piece(W * X.cos(), 0, rank, P))

    # all_gather, consumers sharded: out_i = sum_k a_ik b_jk, a sharded on i, b gathered
    A = _rand(3, n, 3, device=dev)
    B = _rand(4, n, 3, device=dev)
    a = _piece(A, 0, rank, P).clone().requires_grad_()
    b = _piece(B, 0, rank, P).clone().requires_grad_()
    h = all_gather_start(b, 0, sizes=n, grad_placement="partial", name="b", hook=hook, force=force)
    full = wait(h)
    Wab = _rand(5, n, n, device=dev)
    (_piece(Wab, 0, rank, P) * (a @ full.t()).sin()).sum().backward()
    Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
    (Wab * (Ar @ Br.t()).sin()).sum().backward()
    out["all_gather forward"] = _err(full, B)
    out["all_gather backward (reduce_scatter)"] = _err(b.grad, _piece(Br.grad, 0, rank, P))

    # reduce_scatter of partial sums, loss on the shards
    xs = [_rand(10 + q, n, 4, device=dev) for q in range(P)]
    x = xs[rank].clone().requires_grad_()
    h = reduce_scatter_start(x, 0, name="partial", hook=hook, force=force)
    Y = sum(xs)
    Wy = _rand(6, n, 4, device=dev)
    y = wait(h)
    (_piece(Wy, 0, rank, P) * y.sin()).sum().backward()
    out["reduce_scatter forward"] = _err(y, _piece(Y, 0, rank, P))
    out["reduce_scatter backward (all_gather)"] = _err(x.grad, Wy * Y.cos())

    # all_reduce, replicated loss
    x = xs[rank].clone().requires_grad_()
    h = all_reduce_start(x, grad_placement="replicate", name="sum", hook=hook, force=force)
    y = wait(h)
    (Wy * y.sin()).sum().backward()
    out["all_reduce forward"] = _err(y, Y)
    out["all_reduce backward (identity)"] = _err(x.grad, Wy * Y.cos())
    return {"errors": out, "log": log, "device": str(dev)}


def run(world_size: int = 1, backend: str = "gloo", n: int = 13, timeout_s: float = 60.0) -> dict:
    """Run the checks on ``world_size`` local processes; return ``{"ok", "checks", "log",
    "device", "torch"}`` (``checks``: the largest error over ranks for each check, which
    must be below 1e-10 in float64)."""
    # by its module's name, so that the ranks can import it under `python -m` as well
    fn = importlib.import_module("foldcompile.distributed.selfcheck")._rank_checks
    res = spawn(fn, world_size, n, backend=backend, timeout_s=timeout_s)
    checks = {k: max(r["errors"][k] for r in res) for k in res[0]["errors"]}
    return {"ok": all(v < 1e-10 for v in checks.values()), "checks": checks, "log": res[0]["log"],
            "device": res[0]["device"], "torch": torch.__version__, "world_size": world_size,
            "backend": backend}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m foldcompile.distributed.selfcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--n", type=int, default=13, help="length of the sharded dims (default 13: uneven)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    report = run(a.world_size, a.backend, a.n)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"torch {report['torch']}, backend {a.backend}, world size {a.world_size}, device {report['device']}")
        for k, v in report["checks"].items():
            print(f"  {'ok  ' if v < 1e-10 else 'FAIL'} {k}: max error {v:.2e}")
        print("rank 0 events:")
        for e in report["log"]:
            print("  " + e)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
