"""fold-batch-norm: eval-mode BatchNorms disappear into the conv/linear before them, outputs unchanged."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress.passes import standard_pruning
from fxcompress.passes.fold_batch_norm import FoldBatchNorm, FoldBatchNormWarning
from fxcompress.pipeline import parse_pipeline
from fxcompress.prune import L1Norm


class ConvBnRelu(nn.Module):
    """Two conv-bn-relu blocks, the first conv without bias, the second with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(x)))


class LinearBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.bn = nn.BatchNorm1d(20)
        self.fc2 = nn.Linear(20, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class ConvOutputReused(nn.Module):
    """The conv output feeds the BatchNorm and a residual add: the add needs the un-normalised tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedBn(nn.Module):
    """One BatchNorm module called after two different convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


def module_types(gm: fx.GraphModule) -> Counter:
    return Counter(type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module")


def trained_stats(model: nn.Module, helpers) -> nn.Module:
    """Non-trivial running statistics and affine parameters, in eval mode (identity BNs would hide bugs)."""
    return helpers.randomize_norms(model).eval()


def test_folds_conv_bn_relu_and_keeps_outputs(helpers):
    model = trained_stats(ConvBnRelu(), helpers)
    x = torch.randn(2, 3, 10, 10)
    gm = fxcompress.trace(model, x)
    assert module_types(gm) == Counter(Conv2d=2, BatchNorm2d=2)
    result = FoldBatchNorm()(gm)
    gm.recompile()
    assert result.modified
    assert module_types(gm) == Counter(Conv2d=2)
    assert [n.op for n in gm.graph.nodes] == [
        "placeholder", "call_module", "call_function", "call_module", "call_function", "output"
    ]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    fresh = torch.randn(3, 3, 10, 10)
    helpers.outputs_agree(model, gm, (fresh,), rtol=1e-5)


def test_second_run_is_a_no_op(helpers):
    model = trained_stats(ConvBnRelu(), helpers)
    gm = fxcompress.compile(model, torch.randn(1, 3, 8, 8), [FoldBatchNorm()])
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    assert not FoldBatchNorm()(gm).modified
    assert gm.code == code
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_linear_batchnorm1d(helpers):
    model = trained_stats(LinearBn(), helpers)
    x = torch.randn(5, 12)
    gm = fxcompress.compile(model, x, [FoldBatchNorm()])
    assert module_types(gm) == Counter(Linear=2)
    helpers.outputs_agree(model, gm, (torch.randn(7, 12),), rtol=1e-5)


def test_linear_on_sequence_is_not_folded_into_batchnorm1d_over_another_dim(helpers):
    """Linear on (N, L, F) then BatchNorm1d normalises dim 1 (L), not the linear's features: no fold."""

    class SeqLinearBn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc(x))

    model = trained_stats(SeqLinearBn(), helpers)
    gm = fxcompress.compile(model, torch.randn(2, 6, 6), [FoldBatchNorm()])
    assert module_types(gm) == Counter(Linear=1, BatchNorm1d=1)


def test_conv_output_used_elsewhere_is_left_alone(helpers):
    model = trained_stats(ConvOutputReused(), helpers)
    gm = fxcompress.trace(model, torch.randn(1, 4, 6, 6))
    assert not FoldBatchNorm()(gm).modified
    assert module_types(gm) == Counter(Conv2d=1, BatchNorm2d=1)


def test_batchnorm_shared_by_two_convs_is_left_alone(helpers):
    model = trained_stats(SharedBn(), helpers)
    gm = fxcompress.trace(model, torch.randn(1, 4, 6, 6))
    assert not FoldBatchNorm()(gm).modified
    assert module_types(gm) == Counter(Conv2d=2, BatchNorm2d=2)


def test_training_mode_is_skipped_with_a_warning(helpers):
    """Documented behaviour: a training-mode BatchNorm is skipped (not folded) and named in a warning."""
    model = helpers.randomize_norms(ConvBnRelu()).train()
    gm = fxcompress.trace(model, torch.randn(2, 3, 8, 8))
    with pytest.warns(FoldBatchNormWarning, match=r"2 BatchNorm\(s\) in training mode .*'bn1', 'bn2'"):
        assert not FoldBatchNorm()(gm).modified
    assert module_types(gm) == Counter(Conv2d=2, BatchNorm2d=2)


def test_masked_model_is_skipped_and_shrunk_model_folds(helpers):
    model = trained_stats(ConvBnRelu(), helpers)
    x = torch.randn(2, 3, 8, 8)
    masked = fxcompress.compile(model, x, helpers.masked_pipeline(L1Norm(0.5)))
    with pytest.warns(FoldBatchNormWarning, match="run fold-batch-norm after shrink"):
        assert not FoldBatchNorm()(masked).modified
    folded = fxcompress.compile(model, x, [*standard_pruning(L1Norm(0.5)), FoldBatchNorm()])
    assert module_types(folded) == Counter(Conv2d=2)
    helpers.outputs_agree(masked, folded, (torch.randn(2, 3, 8, 8),), rtol=1e-5)


def test_text_pipeline_and_verification_on_resnet18(helpers):
    torchvision = pytest.importorskip("torchvision")
    model = helpers.randomize_norms(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxcompress.compile(model, x, "fold-batch-norm")
    assert module_types(gm)["BatchNorm2d"] == 0
    assert module_types(gm)["Conv2d"] == 20
    helpers.outputs_agree(model, gm, (torch.randn(1, 3, 32, 32),), rtol=1e-4)


def test_user_model_untouched_and_folded_model_trains_and_saves(helpers, tmp_path):
    model = trained_stats(ConvBnRelu(), helpers)
    reference = copy.deepcopy(model.state_dict())
    gm = fxcompress.compile(model, torch.randn(1, 3, 8, 8), parse_pipeline("fold-batch-norm"))
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    assert gm.conv1.bias.requires_grad  # the bias created by folding is trainable like the weight
    gm.train()
    gm(torch.randn(2, 3, 8, 8)).sum().backward()
    assert gm.conv1.weight.grad is not None and gm.conv1.bias.grad is not None
    torch.save(gm, tmp_path / "folded.pt")
    loaded = torch.load(tmp_path / "folded.pt", weights_only=False)
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(loaded.eval()(x), gm.eval()(x))


@pytest.mark.parametrize(
    "layer, bn, shape",
    [
        (nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 9)),
        (nn.Conv3d(2, 4, 3, groups=2), nn.BatchNorm3d(4), (1, 2, 5, 5, 5)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), (1, 4, 5, 5)),
        (nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4), (1, 4, 6, 6)),  # depthwise
    ],
)
def test_fold_table_entries(layer, bn, shape, helpers):
    model = trained_stats(nn.Sequential(layer, bn), helpers)
    gm = fxcompress.compile(model, torch.randn(shape), [FoldBatchNorm()])
    assert module_types(gm) == Counter({type(layer).__name__: 1})
    helpers.outputs_agree(model, gm, (torch.randn(shape),), rtol=1e-5)


def test_grouped_transposed_conv_is_left_alone(helpers):
    model = trained_stats(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), helpers)
    gm = fxcompress.trace(model, torch.randn(1, 4, 5, 5))
    assert not FoldBatchNorm()(gm).modified


def test_affine_free_batchnorm_folds_and_statless_one_is_skipped(helpers):
    affine_free = trained_stats(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), helpers)
    gm = fxcompress.compile(affine_free, torch.randn(1, 3, 5, 5), [FoldBatchNorm()])
    assert module_types(gm) == Counter(Conv2d=1)
    helpers.outputs_agree(affine_free, gm, (torch.randn(2, 3, 5, 5),), rtol=1e-5)
    statless = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    gm = fxcompress.trace(statless, torch.randn(2, 3, 5, 5))
    with pytest.warns(FoldBatchNormWarning, match="without running statistics"):
        assert not FoldBatchNorm()(gm).modified
