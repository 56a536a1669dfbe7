"""Training-aware pruning: fixed masks in fine-tuning, schedules, movement, ADMM, lottery ticket, BN recalibration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import prune as P
from fxcompress.masks import current_masks
from fxcompress.passes import AnalyzeGroups, InsertMasks, PropagateChannels

torch.set_num_threads(2)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


X = torch.randn(2, 1, 8, 8)


def evaluator(n_batches=6, seed=0) -> P.Evaluator:
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n_batches)]
    return P.Evaluator(data, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), progress=False)


def traced():
    torch.manual_seed(0)
    return fxcompress.trace(Tiny(), X)


def sparsity(mask):
    return 1.0 - float(mask.mean())


def test_masked_weights_stay_zero_through_optimizer_steps():
    masked = fxcompress.compile(Tiny(), X, [InsertMasks(P.L1Norm(0.5)), AnalyzeGroups(), PropagateChannels()])
    before = {n: p.detach().clone() for n, p in masked.named_parameters()}
    evaluator().train(masked, epochs=1)
    for name, mask in current_masks(masked).items():
        owner, attr = name.rsplit(".", 1)
        module = masked.get_submodule(owner)
        assert torch.all(getattr(module, attr)[mask == 0] == 0)
        orig = getattr(module, attr + "_orig")
        assert not torch.equal(orig[mask == 1], before[f"{owner}.{attr}_orig"][mask == 1])  # the rest trained
    small = fxcompress.shrink(masked)
    assert small.conv1.weight.shape[0] == 4


def test_schedules_follow_their_formulas():
    assert P.LinearSchedule(end_step=100).sparsity_at(50, 0.8) == pytest.approx(0.4)
    assert P.AGPSchedule(end_step=100).sparsity_at(50, 0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert P.AGPSchedule(end_step=100, start_step=10).sparsity_at(5, 0.8) == 0.0
    assert P.AGPSchedule(end_step=100).sparsity_at(1000, 0.8) == pytest.approx(0.8)


@pytest.mark.parametrize("schedule", [P.LinearSchedule(end_step=4), P.AGPSchedule(end_step=4)])
def test_scheduled_structured_pruning_grows_to_the_final_sparsity(schedule):
    scheduled = P.ScheduledPruning(P.L1Norm(0.75), schedule, every=1)
    seen = [scheduled.pruner_at(step).sparsity for step in range(6)]
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 0.75
    gm = traced()
    scheduled.run(gm, evaluator(), epochs=1)
    small = fxcompress.shrink(gm)
    assert small.conv1.weight.shape[0] == 8 - math.floor(8 * 0.75)
    assert small.conv2.weight.shape[0] == 2


def test_scheduled_per_group_sparsities_each_follow_the_schedule():
    from fxcompress.auto import PerGroupSparsity

    final = {"conv1.weight[0]": 0.75, "conv2.weight[0]": 0.5}
    scheduled = P.ScheduledPruning(PerGroupSparsity(P.FPGM(), final), P.LinearSchedule(end_step=4), every=1)
    assert scheduled.pruner_at(2).sparsities == {"conv1.weight[0]": 0.375, "conv2.weight[0]": 0.25}
    gm = traced()
    scheduled.run(gm, evaluator(), epochs=1)
    small = fxcompress.shrink(gm)
    assert (small.conv1.weight.shape[0], small.conv2.weight.shape[0]) == (2, 4)


def test_scheduled_pruning_rejects_a_pruner_without_sparsity():
    with pytest.raises(fxcompress.ConfigError, match="sparsities mapping"):
        P.ScheduledPruning(P.Combined(()), P.LinearSchedule(end_step=4))


@pytest.mark.parametrize("criterion", ["random", "fpgm", "l1"])
def test_channels_masked_earlier_count_toward_the_next_sparsity(criterion):
    """Pruning a masked model again removes the earlier channels first, whatever the criterion's ranking."""
    gm = traced()
    earlier = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # channels 0 and 2 of conv1 gone
    fxcompress.masks.apply_masks(gm, {"conv1.weight": earlier.view(-1, 1, 1, 1).expand(8, 1, 3, 3).clone(),
                                      "conv1.bias": earlier.clone()})
    pruner = P.make_pruner(criterion, sparsity=0.5)
    fxcompress.masks.apply_masks(gm, pruner.compute_masks(gm, fxcompress.analysis.get_analysis(gm)))
    alive = gm.conv1.weight.detach().abs().sum((1, 2, 3)) != 0
    assert int(alive.sum()) == 4 and not alive[0] and not alive[2]


@pytest.mark.parametrize("criterion", ["random", "fpgm"])
def test_gradual_pruning_reaches_exactly_the_final_sparsity(criterion):
    gm = traced()
    P.ScheduledPruning(P.make_pruner(criterion, sparsity=0.75), P.LinearSchedule(end_step=5), every=1).run(
        gm, evaluator(), epochs=1)
    small = fxcompress.shrink(gm)
    assert small.conv1.weight.shape[0] == 2 and small.conv2.weight.shape[0] == 2


def test_scheduled_level_pruning():
    gm = traced()
    P.ScheduledPruning(P.LevelPruner(0.9), P.AGPSchedule(end_step=4), every=2).run(gm, evaluator(), epochs=1)
    masks = current_masks(gm)
    assert all(sparsity(m) == pytest.approx(int(m.numel() * 0.9) / m.numel()) for m in masks.values())


def test_movement_pruning_reaches_sparsity_per_layer():
    gm = traced()
    P.MovementPruning(0.9, schedule=P.AGPSchedule(end_step=4), every=2).run(gm, evaluator(), epochs=1)
    masks = current_masks(gm)
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert all(sparsity(m) == pytest.approx(int(m.numel() * 0.9) / m.numel()) for m in masks.values())


def test_movement_masks_keep_highest_scores_and_never_revive():
    gm = fxcompress.trace(nn.Sequential(nn.Linear(4, 1)), torch.randn(1, 4))
    scores = {"0.weight": torch.tensor([[4.0, 1.0, 3.0, 2.0]])}
    P.MovementPruning._mask(gm, scores, 0.5)
    assert current_masks(gm)["0.weight"].tolist() == [[1, 0, 1, 0]]
    scores["0.weight"] = torch.tensor([[1.0, 9.0, 3.0, 2.0]])  # a pruned weight now scores highest
    P.MovementPruning._mask(gm, scores, 0.75)
    assert current_masks(gm)["0.weight"].tolist() == [[0, 0, 1, 0]]


def test_admm_reaches_sparsity_and_projects_onto_largest_magnitudes():
    projected = P.training._project(torch.tensor([1.0, -4.0, 3.0, 0.5]), 0.5)
    assert projected.tolist() == [0.0, -4.0, 3.0, 0.0]
    gm = traced()
    P.ADMM(0.8, rho=1e-2, update_every=2).run(gm, evaluator(), epochs=1)
    masks = current_masks(gm)
    assert all(int((m == 0).sum()) == int(m.numel() * 0.8) for m in masks.values())


def test_lottery_ticket_prunes_globally_and_rewinds_to_the_saved_weights():
    assert P.LotteryTicket(0.875, rounds=3).ladder() == pytest.approx([0.5, 0.75, 0.875])
    gm = traced()
    initial = {n: p.detach().clone() for n, p in gm.named_parameters()}
    ev = evaluator()
    P.LotteryTicket(0.75, rounds=2, epochs_per_round=1).run(gm, ev, max_steps_per_round=3)
    masks = current_masks(gm)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) == int(total * 0.75)
    # rounds=1 and no final training: the ticket is exactly the initial weights under the mask
    gm = traced()
    P.LotteryTicket(0.5, rounds=1).run(gm, ev, max_steps_per_round=0)
    assert torch.equal(gm.fc.weight_orig, initial["fc.weight"])


def test_recalibrate_batchnorm_reestimates_statistics_without_training():
    gm = traced()
    ev = evaluator()
    weights = gm.conv1.weight.detach().clone()
    P.recalibrate_batchnorm(gm, ev, num_batches=3)
    with torch.no_grad():
        stacked = torch.cat([b[0] for b in ev.batches(3)])
        expected = gm.conv1(stacked).mean((0, 2, 3))
    assert torch.allclose(gm.bn1.running_mean, expected, atol=1e-5)
    assert torch.equal(gm.conv1.weight, weights)
    assert gm.bn1.momentum == 0.1


def test_cosine_schedule_anneals_the_learning_rate_to_zero_over_the_run():
    import dataclasses

    from fxcompress.errors import ConfigError

    seen = []

    def sgd(params, lr):
        seen.append(torch.optim.SGD(params, lr=lr))
        return seen[-1]

    ev = dataclasses.replace(evaluator(n_batches=4), lr=0.1, optimizer=sgd, lr_schedule="cosine")
    assert ev.train(traced(), epochs=2) == 8
    assert seen[-1].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    for epochs, max_steps, steps in ((2, 3, 3), (1, 30, 4)):  # it ends where training does: cap or data
        assert ev.train(traced(), epochs=epochs, max_steps=max_steps) == steps
        assert seen[-1].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    constant = dataclasses.replace(ev, lr_schedule="constant")
    constant.train(traced(), epochs=1)
    assert seen[-1].param_groups[0]["lr"] == 0.1
    generator_data = dataclasses.replace(ev, data=lambda: iter(evaluator().data))
    with pytest.raises(ConfigError, match="number of training steps"):
        generator_data.train(traced())
    with pytest.raises(ConfigError, match="unknown learning-rate schedule 'linear'"):
        dataclasses.replace(ev, lr_schedule="linear")
