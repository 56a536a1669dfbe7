"""The model-zoo sweep (issue 2's acceptance): prune every torchvision classification model.

For each model of ``torchvision.models.list_models(module=torchvision.models)``
(weights=None, eval mode, seed 0, one 3×224×224 image, 299×299 for
inception_v3) it times ``fxcompress.compile(model, x,
standard_pruning(L1Norm(0.5)), verify=False)`` (model construction
excluded), checks that the shrunk model reproduces the masked model (the same
passes without ``Shrink``) to within 1e-4 of the masked output's largest
magnitude, and reports the MACs ratio (dense / shrunk), the params ratio and,
for models that prune little (MACs ratio < 1.5) or fail, why.

    python tools/zoo.py                      # all 80 models (10-20 minutes on 2 cores)
    python tools/zoo.py --fast --size 96     # the fast subset the tests also run
    python tools/zoo.py --models resnet50,vit_b_16 --json /tmp/zoo.json
    python tools/zoo.py --frontend export    # the same sweep captured by torch.export

The per-model check is :func:`fxcompress.sweep.check_pruning`; the model
table here (:data:`FAST`, :func:`spec`, :func:`build`) is shared with
``tests/test_zoo.py``, which runs the fast subset on small inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision
from tabulate import tabulate

from fxcompress.prune import L1Norm
from fxcompress.sweep import PruningCheck, check_pruning

__all__ = ["FAST", "ZooSpec", "spec", "build", "run_model", "sweep", "summarize", "main"]

#: The fast subset: one model of each architecture family (issue 2).
FAST: tuple[str, ...] = (
    "resnet18", "densenet121", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
    "shufflenet_v2_x0_5", "convnext_tiny", "googlenet", "inception_v3", "squeezenet1_1", "vgg11_bn",
    "vit_b_16", "swin_t", "maxvit_t",
)

#: Input sizes other than the default that a model needs at full size.
FULL_SIZE: dict[str, int] = {"inception_v3": 299}

#: Small configurations for the tests: (input size, constructor options). The
#: architecture is unchanged; only what ties it to the image size is set
#: smaller (ViT's position embeddings, MaxViT's attention partitions).
SMALL: dict[str, tuple[int, dict]] = {
    "inception_v3": (75, {}),  # the smallest input its stem accepts
    "vit_b_16": (32, {"image_size": 32}),  # 2×2 patches of 16
    "maxvit_t": (224, {}),  # every stage must be a multiple of its 7×7 partitions: 224 is the smallest
}
SMALL_DEFAULT = 64

RATIO_TO_EXPLAIN = 1.5
TOLERANCE = 1e-4
WHY_WIDTH = 160  #: characters of the "why" column in the printed table (the JSON has all of it)


@dataclass(frozen=True)
class ZooSpec:
    """How to build one zoo model and its example input."""

    name: str
    size: int
    kwargs: dict = field(default_factory=dict)


def spec(name: str, size: int | None = None, small: bool = False) -> ZooSpec:
    """The spec of ``name``: full size (224, 299 for inception) unless ``size`` or ``small`` say otherwise.

    >>> spec("vit_b_16", small=True)
    ZooSpec(name='vit_b_16', size=32, kwargs={'image_size': 32})
    """
    if small:
        small_size, kwargs = SMALL.get(name, (SMALL_DEFAULT, {}))
        return ZooSpec(name, small_size, dict(kwargs))
    return ZooSpec(name, size or FULL_SIZE.get(name, 224))


def build(zoo_spec: ZooSpec) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (random weights from seed 0, eval mode) and one image of the spec's size."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notes on init_weights for inception/googlenet
        model = torchvision.models.get_model(zoo_spec.name, weights=None, **zoo_spec.kwargs).eval()
    x = torch.randn(1, 3, zoo_spec.size, zoo_spec.size, generator=torch.Generator().manual_seed(0))
    return model, x


def run_model(zoo_spec: ZooSpec, sparsity: float = 0.5, frontend: str = "auto") -> PruningCheck:
    """Build one model and check it with ``L1Norm(sparsity)``; the model is freed on return."""
    model, x = build(zoo_spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opaque-op warnings show up in the "why" column instead
        return check_pruning(model, x, L1Norm(sparsity), frontend=frontend)


def _row(zoo_spec: ZooSpec, sparsity: float, frontend: str = "auto") -> dict:
    """One table row; a failure becomes a row with its error message, never an exception."""
    row = {"model": zoo_spec.name, "input": zoo_spec.size}
    try:
        check = run_model(zoo_spec, sparsity, frontend)
    except Exception as exc:  # noqa: BLE001 - the sweep reports every failure and goes on
        return {**row, "status": "FAIL", "why": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    finally:
        gc.collect()
    status = "ok" if check.passed(TOLERANCE) else "MISMATCH"
    data = check.to_dict()
    explain = status != "ok" or check.macs_ratio < RATIO_TO_EXPLAIN
    return {**row, "status": status, **data, "why": data["why"] if explain else ""}


def _warm_up() -> None:
    """Compile a tiny model once, so that the first model's time does not include lazy imports and caches."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_pruning(model, torch.randn(1, 3, 16, 16), L1Norm(0.5))


def sweep(
    specs: list[ZooSpec], sparsity: float = 0.5, progress: bool = True, on_row: Callable[[list[dict]], None] | None = None,
    frontend: str = "auto",
) -> list[dict]:
    """Run every spec, one model alive at a time, printing one progress line per model to stderr.

    ``on_row(rows_so_far)`` is called after each model (``main`` uses it to
    keep the JSON file current, so an interrupted sweep still leaves its results).
    """
    _warm_up()
    rows = []
    for i, zoo_spec in enumerate(specs, 1):
        start = time.perf_counter()
        row = _row(zoo_spec, sparsity, frontend)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        if progress:
            ratio = f"{row['macs_ratio']:.2f}x" if "macs_ratio" in row else "-"
            print(f"[{i}/{len(specs)}] {zoo_spec.name}: {row['status']} MACs {ratio} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Models passed / total, median MACs ratio, summed compile time, ResNet-50's compile time."""
    done = [r for r in rows if "macs_ratio" in r]
    resnet50 = [r["compile_s"] for r in done if r["model"] == "resnet50"]
    return {
        "passed": sum(r["status"] == "ok" for r in rows),
        "total": len(rows),
        "median_macs_ratio": statistics.median(r["macs_ratio"] for r in done) if done else None,
        "median_params_ratio": statistics.median(r["params_ratio"] for r in done) if done else None,
        "compile_s_sum": sum(r["compile_s"] for r in done),
        "compile_cpu_s_sum": sum(r.get("compile_cpu_s", 0.0) for r in done),
        "resnet50_compile_s": resnet50[0] if resnet50 else None,
    }


def _fmt(value, spec_: str) -> str:
    return "" if value is None else format(value, spec_)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[dict]) -> str:
    table = [
        [r["model"], r["input"], r["status"], _fmt(r.get("compile_s"), ".2f"), _fmt(r.get("compile_cpu_s"), ".2f"),
         _fmt(r.get("error"), ".1e"),
         _fmt(r.get("macs_ratio"), ".2f"), _fmt(r.get("params_ratio"), ".2f"), r["why"]]
        for r in rows
    ]
    headers = ["model", "input", "status", "compile s", "compile CPU s", "rel. error", "MACs ratio", "params ratio", "why"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def format_summary(summary: dict) -> str:
    return (
        f"passed {summary['passed']}/{summary['total']} (error <= {TOLERANCE:.0e}); "
        f"median MACs ratio {_fmt(summary['median_macs_ratio'], '.2f')}; "
        f"median params ratio {_fmt(summary['median_params_ratio'], '.2f')}; "
        f"compile time summed {summary['compile_s_sum']:.1f} s (CPU {summary['compile_cpu_s_sum']:.1f} s); "
        f"resnet50 compile {_fmt(summary['resnet50_compile_s'], '.2f')} s"
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated model names (default: all torchvision classification models)")
    parser.add_argument("--fast", action="store_true", help=f"only the fast subset: {', '.join(FAST)}")
    parser.add_argument("--size", type=int, help="input size for every model (default 224, 299 for inception_v3)")
    parser.add_argument("--small", action="store_true", help="the tests' small inputs and configurations")
    parser.add_argument("--sparsity", type=float, default=0.5, help="L1Norm sparsity (default 0.5)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                        help="how models are captured (fxcompress.compile's frontend; default auto)")
    parser.add_argument("--json", metavar="PATH", help="also write rows and summary as JSON")
    return parser.parse_args(argv)


def _names(args: argparse.Namespace) -> list[str]:
    known = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    else:
        names = list(FAST) if args.fast else known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(unknown)}; see torchvision.models.list_models()")
    return names


def _json_writer(path: str | None, args: argparse.Namespace) -> Callable[[list[dict]], None] | None:
    if not path:
        return None

    def write(rows: list[dict]) -> None:
        data = {"sparsity": args.sparsity, "threads": args.threads, "frontend": args.frontend, "rows": rows,
                "summary": summarize(rows)}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    return write


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    specs = [spec(name, args.size, args.small) for name in _names(args)]
    rows = sweep(specs, args.sparsity, on_row=_json_writer(args.json, args), frontend=args.frontend)
    summary = summarize(rows)
    print(format_table(rows))
    print(format_summary(summary))
    return 0 if summary["passed"] == summary["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
