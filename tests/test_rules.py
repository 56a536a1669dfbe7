"""One test per op family of the rule table (``fxcompress/rules.py``).

Each case is a tiny model: a prunable ``head`` convolution (3 -> 8 channels)
in front of the op under test and a ``tail`` layer reading its result. The
test checks the dependency groups the analysis finds — how many, their sizes,
which are prunable and why the others are frozen — and that the shrunk model
reproduces the masked one at 50% L1 sparsity.

Groups are written as ``(channels, None)`` for a prunable group and
``(channels, "words of the frozen reason")`` for a frozen one, sorted.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.analysis import OpaqueOpWarning, analyze
from fxcompress.prune import L1Norm


class Wrap(nn.Module):
    """``tail(op(head(x)))``: a conv producing 8 channels, the op under test, and a consumer."""

    def __init__(self, op: Callable, tail: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head if head is not None else nn.Conv2d(3, 8, 1)
        self.op = op
        self.tail = tail

    def forward(self, x):
        return self.tail(self.op(self.head(x)))


class Residual(nn.Module):
    def __init__(self, combine: Callable) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.combine = combine

    def forward(self, x):
        return self.combine(x, self.conv(x))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.tail = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        return self.tail(torch.cat([self.a(x), self.b(x)], dim=1))


class Split(nn.Module):
    def __init__(self, use_chunk: bool) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 1)
        self.use_chunk = use_chunk
        first = 4 if use_chunk else 3
        self.a = nn.Conv2d(first, 4, 1)
        self.b = nn.Conv2d(8 - first, 4, 1)

    def forward(self, x):
        x = self.head(x)
        a, b = x.chunk(2, dim=1) if self.use_chunk else torch.split(x, [3, 5], dim=1)
        return self.a(a) + self.b(b)


class Shuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous()
        return x.view(n, -1, h, w)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        return self.gamma * x


class ChannelsLastNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        return self.out(self.attn(x, x, x, need_weights=False)[0])


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(torch.relu(self.embed(ids)))


class PowTensorExponent(nn.Module):
    """``pow(base, exponent)`` with base and exponent from different convs: both operands' channels are coupled."""

    def __init__(self) -> None:
        super().__init__()
        self.base, self.exponent, self.tail = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), conv_tail()

    def forward(self, x):
        return self.tail(torch.pow(self.base(x).abs() + 1, self.exponent(x) * 0.1))


def conv_tail(c: int = 8) -> nn.Module:
    return nn.Conv2d(c, 4, 1)


IMAGE = (2, 3, 4, 4)
INPUT_FROZEN = (3, "graph input")
OUTPUT_FROZEN = (4, "graph output")


@dataclass
class Case:
    build: Callable[[], nn.Module]
    groups: list  #: expected ``(channels, None | reason words)``, in any order
    shape: tuple = IMAGE
    make_input: Callable[[tuple], torch.Tensor] = torch.randn
    pruner: L1Norm = field(default_factory=lambda: L1Norm(0.5))


def through(op, c_out: int = 8, *prunable) -> Case:
    """A channel-preserving op between head and tail: one prunable 8-channel group."""
    return Case(lambda: Wrap(op, conv_tail(c_out)), [INPUT_FROZEN, OUTPUT_FROZEN, (8, None), *prunable])


CASES: dict[str, Case] = {
    # layers with weights: consume input channels, produce new ones
    "conv2d": through(nn.Conv2d(8, 6, 3, padding=1), 6, (6, None)),
    "conv1d": Case(lambda: Wrap(nn.ReLU(), nn.Conv1d(8, 4, 1), head=nn.Conv1d(3, 8, 3)),
                   [INPUT_FROZEN, OUTPUT_FROZEN, (8, None)], shape=(2, 3, 7)),
    "conv3d": Case(lambda: Wrap(nn.ReLU(), nn.Conv3d(8, 4, 1), head=nn.Conv3d(3, 8, 1)),
                   [INPUT_FROZEN, OUTPUT_FROZEN, (8, None)], shape=(1, 3, 2, 3, 3)),
    # grouped: the same local index goes in every group, so 8 channels are 4 coupled pairs
    "grouped-conv": Case(lambda: Wrap(nn.Conv2d(8, 8, 3, padding=1, groups=2), conv_tail()),
                         ([INPUT_FROZEN, OUTPUT_FROZEN, (4, None), (4, None)])),
    # depthwise: output channel j is input channel j (or j // multiplier): one group through it
    "depthwise-conv": through(nn.Conv2d(8, 8, 3, padding=1, groups=8)),
    "depthwise-conv-multiplier": through(nn.Conv2d(8, 16, 3, padding=1, groups=8), 16),
    "conv-transpose2d": through(nn.ConvTranspose2d(8, 6, 2, stride=2), 6, (6, None)),
    "linear": Case(lambda: Wrap(nn.ReLU(), nn.Linear(8, 3), head=nn.Linear(5, 8)),
                   [(3, "graph output"), (5, "graph input"), (8, None)], shape=(2, 5)),
    "embedding": Case(Embed, [(3, "graph output"), (8, None)], shape=(2, 5),
                      make_input=lambda shape: torch.randint(0, 10, shape),
                      pruner=L1Norm(0.5, op_types=(nn.Embedding, nn.Linear))),
    # norms
    "batch-norm": through(nn.BatchNorm2d(8)),
    "instance-norm-affine": through(nn.InstanceNorm2d(8, affine=True)),
    # a GroupNorm group is one unit: 8 channels in 2 groups prune as 2 components
    "group-norm": Case(lambda: Wrap(nn.GroupNorm(2, 8), conv_tail()), [INPUT_FROZEN, OUTPUT_FROZEN, (2, None)]),
    # norms over the last dim stay prunable, with statistics over the kept channels in the masked model
    "layer-norm-channels-last": Case(
        lambda: Wrap(lambda x: F.layer_norm(x.permute(0, 2, 3, 1), (8,)), nn.Linear(8, 4)),
        ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    "layer-norm-module": Case(lambda: Wrap(ChannelsLastNorm(), nn.Linear(8, 4)), [INPUT_FROZEN, OUTPUT_FROZEN, (8, None)]),
    "rms-norm-module": Case(lambda: Wrap(nn.RMSNorm(8), nn.Linear(8, 4), head=nn.Linear(3, 8)),
                            [INPUT_FROZEN, OUTPUT_FROZEN, (8, None)], shape=(2, 5, 3)),
    "layer-norm-two-dims": Case(lambda: Wrap(lambda x: F.layer_norm(x, (4, 4)), conv_tail()),
                                [INPUT_FROZEN, OUTPUT_FROZEN, (8, None)]),
    # channel-wise ops pass channels through
    "relu": through(nn.ReLU()),
    "gelu": through(nn.GELU()),
    "silu": through(nn.SiLU()),
    "hardswish": through(nn.Hardswish()),
    "sigmoid": through(nn.Sigmoid()),
    "F.relu": through(F.relu),
    "torch.tanh": through(torch.tanh),
    "Tensor.relu": through(lambda x: x.relu()),
    "dropout": through(nn.Dropout(0.3)),
    "identity": through(nn.Identity()),
    "max-pool": through(nn.MaxPool2d(2)),
    "avg-pool": through(nn.AvgPool2d(2)),
    "adaptive-avg-pool": through(nn.AdaptiveAvgPool2d(1)),
    "F.max_pool2d": through(lambda x: F.max_pool2d(x, 2)),
    # elementwise arithmetic couples its operands
    "residual-add": through(Residual(operator.add)),
    # ops of three tensors couple all of them (a divisor is frozen)
    "lerp": through(Residual(lambda x, y: torch.lerp(x, y, torch.sigmoid(y)))),
    "addcmul": through(Residual(lambda x, y: torch.addcmul(x, y, y, value=0.5))),
    "addcdiv-freezes-divisor": Case(lambda: Wrap(Residual(lambda x, y: torch.addcdiv(x, x, y.exp())), conv_tail()),
                                    [INPUT_FROZEN, OUTPUT_FROZEN, (8, "divisor")]),
    "clamp-tensor-bounds": through(Residual(lambda x, y: torch.clamp(x, min=y, max=y + 1))),
    "clamp-number-bounds": through(lambda x: torch.clamp(x, -1.0, 1.0)),
    # F.normalize divides by norm.clamp_min(eps), never zero: the channels stay prunable
    "normalize-spatial": through(lambda x: F.normalize(x, dim=-1)),
    "zeros-like-follows-input": through(Residual(lambda x, y: x + torch.zeros_like(y))),
    "roll-spatial": through(lambda x: torch.roll(x, 1, dims=-1)),
    "pad-computed-widths": through(lambda x: F.pad(x, (0, x.shape[-1] % 3, 0, x.shape[-2] % 3))),
    "unbind-spatial": through(lambda x: (x.unbind(-1)[0] + x.unbind(-1)[1]).unsqueeze(-1)),
    "pow-operator": through(lambda x: x ** 2),
    "gather-spatial": through(lambda x: torch.gather(x, 3, torch.zeros_like(x, dtype=torch.long))),
    "roll-channels": Case(lambda: Wrap(lambda x: torch.roll(x, 1, dims=1), conv_tail()),
                          [INPUT_FROZEN, OUTPUT_FROZEN, (8, "rolled")]),
    "sub": through(Residual(operator.sub)),
    "mul": through(Residual(operator.mul)),
    "torch.add": through(Residual(torch.add)),
    "div-freezes-divisor": Case(lambda: Wrap(Residual(operator.truediv), conv_tail()),
                                ([INPUT_FROZEN, OUTPUT_FROZEN, (8, "divisor")])),
    "tensor-scalar": through(lambda x: x * 2.0 + 1.0),
    # the parameter's size-1 dims broadcast against H and W: frozen, one-channel groups
    "layer-scale-get-attr": through(LayerScale(), 8, (1, "broadcast"), (1, "broadcast")),
    "squeeze-excitation": through(SqueezeExcite(), 8, (2, None)),
    # structure: cat, split, slicing, reshapes
    "cat": Case(Concat, ([INPUT_FROZEN, OUTPUT_FROZEN, (6, None), (8, None)])),
    "split": Case(lambda: Split(False), ([INPUT_FROZEN, OUTPUT_FROZEN, (3, None), (5, None)])),
    "chunk": Case(lambda: Split(True), ([INPUT_FROZEN, OUTPUT_FROZEN, (4, None), (4, None)])),
    # the 4 sliced channels are read by the tail, the other 4 only by nothing: two groups
    "getitem-slice": Case(lambda: Wrap(lambda x: x[:, 2:6], conv_tail(4)),
                          [INPUT_FROZEN, OUTPUT_FROZEN, (4, None), (4, None)]),
    "flatten-into-linear": Case(lambda: Wrap(lambda x: torch.flatten(x, 1), nn.Linear(8 * 16, 4)),
                                ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    "view-into-linear": Case(lambda: Wrap(lambda x: x.view(x.size(0), -1), nn.Linear(8 * 16, 4)),
                             ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    "reshape-into-conv1d": Case(lambda: Wrap(lambda x: x.reshape(2, 8, 16), nn.Conv1d(8, 4, 1)),
                                ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    # LeViT's batch norm over tokens: the sizes come from x at run time, so they follow the shrink
    "reshape-as": Case(lambda: Wrap(lambda x: F.relu(x.flatten(0, 1)).reshape_as(x).permute(0, 2, 3, 1),
                                    nn.Linear(8, 4)),
                       ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    "permute": Case(lambda: Wrap(lambda x: x.permute(0, 2, 3, 1), nn.Linear(8, 4)),
                    ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    "transpose": Case(lambda: Wrap(lambda x: x.transpose(1, 3), nn.Linear(8, 4)),
                      ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    # channel shuffle: each channel of the 4-channel carrier dim holds two coupled channels
    "channel-shuffle": Case(lambda: Wrap(Shuffle(), conv_tail()), ([INPUT_FROZEN, OUTPUT_FROZEN, (4, None)])),
    # reductions
    "mean-spatial": Case(lambda: Wrap(lambda x: x.mean((2, 3)), nn.Linear(8, 4)),
                         ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    "sum-spatial": Case(lambda: Wrap(lambda x: x.sum(dim=-1), nn.Conv1d(8, 4, 1)),
                        ([INPUT_FROZEN, OUTPUT_FROZEN, (8, None)])),
    # a second tensor operand of a channel-wise op couples like an elementwise one
    "pow-tensor-exponent": Case(PowTensorExponent, [INPUT_FROZEN, OUTPUT_FROZEN, (8, None)]),
    # a mean over one dim is a statistic over its channels: prunable, over the kept ones in the masked model
    "mean-over-channels": Case(lambda: Wrap(lambda x: x.mean(1, keepdim=True), conv_tail(1)),
                               ([INPUT_FROZEN, OUTPUT_FROZEN, (1, "reduced"), (8, None)])),
    "sum-over-channels": Case(lambda: Wrap(lambda x: x.sum(1, keepdim=True), conv_tail(1)),
                              ([INPUT_FROZEN, OUTPUT_FROZEN, (1, "reduced"), (8, "reduced over")])),
}


def summary(analysis) -> list:
    """Sorted ``(channels, None | frozen reason)`` of every group."""
    return ordered((len(g), g.frozen_reason) for g in analysis.groups)


def ordered(groups) -> list:
    return sorted(groups, key=lambda g: (g[0], g[1] or ""))


def matches(found: list, expected: list) -> bool:
    found, expected = ordered(found), ordered(expected)
    if len(found) != len(expected):
        return False
    return all(n == m and (why is None) == (words is None) and (words is None or words in why)
               for (n, why), (m, words) in zip(found, expected))


def shrink_and_check(model: nn.Module, x: torch.Tensor, helpers, pruner=L1Norm(0.5)) -> tuple:
    masked, shrunk = helpers.compile_pair(model, x, pruner, verify=False)
    fresh = x.clone() if not x.is_floating_point() else torch.randn_like(x)
    helpers.outputs_agree(masked, shrunk, (fresh,), rtol=1e-4)
    return masked, shrunk


@pytest.mark.parametrize("name", list(CASES))
def test_rule(name, helpers):
    case = CASES[name]
    model = case.build().eval()
    helpers.randomize_norms(model)
    x = case.make_input(case.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpaqueOpWarning)
        found = summary(analyze(fxcompress.trace(model, x, frontend="fx")))
    assert matches(found, case.groups), f"groups {found}, expected {case.groups}"
    masked, shrunk = shrink_and_check(model, x, helpers, case.pruner)
    if any(why is None for _, why in case.groups):
        assert helpers.count_params(shrunk) < helpers.count_params(model), "a prunable group was not pruned"
    else:
        assert helpers.count_params(shrunk) == helpers.count_params(model)


def test_multihead_attention_stays_correct_and_keeps_its_output_width(helpers):
    """Attention couples heads, projections and the residual width; whatever is pruned, outputs agree."""
    model = Attention().eval()
    x = torch.randn(2, 5, 5)
    masked, shrunk = shrink_and_check(model, x, helpers)
    assert shrunk(x).shape == model(x).shape
    attn = shrunk.get_submodule("attn")
    assert attn.embed_dim == shrunk.embed.out_features  # the attention width follows its input
    assert helpers.count_params(shrunk) <= helpers.count_params(model)


class Flipped(nn.Module):
    """``torch.fliplr`` (reverses the channels of an image batch): an op the table has no rule for."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.tail(torch.fliplr(self.mid(self.head(x))))


def test_opaque_op_freezes_its_neighbours_and_warns(helpers):
    model = Flipped().eval()
    x = torch.randn(IMAGE)
    gm = fxcompress.trace(model, x, frontend="fx")
    with pytest.warns(OpaqueOpWarning, match=r"no channel rule for torch\.fliplr \(nodes fliplr\)"):
        analysis = analyze(gm)
    assert analysis.opaque_nodes.get("torch.fliplr") == ["fliplr"]
    found = summary(analysis)
    # head -> mid stays prunable; mid's output (read by roll) and roll's output are frozen
    assert matches(found, [INPUT_FROZEN, OUTPUT_FROZEN, (8, None), (8, "no channel rule"), (8, "no channel rule")])
    masked, shrunk = shrink_and_check(model, x, helpers)
    assert (shrunk.head.out_channels, shrunk.mid.out_channels, shrunk.tail.in_channels) == (4, 8, 8)


def test_a_rule_that_fails_on_an_unforeseen_call_makes_the_node_opaque_not_the_compile_fail(helpers, monkeypatch):
    from fxcompress.rules import RULES, OpRule

    def broken(ctx, node):
        raise ValueError("cannot couple (8,) ids with (1,) ids")

    monkeypatch.setitem(RULES._rules, nn.ReLU, OpRule(broken))
    model, x = Wrap(nn.ReLU(), conv_tail()).eval(), torch.randn(IMAGE)
    with pytest.warns(OpaqueOpWarning, match=r"ReLU \(nodes op\)"):
        analysis = analyze(fxcompress.trace(model, x, frontend="fx"))
    assert not analysis.prunable_groups()  # the channels through the ReLU are frozen, the model stays correct
    assert any("its rule failed (ValueError: cannot couple" in (g.frozen_reason or "") for g in analysis.groups)
    shrink_and_check(model, x, helpers)


class BlurBuffer(nn.Module):
    """A fixed depthwise blur held in a buffer (timm's anti-aliased downsampling): sliced, never masked."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.tail = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.register_buffer("filt", torch.ones(8, 1, 3, 3) / 9)

    def forward(self, x):
        return self.tail(F.conv2d(self.head(x), self.filt, padding=1, groups=8))


def test_a_filter_buffer_is_not_masked_like_a_parameter(helpers):
    model = BlurBuffer().eval()
    masked, shrunk = shrink_and_check(model, torch.randn(IMAGE), helpers)
    assert "filt_mask" not in dict(masked.named_buffers())


class RelativePositionAttention(nn.Module):
    """timm's windowed attention in miniature: a per-head bias read from a table by an index buffer
    (``table[index]``) and handed to SDPA as its additive mask, so heads prune through both."""

    def __init__(self, heads: int = 4, head_dim: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(8, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, 8)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        position = torch.arange(tokens)
        self.register_buffer("index", (position[:, None] - position[None, :] + tokens - 1).flatten())

    def forward(self, x):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].reshape(tokens, tokens, self.heads).permute(2, 0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class MaskOrNone(RelativePositionAttention):
    """timm's EVA: ``forward(x, attn_mask=None)``, so the mask is a graph input whose value is None."""

    def forward(self, x, attn_mask=None):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v.type_as(q), attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


def test_an_attention_mask_that_is_none_at_run_time_leaves_heads_prunable(helpers):
    model, x = MaskOrNone().eval(), torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpaqueOpWarning)
        analyze(fxcompress.trace(model, x, frontend="fx"))
    masked, shrunk = shrink_and_check(model, x, helpers)
    assert shrunk.qkv.out_features < model.qkv.out_features


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_heads_prune_through_a_bias_table_and_the_attention_mask(frontend, helpers):
    model, x = RelativePositionAttention().eval(), torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpaqueOpWarning)
        analyze(fxcompress.trace(model, x, frontend=frontend))
    masked, shrunk = helpers.compile_pair(model, x, L1Norm(0.5), verify=False, frontend=frontend)
    helpers.outputs_agree(masked, shrunk, (torch.randn_like(x),), rtol=1e-4)
    table = next(p for name, p in shrunk.named_parameters() if name.endswith("table"))
    assert table.shape[1] == 2, "the bias table keeps one column per kept head"
