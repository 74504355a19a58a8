"""Run every kernel benchmark in one process on one card and save the tables.

    python -m bench.kernels [--quick] [--only norm_softmax attention elementwise] [--out DIR]

Each family compares the foldcompile kernel with eager PyTorch, torch.compile and
public peers, at AlphaFold shapes; results go to ``bench/results/kernels_<family>_<card>_<date>.md``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import traceback

FAMILIES = ("norm_softmax", "attention", "elementwise", "triangle")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(__file__)), "results"))
    args = parser.parse_args(argv)
    failed = []
    for family in args.only:
        print(f"== {family}", flush=True)
        try:
            module = importlib.import_module(f"bench.kernels.{family}")
            results = module.run(quick=args.quick)
            print(results.markdown())
            print("saved", results.save(args.out, f"kernels_{family}"), flush=True)
        except Exception:  # one family failing must not lose the others' numbers
            traceback.print_exc()
            failed.append(family)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
