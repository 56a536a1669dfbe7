"""How fast each weight-only linear kernel streams its weights at decode time (one activation row).

Decoding one token reads every weight once, so a packed layer can only be as
much faster than fp32 as its kernel's bytes per second allow. This tool times
``--layers`` distinct layers of ``--out x --in`` (cycled, so that together
they are far larger than the CPU's caches, as a model's layers are) under each
kernel, and prints milliseconds per layer, the weight bytes streamed per
second and the speed-up over fp32 ``F.linear``:

- ``fp32``: ``F.linear`` on fp32 weights and input;
- ``int8 native`` / ``int8 onednn`` / ``int8 int8pack``:
  :class:`fxcompress.kernels.Int8WeightLinear` with each kernel (bf16 input:
  two digits per activation for the native and oneDNN kernels);
- ``int4 native`` / ``int4 int4pack`` (groups of 128):
  :class:`fxcompress.kernels.Int4NativeLinear` and
  :class:`~fxcompress.kernels.Int4WeightLinear` (bf16 input).

The packed rows time the modules' whole forward (the activation split
included), as a model runs them. Every round times every kernel once, over all
layers; the table gives each kernel's median round.

    python tools/bench_kernels.py                    # 24 layers of 5632 x 2048 (TinyLlama's FFN), 2 threads
    python tools/bench_kernels.py --layers 4 --rounds 3   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from fxcompress.errors import ConfigError
from fxcompress.kernels import INT4_KERNELS, INT8_KERNELS, pack_linear, rtn_grid


def kernels(weights: list[torch.Tensor]) -> dict[str, tuple[list, torch.dtype, int]]:
    """Kernel name -> (one callable per layer, input dtype, weight bytes per layer)."""
    out, cols = weights[0].shape
    found = {"fp32": ([lambda x, w=w: F.linear(x, w) for w in weights], torch.float32, out * cols * 4)}
    int8 = [rtn_grid(w, 8, 0) for w in weights]
    for kernel in INT8_KERNELS:
        try:
            layers = [pack_linear(w.bfloat16(), None, g, "layer", int8_kernel=kernel) for w, g in zip(weights, int8)]
        except ConfigError as error:  # a CPU-specific kernel where it cannot run: say why, time the others
            print(f"int8 {kernel} skipped: {error}", file=sys.stderr)
            continue
        found[f"int8 {kernel}"] = (layers, torch.bfloat16, out * cols)
    int4 = [rtn_grid(w, 4, 128) for w in weights]
    for kernel in INT4_KERNELS:
        try:
            layers = [pack_linear(w.bfloat16(), None, g, "layer", int4_kernel=kernel) for w, g in zip(weights, int4)]
        except ConfigError as error:
            print(f"int4 {kernel} skipped: {error}", file=sys.stderr)
            continue
        found[f"int4 {kernel}"] = (layers, torch.bfloat16, out * cols // 2)
    return found


@torch.no_grad()
def measure(args) -> list[list]:
    torch.manual_seed(0)
    weights = [torch.randn(args.out, args.inputs) for _ in range(args.layers)]
    table = kernels(weights)
    x = torch.randn(1, args.inputs)
    rounds: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, (layers, dtype, _) in table.items():
            xd = x.to(dtype)
            start = time.perf_counter()
            for layer in layers:
                layer(xd)
            rounds[name].append((time.perf_counter() - start) / len(layers))
    rows = []
    fp32 = statistics.median(rounds["fp32"][1:])
    for name, (_, _, nbytes) in table.items():
        seconds = statistics.median(rounds[name][1:])
        rows.append([name, f"{seconds * 1e3:.3f}", f"{nbytes / seconds / 1e9:.1f}", f"{fp32 / seconds:.2f}"])
    return rows


def main(argv=None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="distinct layers cycled (default 24: ~1.1 GB fp32)")
    parser.add_argument("--out", type=int, default=5632, help="output features (default 5632)")
    parser.add_argument("--in", dest="inputs", type=int, default=2048, help="input features (default 2048)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args)
    print(f"{args.layers} layers of {args.out} x {args.inputs}, one activation row, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(tabulate(rows, headers=["kernel", "ms / layer", "weight GB/s", "x fp32"], disable_numparse=True))
    return rows


if __name__ == "__main__":
    main()
