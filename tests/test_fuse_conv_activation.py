"""fuse-conv-activation: conv (+ residual add) + activation becomes one FusedConv2d call, outputs unchanged."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress.passes.channels_last import ChannelsLast
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.fuse_conv_activation import FuseConvActivation, FusedConv2d, fused_kernels_available

pytestmark = pytest.mark.skipif(not fused_kernels_available(), reason="PyTorch built without oneDNN")


class Residual(nn.Module):
    """relu(conv1(x)) then relu(conv2(.) + x): one unary and one binary fusion."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = act or nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.act(self.conv1(x))
        return F.relu(self.conv2(y) + x)


def node_kinds(gm: fx.GraphModule) -> list[str]:
    """Each node as ``op:target-type`` (module class name for modules), in graph order."""
    kinds = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            target = type(gm.get_submodule(n.target)).__name__
        else:
            target = getattr(n.target, "__name__", n.target)
        kinds.append(f"{n.op}:{target}")
    return kinds


def test_unary_and_binary_fusion_graph_and_outputs(helpers):
    model = Residual().eval()
    x = torch.randn(2, 8, 9, 9)
    gm = fxcompress.trace(model, x)
    assert node_kinds(gm) == [
        "placeholder:x", "call_module:Conv2d", "call_module:ReLU", "call_module:Conv2d",
        "call_function:add", "call_function:relu", "output:output",
    ]
    assert FuseConvActivation()(gm).modified
    gm.recompile()
    assert node_kinds(gm) == ["placeholder:x", "call_module:FusedConv2d", "call_module:FusedConv2d", "output:output"]
    assert (gm.conv1.activation.attr, gm.conv1.add) == ("relu", False)
    assert (gm.conv2.activation.attr, gm.conv2.add) == ("relu", True)
    helpers.outputs_agree(model, gm, (torch.randn(3, 8, 9, 9),), rtol=1e-5)


def test_second_run_is_a_no_op():
    gm = fxcompress.compile(Residual().eval(), torch.randn(1, 8, 6, 6), [FuseConvActivation()])
    code = gm.code
    assert not FuseConvActivation()(gm).modified
    assert gm.code == code


ACTS = [nn.ReLU6(), nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.GELU("tanh")]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: repr(a))
def test_activation_table(act, helpers):
    model = Residual(act).eval()
    gm = fxcompress.compile(model, torch.randn(1, 8, 6, 6), [FuseConvActivation()])
    assert isinstance(gm.conv1, FusedConv2d)
    helpers.outputs_agree(model, gm, (torch.randn(2, 8, 6, 6),), rtol=1e-5)


def test_conv_output_with_other_users_is_left_alone():
    class Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y), y

    gm = fxcompress.trace(Tap().eval(), torch.randn(1, 4, 5, 5))
    assert not FuseConvActivation()(gm).modified
    assert type(gm.conv) is nn.Conv2d


def test_conv_added_to_itself_is_not_fused_with_itself(helpers):
    class Double(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y + y)

    model = Double().eval()
    gm = fxcompress.compile(model, torch.randn(1, 4, 5, 5), [FuseConvActivation()])
    assert type(gm.conv) is nn.Conv2d
    helpers.outputs_agree(model, gm, (torch.randn(1, 4, 5, 5),))


def test_macs_report_counts_fused_convs(helpers):
    model = Residual().eval()
    x = torch.randn(1, 8, 6, 6)
    gm = fxcompress.compile(model, x, [FuseConvActivation()])
    assert helpers.count_macs(gm, (x,)) == helpers.count_macs(model, (x,)) == 2 * 8 * 8 * 9 * 36


def test_broadcasting_add_is_not_fused():
    class Bias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x, b):
            return torch.relu(self.conv(x) + b)

    gm = fxcompress.trace(Bias().eval(), (torch.randn(1, 4, 5, 5), torch.randn(4, 1, 1)))
    assert not FuseConvActivation()(gm).modified


def test_stays_trainable_state_dict_and_save(helpers, tmp_path):
    model = Residual().eval()
    keys = set(model.state_dict())
    gm = fxcompress.compile(model, torch.randn(1, 8, 6, 6), [FuseConvActivation()])
    assert set(gm.state_dict()) == keys  # same parameter names: loads into the original model and back
    copy.deepcopy(model).load_state_dict(gm.state_dict())
    gm.train()
    x = torch.randn(2, 8, 6, 6)
    gm(x).sum().backward()  # grad enabled: the eager fallback runs, autograd works
    assert gm.conv1.weight.grad is not None and gm.conv2.weight.grad is not None
    torch.save(gm, tmp_path / "fused.pt")
    loaded = torch.load(tmp_path / "fused.pt", weights_only=False).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), gm.eval()(x), atol=1e-6)


def test_after_fold_and_channels_last_on_resnet18(helpers):
    torchvision = pytest.importorskip("torchvision")
    model = helpers.randomize_norms(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxcompress.compile(model, x, [FoldBatchNorm(), ChannelsLast(), FuseConvActivation()])
    fused = Counter((m.activation.attr, m.add) for m in gm.modules() if isinstance(m, FusedConv2d))
    assert fused == Counter({("relu", False): 9, ("relu", True): 8})
    helpers.outputs_agree(model, gm, (torch.randn(1, 3, 32, 32),), rtol=1e-4)
