"""CPU latency of a pruned torchvision model against its dense original, with and without inference passes.

Every variant is compiled from the same dense model and timed in the same
process, interleaved run by run (``fxcompress.report.measure_latencies``), so
machine noise hits all of them alike. The table gives the median latency, the
speed-up as a ratio of medians against the plain eager dense model, and the
median of per-round ratios (robust to load that drifts during the run), the
fastest run (the least noisy estimate on a busy machine), plus MACs and
parameters. Each variant's pipeline is printed as text, and each
compile runs with output verification on, so every row computes what the
dense (or masked) model computes.

    python tools/bench_latency.py                       # ResNet-50, L1 0.5, batch 1, 224x224, 2 threads
    python tools/bench_latency.py --round-to 1 8 16 --json latency.json
    python tools/bench_latency.py --model resnet18 --runs 10 --size 128
    python tools/bench_latency.py --passes '' fold-batch-norm,channels-last,fuse-conv-activation

Inference passes: ``fold-batch-norm`` (BatchNorm folded into the conv before
it), ``channels-last`` (conv weights, and so activations, NHWC) and
``fuse-conv-activation`` (conv + activation, and conv + residual add +
activation, as one oneDNN op; fast under ``torch.no_grad``, which is how every
variant is timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import warnings
from collections.abc import Sequence

import torch
import torchvision
from tabulate import tabulate
from torch import nn

import fxcompress
from fxcompress.passes import standard_pruning
from fxcompress.passes.channels_last import ChannelsLast
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.fuse_conv_activation import FuseConvActivation
from fxcompress.prune import L1Norm
from fxcompress.report import count_macs, count_params, measure_latencies

#: The inference-pass combinations timed on top of the dense and the shrunk model.
INFERENCE_PASSES: dict[str, tuple] = {
    "": (),
    "fold-batch-norm": (FoldBatchNorm(),),
    "channels-last": (ChannelsLast(),),
    "fold-batch-norm,channels-last": (FoldBatchNorm(), ChannelsLast()),
    "fold-batch-norm,fuse-conv-activation": (FoldBatchNorm(), FuseConvActivation()),
    "fold-batch-norm,channels-last,fuse-conv-activation": (FoldBatchNorm(), ChannelsLast(), FuseConvActivation()),
}


#: Issue 2's acceptance figure for ResNet-50 at sparsity 0.5 (batch 1, 224x224, 2 threads).
TARGET_SPEEDUP = 2.7


@dataclasses.dataclass
class Variant:
    """One model to time: its label, the text of the pipeline that built it, and the module."""

    label: str
    pipeline: str
    model: nn.Module


@dataclasses.dataclass
class Row:
    label: str
    pipeline: str
    median_ms: float
    min_ms: float
    speedup: float
    paired_speedup: float
    macs_ratio: float
    params_ratio: float
    conv_widths: str


def pipeline_text(passes: Sequence) -> str:
    """The textual form of a pass list, e.g. ``insert-masks{pruner=l1,sparsity=0.5},...,shrink``."""
    names = []
    for p in passes:
        pruner = getattr(p, "pruner", None)
        if pruner is None:
            names.append(p.name)
            continue
        options = f"pruner={pruner.key},sparsity={pruner.sparsity}" + (
            f",round_to={pruner.round_to}" if pruner.round_to != 1 else ""
        )
        names.append(f"{p.name}{{{options}}}")
    return ",".join(names) or "(eager model, no passes)"


def build_variants(
    model: nn.Module, inputs: tuple, sparsity: float, round_tos: Sequence[int], combos: Sequence[str]
) -> list[Variant]:
    """Dense eager, dense + each inference-pass combination, shrunk (per round_to) + each combination."""
    variants = [Variant("dense", pipeline_text(()), model)]
    bases = [("dense", ())]
    for r in round_tos:
        bases.append((f"shrunk{'' if r == 1 else f' round_to={r}'}", standard_pruning(L1Norm(sparsity, round_to=r))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for base_label, pruning in bases:
            for extra_label in combos:
                extra = INFERENCE_PASSES[extra_label]
                if base_label == "dense" and not extra:
                    continue
                passes = [*pruning, *extra]
                label = base_label + (f" + {extra_label}" if extra_label else "")
                gm = fxcompress.compile(model, inputs, passes, verify=True)
                variants.append(Variant(label, pipeline_text(passes), gm.eval()))
    return variants


def conv_widths(model: nn.Module) -> str:
    """The distinct output-channel counts of the 2-d convolutions, e.g. ``32..2048 (all %8)``."""
    widths = sorted({m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)})
    if not widths:
        return "-"
    aligned = max(a for a in (1, 2, 4, 8, 16, 32) if all(w % a == 0 for w in widths))
    return f"{widths[0]}..{widths[-1]} ({len(widths)} distinct, all %{aligned})"


def paired(reference: list[float], other: list[float]) -> float:
    """Median over rounds of ``reference / other``: the speed-up, insensitive to slow drifts in machine load."""
    return statistics.median(r / o for r, o in zip(reference, other))


def measure(variants: list[Variant], inputs: tuple, runs: int, warmup: int, threads: int) -> list[Row]:
    latencies = measure_latencies([v.model for v in variants], inputs, runs=runs, warmup=warmup, threads=threads)
    dense = latencies[0]
    dense_macs, dense_params = count_macs(variants[0].model, inputs), count_params(variants[0].model)
    rows = []
    for variant, latency in zip(variants, latencies):
        rows.append(Row(
            label=variant.label,
            pipeline=variant.pipeline,
            median_ms=latency.median_ms,
            min_ms=1000.0 * min(latency.runs_s),
            speedup=dense.median_ms / latency.median_ms,
            paired_speedup=paired(dense.runs_s, latency.runs_s),
            macs_ratio=dense_macs / count_macs(variant.model, inputs),
            params_ratio=dense_params / count_params(variant.model),
            conv_widths=conv_widths(variant.model),
        ))
    return rows


def format_table(rows: list[Row]) -> str:
    headers = [
        "variant", "median ms", "min ms", "speed-up", "paired speed-up", "MACs ratio", "params ratio", "conv widths"
    ]
    body = [
        [r.label, f"{r.median_ms:.1f}", f"{r.min_ms:.1f}", f"{r.speedup:.2f}x", f"{r.paired_speedup:.2f}x",
         f"{r.macs_ratio:.2f}", f"{r.params_ratio:.2f}", r.conv_widths]
        for r in rows
    ]
    return tabulate(body, headers=headers, disable_numparse=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision classification model name")
    parser.add_argument("--sparsity", type=float, default=0.5, help="L1Norm channel sparsity")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1], help="L1Norm round_to values to compare")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads while timing")
    parser.add_argument("--runs", type=int, default=30, help="timed rounds (every variant once per round)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--passes", nargs="+", choices=list(INFERENCE_PASSES), default=list(INFERENCE_PASSES), metavar="PIPELINE",
        help="inference-pass combinations to time on the dense and shrunk models ('' = none); default: all of "
        + ", ".join(repr(k) for k in INFERENCE_PASSES),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the settings and rows as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = torchvision.models.get_model(args.model).eval()
    inputs = (torch.randn(args.batch, 3, args.size, args.size),)
    variants = build_variants(model, inputs, args.sparsity, args.round_to, args.passes)
    rows = measure(variants, inputs, args.runs, args.warmup, args.threads)
    print(f"{args.model}, L1Norm sparsity {args.sparsity}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.threads} threads, median of {args.runs} interleaved rounds; "
          "speed-ups against the plain eager dense model")
    print(format_table(rows))
    full = rows[-1]
    print(f"\nheadline: {full.label}: {full.speedup:.2f}x (ratio of medians), {full.paired_speedup:.2f}x (paired) "
          f"at MACs ratio {full.macs_ratio:.2f}; issue 2 asks for >= {TARGET_SPEEDUP}x")
    print("\npipelines:")
    for row in rows:
        print(f"  {row.label}: {row.pipeline}")
    if args.json:
        with open(args.json, "w") as f:
            rows_json = [dataclasses.asdict(r) for r in rows]
            json.dump({"settings": vars(args), "torch": torch.__version__, "rows": rows_json}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
