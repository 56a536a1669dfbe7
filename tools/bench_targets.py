"""Prune to a target: how close ``standard_pruning(criterion, target=...)`` lands, in one call.

For each model (torchvision, ``weights=None``, seed 0, eval mode, one
3×224×224 image), each data-free structured criterion and each target, it
compiles ``fxcompress.compile(model, x, standard_pruning(criterion,
target=T), verify=False)`` and measures the ratio the built model really
reaches (dense / shrunk MACs counted by ``torch.utils.flop_counter``, or
parameters), its error against the target, and the compile time. A target
missed by more than the 2 % tolerance shows as a row with ``miss``.

    python tools/bench_targets.py                     # resnet50, mobilenet_v3_large, vit_b_16
    python tools/bench_targets.py --models resnet18 --criteria l1 --targets macs=3 --size 64

``tests/test_targets.py`` asserts the same landing on small inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings

import torch
import torchvision
from tabulate import tabulate

import fxcompress
from fxcompress.passes import standard_pruning
from fxcompress.prune import Budget, make_pruner
from fxcompress.report import count_macs, count_params

TOLERANCE = 0.02
#: The data-free structured criteria, by their pruner names (``python -m fxcompress passes``).
CRITERIA = ("l1", "l2", "fpgm", "lamp", "slim", "random")
MODELS = ("resnet50", "mobilenet_v3_large", "vit_b_16")
TARGETS = ("macs=2", "params=2")


def measure(name: str, size: int, criterion: str, target: str) -> dict:
    """One compile to ``target``; what the built model reaches."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    budget = Budget.of(target)
    row = {"model": name, "criterion": criterion, "target": target}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fxcompress.compile(model, x, standard_pruning(make_pruner(criterion), target=target), verify=False)
    row["compile s"] = time.perf_counter() - start
    count = (lambda m: count_macs(m, x)) if budget.metric.value == "macs" else count_params
    reached = count(model) / count(small)
    row["reached"] = reached
    row["error %"] = 100 * (reached / budget.ratio - 1)
    row["status"] = "ok" if abs(reached / budget.ratio - 1) <= TOLERANCE else "miss"
    row["warnings"] = "; ".join(sorted({str(w.message).splitlines()[0][:80] for w in caught}))
    del model, small
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help=f"comma-separated, of {', '.join(CRITERIA)}")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated budgets, e.g. macs=2,params=3")
    parser.add_argument("--size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        for criterion in args.criteria.split(","):
            for target in args.targets.split(","):
                rows.append(measure(name, args.size, criterion, target))
                print(tabulate([rows[-1]], headers="keys", floatfmt=".3f"), flush=True)
    print()
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    worst = max(abs(r["error %"]) for r in rows)
    landed = sum(r["status"] == "ok" for r in rows)
    print(f"\n{landed}/{len(rows)} within {TOLERANCE:.0%}; largest error {worst:.2f} %; "
          f"median compile {statistics.median(r['compile s'] for r in rows):.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python", "tools/bench_targets.py", *(argv or sys.argv[1:])]),
                       "rows": rows}, f, indent=1)
    return 0 if landed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
