"""Train an Evoformer block sharded by DAP, unchanged training loop, and check it against one process.

Under ``torchrun`` (every rank runs this module)::

    torchrun --nproc-per-node 2 -m foldcompile.distributed.demo [--steps 2] [--model evoformer_block]

or on local processes started here (:func:`foldcompile.distributed.spawn`, gloo)::

    python -m foldcompile.distributed.demo --spawn 2

Every rank builds the same model and inputs, calls ``foldcompile.optimize(model, *inputs,
world_size=P)`` and runs ``loss.backward(); opt.step()`` as one process would (train mode:
dropout on, the same masks as one process). Each rank then compares its parameters with a
one-process run of the same loop and prints the largest relative difference.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["train", "main"]


def _loss(outs) -> torch.Tensor:
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return sum(o.square().mean() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())


def train(world_size: int, steps: int = 2, model_name: str = "evoformer_block",
          dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps of the zoo model sharded over ``world_size`` ranks (1: one process, no
    sharding); returns the parameters after them."""
    import foldcompile
    from foldcompile.models import zoo

    model, inputs = zoo.get(model_name, size="tiny")
    model = model.to(dtype).train()
    inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    fast = foldcompile.optimize(model, *inputs, world_size=world_size) if world_size > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    torch.manual_seed(0)                  # the same generator on every rank: dropout draws one process's masks
    for _ in range(steps):
        loss = _loss(fast(*inputs))
        opt.zero_grad()
        loss.backward()                   # Partial gradients all-reduced and waited at the end of backward
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


def _rank(rank: int, steps: int, model_name: str) -> float:
    mine = train(dist.get_world_size(), steps, model_name)
    return _difference(mine, train(1, steps, model_name))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m foldcompile.distributed.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--spawn", type=int, default=0, help="start this many local ranks (without torchrun)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model", default="evoformer_block")
    args = ap.parse_args(argv)
    if args.spawn:
        from foldcompile.distributed import spawn

        diffs = spawn(_rank, args.spawn, args.steps, args.model, timeout_s=600)
    elif "RANK" in os.environ:                      # under torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        diffs = [_rank(dist.get_rank(), args.steps, args.model)]
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, diffs[0])
        diffs = every
        if dist.get_rank() != 0:
            dist.destroy_process_group()
            return 0
        dist.destroy_process_group()
    else:
        print("run under torchrun, or pass --spawn N", file=sys.stderr)
        return 2
    worst = max(diffs)
    for r, d in enumerate(diffs):
        print(f"rank {r}: parameters after {args.steps} steps vs one process: largest relative difference {d:.2e}")
    ok = worst < 1e-9
    print("OK: every rank trained what one process trains" if ok else "FAIL: the ranks differ from one process")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
