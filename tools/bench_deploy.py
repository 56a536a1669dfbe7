"""Deployment speed: pruning and int8, alone and together, in eager PyTorch, torch.compile and ONNX Runtime (issue 19).

One process, batch 1, ``--threads`` (2) threads for PyTorch and ONNX Runtime
alike. Every row of a model is timed with ``torch.utils.benchmark``
(``blocked_autorange``) once per round, rounds interleaved, and reports the
median over rounds of the per-round medians. Rows (``--rows``):

- ``dense-eager``, ``dense-compile``: the model; ``torch.compile`` (Inductor, frozen);
- ``pruned-eager``: fxcompress ``standard_pruning(L1Norm(0.5))`` + fold-batch-norm + channels-last;
  ``pruned-compile``: the shrunk model under ``torch.compile``;
- ``int8-ort``, ``int8-compile``: fxcompress PTQ (fold-batch-norm, MinMax-calibrated per-channel int8 weights,
  uint8 activations; ``tools/bench_quant.py``'s recipe) folded to QDQ for ONNX Runtime, or to the PT2E form for
  ``fxcompress.quant.inductor.compile`` (oneDNN int8 kernels). Each runtime gets its placement: ONNX Runtime's
  quantizes the activations around adds, matmuls, pools and ``cat`` too (``QConfig.functional=True``, its
  int8 kernels for those keep blocks in int8); Inductor's only the weighted layers' (``functional=False``:
  its int8 convs and linears take float post-ops, and it runs attention's matmuls in float);
- ``ort-quantize-static``: ONNX Runtime's own ``quantize_static`` on the float ONNX model, same calibration data,
  the fastest of :data:`ORT_SETTINGS` here;
- ``pruned-int8-ort``, ``pruned-int8-compile``: both, on the shrunk model;
- ``torch-pruning``: Torch-Pruning's L1 result (``tools/bench_compile.py``'s call) with ``torch.fx`` conv-bn
  fusion and channels-last (the pruning peer);
- ``torchao-pt2e``: torchao's PT2E flow with ``X86InductorQuantizer`` under ``torch.compile`` (the quantization
  peer); a failure is printed in its row.

Models (``--models``): torchvision ResNet-50 and MobileNetV3-Large at 224x224 (random weights, BatchNorm
statistics settled on random images so activations keep a trained model's scale), ``transformers.BertModel``
at BERT-base's shape on 128 tokens (through ``torch.export``, which calls its linear layers as functions),
the same encoder written with ``nn.Linear`` modules (``encoder-base``), and ``small-cnn``
for tests. Every compile row runs frozen (``torch._inductor.config.freezing``), as PT2E int8 needs.

Columns: median ms, speed-up against dense eager, MACs ratio (dense / row's model), ``err`` (largest absolute
difference from the row's reference, over the reference's largest absolute value: the float or fake-quantized
model it must reproduce), ``int8 vs float`` (the same measure against the float model an int8 row quantizes)
and a note (kernels used, the ORT setting, errors). An int8 row's ``err`` grows with depth on random-weight
models: where oneDNN's requantization rounds a value to the other side of a grid midpoint, the next layers
spread that one-step difference (MobileNetV3-Large: 0.02 % of values differ after 3 blocks, most after 8).

    python tools/bench_deploy.py                 # ResNet-50, MobileNetV3-Large, BERT-base, BERT-base-shaped encoder
    python tools/bench_deploy.py --models resnet50 --rows dense-eager int8-compile --json out.json
    python tools/bench_deploy.py --quick --models small-cnn       # smoke test, seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.fx.experimental.optimization
from tabulate import tabulate
from torch import nn
from torch.utils import benchmark

import fxcompress
from bench_compile import run_torch_pruning
from bench_latency import INFERENCE_PASSES
from bench_quant import fxcompress_simulated, ort_int8
from fxcompress.errors import ConfigError
from fxcompress.export import onnx_session, to_onnx
from fxcompress.passes import standard_pruning
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.fold_qdq import FoldQDQ
from fxcompress.prune import L1Norm
from fxcompress.quant import Quantizer, inductor
from fxcompress.report import count_macs

ROWS = ("dense-eager", "dense-compile", "pruned-eager", "pruned-compile", "int8-ort", "ort-quantize-static",
        "int8-compile", "pruned-int8-ort", "pruned-int8-compile", "torch-pruning", "torchao-pt2e")

#: ``quantize_static`` settings tried for the ``ort-quantize-static`` row; the fastest is kept.
ORT_SETTINGS: dict[str, dict] = {
    "QDQ per-channel": {},
    "QDQ per-tensor": {"per_channel": False},
    "QOperator per-channel": {"quant_format": "QOperator"},
}

#: The inference passes of the pruned eager row (what ``tools/bench_latency.py`` times as its fastest).
PRUNED_PASSES = "fold-batch-norm,channels-last"


# ---------------------------------------------------------------------------- models


class BertEncoder(nn.Module):
    """``transformers.BertModel`` (random weights) returning ``last_hidden_state``, one tensor to compare and export."""

    def __init__(self, **config) -> None:
        super().__init__()
        import transformers

        self.bert = transformers.BertModel(transformers.BertConfig(**config), add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids).last_hidden_state


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[bool], nn.Module]
    #: one input batch (seeded) for the given quick flag and seed
    inputs: Callable[[bool, int], torch.Tensor]
    frontend: str = "auto"


def _image(size: int, quick_size: int, channels: int = 3) -> Callable[[bool, int], torch.Tensor]:
    def make(quick: bool, seed: int) -> torch.Tensor:
        side = quick_size if quick else size
        return torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(seed))

    return make


def _tokens(quick: bool, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (1, 16 if quick else 128), generator=torch.Generator().manual_seed(seed))


def _torchvision(name: str, size: int, quick_size: int) -> Callable[[bool], nn.Module]:
    def build(quick: bool) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        side = quick_size if quick else size
        return settle_batch_norm(model, torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(99)))

    return build


def settle_batch_norm(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to ``batch``'s, in eval mode.

    Freshly initialised statistics (mean 0, variance 1) let activations shrink
    layer after layer: random-weight MobileNetV3-Large outputs about 1e-10,
    which makes every int8 error relative to the output meaningless. Settled
    statistics keep activations near unit scale, as a trained model's are.
    """
    norms = {m: m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calls below
    model.train()
    with torch.no_grad():
        for chunk in batch.split(2):
            model(chunk)
    for norm, momentum in norms.items():
        norm.momentum = momentum
    return model.eval()


def _bert(quick: bool) -> nn.Module:
    tiny = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=256, vocab_size=1000)
    return BertEncoder(**(tiny if quick else {})).eval()


def _encoder(quick: bool) -> nn.Module:
    from bench_quant import TinyBert

    return (TinyBert(layers=2, d=128, heads=4, ffn=256) if quick else TinyBert(layers=12, d=768, heads=12,
                                                                                 ffn=3072)).eval()


def _embedded(quick: bool, seed: int) -> torch.Tensor:
    return torch.randn(1, 16 if quick else 128, 128 if quick else 768, generator=torch.Generator().manual_seed(seed))


def _small_cnn(quick: bool) -> nn.Module:
    from fxcompress.examples import SmallCNN

    return SmallCNN().eval()


MODELS: dict[str, Case] = {
    "resnet50": Case(_torchvision("resnet50", 224, 64), _image(224, 64)),
    "mobilenet_v3_large": Case(_torchvision("mobilenet_v3_large", 224, 64), _image(224, 64)),
    "bert-base": Case(_bert, _tokens, frontend="export"),
    # BERT-base's encoder written with nn.Linear modules (tools/bench_quant.py's TinyBert at 12 x 768, 12 heads,
    # FFN 3072, on 128 embedded tokens), the same computation as BertModel's without its export graph
    "encoder-base": Case(_encoder, _embedded),
    "small-cnn": Case(_small_cnn, _image(28, 28, channels=1)),
}


# ---------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Row:
    """One way to run the model: how to call it, the torch module its MACs are counted on, its reference."""

    key: str
    run: Callable[[torch.Tensor], torch.Tensor] | None = None
    macs_model: nn.Module | None = None
    reference: str | None = None  # a key of Builder.references
    float_reference: str | None = None  # the float model an int8 row quantizes ("dense" or "pruned")
    note: str = ""
    count_kernels: bool = False  # read the oneDNN int8 kernels from Inductor's code into the note
    ms: float | None = None
    speedup: float | None = None
    macs_ratio: float | None = None
    err: float | None = None
    float_err: float | None = None

    def table_row(self) -> list:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        return [self.key, fmt(self.ms, ".2f"), fmt(self.speedup, ".2f"), fmt(self.macs_ratio, ".2f"),
                fmt(self.err, ".1e"), self.reference or "-", fmt(self.float_err, ".1e"), self.note]

    def to_json(self) -> dict:
        keys = ("key", "ms", "speedup", "macs_ratio", "err", "reference", "float_err", "float_reference", "note")
        return {k: getattr(self, k) for k in keys}


def _reference(pruned: bool, form: str) -> str:
    """The name of the fake-quantized model an int8 row of ``form`` ("onnx" or "pt2e") was folded from."""
    return f"{'pruned ' if pruned else ''}fake-quant{' (inductor)' if form == 'pt2e' else ''}"


def _eager(model: nn.Module) -> Callable:
    def run(x):
        with torch.no_grad():
            return model(x)

    return run


def _ort(path: str, threads: int) -> Callable:
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


def _warnings_off():
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("ignore")
    return context


class Builder:
    """Builds the requested rows of one model, sharing the intermediate models between rows."""

    def __init__(self, case: Case, args: argparse.Namespace, workdir: Path) -> None:
        torch.manual_seed(args.seed)
        self.case, self.args, self.workdir = case, args, workdir
        self.model = case.build(args.quick)
        self.x = case.inputs(args.quick, 0)
        self.batches = [case.inputs(args.quick, 1 + i) for i in range(args.calibration_batches)]
        self.cache: dict[str, object] = {}
        #: reference label -> module whose output a row must reproduce
        self.references: dict[str, nn.Module] = {"dense": self.model}

    def _once(self, key: str, make: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def _compile(self, model: nn.Module, passes: list) -> nn.Module:
        return fxcompress.compile(model, self.x, passes, verify=False, frontend=self.case.frontend).eval()

    def shrunk(self) -> nn.Module:
        return self._once("shrunk", lambda: self._compile(self.model, standard_pruning(L1Norm(self.args.sparsity))))

    def simulated(self, pruned: bool, form: str) -> nn.Module:
        """The fake-quantized dense or shrunk model for ``form``'s runtime (one calibration each), registered as
        a reference: ONNX Runtime's placement quantizes adds, matmuls, pools and ``cat`` too (its int8 kernels
        for them keep whole blocks in int8); Inductor's (``functional=False``) only the weighted layers, whose
        int8 kernels take float post-ops, as torchao's ``X86InductorQuantizer`` does."""
        def make():
            source = self.shrunk() if pruned else self.model
            gm = fxcompress_simulated(source, self.batches, functional=form != "pt2e", frontend=self.case.frontend)
            if not any(isinstance(m, Quantizer) for m in gm.modules()):
                raise ConfigError(f"fxcompress placed no quantizer: the {self.case.frontend} frontend's graph calls "
                                  "linear layers as functions, and QConfig quantizes nn.Linear/Conv modules")
            self.references[_reference(pruned, form)] = gm
            return gm

        return self._once(f"simulated-{pruned}-{form}", make)

    def folded(self, pruned: bool, form: str) -> nn.Module:
        sim = self.simulated(pruned, form)
        return self._once(f"folded-{pruned}-{form}", lambda: fxcompress.compile(sim, self.x, [FoldQDQ(form=form)],
                                                                                 verify=False))

    def float_onnx(self) -> str:
        def make():
            path = str(self.workdir / "float.onnx")
            to_onnx(self._compile(self.model, [FoldBatchNorm()]), self.x, path)
            return path

        return self._once("float-onnx", make)

    # ------------------------------------------------------------------ one method per row

    def dense_eager(self) -> Row:
        return Row("dense-eager", _eager(self.model), self.model, note="torch eager, no_grad")

    def dense_compile(self) -> Row:
        return Row("dense-compile", inductor.compile(copy.deepcopy(self.model)), self.model, "dense",
                   note="torch.compile, freezing")

    def pruned_eager(self) -> Row:
        self.references["pruned"] = self.shrunk()
        gm = self._compile(self.shrunk(), list(INFERENCE_PASSES[PRUNED_PASSES]))
        return Row("pruned-eager", _eager(gm), gm, "pruned", note=f"L1 {self.args.sparsity} + {PRUNED_PASSES}")

    def pruned_compile(self) -> Row:
        self.references["pruned"] = self.shrunk()
        return Row("pruned-compile", inductor.compile(copy.deepcopy(self.shrunk())), self.shrunk(), "pruned",
                   note="torch.compile, freezing")

    def _int8_ort(self, pruned: bool) -> Row:
        path = str(self.workdir / f"int8-{pruned}.onnx")
        result = to_onnx(self.folded(pruned, "onnx"), self.x, path)
        key = "pruned-int8-ort" if pruned else "int8-ort"
        return Row(key, _ort(path, self.args.threads), self.shrunk() if pruned else self.model, _reference(pruned, "onnx"),
                   "pruned" if pruned else "dense", note=f"QDQ, to_onnx error {result.max_error:.1e}")

    def _int8_compile(self, pruned: bool) -> Row:
        gm = self.folded(pruned, "pt2e")
        key = "pruned-int8-compile" if pruned else "int8-compile"
        return Row(key, inductor.compile(gm), self.shrunk() if pruned else self.model, _reference(pruned, "pt2e"),
                   "pruned" if pruned else "dense", count_kernels=True)

    def int8_ort(self) -> Row:
        return self._int8_ort(False)

    def pruned_int8_ort(self) -> Row:
        return self._int8_ort(True)

    def int8_compile(self) -> Row:
        return self._int8_compile(False)

    def pruned_int8_compile(self) -> Row:
        return self._int8_compile(True)

    def ort_quantize_static(self) -> Row:
        settings = ORT_SETTINGS if not self.args.quick else dict(list(ORT_SETTINGS.items())[:1])
        best = None
        from onnxruntime.quantization import QuantFormat

        for i, (label, options) in enumerate(settings.items()):
            path = str(self.workdir / f"ort-{i}.onnx")
            options = {k: (QuantFormat[v] if k == "quant_format" else v) for k, v in options.items()}
            caveat = ort_int8(self.float_onnx(), path, self.batches, **options)
            run = _ort(path, self.args.threads)
            ms = _median_ms(run, self.x, self.args.threads, self.args.min_time)
            if best is None or ms < best[0]:
                best = (ms, label + (f", {caveat}" if caveat else ""), run)
        return Row("ort-quantize-static", best[2], self.model, "dense", "dense", note=f"fastest: {best[1]}")

    def torch_pruning(self) -> Row:
        pruned = run_torch_pruning(copy.deepcopy(self.model), self.x, self.args.sparsity)
        self.references["torch-pruning"] = pruned
        note = "Torch-Pruning L1 + fx conv-bn fusion + channels-last"
        try:
            fused = torch.fx.experimental.optimization.fuse(copy.deepcopy(pruned))
        except Exception as error:  # noqa: BLE001 - models torch.fx cannot trace (Hugging Face) run unfused
            fused, note = copy.deepcopy(pruned), f"Torch-Pruning L1, unfused (fx cannot trace it: {type(error).__name__})"
        fused = fused.to(memory_format=torch.channels_last)
        return Row("torch-pruning", _eager(fused), pruned, "torch-pruning", note=note)

    def torchao_pt2e(self) -> Row:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        exported = torch.export.export(copy.deepcopy(self.model), (self.x,)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for batch in self.batches:
            prepared(batch)
        converted = convert_pt2e(prepared)
        return Row("torchao-pt2e", inductor.compile(converted), self.model, "dense", "dense", count_kernels=True)

    def build(self, key: str) -> Row:
        """The row, or a row whose note says why it could not be built."""
        context = _warnings_off()
        try:
            return getattr(self, key.replace("-", "_"))()
        except Exception as error:  # noqa: BLE001 - one failing row must not stop the others
            if self.args.debug:
                traceback.print_exc()
            line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return Row(key, note=f"fails: {type(error).__name__}: {line[:160]}")
        finally:
            context.__exit__(None, None, None)


# ---------------------------------------------------------------------------- measurement


def _median_ms(run: Callable, x: torch.Tensor, threads: int, min_time: float) -> float:
    timer = benchmark.Timer(stmt="run(x)", globals={"run": run, "x": x}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def _check(builder: Builder, row: Row) -> None:
    """Warm the row up (compiles), read its kernels and its error against its reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if row.count_kernels:
            from torch._inductor.utils import run_and_get_code

            out, code = run_and_get_code(row.run, builder.x)
            counts = inductor.int8_kernels(code)
            row.note = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "no int8 kernels"
        else:
            out = row.run(builder.x)
        for _ in range(2):
            row.run(builder.x)
        with torch.no_grad():
            if row.reference is not None:
                row.err = inductor.relative_error(out, builder.references[row.reference](builder.x))
            if row.float_reference is not None:
                builder.references["pruned"] = builder.shrunk()
                row.float_err = inductor.relative_error(out, builder.references[row.float_reference](builder.x))


def bench_model(name: str, args: argparse.Namespace) -> list[Row]:
    case = MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        builder = Builder(case, args, Path(tmp))
        rows = []
        for key in args.rows:
            row = builder.build(key)
            if row.run is not None:
                try:
                    _check(builder, row)
                except Exception as error:  # noqa: BLE001
                    line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
                    row.note, row.run, row.reference = f"fails when run: {type(error).__name__}: {line}", None, None
            rows.append(row)
            print(f"  built {name} {key}" + (f" ({row.note})" if row.run is None else ""), file=sys.stderr)
        live = [r for r in rows if r.run is not None]
        samples: dict[str, list[float]] = {r.key: [] for r in live}
        for _ in range(args.rounds):
            for row in live:
                samples[row.key].append(_median_ms(row.run, builder.x, args.threads, args.min_time))
        dense_macs = count_macs(builder.model, (builder.x,))
        for row in live:
            row.ms = float(np.median(samples[row.key]))
            row.macs_ratio = dense_macs / count_macs(row.macs_model, (builder.x,))
        base = next((r.ms for r in live if r.key == "dense-eager"), None)
        for row in live:
            row.speedup = base / row.ms if base else None
    return rows


def checks(rows: list[Row]) -> list[str]:
    """Issue 19's targets that the rows of one model can answer, as lines (ratios of medians)."""
    by = {r.key: r for r in rows if r.ms is not None}
    lines = []

    def ratio(a: str, b: str) -> float | None:
        return by[b].ms / by[a].ms if a in by and b in by else None

    best = [k for k in ("pruned-int8-ort", "pruned-int8-compile") if k in by]
    if best and "dense-eager" in by:
        k = min(best, key=lambda k: by[k].ms)
        lines.append(f"pruned + int8, best runtime ({k}): {by[k].speedup:.2f}x dense eager (target >= 8 on ResNet-50)")
    for a, b, target in (("int8-compile", "dense-compile", ">= 2.5 on ResNet-50"),
                         ("int8-compile", "torchao-pt2e", ">= 1"), ("int8-ort", "ort-quantize-static", ">= 1"),
                         ("pruned-eager", "torch-pruning", ">= 1.1 on ResNet-50")):
        r = ratio(a, b)
        if r is not None:
            lines.append(f"{a} vs {b}: {r:.2f}x (target {target})")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["resnet50", "mobilenet_v3_large",
                                                                               "bert-base", "encoder-base"])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 64x64 images, a 2-layer BERT at 16 tokens, 2 calibration batches, one "
                             "round of short timings, one ORT setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calibration-batches", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds, interleaved (default 5, quick 1)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of blocked_autorange per row and round (default 1.0, quick 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failing row")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    defaults = dict(calibration_batches=(2, 8), rounds=(1, 5), min_time=(0.05, 1.0))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "torch": torch.__version__, "models": {}}
    for name in args.models:
        rows = bench_model(name, args)
        lines = checks(rows)
        report["models"][name] = {"rows": [r.to_json() for r in rows], "checks": lines}
        print(f"\n{name}: batch 1, {args.threads} threads, median of {args.rounds} interleaved rounds "
              f"(torch.utils.benchmark); speed-up against dense eager")
        headers = ["row", "ms", "speed-up", "MACs ratio", "err", "ref", "int8 vs float", "note"]
        print(tabulate([r.table_row() for r in rows], headers=headers, disable_numparse=True))
        for line in lines:
            print("  " + line, flush=True)
        if args.json:  # after every model, so a long run that is stopped keeps what it measured
            args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
