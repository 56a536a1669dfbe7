"""Compile time and peak compile memory: fxcompress against Torch-Pruning on eight torchvision models.

    python tools/bench_compile.py                 # both tables, 5 timed runs per tool and model
    python tools/bench_compile.py --models resnet50 --repeat 3 --no-memory

**Time.** fxcompress: ``compile(model, x, standard_pruning(L1Norm(0.5)),
verify=False)`` — trace, analysis, masks, shrink (Torch-Pruning checks
nothing, so verification is left out; ``--verify`` adds it). Torch-Pruning:
``MagnitudePruner`` with L1 importance, ``pruning_ratio=0.5``, local, the
classifier ignored, then ``step()``. Both build their dependency graph from the
same example input. Every run gets a fresh deep copy of the model (the copy is
not timed); the tools alternate which goes first; the table gives medians and
the ratio fxcompress / Torch-Pruning per model, and their geometric mean.

**Memory.** Each (model, tool) runs in a fresh subprocess: the model is built,
one warm-up run of the tool on a tiny model loads its lazy imports, then the
peak resident set (``VmHWM``) is reset through ``/proc/self/clear_refs`` and
the tool runs once. *Extra* is the peak minus the resident set just before the
run, as a multiple of the model's weight bytes (parameters and buffers):
memory a compile needs beyond the model the user already holds. Linux only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torchvision
from proc_memory import reset_peak, status_bytes
from tabulate import tabulate

MODELS = ["resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny", "regnet_y_400mf",
          "resnext50_32x4d", "vgg16_bn"]
SIZE = 224


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval(), torch.randn(1, 3, SIZE, SIZE)


def run_fxcompress(model: torch.nn.Module, x: torch.Tensor, sparsity: float = 0.5, verify: bool = False):
    import fxcompress
    from fxcompress.passes import standard_pruning
    from fxcompress.prune import L1Norm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxcompress.compile(model, x, standard_pruning(L1Norm(sparsity)), verify=verify)


def run_torch_pruning(model: torch.nn.Module, x: torch.Tensor, sparsity: float = 0.5) -> torch.nn.Module:
    import torch_pruning as tp

    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=sparsity, global_pruning=False, ignored_layers=classifier)
        pruner.step()
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def time_one(tool: str, model: torch.nn.Module, x: torch.Tensor, verify: bool) -> float:
    fresh = copy.deepcopy(model)
    start = time.perf_counter()
    if tool == "fxcompress":
        run_fxcompress(fresh, x, verify=verify)
    else:
        run_torch_pruning(fresh, x)
    return time.perf_counter() - start


def time_table(models: list[str], repeat: int, verify: bool) -> tuple[list[list], float]:
    rows, ratios = [], []
    tools = ["fxcompress", "tp"]
    tiny = (torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4)),)
    tiny[0](torch.randn(1, 3, 8, 8))
    for tool in tools:  # lazy imports and first-call costs out of the way
        time_one(tool, tiny[0].eval(), torch.randn(1, 3, 8, 8), verify)
    for name in models:
        model, x = build(name)
        times: dict[str, list[float]] = {t: [] for t in tools}
        for k in range(repeat):
            for tool in tools if k % 2 == 0 else tools[::-1]:
                times[tool].append(time_one(tool, model, x, verify))
        fx_s, tp_s = statistics.median(times["fxcompress"]), statistics.median(times["tp"])
        ratios.append(fx_s / tp_s)
        rows.append([name, f"{fx_s:.3f}", f"{tp_s:.3f}", f"{fx_s / tp_s:.2f}",
                     f"{min(times['fxcompress']):.3f}-{max(times['fxcompress']):.3f}",
                     f"{min(times['tp']):.3f}-{max(times['tp']):.3f}"])
        print(f"  {name}: fxcompress {fx_s:.3f} s, Torch-Pruning {tp_s:.3f} s", file=sys.stderr, flush=True)
    return rows, math.exp(statistics.fmean(math.log(r) for r in ratios))


def measure_memory(name: str, tool: str, verify: bool) -> dict:
    """In this process: build, warm up, reset the peak, run ``tool`` once; sizes in bytes."""
    torch.set_num_threads(1)
    model, x = build(name)
    warm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    if tool == "fxcompress":
        run_fxcompress(warm, torch.randn(1, 3, 8, 8), verify=verify)
    else:
        import torch_pruning  # noqa: F401 - its import is not the compile's memory
    reset_peak()
    before = status_bytes("VmRSS")
    result = run_fxcompress(model, x, verify=verify) if tool == "fxcompress" else run_torch_pruning(model, x)
    peak = status_bytes("VmHWM")
    del result
    return {"weights": weight_bytes(build(name)[0]), "extra": peak - before}


def memory_table(models: list[str], verify: bool) -> tuple[list[list], float]:
    rows, worst = [], 0.0
    for name in models:
        found = {}
        for tool in ("fxcompress", "tp"):
            command = [sys.executable, __file__, "--measure-memory", name, tool] + (["--verify"] if verify else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"memory run of {tool} on {name} failed:\n{done.stderr[-2000:]}")
            found[tool] = json.loads(done.stdout.strip().splitlines()[-1])
        weights = found["fxcompress"]["weights"]
        fx_x, tp_x = found["fxcompress"]["extra"] / weights, found["tp"]["extra"] / weights
        worst = max(worst, fx_x)
        rows.append([name, f"{weights / 2**20:.0f}", f"{found['fxcompress']['extra'] / 2**20:.0f}", f"{fx_x:.2f}",
                     f"{found['tp']['extra'] / 2**20:.0f}", f"{tp_x:.2f}"])
        print(f"  {name}: extra fxcompress {fx_x:.2f}x, Torch-Pruning {tp_x:.2f}x of the weights", file=sys.stderr,
              flush=True)
    return rows, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per tool and model (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the timing")
    parser.add_argument("--verify", action="store_true", help="time fxcompress with verification on")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--no-time", action="store_true", help="skip the time table")
    parser.add_argument("--measure-memory", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory(*args.measure_memory, args.verify)))
        return 0
    models = args.models.split(",")
    torch.set_num_threads(args.threads)
    if not args.no_time:
        rows, geomean = time_table(models, args.repeat, args.verify)
        print(f"Compile time (trace -> shrink, L1 0.5, verify={'on' if args.verify else 'off'}), "
              f"medians of {args.repeat}, {args.threads} thread(s):\n")
        print(tabulate(rows, headers=["model", "fxcompress s", "Torch-Pruning s", "ratio", "fxcompress range",
                                      "Torch-Pruning range"], tablefmt="github"))
        print(f"\ngeometric mean of the ratios fxcompress / Torch-Pruning: {geomean:.2f}\n")
    if not args.no_memory:
        rows, worst = memory_table(models, args.verify)
        print("Peak memory a compile needs beyond the model (fresh process per model and tool):\n")
        print(tabulate(rows, headers=["model", "weights MiB", "fxcompress extra MiB", "x weights",
                                      "Torch-Pruning extra MiB", "x weights"], tablefmt="github"))
        print(f"\nworst fxcompress extra: {worst:.2f}x the weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
