"""Recovery fine-tuning by logit distillation: the loss, the budget, determinism, and that it moves the student
toward the teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from fxcompress.errors import ConfigError  # noqa: E402 - after the skip
from fxcompress.examples_llm import stdlib_corpus  # noqa: E402
from llm_helpers import trained_teacher  # noqa: E402
from fxcompress.prune import Recovery, distillation_loss, recover, remove_layers, token_windows  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def teacher():
    return trained_teacher()


def _data():
    return token_windows(stdlib_corpus().split("train")[:200_000], batch_size=4, seq_len=32)


def _held_out():
    return token_windows(stdlib_corpus().split("valid")[:50_000], 8, 32)(torch.Generator().manual_seed(5))


def _kl(student, teacher, x) -> float:
    with torch.no_grad():
        return float(distillation_loss(student(x).logits, teacher(x).logits))


def test_distillation_loss_is_t2_kl_plus_weighted_next_token_ce():
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    ids = torch.randint(0, 7, (2, 5), generator=generator)
    p = F.softmax(t / 2, -1)
    kl = (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert float(distillation_loss(s, t, 2.0)) == pytest.approx(float(kl), rel=1e-5)
    assert float(distillation_loss(s, t, 2.0, ids, ce_weight=0.5)) == pytest.approx(float(kl + 0.5 * ce), rel=1e-5)
    assert float(distillation_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="input_ids"):
        distillation_loss(s, t, ce_weight=1.0)


def test_recovery_lowers_the_depth_pruned_students_kl_to_the_teacher(teacher):
    student = remove_layers(teacher, [1])
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = _held_out()
    before = _kl(student, teacher, x)
    result = recover(student, teacher, _data(), Recovery(steps=25, lr=3e-3))
    after = _kl(student, teacher, x)
    assert result.steps == 25 and result.stopped_by == "steps" and len(result.losses) == 25
    assert result.trainable_params == sum(p.numel() for p in student.parameters())  # every weight trains
    assert after < 0.6 * before, (before, after)  # on held-out text, not the batches trained on
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())  # the teacher is untouched
    assert not student.training and not teacher.training and all(math.isfinite(v) for v in result.losses)


def test_recovery_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(teacher):
    runs = []
    for seed in (0, 0, 1):
        student = remove_layers(teacher, [2])
        torch.manual_seed(123)
        result = recover(student, teacher, _data(), Recovery(steps=4, seed=seed))
        runs.append((result.losses, student.state_dict(), torch.rand(1)))
    assert runs[0][0] == runs[1][0] and runs[0][0] != runs[2][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    assert torch.equal(runs[0][2], runs[2][2])  # the caller's random stream continues as if recover had not run


def test_the_wall_clock_budget_stops_training_and_a_list_of_batches_is_cycled(teacher):
    student = remove_layers(teacher, [1])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = recover(student, teacher, _data(), Recovery(minutes=1e-9))
    assert (result.steps, result.stopped_by) == (0, "minutes")
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    seen = []
    batches = [_held_out()[:2], _held_out()[2:4]]
    student.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    recover(student, teacher, batches, Recovery(steps=3, ce_weight=1.0))
    assert [torch.equal(s, b) for s, b in zip(seen, batches * 2)] == [True, True, True]


def test_recovery_refuses_settings_without_a_budget():
    with pytest.raises(ConfigError, match="budget"):
        Recovery()
    with pytest.raises(ConfigError, match="minutes"):
        Recovery(minutes=0)
    with pytest.raises(ConfigError, match="window"):
        token_windows(torch.arange(10), 2, 10)


def test_a_step_that_would_end_past_the_budget_is_not_started(teacher, monkeypatch):
    """Each step takes 1 s of a fake clock; a 4.5 s budget runs 4 steps and stops inside it, not after a fifth."""
    import importlib

    clock = {"now": 0.0}
    module = importlib.import_module("fxcompress.prune.recover")
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock["now"])
    student = remove_layers(teacher, [1])
    student.register_forward_pre_hook(lambda *_: clock.__setitem__("now", clock["now"] + 1.0))
    result = recover(student, teacher, _data(), Recovery(minutes=4.5 / 60))
    assert (result.steps, result.stopped_by) == (4, "minutes") and result.seconds <= 4.5
