"""The timm zoo sweep (issue 13's acceptance): prune the smallest model of every timm model module.

For each module of ``timm.models._registry.list_modules()`` it picks the
model of ``list_models(module=...)`` with the fewest parameters (counted on
models built on the meta device, cached per timm version), builds it with
random weights (seed 0, eval mode) at the input size of its pretrained config
(capped at :data:`MAX_SIZE`: models whose default is larger are built with
``img_size=256`` when their constructor takes it and run at 256 either way),
and compiles it with ``standard_pruning(L1Norm(0.5))``. Verification is on
(``VerifyOutputs`` with the user's module as oracle, as
``fxcompress.compile(verify=True)`` installs it, except that a removed-channel
noise check that fails only by overflowing float32 is repeated in float64 and
flagged in the ``noise f32`` column instead of failing the row; see
:func:`_verifier`), and the masked and shrunk models are also compared on a
fresh input. Per model the row says which frontend
captured it, the MACs and params ratios, the compile time (trace → shrink,
verification excluded; verification's own time is a separate column) and, when
the MACs ratio is below 1.5, the constructs that froze the most channels.

    python tools/zoo_timm.py                            # one model per module (~98)
    python tools/zoo_timm.py --peer tp --json /tmp/zoo_timm.json
    python tools/zoo_timm.py --models resnet10t,efficientnet_b0 --size 64
    python tools/zoo_timm.py --limit 10 --frontend export --timeout 300 --max-gb 8

``--peer tp`` also prunes each model with Torch-Pruning (``MagnitudePruner``,
L1 magnitude, ``pruning_ratio`` = the sparsity, ``global_pruning=False``, the
classifier ignored; as in Torch-Pruning's timm example, ``num_heads`` given for
every module with a ``qkv`` linear and a ``num_heads`` attribute, and those
modules' ``num_heads``/``head_dim``/``attn_dim`` updated after pruning) in the same
process, alternating which tool goes first from model to model, and reports
both compile times and the sum over the models both handle. Torch-Pruning
"handles" a model when pruning succeeds and the pruned model still runs and
returns the dense output's shape; nothing checks what it computes.

Freezing ops: the masked model's channel analysis attributes every frozen
channel to the op that froze it first (:meth:`ChannelAnalysis.freezers`, over
the channels layers produce less those graph inputs/outputs pin); a row lists
the top ops with their share of the prunable parameter mass, and the summary
ranks them over the models below 1.5x.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tabulate import tabulate

__all__ = [
    "MAX_SIZE",
    "TimmSpec",
    "smallest_per_module",
    "spec",
    "build",
    "freezing_constructs",
    "run_fxcompress",
    "run_torch_pruning",
    "row",
    "sweep",
    "summarize",
    "rank_blockers",
    "format_table",
    "main",
]

MAX_SIZE = 256  #: largest input side used; larger defaults (299 to 896) are rebuilt at this size when the model allows
RATIO_TO_EXPLAIN = 1.5
TOLERANCE = 1e-4
WHY_WIDTH = 110
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fxcompress")


class ModelTimeout(BaseException):
    """A model ran past ``--timeout`` or ``--max-gb`` (a BaseException, so that no ``except Exception`` inside the
    tools swallows it)."""


@dataclass(frozen=True)
class TimmSpec:
    """How to build one timm model and its example input."""

    name: str
    module: str = ""
    size: tuple[int, int] = (224, 224)
    kwargs: dict = field(default_factory=dict)
    params: int | None = None  #: dense parameter count, when known from the selection


# ---------------------------------------------------------------------------- choosing the models


def _timm():
    import timm  # noqa: PLC0415 - timm is optional for the rest of fxcompress

    return timm


def _meta_params(name: str) -> int | None:
    """Parameter count of ``name`` built on the meta device (no memory, no init cost); None if it fails."""
    timm = _timm()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is skipped for the choice
        return None
    return sum(p.numel() for p in model.parameters())


def smallest_per_module(modules: list[str] | None = None, cache: bool = True, progress: bool = False) -> list[TimmSpec]:
    """The model with the fewest parameters of every timm model module (ties: first in timm's order).

    Counting builds every registered model once on the meta device (about a
    minute for timm 1.0's ~1,400 models); the counts are cached in
    ``~/.cache/fxcompress/timm-params-<version>.json``.
    """
    timm = _timm()
    from timm.models import _registry as registry

    path = os.path.join(CACHE, f"timm-params-{timm.__version__}.json")
    counts: dict[str, int | None] = {}
    if cache and os.path.exists(path):
        with open(path) as f:
            counts = json.load(f)
    missing = False
    chosen = []
    for module in modules or registry.list_modules():
        best = None
        for name in registry.list_models(module=module):
            if name not in counts:
                counts[name] = _meta_params(name)
                missing = True
            n = counts[name]
            if n is not None and (best is None or n < best[1]):
                best = (name, n)
        if best is None:
            names = registry.list_models(module=module)
            best = (names[0], None) if names else None
        if best is not None:
            chosen.append(TimmSpec(best[0], module, params=best[1]))
            if progress:
                print(f"module {module}: {best[0]} ({best[1]} params)", file=sys.stderr, flush=True)
    if cache and missing:
        os.makedirs(CACHE, exist_ok=True)
        with open(path, "w") as f:
            json.dump(counts, f)
    return chosen


def _default_size(name: str) -> tuple[int, int]:
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) or (3, 224, 224)
    return int(size[-2]), int(size[-1])


def spec(name: str, module: str = "", size: int | None = None, params: int | None = None) -> TimmSpec:
    """The spec of ``name``: its pretrained config's input size, capped at :data:`MAX_SIZE`, unless ``size`` is given.

    A model whose default side exceeds the cap gets ``img_size`` in its
    constructor options (dropped again by :func:`build` if the constructor
    refuses it) and an input of the cap's size. An explicit ``size`` sets ``img_size`` too, for models whose
    position tables or windows are tied to the image size.
    """
    if size is not None:
        return TimmSpec(name, module, (size, size), {"img_size": size}, params)
    h, w = _default_size(name)
    if max(h, w) <= MAX_SIZE:
        return TimmSpec(name, module, (h, w), {}, params)
    return TimmSpec(name, module, (MAX_SIZE, MAX_SIZE), {"img_size": MAX_SIZE}, params)


def _create(name: str, kwargs: dict) -> tuple[torch.nn.Module, dict]:
    timm = _timm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return timm.create_model(name, pretrained=False, **kwargs), kwargs
        except TypeError:
            if not kwargs:
                raise
            return timm.create_model(name, pretrained=False), {}


def _patch_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The first ``patch_size`` attribute of the model or a submodule (ViT-style patch embeddings), as (h, w)."""
    for module in model.modules():
        patch = getattr(module, "patch_size", None)
        if isinstance(patch, int):
            return patch, patch
        if isinstance(patch, (tuple, list)) and len(patch) >= 2 and all(isinstance(p, int) for p in patch[-2:]):
            return tuple(patch[-2:])
    return None


def build(timm_spec: TimmSpec) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (random weights from seed 0, eval mode) and one input of the spec's size.

    A constructor that refuses ``img_size`` builds the default model, which
    then runs at the spec's size. Either way, when the size was capped or
    given and the model has a ``patch_size`` the side does not divide, the side
    is rounded down to a multiple of it (and the model rebuilt with that
    ``img_size`` when it takes one). Convolutional models take any size; others
    fail at a size they refuse, which their row reports.
    """
    torch.manual_seed(0)
    model, used = _create(timm_spec.name, timm_spec.kwargs)
    h, w = timm_spec.size
    patch = _patch_size(model) if timm_spec.kwargs else None
    if patch is not None and (h % patch[0] or w % patch[1]):  # a side the patches divide
        h, w = h - h % patch[0], w - w % patch[1]
        if used:
            torch.manual_seed(0)
            model, _ = _create(timm_spec.name, {**timm_spec.kwargs, "img_size": (h, w)})
    channels = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0])
    x = torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(0))
    return model.eval(), x


# ---------------------------------------------------------------------------- why channels stayed


def freezing_constructs(analysis, top: int = 8) -> list[dict]:
    """The ops that froze prunable channels, most parameter mass first (:meth:`ChannelAnalysis.freezers`).

    Candidates are the channels a layer produces, less those a graph input or
    output pins. Each entry: ``op`` (its spelling: module type, function,
    ``Tensor.method`` or aten overload), ``opaque`` (no channel rule, or the
    rule refused the call), ``channels``, ``share`` (of the candidates'
    parameter mass), ``where`` (its first three module paths or nodes) and
    ``reason`` (one freeze reason it made, e.g. why its rule refused the call).
    """
    reasons: dict[tuple[str, bool], str] = {}
    for reason, culprit in analysis.culprits.items():
        reasons.setdefault((culprit.op, culprit.opaque), reason)
    return [
        {"op": f.op, "opaque": f.opaque, "channels": f.channels, "share": f.share, "where": list(f.where[:3]),
         "reason": reasons.get((f.op, f.opaque), "")}
        for f in analysis.freezers(analysis.candidates())[:top]
    ]


def _frozen_share(analysis) -> float:
    return sum(f.share for f in analysis.freezers(analysis.candidates()))


def _label(freeze: dict) -> str:
    """The op, and for an opaque one whether it has no rule or why its rule refused the call."""
    if not freeze["opaque"]:
        return freeze["op"]
    reason = freeze.get("reason", "")
    if not reason or reason.endswith("has no channel rule"):
        return freeze["op"] + " [no rule]"
    return f"{freeze['op']} [refused: {reason.rpartition('): ')[2]}]"


# ---------------------------------------------------------------------------- one model, each tool


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


@contextlib.contextmanager
def _limits(seconds: float | None, max_gb: float | None = None) -> Iterator[None]:
    """Raise :class:`ModelTimeout` in the main thread after ``seconds`` or once the resident memory exceeds ``max_gb``.

    Time is SIGALRM; memory is a thread polling ``/proc/self/statm`` that
    signals the process (SIGUSR1). Both are delivered when the main thread
    next runs Python code (Unix only; silently off elsewhere).
    """
    if not hasattr(signal, "SIGALRM") or not (seconds or max_gb):
        yield
        return
    done = threading.Event()

    def expire(signum, frame):
        if signum == signal.SIGALRM:
            raise ModelTimeout(f"ran past the {seconds:g} s timeout")
        raise ModelTimeout(f"resident memory passed {max_gb:g} GB")

    def watch() -> None:
        while not done.wait(0.2):
            if _rss_gb() > max_gb:
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGALRM, expire), signal.signal(signal.SIGUSR1, expire)
    if seconds:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    watcher = threading.Thread(target=watch, daemon=True) if max_gb and os.path.exists("/proc/self/statm") else None
    if watcher is not None:
        watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.setitimer(signal.ITIMER_REAL, 0)
        if watcher is not None:
            watcher.join()
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGUSR1, previous[1])


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _frontend_of(gm) -> str:
    """``export`` for graphs captured by torch.export (nodes carry ``meta['val']``), else ``fx``."""
    return "export" if any("val" in n.meta for n in gm.graph.nodes) else "fx"


@dataclass
class _TraceEnd:
    """Hook, first in the list: the time the trace ended (the first hook call) and the frontend that captured."""

    time: float | None = None
    frontend: str = ""

    def __call__(self, previous, gm, next_pass) -> None:
        if previous is None:
            self.time = time.perf_counter()
            self.frontend = _frontend_of(gm)


@dataclass
class _Probe:
    """Hook, after verification: the masked outputs on a fresh input and the analysis after propagate-channels,
    the shrunk outputs at the end, and its own time (excluded from the compile time)."""

    fresh: torch.Tensor
    own_s: float = 0.0
    masked: list | None = None
    shrunk: list | None = None
    analysis: object = None

    def __call__(self, previous, gm, next_pass) -> None:
        start = time.perf_counter()
        if getattr(previous, "name", None) == "propagate-channels":
            from fxcompress.analysis import get_analysis

            self.masked = _outputs(gm, self.fresh)
            self.analysis = get_analysis(gm)
        if next_pass is None:
            self.shrunk = _outputs(gm, self.fresh)
        self.own_s += time.perf_counter() - start


def _count_macs(model: torch.nn.Module, x: torch.Tensor, notes: list[str]) -> int:
    """``fxcompress.report.count_macs``; when it raises, the count on a copy whose parameters need no grad.

    torch's ``FlopCounterMode`` tracks modules with autograd hooks and asserts
    on a module argument that requires grad without a grad function (timm's
    CaiT passes ``cls_token.expand(...)``, made under no_grad, to its blocks);
    the error goes into ``notes`` and the row keeps its figures.
    """
    from fxcompress.report import count_macs
    from fxcompress.trace import copy_model

    try:
        return count_macs(model, (x,))
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        notes.append(f"count_macs: {_error_text(exc)}")
    frozen = copy_model(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return count_macs(frozen, (x,))


def _noise_overflows(gm, inputs: tuple) -> bool:
    """Whether the removed-channel noise check's forward is non-finite (the noise grew past float32's range)."""
    from fxcompress.verify import forward, nonfinite_leaf, perturbed_removed_channels

    with perturbed_removed_channels(gm):
        return nonfinite_leaf(forward(gm, inputs)) is not None


def _noise_check_f64(gm, inputs: tuple, rtol: float) -> bool:
    """The removed-channel noise check repeated on a float64 copy; False when it fails or cannot run."""
    from fxcompress.trace import copy_model
    from fxcompress.verify import forward, unreachable_error

    try:
        wide = copy_model(gm).double()
        for module in wide.modules():  # masked tensors read by get_attr are plain attributes: recompute them
            for name in [n.removesuffix("_orig") for n, _ in module.named_parameters(recurse=False) if n.endswith("_orig")]:
                if hasattr(module, name + "_mask"):
                    setattr(module, name, getattr(module, name + "_orig") * getattr(module, name + "_mask"))
        wide_inputs = tuple(t.double() for t in inputs)
        return unreachable_error(wide, wide_inputs, forward(wide, wide_inputs), rtol) is None
    except Exception:  # noqa: BLE001 - inconclusive: the float32 failure stands
        return False


def _verifier(inputs: tuple, model: torch.nn.Module):
    """``VerifyOutputs`` as ``compile(verify=True)`` installs it, with one difference.

    When the removed-channel noise check fails only because the noise grew
    past float32's range (its forward is non-finite: ``0 * inf`` in a consumer
    of a removed channel, after ~30 layers of noise feeding noise) and the
    same check passes in float64, the failure is recorded in
    ``noise_overflow`` instead of raised, and the original-model oracle, which
    the failure skipped, runs. Any other failure is raised as it is.
    """
    from fxcompress.errors import VerificationError
    from fxcompress.pipeline import VerifyOutputs
    from fxcompress.verify import oracle_outputs, worst_leaf

    class Verify(VerifyOutputs):
        noise_overflow = False

        def check_masked(self, gm, outputs) -> None:
            try:
                super().check_masked(gm, outputs)
                return
            except VerificationError as exc:
                if "hold noise" not in str(exc) or not _noise_overflows(gm, self.example_inputs):
                    raise
                if not _noise_check_f64(gm, self.example_inputs, self.rtol):
                    raise
            self.noise_overflow = True
            oracle = oracle_outputs(self.original, gm, self.example_inputs)
            wrong = None if oracle is None else worst_leaf(oracle, outputs, self.rtol)
            if wrong is not None:
                raise VerificationError(f"the original model run with the masked weights disagrees with the masked "
                                        f"graph on output {wrong.leaf} (error {wrong.error:.2e})")

    return Verify(inputs, rtol=TOLERANCE, original=model)


def run_fxcompress(model: torch.nn.Module, x: torch.Tensor, sparsity: float = 0.5, frontend: str = "auto") -> dict:
    """Compile ``model`` with ``standard_pruning(L1Norm(sparsity))``, verified; the figures of one row.

    ``compile_s`` is trace + passes (wall clock, verification and the probe
    excluded), ``verify_s`` verification's time. Raises what compile raises
    (a verification failure included).
    """
    import fxcompress
    from fxcompress.passes import standard_pruning
    from fxcompress.prune import L1Norm
    from fxcompress.report import count_params, relative_error

    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    trace_end, probe = _TraceEnd(), _Probe(fresh)
    verify = _verifier((x,), model)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gm = fxcompress.compile(model, x, standard_pruning(L1Norm(sparsity)), verify=False, frontend=frontend,
                                    hooks=[trace_end, verify, probe])
        except Exception as exc:
            exc.fxcompress_frontend = trace_end.frontend  # which frontend captured it, for the failure's row
            raise
    total = time.perf_counter() - start
    from fxcompress.analysis import OpaqueOpWarning

    opaque_warnings = sorted({str(w.message).split(" (nodes")[0].removeprefix("fxcompress has no channel rule for ")
                              for w in caught if issubclass(w.category, OpaqueOpWarning)})
    from fxcompress import meta

    passes_s = sum(s for _, s in gm.meta.get(meta.PASS_SECONDS, []))
    compile_s = (trace_end.time - start) + passes_s
    notes: list[str] = []
    macs_dense, macs_shrunk = _count_macs(model, x, notes), _count_macs(gm, x, notes)
    params_dense, params_shrunk = count_params(model), count_params(gm)
    analysis = probe.analysis
    return {
        "frontend": trace_end.frontend,
        "compile_s": compile_s,
        "verify_s": max(total - compile_s - probe.own_s, 0.0),
        "verify_error": max(verify.errors.values(), default=0.0),
        "noise_overflow": verify.noise_overflow,
        "notes": notes,
        "fresh_error": relative_error(probe.masked, probe.shrunk),
        "macs_dense": macs_dense,
        "macs_shrunk": macs_shrunk,
        "macs_ratio": macs_dense / max(macs_shrunk, 1),
        "params_dense": params_dense,
        "params_shrunk": params_shrunk,
        "params_ratio": params_dense / max(params_shrunk, 1),
        "frozen_share": _frozen_share(analysis),
        "prunable_groups": len(analysis.prunable_groups()),
        "prunable_channels": sum(len(g) for g in analysis.prunable_groups()),
        "opaque": {op: len(nodes) for op, nodes in analysis.opaque_nodes.items()},
        "opaque_warnings": opaque_warnings,
        "freezes": freezing_constructs(analysis),
    }


def fx_failure(model: torch.nn.Module) -> str:
    """Why ``symbolic_trace`` rejects ``model`` (first line), or "" when it traces: for rows the auto frontend exported."""
    from fxcompress.trace import copy_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.fx.symbolic_trace(copy_model(model))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return _error_text(exc)
    return ""


def _classifiers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """timm's ``get_classifier()`` (a module, a tuple of them for distilled heads, or Identity)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = head if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, torch.nn.Module) and any(True for _ in h.parameters())]


def _num_heads(model: torch.nn.Module) -> dict:
    """Torch-Pruning's timm recipe: ``{attn.qkv: attn.num_heads}`` for every attention with a fused qkv linear."""
    found = {}
    for module in model.modules():
        qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
        if isinstance(qkv, torch.nn.Linear) and isinstance(heads, int):
            found[qkv] = heads
    return found


def _fix_attention(model: torch.nn.Module, pruner) -> None:
    """Torch-Pruning's timm recipe after pruning: attention modules learn their new head count and head size."""
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        if qkv in pruner.num_heads and isinstance(getattr(module, "num_heads", None), int):
            module.num_heads = pruner.num_heads[qkv]
            if hasattr(module, "head_dim"):
                module.head_dim = qkv.out_features // (3 * module.num_heads)
            if hasattr(module, "attn_dim"):  # timm >= 1.0.20 reshapes the heads' output with it
                module.attn_dim = qkv.out_features // 3


def run_torch_pruning(model: torch.nn.Module, x: torch.Tensor, sparsity: float = 0.5) -> dict:
    """Prune ``model`` in place with Torch-Pruning's ``MagnitudePruner`` (L1, local); time, MACs and params ratios.

    Raises when Torch-Pruning fails, or when the pruned model fails to run or
    changes the output shape.
    """
    import torch_pruning as tp
    from fxcompress.report import count_params

    dense_out = _outputs(model, x)
    notes: list[str] = []
    macs_dense, params_dense = _count_macs(model, x, notes), count_params(model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=sparsity,
            global_pruning=False, ignored_layers=_classifiers(model), num_heads=_num_heads(model),
        )
        pruner.step()
        _fix_attention(model, pruner)
    tp_s = time.perf_counter() - start
    try:
        out = _outputs(model, x)
    except Exception as exc:
        raise RuntimeError(f"pruned model fails to run: {type(exc).__name__}: {exc}") from exc
    if [t.shape for t in out] != [t.shape for t in dense_out]:
        raise RuntimeError(f"pruned model's output shape changed: {[tuple(t.shape) for t in out]}")
    macs_shrunk, params_shrunk = _count_macs(model, x, notes), count_params(model)
    return {
        "tp_s": tp_s,
        "tp_macs_ratio": macs_dense / max(macs_shrunk, 1),
        "tp_params_ratio": params_dense / max(params_shrunk, 1),
        "tp_notes": notes,
    }


def _error_text(exc: BaseException) -> str:
    """The first line of the error, plus each frontend's own line when ``auto`` reports both."""
    lines = [line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
    keep = lines[:1] + [line[:400] for line in lines[1:] if line.startswith(("symbolic_trace:", "torch.export:"))]
    return " | ".join(keep if len(keep) > 1 else lines[:3])[:900]


def _top_why(result: dict, top: int = 3) -> str:
    """The share of prunable parameter mass frozen, the top freezing ops with their shares, and what is left prunable."""
    freezes = result.get("freezes", [])[:top]
    parts = [f"{_label(f)} {f['share']:.0%} ({f['channels']} ch)" for f in freezes]
    text = f"frozen {result.get('frozen_share', 0):.0%}: " + "; ".join(parts) if parts else "nothing frozen"
    # channels coupled into a few large components (e.g. GroupNorm(1, C)) are not frozen but barely prunable
    return text + f"; prunable: {result.get('prunable_channels', 0)} ch in {result.get('prunable_groups', 0)} groups"


def _repeat_times(timm_spec: TimmSpec, out: dict, sparsity: float, frontend: str, peer: str | None,
                  timeout: float | None, max_gb: float | None, tp_first: bool, repeat: int) -> None:
    """Time each tool that succeeded ``repeat - 1`` more times (fresh model each, alternating which goes first)
    and replace ``compile_s`` / ``verify_s`` / ``tp_s`` by the medians; the runs' times go in ``*_runs``."""
    runs = {key: [out[key]] for key in ("compile_s", "verify_s", "tp_s") if key in out}
    tools = [t for t in (["fxcompress"] + (["tp"] if peer == "tp" else [])) if ("compile_s" if t == "fxcompress" else "tp_s") in out]
    for k in range(1, repeat):
        for tool in (tools[::-1] if tp_first ^ (k % 2 == 1) else tools):
            try:
                with _limits(timeout, max_gb):
                    model, x = build(timm_spec)
                    result = run_fxcompress(model, x, sparsity, frontend) if tool == "fxcompress" else \
                        run_torch_pruning(model, x, sparsity)
                for key in runs:
                    if key in result:
                        runs[key].append(result[key])
            except (Exception, ModelTimeout):  # noqa: BLE001 - a repeat that fails leaves the first run's figures
                pass
            finally:
                model = x = None
                gc.collect()
    for key, values in runs.items():
        out[key] = statistics.median(values)
        out[key.removesuffix("_s") + "_runs"] = values


def row(timm_spec: TimmSpec, sparsity: float = 0.5, frontend: str = "auto", peer: str | None = None,
        timeout: float | None = None, tp_first: bool = False, max_gb: float | None = None, repeat: int = 1) -> dict:
    """One table row; a failure (of either tool) becomes fields of the row with its error, never an exception.

    With ``repeat > 1`` the times are medians over that many runs of each tool.
    """
    out = {"model": timm_spec.name, "module": timm_spec.module, "input": "x".join(map(str, timm_spec.size))}
    tools = ["fxcompress"] + (["tp"] if peer == "tp" else [])
    if tp_first:
        tools.reverse()
    for tool in tools:
        try:
            with _limits(timeout, max_gb):
                model, x = build(timm_spec)
                out["input"] = "x".join(map(str, x.shape[-2:]))
                if tool == "fxcompress":
                    out.update(run_fxcompress(model, x, sparsity, frontend))
                    if frontend == "auto" and out["frontend"] == "export":
                        out["fx_error"] = fx_failure(model)
                else:
                    out.update(run_torch_pruning(model, x, sparsity))
        except (Exception, ModelTimeout) as exc:  # noqa: BLE001 - the sweep reports every failure and goes on
            out["error" if tool == "fxcompress" else "tp_error"] = _error_text(exc)
            if getattr(exc, "fxcompress_frontend", ""):
                out["frontend"] = exc.fxcompress_frontend
            if tool == "fxcompress" and type(exc).__name__ == "VerificationError":
                out["verification_failed"] = True
        finally:
            model = x = None
            gc.collect()
    if repeat > 1:
        _repeat_times(timm_spec, out, sparsity, frontend, peer, timeout, max_gb, tp_first, repeat)
    if "error" in out:
        out["status"] = "VERIFY" if out.get("verification_failed") else "FAIL"
    elif out["fresh_error"] > TOLERANCE:
        out["status"] = "MISMATCH"
    else:
        out["status"] = "ok"
    out["why"] = _top_why(out) if out["status"] == "ok" and out["macs_ratio"] < RATIO_TO_EXPLAIN else ""
    if "error" in out:
        out["why"] = out["error"]
    return out


# ---------------------------------------------------------------------------- the sweep and its summary


def _warm_up(peer: str | None) -> None:
    """Compile (and Torch-Prune) a tiny model once, so the first model's time excludes lazy imports."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 16, 16)
    run_fxcompress(model, x)
    if peer == "tp":
        with contextlib.suppress(RuntimeError):  # it prunes the last conv too (no classifier to ignore): only a warm-up
            run_torch_pruning(model, x)


def sweep(specs: list[TimmSpec], sparsity: float = 0.5, frontend: str = "auto", peer: str | None = None,
          timeout: float | None = None, max_gb: float | None = None, repeat: int = 1, progress: bool = True,
          on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every spec, one model alive at a time; with a peer, the tool that goes first alternates from model to model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _warm_up(peer)
    rows = []
    for i, timm_spec in enumerate(specs, 1):
        start = time.perf_counter()
        r = row(timm_spec, sparsity, frontend, peer, timeout, tp_first=i % 2 == 0, max_gb=max_gb, repeat=repeat)
        rows.append(r)
        if on_row is not None:
            on_row(rows)
        if progress:
            ratio = f"{r['macs_ratio']:.2f}x" if "macs_ratio" in r else "-"
            tp = ""
            if peer == "tp":
                tp = f" | TP {r['tp_macs_ratio']:.2f}x" if "tp_macs_ratio" in r else " | TP fail"
            print(f"[{i}/{len(specs)}] {timm_spec.name}: {r['status']} {r.get('frontend', '')} MACs {ratio}{tp} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return rows


def rank_blockers(rows: list[dict]) -> list[dict]:
    """Freezing ops over the compiled models with MACs ratio < 1.5, most often the largest blocker first.

    Each entry: ``construct`` (op spelling, ``[no rule]`` when opaque),
    ``models`` (how many it froze prunable channels in), ``top_in`` (models
    where it froze the most), ``mean_share`` (of the prunable parameter mass,
    over those models), ``channels`` (summed), ``examples`` (first five models).
    """
    by: dict[str, dict] = {}
    for r in rows:
        if "macs_ratio" not in r or r["macs_ratio"] >= RATIO_TO_EXPLAIN:
            continue
        for rank, f in enumerate(r["freezes"]):
            key = _label(f)
            entry = by.setdefault(key, {"construct": key, "models": 0, "top_in": 0, "share_sum": 0.0, "channels": 0,
                                        "examples": []})
            entry["models"] += 1
            entry["top_in"] += rank == 0
            entry["share_sum"] += f["share"]
            entry["channels"] += f["channels"]
            entry["examples"].append(r["model"])
    for e in by.values():
        e["mean_share"] = e.pop("share_sum") / e["models"]
    ranked = sorted(by.values(), key=lambda e: (-e["top_in"], -e["models"], -e["mean_share"]))
    for e in ranked:
        e["examples"] = e["examples"][:5]
    return ranked


def summarize(rows: list[dict]) -> dict:
    """Counts, median ratios, failures and (with a peer) the summed times over the models both tools handle."""
    done = [r for r in rows if "macs_ratio" in r]
    both = [r for r in done if "tp_s" in r]
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {
        "total": len(rows),
        "compiled": len(done),
        "equivalent": len(ok),
        "mismatch": sum(r["status"] == "MISMATCH" for r in rows),
        "failed": sum(r["status"] == "FAIL" for r in rows),
        "macs_ge_1_5": sum(r["macs_ratio"] >= RATIO_TO_EXPLAIN for r in ok),
        "median_macs_ratio": statistics.median(r["macs_ratio"] for r in done) if done else None,
        "median_params_ratio": statistics.median(r["params_ratio"] for r in done) if done else None,
        "frontends": dict(Counter(r["frontend"] for r in done)),
        "compile_s_sum": sum(r["compile_s"] for r in done),
        "verify_s_sum": sum(r["verify_s"] for r in done),
        "worst_fresh_error": max((r["fresh_error"] for r in done), default=None),
        "noise_overflow": sum(bool(r.get("noise_overflow")) for r in done),
    }
    if any("tp_s" in r or "tp_error" in r for r in rows):
        tp_ok = [r for r in rows if "tp_s" in r]
        fx_sum, tp_sum = sum(r["compile_s"] for r in both), sum(r["tp_s"] for r in both)
        summary.update({
            "tp_handled": len(tp_ok),
            "tp_macs_ge_1_5": sum(r["tp_macs_ratio"] >= RATIO_TO_EXPLAIN for r in tp_ok),
            "tp_median_macs_ratio": statistics.median(r["tp_macs_ratio"] for r in tp_ok) if tp_ok else None,
            "both_handled": len(both),
            "both_fx_compile_s_sum": fx_sum,
            "both_fx_compile_verify_s_sum": fx_sum + sum(r["verify_s"] for r in both),
            "both_tp_s_sum": tp_sum,
            "both_time_ratio_fx_over_tp": fx_sum / tp_sum if tp_sum else None,
        })
    return summary


def _fmt(value, spec_: str) -> str:
    return "" if value is None else format(value, spec_)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[dict], peer: bool = False) -> str:
    headers = ["module", "model", "input", "frontend", "status", "noise f32", "compile s", "verify s", "fresh err",
               "MACs ratio", "params ratio"]
    if peer:
        headers += ["TP s", "TP MACs ratio"]
    headers.append("why (MACs < 1.5) / error")
    table = []
    for r in rows:
        line = [r["module"], r["model"], r["input"], r.get("frontend", ""), r["status"],
                "overflow" if r.get("noise_overflow") else "", _fmt(r.get("compile_s"), ".2f"),
                _fmt(r.get("verify_s"), ".2f"), _fmt(r.get("fresh_error"), ".1e"), _fmt(r.get("macs_ratio"), ".2f"),
                _fmt(r.get("params_ratio"), ".2f")]
        if peer:
            line += [_fmt(r.get("tp_s"), ".2f"),
                     _fmt(r.get("tp_macs_ratio"), ".2f") if "tp_macs_ratio" in r else _clip("fail: " + r.get("tp_error", ""), 40)]
        line.append(_clip(r["why"], WHY_WIDTH))
        table.append(line)
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def format_summary(summary: dict) -> str:
    text = (
        f"{summary['equivalent']}/{summary['total']} compiled with shrunk == masked (verified, and <= {TOLERANCE:.0e} "
        f"on a fresh input), {summary['mismatch']} mismatched, {summary['failed']} failed; "
        f"MACs ratio >= {RATIO_TO_EXPLAIN}: {summary['macs_ge_1_5']}/{summary['total']}; "
        f"median MACs ratio {_fmt(summary['median_macs_ratio'], '.2f')}, params {_fmt(summary['median_params_ratio'], '.2f')}; "
        f"frontends {summary['frontends']}; compile time summed {summary['compile_s_sum']:.1f} s "
        f"(+ verification {summary['verify_s_sum']:.1f} s); removed-channel noise check overflowed float32 "
        f"(passed in float64) on {summary['noise_overflow']}"
    )
    if "tp_handled" in summary:
        text += (
            f"\nTorch-Pruning: {summary['tp_handled']}/{summary['total']} handled, MACs ratio >= {RATIO_TO_EXPLAIN}: "
            f"{summary['tp_macs_ge_1_5']}, median {_fmt(summary['tp_median_macs_ratio'], '.2f')}; "
            f"over the {summary['both_handled']} models both handle: fxcompress {summary['both_fx_compile_s_sum']:.1f} s "
            f"(with verification {summary['both_fx_compile_verify_s_sum']:.1f} s), Torch-Pruning "
            f"{summary['both_tp_s_sum']:.1f} s, ratio fxcompress/TP {_fmt(summary['both_time_ratio_fx_over_tp'], '.2f')}"
        )
    return text


def format_blockers(ranked: list[dict], top: int = 15) -> str:
    table = [[e["construct"][:100], e["models"], e["top_in"], f"{e['mean_share']:.0%}", e["channels"],
              ", ".join(e["examples"])] for e in ranked[:top]]
    headers = ["freezing op (models < 1.5x)", "models", "largest in", "mean share", "channels", "examples"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


# ---------------------------------------------------------------------------- command line


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated timm model names (default: the smallest of every module)")
    parser.add_argument("--modules", help="comma-separated timm module names to take the smallest model of")
    parser.add_argument("--limit", type=int, help="only the first N models")
    parser.add_argument("--size", type=int, help=f"input side for every model (default: its pretrained config's, max {MAX_SIZE})")
    parser.add_argument("--sparsity", type=float, default=0.5, help="L1Norm sparsity and TP pruning_ratio (default 0.5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto", help="fxcompress.compile's frontend")
    parser.add_argument("--peer", choices=("tp",), help="also run Torch-Pruning on every model, in the same process")
    parser.add_argument("--timeout", type=float, help="seconds per model and tool (SIGALRM); a model past it is a FAIL row")
    parser.add_argument("--max-gb", type=float,
                        help="resident memory (GB) past which a model is stopped and becomes a FAIL row (Linux)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each tool this many times per model (fresh model, alternating order); medians")
    parser.add_argument("--json", metavar="PATH", help="also write rows, summary and blocker ranking as JSON")
    return parser.parse_args(argv)


def _specs(args: argparse.Namespace) -> list[TimmSpec]:
    if args.models:
        timm = _timm()
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in timm.list_models()]
        if unknown:
            raise SystemExit(f"unknown timm model(s): {', '.join(unknown)}")
        from timm.models import _registry as registry

        chosen = [TimmSpec(n, registry._model_to_module.get(n, "")) for n in names]
    else:
        modules = [m.strip() for m in args.modules.split(",")] if args.modules else None
        chosen = smallest_per_module(modules)
    chosen = chosen[: args.limit] if args.limit else chosen
    return [spec(s.name, s.module, args.size, s.params) for s in chosen]


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    specs = _specs(args)
    header = {"command": " ".join(["python", "tools/zoo_timm.py", *(argv if argv is not None else sys.argv[1:])]),
              "commit": _commit(), "timm": _timm().__version__, "torch": torch.__version__,
              "sparsity": args.sparsity, "threads": args.threads, "repeat": args.repeat, "frontend": args.frontend, "peer": args.peer}

    def write(rows: list[dict]) -> None:
        if args.json:
            data = {**header, "rows": rows, "summary": summarize(rows), "blockers": rank_blockers(rows)}
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)

    rows = sweep(specs, args.sparsity, args.frontend, args.peer, args.timeout, args.max_gb, args.repeat, on_row=write)
    summary = summarize(rows)
    print(format_table(rows, peer=args.peer == "tp"))
    print()
    print(format_summary(summary))
    print()
    print(format_blockers(rank_blockers(rows)))
    return 0 if summary["equivalent"] == summary["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
