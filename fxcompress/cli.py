"""The command line: ``python -m fxcompress {compress,report,viz,passes,auto} ...``.

Every subcommand takes a *model file*: a Python file that defines

- ``model()`` returning the ``nn.Module`` (or a module-level ``model`` object), and
- ``example_inputs()`` returning a tuple of forward() arguments (or a
  module-level ``example_inputs`` tuple or tensor).

``examples/resnet18.py`` is one. ``auto`` (automatic per-group sparsity) also
needs ``evaluate(model) -> float`` in the file (higher is better). A bad path, a file missing either name or
a malformed pipeline prints one line on stderr and exits with status 2::

    $ python -m fxcompress compress examples/resnet18.py --onnx small.onnx \\
        --pipeline "insert-masks{pruner=l1,sparsity=0.5},propagate-channels,shrink"
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from torch import fx, nn

from fxcompress.errors import ConfigError, FxCompressError
from fxcompress.trace import normalize_example_inputs

__all__ = [
    "ModelFile", "ModelFileError", "load_model_file", "load_evaluate", "ModelFileSource", "build_parser", "main",
    "DEFAULT_PIPELINE",
]

DEFAULT_PIPELINE = "insert-masks{pruner=l1,sparsity=0.5},propagate-channels,shrink"

#: Exit status of usage errors (argparse's convention): bad paths, malformed pipelines, bad options.
USAGE_ERROR = 2


class ModelFileError(ConfigError):
    """A model file is missing, cannot be imported, or does not follow the model-file convention."""


@dataclasses.dataclass(frozen=True)
class ModelFile:
    path: Path
    model: nn.Module
    example_inputs: tuple


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"fxcompress_model_file_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path} cannot be imported as Python: give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:  # not a reason to end the command with status 0, having done nothing
        raise ModelFileError(f"importing model file {path} called sys.exit({exc.code!r}): a model file must "
                             "only define model() and example_inputs()") from None
    except Exception as exc:
        raise ModelFileError(f"importing model file {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _attribute(module, name: str, path: Path):
    """``name`` from the file: called when it is a plain function, used as is when it is a module or value."""
    if not hasattr(module, name):
        raise ModelFileError(
            f"model file {path} defines no '{name}': define {name}() returning "
            + ("the nn.Module" if name == "model" else "a tuple of forward() arguments")
        )
    value = getattr(module, name)
    if callable(value) and not isinstance(value, nn.Module):
        try:
            value = value()
        except Exception as exc:
            raise ModelFileError(f"{path}: {name}() raised {type(exc).__name__}: {exc}") from exc
    return value


def load_model_file(path: str | Path) -> ModelFile:
    """Import a model file (see the module docstring) and return its model and example inputs."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if not path.is_file() or path.suffix != ".py":
        raise ModelFileError(f"model file {path} must be a .py file defining model() and example_inputs()")
    module = _import_file(path)
    model = _attribute(module, "model", path)
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{path}: model must be (or return) an nn.Module, got {type(model).__name__}")
    try:
        inputs = normalize_example_inputs(_attribute(module, "example_inputs", path))
    except FxCompressError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    _check_forward(path, model, inputs)
    return ModelFile(path, model, inputs)


def _check_forward(path: Path, model: nn.Module, inputs: tuple) -> None:
    """Run the model once on its example inputs, so that a wrong shape is one clear line, not a trace failure.

    Buffers are cloned for the call (``functional_call``): batch-norm statistics of a model in train mode
    stay as they were.
    """
    import torch

    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            torch.func.functional_call(model, buffers, inputs, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelFileError(f"{path}: model()(*example_inputs()) failed: {type(exc).__name__}: {first}") from exc


def load_evaluate(path: str | Path):
    """The ``evaluate(model) -> float`` function of a model file (for ``auto``); not called here."""
    path = Path(path)
    evaluate = getattr(_import_file(path), "evaluate", None)
    if not callable(evaluate):
        raise ModelFileError(
            f"model file {path} defines no 'evaluate': define evaluate(model) -> float (higher is better) to use auto"
        )
    return evaluate


@dataclasses.dataclass(frozen=True)
class ModelFileSource:
    """What ``auto`` search workers load: the model file itself, imported in each worker process."""

    path: str

    def load(self):
        loaded = load_model_file(self.path)
        return loaded.model, loaded.example_inputs, load_evaluate(self.path)


# ---------------------------------------------------------------------------- hooks used by the commands


@dataclasses.dataclass
class _Progress:
    """Hook: a tqdm bar over the passes of a pipeline (on stderr, hidden when it is not a terminal)."""

    total: int
    bar: object = None

    def __call__(self, previous, gm: fx.GraphModule, next_pass) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="passes", unit="pass", disable=None, file=sys.stderr)
        if previous is not None:
            self.bar.update(1)
        if next_pass is None:
            self.bar.close()
        else:
            self.bar.set_postfix_str(next_pass.name)


def _parse(pipeline: str) -> list:
    import fxcompress.passes  # noqa: F401  (registers the passes by name)
    from fxcompress.pipeline import parse_pipeline

    return parse_pipeline(pipeline)


def _compile(args, loaded: ModelFile, passes: list) -> tuple[fx.GraphModule, dict[str, float]]:
    import fxcompress

    from fxcompress.pipeline import TimePasses

    clock = TimePasses()  # the runner's own per-pass wall time, hooks excluded
    hooks = [clock, _Progress(len(passes))]
    if args.trace_passes:
        from fxcompress.viz import DumpPasses

        hooks.append(DumpPasses(args.trace_passes))
    gm = fxcompress.compile(loaded.model, loaded.example_inputs, passes, verify=args.verify, rtol=args.rtol,
                            hooks=hooks)
    return gm, clock.seconds


# ---------------------------------------------------------------------------- subcommands


def _export_onnx(gm: fx.GraphModule, example_inputs: tuple, path: Path) -> str:
    """Export with ``fxcompress.export.to_onnx``, which also checks the file in ONNX Runtime."""
    from fxcompress.export import to_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    to_onnx(gm, example_inputs, path)
    return "fxcompress.export.to_onnx"


def _print_timings(seconds: dict[str, float]) -> None:
    from tabulate import tabulate

    rows = [[name, f"{s:.3f}"] for name, s in seconds.items()]
    print(tabulate(rows, headers=["pass", "seconds"], disable_numparse=True))


def cmd_compress(args) -> int:
    from fxcompress.masks import remove_masks
    from fxcompress.report import compare

    passes = _parse(args.pipeline)
    loaded = load_model_file(args.model)
    gm, seconds = _compile(args, loaded, passes)
    _print_timings(seconds)
    comparison = compare(loaded.model, gm, loaded.example_inputs, latency=args.runs > 0, runs=max(args.runs, 1),
                         show=False)
    print(comparison.table())
    if args.out:
        _save(gm, args.out)
    if args.onnx:
        remove_masks(gm)  # ONNX wants plain weights: make any remaining masks permanent
        how = _export_onnx(gm, loaded.example_inputs, Path(args.onnx))
        print(f"wrote {args.onnx} with {how}")
    if args.json:
        _write_json(args.json, {"pipeline": args.pipeline, "pass_seconds": seconds, **comparison.to_dict()})
    return 0


def cmd_report(args) -> int:
    from fxcompress import report

    passes = _parse(args.pipeline) if args.pipeline else None
    loaded = load_model_file(args.model)
    if passes is None:
        return _report_single(args, loaded)
    gm, _ = _compile(args, loaded, passes)
    result = report.report(loaded.model, gm, loaded.example_inputs, latency=args.runs > 0, runs=max(args.runs, 1),
                           warmup=args.warmup)
    print(result.table())
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _report_single(args, loaded: ModelFile) -> int:
    from fxcompress import report

    latency = None
    if args.runs > 0:
        latency = report.measure_latency(loaded.model, loaded.example_inputs, runs=args.runs, warmup=args.warmup)
    stats = report.model_stats(loaded.model, loaded.example_inputs, latency=latency)
    rows = report.layer_table(loaded.model, loaded.example_inputs)
    from tabulate import tabulate

    print(tabulate([[k, v] for k, v in stats.to_dict().items() if v is not None], headers=["", args.model],
                   tablefmt="github"))
    print()
    print(report.format_layers(rows))
    if args.json:
        _write_json(args.json, {"model": stats.to_dict(), "layers": [r.to_dict() for r in rows]})
    return 0


def cmd_viz(args) -> int:
    import fxcompress
    from fxcompress.prune import make_pruner
    from fxcompress.viz import parse_formats, render, summary_table, view_graph

    formats = parse_formats(args.format)
    loaded = load_model_file(args.model)
    pruner = make_pruner(args.pruner, sparsity=args.sparsity) if args.sparsity is not None else None
    gm = fxcompress.trace(loaded.model, loaded.example_inputs)
    view = view_graph(gm, pruner=pruner, title=f"{Path(args.model).stem} ({type(loaded.model).__name__})",
                      collapse=args.collapse)
    out = args.out or str(Path("fxcompress-viz") / Path(args.model).stem)
    written = render(view, out, formats, engine=args.engine, rankdir=args.rankdir)
    print(summary_table(view))
    for fmt, path in written.items():
        print(f"wrote {fmt}: {path}")
    return 0


def cmd_passes(args) -> int:
    import fxcompress.passes  # noqa: F401
    from fxcompress.pipeline import PASS_REGISTRY
    from fxcompress.prune import PRUNERS
    from tabulate import tabulate

    rows = [[name, _options(cls), _first_line(cls.__doc__)] for name, cls in sorted(PASS_REGISTRY.items())]
    print(tabulate(rows, headers=["pass", "options", "what it does"]))
    print()
    rows = [[name, _first_line(cls.__doc__), _options(cls)] for name, cls in sorted(PRUNERS.items())]
    print(tabulate(rows, headers=["pruner", "what it does", "options (insert-masks{pruner=NAME,option=value})"]))
    return 0


def _options(cls) -> str:
    """``name: type = default`` for each constructor field of a dataclass (``-`` when there are none)."""
    from fxcompress.pipeline import option_fields

    shown = []
    for field, default in option_fields(cls):
        text = f"{field.name}: {field.type}"
        if default is not dataclasses.MISSING:
            if isinstance(default, tuple) and all(isinstance(t, type) for t in default) and default:
                default = "(" + ", ".join(t.__name__ for t in default) + ("," if len(default) == 1 else "") + ")"
            text += f" = {getattr(default, 'value', default)}"
        shown.append(text)
    return ", ".join(shown) or "-"


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def _save(gm: fx.GraphModule, path: str) -> None:
    import fxcompress

    fxcompress.save(gm, path)
    print(f"saved the compressed model to {path} (load with fxcompress.load(path): no pickle, checksummed)")


def _check_writable(option: str, path: str | None, directory: bool = False) -> None:
    """Fail before any work when an output path cannot be written (not after a whole compile or search)."""
    if not path:
        return
    target = Path(path)
    folder = target if directory else target.parent
    if not directory and target.is_dir():
        raise ConfigError(f"{option} {path} is a directory: give a file path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"{option} {path} is not writable")


def _check_outputs(args) -> None:
    for option in ("out", "onnx", "json"):
        _check_writable(f"--{option}", getattr(args, option, None))
    _check_writable("--trace-passes", getattr(args, "trace_passes", None), directory=True)
    rtol = getattr(args, "rtol", None)
    if rtol is not None and not rtol > 0:
        raise ConfigError(f"--rtol must be positive, got {rtol!r}")


def _write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def _auto_criterion(args):
    from fxcompress.prune import PRUNERS, ChannelPruner, make_pruner

    cls = PRUNERS.get(args.criterion)
    if cls is not None and not issubclass(cls, ChannelPruner):
        raise ConfigError(f"--criterion {args.criterion!r} is not a channel criterion (try l1, l2, fpgm)")
    return make_pruner(args.criterion, round_to=args.round_to)


def _parse_ladder(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--ladder must be comma-separated sparsities such as 0.25,0.5,0.75, got {text!r}") from None


def _auto_sensitivity(args, loaded: ModelFile, evaluate, criterion) -> int:
    from fxcompress.auto import sensitivity

    result = sensitivity(loaded.model, loaded.example_inputs, evaluate, _parse_ladder(args.ladder),
                         criterion=criterion, cache=args.cache)
    print(result.table())
    print(f"wrote {result.plot(args.sensitivity)} ({result.evaluated} cells evaluated, the rest from the cache)")
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _auto_storage(args) -> str:
    """``--storage``, or a journal file in the output directory (kept: a rerun with ``--resume`` continues it)."""
    from fxcompress.auto.search import default_storage

    if args.storage:
        return args.storage
    folder = Path(args.out or args.json or "fxcompress-auto/x").parent
    return default_storage(folder, args.study)


def cmd_auto(args) -> int:
    import uuid

    from fxcompress.auto import Budget, Heartbeat, run_worker, search

    budget = Budget.parse(args.budget)
    criterion = _auto_criterion(args)
    heartbeat = Heartbeat(args.heartbeat_interval, args.grace_period)
    if args.join and not (args.storage and args.study):
        raise ConfigError("--join needs --storage and --study naming the shared study")
    if args.resume and not args.study:
        raise ConfigError("--resume needs --study naming the study to continue")
    if args.join:
        ran = run_worker(ModelFileSource(args.model), args.study, args.storage, args.trials, index=args.seed,
                         progress=True, heartbeat=heartbeat)
        print(f"ran {ran} trials of study {args.study!r}")
        return 0
    args.study = args.study or f"fxcompress-{uuid.uuid4().hex[:8]}"
    storage = _auto_storage(args)
    if args.resume:
        from fxcompress.auto.search import _load_study

        _load_study(args.study, storage)  # a clear error when there is nothing to resume
    loaded = load_model_file(args.model)
    evaluate = load_evaluate(args.model)
    if args.sensitivity:
        return _auto_sensitivity(args, loaded, evaluate, criterion)
    print(f"study {args.study!r} in {storage} (rerun with --study {args.study} --resume to continue it)")
    result = search(loaded.model, loaded.example_inputs, evaluate, budget, args.trials, criterion=criterion,
                    max_sparsity=args.max_sparsity, sampler=args.sampler, seed=args.seed, storage=storage,
                    study_name=args.study, n_workers=args.workers, source=ModelFileSource(args.model),
                    heartbeat=heartbeat)
    print(result.table())
    if args.out:
        _save(result.model, args.out)
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


# ---------------------------------------------------------------------------- the parser


_MODEL_HELP = "Python file defining model() -> nn.Module and example_inputs() -> tuple (e.g. examples/resnet18.py)"
_PIPELINE_HELP = (
    "textual pass pipeline, parsed by fxcompress.pipeline.parse_pipeline into the same pass objects as the "
    "Python API: comma-separated pass names with {key=value,...} options (list them with `fxcompress passes`)"
)


def _add_compile_options(parser: argparse.ArgumentParser, pipeline_default: str | None) -> None:
    parser.add_argument("--pipeline", default=pipeline_default, metavar="TEXT", help=_PIPELINE_HELP +
                        (f" (default: {pipeline_default.replace('%', '%%')})" if pipeline_default else ""))
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking, after each output-preserving pass, that outputs are unchanged")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="verification tolerance relative to the largest output magnitude (default: 1e-4)")
    parser.add_argument("--trace-passes", metavar="DIR",
                        help="write the graph (text and HTML picture) after every pass and per-pass timings to DIR")
    parser.add_argument("--runs", type=int, default=20,
                        help="timed forward passes for the median latency; 0 skips latency (default: 20)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")


def _add_auto(commands) -> None:
    auto = commands.add_parser(
        "auto", help="search per-group sparsities under a MACs/params/latency budget (or a sensitivity analysis)",
        description="Find per-group sparsities that maximise the model file's evaluate(model) under a budget, "
        "with Optuna; print the chosen sparsities and a comparison with uniform sparsity. Several workers "
        "(--workers, or --join on other machines) can share one study through --storage.")
    auto.add_argument("model", help=_MODEL_HELP + "; it must also define evaluate(model) -> float (higher is better)")
    auto.add_argument("--budget", default="macs=2", metavar="METRIC=RATIO",
                      help="macs, params or latency, and how many times smaller (default: macs=2)")
    auto.add_argument("--trials", type=int, default=30, help="trials in the study, all workers together (default: 30)")
    auto.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: 1)")
    auto.add_argument("--storage", metavar="PATH|URL",
                      help="Optuna storage shared by the workers: a journal file path (on a shared file system for "
                      "several machines) or a database URL such as postgresql://user@host/db (default: the journal "
                      "file STUDY.journal in the folder of --out, else of --json, else fxcompress-auto/; kept, "
                      "so completed trials survive any failure)")
    auto.add_argument("--study", metavar="NAME", help="study name in the storage; rerunning resumes it")
    auto.add_argument("--resume", action="store_true",
                      help="continue the existing --study (an error when the storage holds no such study)")
    auto.add_argument("--heartbeat-interval", type=float, default=10.0, metavar="SECONDS",
                      help="how often a running trial stamps that its worker is alive (default: 10)")
    auto.add_argument("--grace-period", type=float, default=60.0, metavar="SECONDS",
                      help="a running trial silent this long belongs to a dead worker: it is failed and "
                      "retried once (default: 60)")
    auto.add_argument("--join", action="store_true",
                      help="only run trials of the existing --study in --storage (start this on other machines)")
    auto.add_argument("--criterion", default="l1", help="channel ranking inside each group, by name (default: l1)")
    auto.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of N (default: 1)")
    auto.add_argument("--max-sparsity", type=float, default=0.9,
                      help="most any group may lose (default: 0.9)")
    auto.add_argument("--sampler", choices=("tpe", "cmaes", "random"), default="tpe",
                      help="Optuna sampler (default: tpe; cmaes needs the cmaes package)")
    auto.add_argument("--seed", type=int, default=0, help="sampler seed (a joining worker's own seed offset)")
    auto.add_argument("--sensitivity", metavar="PNG",
                      help="instead of searching, prune each group alone at --ladder and plot the metric to PNG")
    auto.add_argument("--ladder", default="0.25,0.5,0.75", help="sparsities of --sensitivity (default: 0.25,0.5,0.75)")
    auto.add_argument("--cache", metavar="JSON", help="sensitivity results cache; a rerun resumes from it")
    auto.add_argument("--out", metavar="PATH", help="fxcompress.save the best compressed model to PATH")
    auto.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    auto.set_defaults(handler=cmd_auto)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fxcompress",
        description="fxcompress: prune and quantize PyTorch models as torch.fx graphs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            model files: a .py file defining model() (returning the nn.Module) and
            example_inputs() (returning a tuple of forward() arguments); module-level
            `model` and `example_inputs` objects work too. See examples/resnet18.py.

            examples:
              python -m fxcompress compress examples/resnet18.py --onnx out.onnx \\
                  --pipeline "insert-masks{pruner=l1,sparsity=0.5},propagate-channels,shrink"
              python -m fxcompress report examples/resnet18.py
              python -m fxcompress viz examples/resnet18.py --sparsity 0.5 --out out/resnet18
              python -m fxcompress passes
              python -m fxcompress auto MODEL.py --budget macs=3 --trials 40   # MODEL.py defines evaluate(model)

            exit status: 0 on success, 2 for bad paths, options or pipelines, 1 otherwise."""
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compress = commands.add_parser("compress", help="run a pass pipeline on a model; save it, export ONNX",
                                   description="Trace the model, run the pipeline, print pass timings and a "
                                   "before/after table (params, MACs, size, latency).")
    compress.add_argument("model", help=_MODEL_HELP)
    _add_compile_options(compress, DEFAULT_PIPELINE)
    compress.add_argument("--out", metavar="PATH", help="fxcompress.save the compressed model to PATH "
                          "(safetensors weights + torch.export program; load with fxcompress.load)")
    compress.add_argument("--onnx", metavar="PATH", help="export the compressed model to ONNX at PATH")
    compress.set_defaults(handler=cmd_compress)

    report = commands.add_parser("report", help="params, MACs, size, latency and per-layer table of a model",
                                 description="Without --pipeline: figures of the model itself. With --pipeline: "
                                 "compile it and compare before/after, per layer and whole-model.")
    report.add_argument("model", help=_MODEL_HELP)
    _add_compile_options(report, None)
    report.add_argument("--warmup", type=int, default=3, help="untimed forward passes before timing (default: 3)")
    report.set_defaults(handler=cmd_report)

    viz = commands.add_parser("viz", help="draw the dependency groups (HTML + PNG) and print a table of them",
                              description="Trace the model, run the dependency-group analysis and draw it: one "
                              "colour per prunable group, frozen parts grey with the reason, channel counts on "
                              "edges. Also `python -m fxcompress.viz MODEL`.")
    viz.add_argument("model", help=_MODEL_HELP)
    viz.add_argument("--sparsity", type=float, metavar="S",
                     help="show channel counts before -> after pruning with --pruner at this sparsity")
    viz.add_argument("--pruner", default="l1", help="pruner for --sparsity, by name (default: l1)")
    viz.add_argument("--out", metavar="PREFIX",
                     help="output path without extension (default: fxcompress-viz/<model file name>)")
    viz.add_argument("--format", default="html,png",
                     help="comma-separated: html, png, svg, dot, txt, json (default: html,png)")
    viz.add_argument("--collapse", type=int, metavar="DEPTH",
                     help="merge nodes by module path at this depth (default: only graphs over 400 nodes)")
    viz.add_argument("--engine", choices=("auto", "graphviz", "networkx"), default="auto",
                     help="layout: Graphviz dot, or networkx + matplotlib (default: graphviz when installed)")
    viz.add_argument("--rankdir", choices=("TB", "LR"), default="TB", help="graph direction (default: TB)")
    viz.set_defaults(handler=cmd_viz)

    _add_auto(commands)

    passes = commands.add_parser("passes", help="list the passes and pruners a pipeline can name")
    passes.set_defaults(handler=cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for usage errors, with one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_outputs(args)
        return args.handler(args)
    except FxCompressError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message's own layout
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR if not _is_internal(exc) else 1


def _is_internal(exc: FxCompressError) -> bool:
    """Verification failures are fxcompress's fault, not the user's: exit status 1, not 2."""
    from fxcompress.errors import VerificationError

    return isinstance(exc, VerificationError)
