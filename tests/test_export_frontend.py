"""The torch.export frontend prunes as much as symbolic_trace (issue 13, frontend parity).

Export graphs spell batch norm, pooling, padding, grouped convolutions and
in-place activations as aten ops; each has a rule, so the same model pruned
through either frontend keeps the same channels and stays equivalent.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxcompress
from fxcompress.analysis import OpaqueOpWarning, analyze
from fxcompress.prune import L1Norm
from fxcompress.rules import RULES
from fxcompress.sweep import check_pruning

aten = torch.ops.aten


def _check(model, x, frontend):
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpaqueOpWarning)  # every op has a rule
        return check_pruning(model.eval(), x, L1Norm(0.5), frontend=frontend)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)])
def test_export_prunes_torchvision_models_as_much_as_symbolic_trace(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    x = torch.randn(1, 3, 64, 64)
    fx_check, export_check = _check(model, x, "fx"), _check(model, x, "export")
    assert export_check.error < 1e-5
    assert export_check.macs_shrunk == fx_check.macs_shrunk
    assert export_check.params_shrunk == fx_check.params_shrunk
    assert export_check.macs_ratio > 2.5


class WithAuxiliaryHead(nn.Module):
    """GoogLeNet's pattern: a classifier that only runs in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.aux = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            return y, self.aux(y.mean((2, 3)))
        return y


def test_export_keeps_only_the_weights_the_traced_path_reads():
    model, x = WithAuxiliaryHead().eval(), torch.randn(1, 3, 8, 8)
    gm = fxcompress.compile(model, x, [], frontend="export")
    assert [name for name, _ in gm.named_parameters()] == ["conv.weight", "conv.bias"]
    assert torch.equal(gm(x), model(x)) and hasattr(model, "aux")


def test_export_graph_of_resnet18_has_the_same_groups_as_its_fx_graph():
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    sizes = {}
    for frontend in ("fx", "export"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", OpaqueOpWarning)
            analysis = analyze(fxcompress.trace(model, x, frontend=frontend))
        sizes[frontend] = sorted(len(g) for g in analysis.prunable_groups())
    assert sizes["export"] == sizes["fx"] and len(sizes["fx"]) == 12


def test_export_gives_every_tensor_the_role_symbolic_trace_gives_it():
    """Running statistics read through get_attr are buffers, not affine weights that criteria score."""
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    roles = {}
    for frontend in ("fx", "export"):
        analysis = analyze(fxcompress.trace(model, x, frontend=frontend))
        pieces = [analysis.slices[k] for g in analysis.prunable_groups() for k in g.slices]
        roles[frontend] = {(p.target, p.dim): p.role for p in pieces}
    assert roles["export"] == roles["fx"]
    assert roles["export"][("bn1.running_var", 0)].name == "BUFFER"


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` pattern: a BatchNorm2d subclass that calls ``F.batch_norm`` itself."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return F.relu(x)


class PaddedNet(nn.Module):
    def __init__(self, pool_indices=False):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 16, 3), BatchNormAct(16)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.pool = nn.MaxPool2d(2, return_indices=pool_indices)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.pool_indices = pool_indices

    def forward(self, x):
        y = self.bn(self.conv1(x))
        y = F.pad(y, (1, 1, 1, 1))
        y = self.dw(y).relu_()
        y = self.pool(y)
        if self.pool_indices:
            y = y[0]
        return self.conv2(y)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("pool_indices", [False, True])
def test_functional_batch_norm_pad_depthwise_and_inplace_ops_prune(frontend, pool_indices):
    torch.manual_seed(0)
    model = PaddedNet(pool_indices).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    check = _check(model, x, frontend)
    assert check.error < 1e-5
    small = fxcompress.compile(model, x, fxcompress.passes.standard_pruning(L1Norm(0.5)), frontend=frontend)
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    assert shapes["conv1.weight"] == (8, 3, 3, 3) and shapes["bn.running_mean"] == (8,)
    assert shapes["dw.weight"] == (8, 1, 3, 3) and shapes["conv2.weight"] == (8, 8, 1, 1)
    assert small(x).shape == (2, 8, 7, 7)


def test_padding_a_channel_dim_freezes_it():
    class PadChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(10, 4, 1)

        def forward(self, x):
            return self.conv2(F.pad(self.conv1(x), (0, 0, 0, 0, 1, 1)))

    analysis = analyze(fxcompress.trace(PadChannels().eval(), torch.randn(1, 3, 4, 4)))
    assert analysis.prunable_groups() == []
    assert any("padded by" in (g.frozen_reason or "") for g in analysis.groups)


def test_in_place_aten_ops_share_their_functional_rule():
    gm = fxcompress.trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True)).eval(), torch.randn(1, 3, 4, 4),
                          frontend="export")
    relu = next(n for n in gm.graph.nodes if n.target is aten.relu_.default)
    assert aten.relu_.default not in RULES
    functional = gm.graph.call_function(aten.relu.default, relu.args)
    assert RULES.lookup(gm, relu) is RULES.lookup(gm, functional)
    gm.graph.erase_node(functional)


def test_an_exported_graph_switches_mode_like_a_module_and_warns_when_it_cannot_follow():
    """torch's unlifted module refuses .train()/.eval(); the compiled one accepts them and says, once, that
    dropout keeps the captured behaviour."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    x = torch.randn(2, 4)
    compiled = fxcompress.compile(model, x, [], frontend="export")
    assert compiled.eval() is compiled and not compiled.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x)
    compiled.train()
    with pytest.warns(UserWarning, match="captured by torch.export in eval mode"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))  # dropout stays off, as captured
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x)  # once
