"""Property test: on random networks, the shrunk model computes what the masked model computes.

Hypothesis draws a network as a list of block specs (conv, grouped and
depthwise conv, batch norm, layer norm, activations, residual add, cat,
split/chunk, channel shuffle, squeeze-excitation, flatten, view/reshape,
permute/transpose, ...), builds it as a real ``nn.Module`` whose ``forward``
interprets the specs (so ``torch.fx.symbolic_trace`` unrolls it), compiles it
with ``standard_pruning(L1Norm(sparsity))`` and checks three things:

* compiling never raises, and no supported block is reported as opaque;
* the shrunk model's output equals the masked model's (the same passes
  without ``Shrink``) on a fresh input, within 1e-4 of the output's scale;
* MACs and parameter counts never grow.

Failures hypothesis found are pinned in explicit regression tests at the end
(``xfail(strict=True)`` while the core bug is open, so the suite stays green
but says what is broken).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress.analysis import OpaqueOpWarning
from fxcompress.passes import standard_pruning
from fxcompress.prune import L1Norm
from fxcompress.modules import has_masked_statistics
from fxcompress.verify import forward, oracle_outputs, unreachable_error, worst_leaf

BATCH, IN_CHANNELS, SIZE, CLASSES = 2, 3, 6, 5

#: Activations by name: modules and plain functions (traced as call_module / call_function).
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "sigmoid": nn.Sigmoid,
    "F.relu": lambda: F.relu,
    "torch.tanh": lambda: torch.tanh,
}


class Spec(NamedTuple):
    """One block of a random network. ``width`` and ``option`` mean what the block's builder says."""

    kind: str
    width: int = 4
    option: int = 0
    act: str = "relu"


# ---------------------------------------------------------------------------- blocks on [N, C, H, W]


class ConvBlock(nn.Module):
    """conv (groups = a common divisor of in/out picked by ``option``) + batch norm + activation."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        divisors = [g for g in range(1, c + 1) if c % g == 0 and spec.width % g == 0]
        groups = divisors[spec.option % len(divisors)]
        self.conv = nn.Conv2d(c, spec.width, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(spec.width)
        self.act = ACTIVATIONS[spec.act]()
        self.out_channels = spec.width

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DepthwiseBlock(nn.Module):
    """Depthwise conv with channel multiplier 1 or 2, then batch norm and activation."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.out_channels = c * (1 + spec.option % 2)
        self.conv = nn.Conv2d(c, self.out_channels, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(self.out_channels)
        self.act = ACTIVATIONS[spec.act]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """ResNet basic block: ``x + bn(conv(act(bn(conv(x)))))`` with a hidden width."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, spec.width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.width)
        self.act = ACTIVATIONS[spec.act]()
        self.conv2 = nn.Conv2d(spec.width, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.out_channels = c

    def forward(self, x):
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class ConcatBlock(nn.Module):
    """Two branches concatenated along channels (Inception / DenseNet)."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, spec.width, 1)
        self.b = nn.Conv2d(c, 2 + spec.option % 4, 3, padding=1)
        self.dense = spec.option % 2 == 1  # DenseNet: the input is one of the concatenated pieces
        self.out_channels = spec.width + self.b.out_channels + (c if self.dense else 0)

    def forward(self, x):
        pieces = [x, self.a(x), self.b(x)] if self.dense else [self.a(x), self.b(x)]
        return torch.cat(pieces, 1)


class SplitBlock(nn.Module):
    """Split the channels (``split`` or ``chunk``), convolve one piece, concatenate back or add."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.mode = spec.option % 3  # 0: split+cat, 1: chunk+cat, 2: chunk+add
        if self.mode != 0 and c % 2:
            self.mode = 0
        self.first = max(1, min(c - 1, spec.width)) if self.mode == 0 else c // 2
        if c == 1:
            self.mode, self.first = -1, 1
        self.conv = nn.Conv2d(self.first, self.first, 1)
        self.out_channels = c if self.mode != 2 else c // 2

    def forward(self, x):
        if self.mode == -1:
            return self.conv(x)
        if self.mode == 0:
            a, b = torch.split(x, [self.first, x.shape[1] - self.first], dim=1)
        else:
            a, b = x.chunk(2, dim=1)
        if self.mode == 2:
            return self.conv(a) + b
        return torch.cat([self.conv(a), b], dim=1)


class ShuffleBlock(nn.Module):
    """ShuffleNet's channel shuffle: reshape to groups, transpose, flatten back."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.groups = shuffle_groups(c, spec.option)
        self.out_channels = c

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, self.groups, c // self.groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(n, -1, h, w)


def shuffle_groups(c: int, option: int) -> int:
    """A group count for channel shuffle: any divisor of ``c``, including ``g >= c / g``
    (see ``test_channel_shuffle_with_many_groups``)."""
    divisors = [g for g in range(2, c + 1) if c % g == 0] or [1]
    return divisors[option % len(divisors)]


class SqueezeExcitation(nn.Module):
    """SE: a channel gate computed from the global mean, multiplied in by broadcasting."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, spec.width, 1)
        self.fc2 = nn.Conv2d(spec.width, c, 1)
        self.act = ACTIVATIONS[spec.act]()
        self.out_channels = c

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        scale = torch.sigmoid(self.fc2(self.act(self.fc1(scale))))
        return x * scale


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm, Linear-act-Linear, permute back, residual."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, spec.width)
        self.act = ACTIVATIONS[spec.act]()
        self.fc2 = nn.Linear(spec.width, c)
        self.out_channels = c

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class TransposeLinear(nn.Module):
    """A linear layer applied to the channel dim by ``transpose(1, -1)`` there and back."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.fc = nn.Linear(c, spec.width)
        self.out_channels = spec.width

    def forward(self, x):
        return self.fc(x.transpose(1, -1)).transpose(1, -1).contiguous()


class ReshapeConv1d(nn.Module):
    """Merge H and W with ``reshape``, apply a Conv1d, restore them with ``view``."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c, spec.width, 3, padding=1)
        self.out_channels = spec.width

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.conv(x.reshape(n, c, h * w))
        return y.view(n, -1, h, w)


class NormAct(nn.Module):
    """A stand-alone batch norm, activation and a size-preserving max pool."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.act = ACTIVATIONS[spec.act]()
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.out_channels = c

    def forward(self, x):
        return self.pool(self.act(self.bn(x)))


BLOCKS: dict[str, type[nn.Module]] = {
    "conv": ConvBlock,
    "depthwise": DepthwiseBlock,
    "residual": ResidualBlock,
    "concat": ConcatBlock,
    "split": SplitBlock,
    "shuffle": ShuffleBlock,
    "se": SqueezeExcitation,
    "mlp": ChannelsLastMLP,
    "transpose": TransposeLinear,
    "reshape": ReshapeConv1d,
    "norm": NormAct,
}

# ---------------------------------------------------------------------------- heads: [N, C, H, W] -> [N, CLASSES]


class PoolHead(nn.Module):
    """Global average pool, ``flatten``, linear (ResNet)."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class FlattenHead(nn.Module):
    """``flatten`` of C*H*W into a hidden linear layer with a norm (VGG-like classifier)."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c * SIZE * SIZE, spec.width)
        self.norm = nn.LayerNorm(spec.width) if spec.option % 2 else nn.BatchNorm1d(spec.width)
        self.act = ACTIVATIONS[spec.act]()
        self.fc2 = nn.Linear(spec.width, CLASSES)

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x.flatten(1)))))


class ViewHead(nn.Module):
    """``view(n, -1)`` into a linear layer."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.fc = nn.Linear(c * SIZE * SIZE, CLASSES)

    def forward(self, x):
        return self.fc(x.view(x.size(0), -1))


class MeanHead(nn.Module):
    """``mean`` over the spatial dims, then a linear layer."""

    def __init__(self, c: int, spec: Spec) -> None:
        super().__init__()
        self.fc = nn.Linear(c, CLASSES)

    def forward(self, x):
        return self.fc(x.mean(dim=(-2, -1)))


HEADS: dict[str, type[nn.Module]] = {"pool": PoolHead, "flatten": FlattenHead, "view": ViewHead, "mean": MeanHead}


class RandomNet(nn.Module):
    """A stem conv, the drawn blocks in order, and the drawn head."""

    def __init__(self, stem_width: int, blocks: list[Spec], head: Spec) -> None:
        super().__init__()
        self.stem = nn.Conv2d(IN_CHANNELS, stem_width, 3, padding=1)
        c, layers = stem_width, []
        for spec in blocks:
            layers.append(BLOCKS[spec.kind](c, spec))
            c = layers[-1].out_channels
        self.blocks = nn.Sequential(*layers)
        self.head = HEADS[head.kind](c, head)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


# ---------------------------------------------------------------------------- strategies

widths = st.integers(1, 8)


def specs(kinds) -> st.SearchStrategy[Spec]:
    return st.builds(
        Spec,
        kind=st.sampled_from(sorted(kinds)),
        width=widths,
        option=st.integers(0, 5),
        act=st.sampled_from(sorted(ACTIVATIONS)),
    )


networks = st.tuples(st.integers(1, 8), st.lists(specs(BLOCKS), min_size=0, max_size=5), specs(HEADS))


def build(stem_width: int, blocks: list[Spec], head: Spec, seed: int = 0) -> RandomNet:
    """The network of a drawn spec, with random weights and random norm statistics (eval mode)."""
    torch.manual_seed(seed)
    model = RandomNet(stem_width, blocks, head)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


class _KeepMasked:
    """Hook: a copy of the module right after ``propagate-channels`` (the masked model), so one compile gives both."""

    masked = None

    def __call__(self, previous, gm, next_pass) -> None:
        if getattr(previous, "name", None) == "propagate-channels":
            self.masked = copy.deepcopy(gm)


def check_network(helpers, stem_width: int, blocks: list[Spec], head: Spec, sparsity: float) -> None:
    """One verified compile (which runs the removed-channel noise check); then, on a fresh input,
    shrunk == masked and the independent oracle (original module with the masked tensors) == masked."""
    model = build(stem_width, blocks, head)
    example = torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE)
    keep = _KeepMasked()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpaqueOpWarning)
        shrunk = fxcompress.compile(model, example, standard_pruning(L1Norm(sparsity=sparsity)), hooks=[keep]).eval()
    masked = keep.masked.eval()
    fresh = (torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE),)
    helpers.outputs_agree(masked, shrunk, fresh, rtol=1e-4)
    oracle = oracle_outputs(model, masked, fresh)  # None exactly when norms use kept-channel statistics
    assert (oracle is None) == has_masked_statistics(masked)
    assert oracle is None or worst_leaf(oracle, forward(masked, fresh), 1e-4) is None
    assert unreachable_error(masked, fresh, forward(masked, fresh), 1e-4, seed=1) is None
    assert helpers.count_params(shrunk) <= helpers.count_params(model)


#: ``ci`` (the default) runs SHARDS x 20 = 500 networks per run, about 27 s per shard on the loaded 2-core
#: machine; ``long`` (FXCOMPRESS_HYPOTHESIS=long) runs SHARDS x 200 = 5,000
SHARDS = 25
settings.register_profile("ci", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_PROFILE = settings.get_profile(os.environ.get("FXCOMPRESS_HYPOTHESIS", "ci"))


@pytest.mark.parametrize("shard", range(SHARDS))
@settings(_PROFILE)
@given(network=networks, sparsity=st.floats(0.0, 0.9))
def test_shrunk_equals_masked_on_random_networks(helpers, shard, network, sparsity):
    check_network(helpers, *network, sparsity)


# ---------------------------------------------------------------------------- regressions hypothesis found


def _shuffle_net(channels: int, groups: int) -> RandomNet:
    """stem (channels) -> channel shuffle with ``groups`` -> pooled linear head."""
    model = build(channels, [], Spec("pool"))
    block = ShuffleBlock(channels, Spec("shuffle"))
    block.groups = groups
    model.blocks = nn.Sequential(block)
    return model


def test_channel_shuffle_with_few_groups(helpers):
    """ShuffleNetV2's case: 2 groups of c/2 channels; the c/2 dim carries the channels."""
    model = _shuffle_net(8, 2)
    x = torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE)
    masked, shrunk = helpers.compile_pair(model, x, L1Norm(0.5))
    helpers.outputs_agree(masked, shrunk, (torch.randn_like(x),))
    assert shrunk.stem.out_channels == 4


@pytest.mark.parametrize("channels, groups", [(8, 4), (2, 2)])
def test_channel_shuffle_with_many_groups(helpers, channels, groups):
    model = _shuffle_net(channels, groups)
    x = torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE)
    masked, shrunk = helpers.compile_pair(model, x, L1Norm(0.5))
    helpers.outputs_agree(masked, shrunk, (torch.randn_like(x),))
