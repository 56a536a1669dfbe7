"""channels-last: conv weights re-laid NHWC, views made layout-proof, outputs unchanged in value and strides."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress.passes import standard_pruning
from fxcompress.passes.channels_last import ChannelsLast
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.prune import L1Norm

CL = torch.channels_last


class ConvViewHead(nn.Module):
    """A conv trunk whose features are flattened with ``view`` (fails on an NHWC tensor) and also returned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        features = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(features.view(features.shape[0], -1)), features


def call_ops(gm: fx.GraphModule) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_method")


def test_weights_are_channels_last_and_graph_is_fixed_up(helpers):
    model = helpers.randomize_norms(ConvViewHead()).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = fxcompress.trace(model, x)
    assert call_ops(gm) == Counter(view=1)
    result = ChannelsLast()(gm)
    assert result.modified
    assert gm.conv1.weight.is_contiguous(memory_format=CL) and gm.conv2.weight.is_contiguous(memory_format=CL)
    assert call_ops(gm) == Counter(reshape=1, contiguous=1)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert [a.target for a in output.args[0]] == ["fc", "contiguous"]


def test_outputs_equal_and_strides_of_outputs_unchanged(helpers):
    model = helpers.randomize_norms(ConvViewHead()).eval()
    gm = fxcompress.compile(model, torch.randn(2, 3, 6, 6), [ChannelsLast()])
    fresh = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        logits, features = gm(fresh)
        ref_logits, ref_features = model(fresh)
    assert helpers.relative_error(ref_logits, logits) <= 1e-5
    assert helpers.relative_error(ref_features, features) <= 1e-5
    assert features.is_contiguous()


def test_activations_inside_run_channels_last(helpers):
    """The point of the pass: the conv output (and what follows it) is NHWC without any explicit conversion."""
    model = helpers.randomize_norms(ConvViewHead()).eval()
    gm = fxcompress.compile(model, torch.randn(1, 3, 6, 6), [ChannelsLast()])
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    assert relu.meta["tensor_meta"].memory_format is CL


def test_second_run_is_a_no_op(helpers):
    gm = fxcompress.compile(ConvViewHead().eval(), torch.randn(1, 3, 6, 6), [ChannelsLast()])
    code = gm.code
    assert not ChannelsLast()(gm).modified
    assert gm.code == code


def test_model_without_conv2d_is_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    gm = fxcompress.trace(model, torch.randn(2, 4))
    code = gm.code
    assert not ChannelsLast()(gm).modified
    assert gm.code == code


def test_state_dict_round_trip_training_and_save(helpers, tmp_path):
    model = helpers.randomize_norms(ConvViewHead()).eval()
    gm = fxcompress.compile(model, torch.randn(2, 3, 6, 6), [ChannelsLast()])
    fresh = ConvViewHead()
    fresh.load_state_dict(gm.state_dict())  # loads into the plain NCHW model
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert helpers.relative_error(fresh.eval()(x)[0], gm(x)[0]) <= 1e-5
    torch.save(gm, tmp_path / "cl.pt")
    loaded = torch.load(tmp_path / "cl.pt", weights_only=False)
    assert loaded.conv1.weight.is_contiguous(memory_format=CL)
    gm.train()
    logits, _ = gm(x)
    logits.sum().backward()
    assert gm.conv1.weight.grad is not None
    torch.optim.SGD(gm.parameters(), lr=0.1).step()


class ResidualNet(nn.Module):
    """conv-bn-relu stem, one residual block, pooled features flattened with ``view``: prunable, foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.block(x) + x)
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.view(x.shape[0], -1))


def test_after_shrink_and_fold(helpers):
    model = helpers.randomize_norms(ResidualNet()).eval()
    x = torch.randn(2, 3, 12, 12)
    passes = [*standard_pruning(L1Norm(0.5)), FoldBatchNorm(), ChannelsLast()]
    gm = fxcompress.compile(model, x, passes)  # verification checks every output-preserving pass
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 8]
    assert all(c.weight.is_contiguous(memory_format=CL) for c in convs)
    assert call_ops(gm) == Counter(reshape=1)
    masked = fxcompress.compile(model, x, helpers.masked_pipeline(L1Norm(0.5)))
    helpers.outputs_agree(masked, gm, (torch.randn(2, 3, 12, 12),), rtol=1e-4)


def test_channel_shuffle_views_survive(helpers):
    """ShuffleNetV2 reshapes NHWC activations with ``view``: the rewritten graph still runs and agrees."""
    torchvision = pytest.importorskip("torchvision")
    model = helpers.randomize_norms(torchvision.models.shufflenet_v2_x0_5()).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxcompress.compile(model, x, "fold-batch-norm,channels-last")
    assert call_ops(gm)["view"] == 0 and call_ops(gm)["reshape"] > 0
    helpers.outputs_agree(model, gm, (torch.randn(1, 3, 32, 32),), rtol=1e-4)
