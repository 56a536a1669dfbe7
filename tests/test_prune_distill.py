"""Layer-wise distillation between the original (teacher) and compressed (student) graphs, matched by node name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxcompress
from fxcompress import prune as P
from fxcompress.examples import SmallCNN
from fxcompress.passes import standard_pruning

torch.set_num_threads(2)
X = torch.randn(4, 1, 28, 28)


def model():
    torch.manual_seed(0)
    return SmallCNN(8, 16, 32).eval()


def test_layers_match_by_name_only_where_shapes_agree():
    m = model()
    teacher = fxcompress.trace(m, X)
    student = fxcompress.compile(m, X, standard_pruning(P.L1Norm(0.5, op_names=("conv2",))))
    kd = P.LayerwiseDistillation(teacher, student)
    assert "fc1" in kd.layers and "relu_2" in kd.layers and "conv1" in kd.layers  # unpruned
    assert "conv2" not in kd.layers and "bn2" not in kd.layers  # 16 -> 8 channels
    assert "fc2" not in kd.layers  # the output is distilled through the logits term


def test_identical_student_has_zero_distillation_loss():
    m = model()
    kd = P.LayerwiseDistillation(fxcompress.trace(m, X), fxcompress.trace(m, X))
    kd.student.eval()
    assert kd(kd.student, (X, None)).item() == pytest.approx(0.0, abs=1e-6)


def test_training_with_distillation_pulls_the_student_towards_the_teacher():
    m = model()
    teacher = fxcompress.trace(m, X)
    student = fxcompress.compile(m, X, standard_pruning(P.L1Norm(0.5)))
    kd = P.LayerwiseDistillation(teacher, student, task_loss=lambda out, b: F.cross_entropy(out, b[1]))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))] * 4
    student.eval()
    before = kd(student, data[0]).item()
    P.Evaluator(data, loss=kd, progress=False).train(student, epochs=3)
    student.eval()
    assert kd(student, data[0]).item() < before


def test_unknown_layer_is_a_clear_error():
    m = model()
    with pytest.raises(fxcompress.ConfigError, match="nope"):
        P.LayerwiseDistillation(fxcompress.trace(m, X), fxcompress.trace(m, X), layers=("nope",))
