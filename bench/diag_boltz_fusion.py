"""What ``optimize`` fuses and refuses in the unmodified Boltz-2 Pairformer under Boltz-2's own autocast.

CUDA's autocast policy (layer_norm, softmax, exp, sum in fp32; GEMMs in bf16) differs from the CPU's, and
fake tensors cannot show it without a GPU: this prints, on the GPU, the explicit-autocast record (regions,
refused nodes, casts), every rule's matched/rejected counts and the rejections grouped by reason, for the
benchmark's Boltz-2 subject (``bench.trunks``, Boltz-2's dims) at a given N_res. One command:

    python -m bench.diag_boltz_fusion [--n-res 256] [--out DIR]

writes ``diag_boltz_fusion_<card>_<date>.json`` (and prints the summary).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os

import torch

import foldcompile
from bench.common import card_name
from bench.trunks import BOLTZ, subject


def run(n_res: int, device: str) -> dict:
    subj = subject(BOLTZ, dict(n_seq=1, n_res=n_res, train=False), device, smoke=device == "cpu")
    with torch.no_grad(), subj.precision():
        fast = foldcompile.optimize(subj.module, *subj.inputs)
        fast(*subj.inputs)
    report = fast.report
    record = report.record
    reasons = collections.Counter()
    for r in record.get("rejections", []):
        reasons[f"{r.get('rule')}: {str(r.get('reason'))[:160]}"] += 1
    ea = record.get("explicit_autocast", {})
    return {
        "card": card_name() if device == "cuda" else "cpu", "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "n_res": n_res, "executor": report.executor,
        "counts": report.counts(),
        "rejections": reasons.most_common(),
        "explicit_autocast": {k: ea.get(k) for k in ("explicit", "wrapped", "dropped", "refused", "refused_graph")},
        "unfused_ops": collections.Counter(u.get("op") for u in record.get("unfused", [])).most_common(30),
        "coverage": record.get("coverage"),
        "changed_ops": collections.Counter(c.get("op") for c in ea.get("changed", [])).most_common(),
        "casts": len(ea.get("casts", [])) if isinstance(ea.get("casts"), list) else ea.get("casts"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-res", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run(args.n_res, device)
    print(json.dumps(result, indent=1, default=str))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"diag_boltz_fusion_{result['card'].replace(' ', '_')}_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("saved", path)


if __name__ == "__main__":
    main()
