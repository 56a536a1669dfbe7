"""Fault injection: deliberately broken op rules that ``compile(verify=True)`` must refuse.

Each mutant replaces one entry of ``fxcompress.rules.RULES`` (monkeypatched,
never edited) with a rule that is wrong in one typical way, and names a small
model that exercises it. A mutant is *killed* when compiling that model with
L1 pruning at 50 % raises ``VerificationError``. ``tests/test_mutations.py``
asserts every mutant is killed.

Usage: ``python tools/mutate_rules.py`` prints one row per mutant and the kill rate.

Figures: 45 mutants, 45 killed (100 %), 7 s on the 2-core machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import rules
from fxcompress.errors import VerificationError
from fxcompress.passes import standard_pruning
from fxcompress.prune import L1Norm
from fxcompress.rules import RULES, OpRule, broadcast_into, same_shape_passthrough

__all__ = ["Mutant", "MUTANTS", "mutated", "is_killed", "main"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    """A broken rule for ``key`` and a model (built by ``model``, fed ``shape``) that uses it."""

    name: str
    key: object
    analyze: Callable
    model: Callable[[], nn.Module]
    shape: tuple[int, ...]


@contextlib.contextmanager
def mutated(key, analyze: Callable):
    """``RULES[key]`` replaced by ``analyze`` for the duration: its shrink step kept, its mask step dropped
    (statistics over kept channels are part of what a mutant may get wrong)."""
    table = RULES._rules
    old = table[key]
    table[key] = OpRule(analyze, old.shrink)
    try:
        yield
    finally:
        table[key] = old


# ---------------------------------------------------------------------------- broken rules


def passthrough(ctx, node):
    """Treat a channel-mixing op as channel-wise."""
    return same_shape_passthrough(ctx, node, node.args[0])


def first_operand(ctx, node):
    """Elementwise op that ignores every operand but the first (drops the coupling)."""
    return broadcast_into(ctx, ctx.shape(node), [node.args[0]], ctx.where(node))


def second_dropped_where(ctx, node):
    """``where(c, a, b)`` that ignores ``b``."""
    return broadcast_into(ctx, ctx.shape(node), list(node.args[:2]), ctx.where(node))


def unfrozen(rule: Callable) -> Callable:
    """``rule`` with every freeze forgotten."""

    def analyze(ctx, node):
        freeze = ctx.space.freeze
        ctx.space.freeze = lambda ids, reason: None
        try:
            return rule(ctx, node)
        finally:
            ctx.space.freeze = freeze

    return analyze


def group_norm_per_channel(ctx, node):
    """GroupNorm that lets channels of one group be pruned apart (no per-group coupling)."""
    channels = same_shape_passthrough(ctx, node, node.args[0])
    for name in ("weight", "bias"):
        ctx.space.add_slice(node.target, name, 0, channels[1], rules.Role.AFFINE)
    return channels


def cat_reversed(ctx, node):
    """``cat`` with the parts' offsets swapped."""
    parts = [ctx.tensor_channels(t) for t in node.args[0]]
    dim = rules.norm_dim(rules.arg(node, 1, "dim", 0), len(parts[0]))
    out = list(parts[0])
    out[dim] = np.concatenate([p[dim] for p in reversed(parts)])
    return tuple(out)


def cat_uncoupled(ctx, node):
    """``cat`` that forgets to couple the non-concatenated dims of its parts."""
    parts = [ctx.tensor_channels(t) for t in node.args[0]]
    dim = rules.norm_dim(rules.arg(node, 1, "dim", 0), len(parts[0]))
    out = list(parts[0])
    out[dim] = np.concatenate([p[dim] for p in parts])
    return tuple(out)


def split_reversed(ctx, node):
    """``split``/``chunk`` whose sections are taken from the wrong end."""
    result = rules.split(ctx, node)
    return rules.Multi(reversed(result)) if len({len(r[1]) for r in result}) == 1 else result


def getitem_offset_zero(ctx, node):
    """Slicing ``x[:, a:b]`` as if it started at 0."""
    source, index = node.args
    if not isinstance(index, tuple):
        return rules.getitem(ctx, node)
    channels = list(ctx.tensor_channels(source))
    item = index[1]
    channels[1] = channels[1][: len(range(*item.indices(len(channels[1]))))]
    return tuple(channels)


def swap_identity(ctx, node):
    """``permute``/``transpose`` that forgets to move dims (shapes happen to agree)."""
    return ctx.tensor_channels(node.args[0])


def flatten_tiled(ctx, node):
    """``flatten(1)`` with channel-major order confused (tile instead of repeat)."""
    channels = ctx.tensor_channels(node.args[0])
    inner = math.prod(len(c) for c in channels[2:])
    ctx.freeze_all((channels[2:]), "flattened")
    return (channels[0], np.tile(channels[1], inner))


def view_partial(ctx, node):
    """``view(b, 4, 4)`` of ``[b, 16]`` that carries only the first 4 ids."""
    channels = ctx.tensor_channels(node.args[0])
    shape = ctx.shape(node)
    return (channels[0], ctx.space.fresh(shape[1], frozen="view"), channels[1][: shape[2]])


def repeat_tiled(ctx, node):
    """``repeat_interleave`` as ``repeat`` (tile instead of repeat)."""
    channels = list(ctx.tensor_channels(node.args[0]))
    channels[1] = np.tile(channels[1], rules.arg(node, 1, "repeats"))
    return tuple(channels)


def conv_as_dense(ctx, node):
    """A grouped or depthwise convolution analysed as if ``groups == 1``."""
    module = ctx.module(node)
    channels = ctx.tensor_channels(node.args[0])
    out, cdim = rules._conv_spatial(ctx, node, channels, module.weight.dim() - 2)
    out_ids = ctx.space.fresh(module.out_channels)
    ctx.space.add_slice(node.target, "weight", 1, channels[cdim][: module.weight.shape[1]], rules.Role.CONSUMER)
    ctx.space.add_slice(node.target, "weight", 0, out_ids, rules.Role.PRODUCER)
    if module.bias is not None:
        ctx.space.add_slice(node.target, "bias", 0, out_ids, rules.Role.PRODUCER)
    out[cdim] = out_ids
    return tuple(out)


def without_role(role) -> Callable:
    """A parametrised-op rule that forgets to declare its slices of ``role`` (consumer columns, producer bias)."""

    def analyze(ctx, node):
        add_slice = ctx.space.add_slice
        ctx.space.add_slice = lambda *a, **k: None if (a[4] if len(a) > 4 else k.get("role")) is role else add_slice(*a, **k)
        try:
            return RULES_BEFORE[type(ctx.module(node))].analyze(ctx, node)
        finally:
            ctx.space.add_slice = add_slice

    return analyze


def bias_forgotten(ctx, node):
    """Linear/conv that declares the weight rows but not the bias as producers."""
    add_slice = ctx.space.add_slice
    ctx.space.add_slice = lambda target, name, *rest: None if name == "bias" else add_slice(target, name, *rest)
    try:
        return RULES_BEFORE[type(ctx.module(node))].analyze(ctx, node)
    finally:
        ctx.space.add_slice = add_slice


def fresh_output(ctx, node):
    """An op whose output gets new, unfrozen channels unrelated to its input (lost provenance)."""
    return tuple(ctx.space.fresh(n) for n in ctx.shape(node))


def wrong_linear_dim(ctx, node):
    """Linear that keeps the input's last-dim ids for its output and declares no producer rows.

    (Keeping the ids *with* the rows declared as producers is merely over-coupled:
    a correct, less compressed model, which verification rightly accepts.)
    """
    channels = ctx.tensor_channels(node.args[0])
    ctx.space.add_slice(node.target, "weight", 1, channels[-1], rules.Role.CONSUMER)
    return tuple(channels)


RULES_BEFORE = dict(RULES._rules)

# ---------------------------------------------------------------------------- models that exercise them


class Seq(nn.Sequential):
    pass


def _mlp(*middle):
    return lambda: nn.Sequential(nn.Linear(8, 16), *middle, nn.Linear(16, 4))


def _cnn(*middle):
    return lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *middle, nn.Flatten(), nn.Linear(16 * 16, 4))


class Lambda(nn.Module):
    """A two-branch block: ``fn(a(x), b(x))`` with a head that reads every channel."""

    def __init__(self, fn, width=16, n_in=8, out=None) -> None:
        super().__init__()
        self.fn = fn
        self.a, self.b, self.c = nn.Linear(n_in, width), nn.Linear(n_in, width), nn.Linear(n_in, width)
        self.head = nn.Linear(out or width, 4)

    def forward(self, x):
        return self.head(self.fn(self.a(x), self.b(x), self.c(x)))


class ConvPair(nn.Module):
    """Two conv branches combined by ``fn`` and a conv head."""

    def __init__(self, fn, mid=None) -> None:
        super().__init__()
        self.fn, self.a, self.b = fn, nn.Conv2d(3, 16, 1), nn.Conv2d(3, 16, 1)
        self.mid = mid or nn.Identity()
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.mid(self.fn(self.a(x), self.b(x))))


class Sandwich(nn.Module):
    """Linear layers around a conv (channels-last between them), so each kind has producers of the other kind."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.inp, self.conv, self.out = nn.Linear(8, 16), nn.Conv2d(16, 16, 3, padding=1, groups=groups), nn.Linear(16, 4)
        self.mid = nn.Linear(16, 16)

    def forward(self, x):
        y = self.conv(self.inp(x).permute(0, 3, 1, 2)).relu().permute(0, 2, 3, 1)
        return self.out(self.mid(y).relu())


class ConvAroundLinear(nn.Module):
    """Convolutions around a linear layer applied channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.out = nn.Conv2d(3, 16, 1), nn.Linear(16, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(self.fc(self.inp(x).relu().permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def _lam(fn, **kw):
    return lambda: Lambda(fn, **kw)


def _convpair(fn, mid=None):
    return lambda: ConvPair(fn, mid() if mid else None)


def _add(a, b, c):
    return a + b


def _sub(a, b, c):
    return a - b


def _mul(a, b, c):
    return a * b


def _torch_add(a, b, c):
    return torch.add(a, b)


def _maximum(a, b, c):
    return torch.maximum(a, b)


def _where(a, b, c):
    return torch.where(a > 0, b, c)


def _cat(a, b, c):
    return torch.cat([a[:, :8], b[:, :8]], dim=1)


def _cat3(a, b, c):
    return torch.cat([a.unsqueeze(1), b.unsqueeze(1)], dim=1).sum(1)


def _chunk(a, b, c):
    x, y = torch.chunk(a, 2, dim=1)
    return torch.cat([y * 2.0, x], dim=1)


def _split(a, b, c):
    x, y = a.split(8, dim=1)
    return torch.cat([y, x.relu()], dim=1)


def _slice(a, b, c):
    return a[:, 4:12]


def _softmax(a, b, c):
    return F.softmax(a, dim=1)


def _mean(a, b, c):
    return a - a.mean(dim=1, keepdim=True)


def _sum(a, b, c):
    return a * a.sum(1, keepdim=True)


def _rsqrt(a, b, c):
    return torch.rsqrt(a * a) * b


def _matmul(a, b, c):
    return torch.matmul(a.unsqueeze(1), b.unsqueeze(2)).squeeze(2) * c


def _transpose(a, b, c):
    return a.view(-1, 4, 4).transpose(1, 2).reshape(-1, 16) + b


def _permute(a, b, c):
    return a.view(-1, 4, 4).permute(0, 2, 1).reshape(-1, 16)


def _view(a, b, c):
    return a.view(-1, 4, 4).sum(1)


def _repeat(a, b, c):
    return a[:, :8].view(-1, 8, 1).repeat_interleave(2, dim=1).view(-1, 16) * b


def _cumsum(a, b, c):
    return a.cumsum(1)


def _layer_norm(a, b, c):
    return F.layer_norm(a, (16,))


def _conv_add(a, b):
    return a + b


def _conv_cat(a, b):
    return torch.cat([a[:, :8], b[:, :8]], dim=1)


def _conv_mul(a, b):
    return a * torch.sigmoid(b.mean((2, 3), keepdim=True))


MUTANTS: list[Mutant] = [
    Mutant("linear as channel-wise", nn.Linear, passthrough, ConvAroundLinear, (2, 3, 4, 4)),
    Mutant("linear keeps input ids, no producers", nn.Linear, wrong_linear_dim, ConvAroundLinear, (2, 3, 4, 4)),
    Mutant("linear forgets consumer columns", nn.Linear, without_role(rules.Role.CONSUMER), _mlp(nn.ReLU()), (4, 8)),
    Mutant("linear forgets bias", nn.Linear, bias_forgotten, _mlp(nn.ReLU()), (4, 8)),
    Mutant("conv as channel-wise", nn.Conv2d, passthrough, Sandwich, (2, 4, 4, 8)),
    Mutant("grouped conv as channel-wise", nn.Conv2d, passthrough, lambda: Sandwich(groups=4), (2, 4, 4, 8)),
    Mutant("conv forgets consumer columns", nn.Conv2d, without_role(rules.Role.CONSUMER),
           _cnn(nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(4)), (2, 3, 8, 8)),
    Mutant("conv forgets bias", nn.Conv2d, bias_forgotten, _cnn(nn.ReLU(), nn.AdaptiveAvgPool2d(4)), (2, 3, 8, 8)),
    Mutant("grouped conv as dense", nn.Conv2d, conv_as_dense, lambda: nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(16, 4, 1)),
        (2, 3, 4, 4)),
    Mutant("depthwise conv as dense", nn.Conv2d, conv_as_dense, lambda: nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 4, 1)),
        (2, 3, 4, 4)),
    Mutant("batch norm without its parameters", nn.BatchNorm2d, passthrough,
           lambda: nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)), (2, 3, 4, 4)),
    Mutant("layer norm module as channel-wise", nn.LayerNorm, passthrough, _mlp(nn.LayerNorm(16)), (4, 8)),
    Mutant("layer norm module, whole-width statistics", nn.LayerNorm, rules.layer_norm_module,
           _mlp(nn.LayerNorm(16)), (4, 8)),
    Mutant("rms norm module, whole-width statistics", nn.RMSNorm, rules.layer_norm_module,
           _mlp(nn.RMSNorm(16)), (4, 8)),
    Mutant("group norm as channel-wise", nn.GroupNorm, passthrough,
           lambda: nn.Sequential(nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16), nn.Conv2d(16, 4, 1)), (2, 3, 4, 4)),
    Mutant("group norm prunes inside a group", nn.GroupNorm, group_norm_per_channel,
           lambda: nn.Sequential(nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16), nn.Conv2d(16, 4, 1)), (2, 3, 4, 4)),
    Mutant("softmax module unfrozen", nn.Softmax, unfrozen(rules.softmax), _mlp(nn.Softmax(dim=1)), (4, 8)),
    Mutant("add drops second operand", operator.add, first_operand, _lam(_add), (4, 8)),
    Mutant("sub drops second operand", operator.sub, first_operand, _lam(_sub), (4, 8)),
    Mutant("mul drops second operand", operator.mul, first_operand, _lam(_mul), (4, 8)),
    Mutant("torch.add drops second operand", torch.add, first_operand, _lam(_torch_add), (4, 8)),
    Mutant("maximum drops second operand", torch.maximum, first_operand, _lam(_maximum), (4, 8)),
    Mutant("where drops third operand", torch.where, second_dropped_where, _lam(_where), (4, 8)),
    Mutant("conv residual add drops operand", operator.add, first_operand, _convpair(_conv_add), (2, 3, 4, 4)),
    Mutant("SE gate mul drops the gate", operator.mul, first_operand, _convpair(_conv_mul), (2, 3, 4, 4)),
    Mutant("cat with swapped offsets", torch.cat, cat_reversed, _lam(_cat), (4, 8)),
    Mutant("conv cat with swapped offsets", torch.cat, cat_reversed, _convpair(_conv_cat), (2, 3, 4, 4)),
    Mutant("cat forgets coupling of other dims", torch.cat, cat_uncoupled, _lam(_cat3), (4, 8)),
    Mutant("chunk sections swapped", torch.chunk, split_reversed, _lam(_chunk), (4, 8)),
    Mutant("split sections swapped", ".split", split_reversed, _lam(_split), (4, 8)),
    Mutant("slice offset forgotten", operator.getitem, getitem_offset_zero, _lam(_slice, out=8), (4, 8)),
    Mutant("softmax unfrozen", F.softmax, unfrozen(rules.softmax), _lam(_softmax), (4, 8)),
    Mutant("mean over channels unfrozen", ".mean", unfrozen(rules.reduction), _lam(_mean), (4, 8)),
    Mutant("mean over channels, whole-width statistics", ".mean", rules.mean, _lam(_mean), (4, 8)),
    Mutant("sum over channels unfrozen", ".sum", unfrozen(rules.reduction), _lam(_sum), (4, 8)),
    Mutant("rsqrt unfrozen", torch.rsqrt, unfrozen(rules.channelwise_unbounded), _lam(_rsqrt), (4, 8)),
    Mutant("matmul contraction unfrozen", torch.matmul, unfrozen(rules.matmul), _lam(_matmul), (4, 8)),
    Mutant("transpose forgets to move dims", ".transpose", swap_identity, _lam(_transpose), (4, 8)),
    Mutant("permute forgets to move dims", ".permute", swap_identity, _lam(_permute), (4, 8)),
    Mutant("view carries part of the ids", ".view", view_partial, _lam(_view, out=4), (4, 8)),
    Mutant("repeat_interleave as repeat", ".repeat_interleave", repeat_tiled, _lam(_repeat), (4, 8)),
    Mutant("flatten order confused", nn.Flatten, flatten_tiled, _cnn(nn.ReLU(), nn.AdaptiveAvgPool2d(4)), (2, 3, 8, 8)),
    Mutant("cumsum unfrozen", ".cumsum", unfrozen(rules.cumulative), _lam(_cumsum), (4, 8)),
    Mutant("layer_norm function unfrozen", F.layer_norm, unfrozen(rules.layer_norm_function), _lam(_layer_norm), (4, 8)),
    Mutant("reshape output loses provenance", ".reshape", fresh_output, _lam(_transpose), (4, 8)),
]


def is_killed(mutant: Mutant) -> tuple[bool, str]:
    """Compile the mutant's model under the broken rule; killed iff a ``VerificationError`` is raised."""
    torch.manual_seed(0)
    model = mutant.model().eval()
    x = torch.randn(*mutant.shape)
    with mutated(mutant.key, mutant.analyze), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fxcompress.compile(model, x, standard_pruning(L1Norm(0.5)), verify=True)
        except VerificationError as exc:
            return True, str(exc).splitlines()[0][:110]
        except Exception as exc:  # noqa: BLE001 - a crash is a survival: verification must name it
            return False, f"{type(exc).__name__}: {str(exc)[:100]}"
    return False, "compiled without complaint"


def main() -> int:
    start, killed = time.perf_counter(), 0
    for mutant in MUTANTS:
        dead, why = is_killed(mutant)
        killed += dead
        print(f"{'killed ' if dead else 'SURVIVED'}  {mutant.name:40s} {why}")
    n = len(MUTANTS)
    print(f"\n{killed}/{n} mutants killed ({100 * killed / n:.0f} %) in {time.perf_counter() - start:.1f} s")
    return 0 if killed == n else 1


if __name__ == "__main__":
    sys.exit(main())
