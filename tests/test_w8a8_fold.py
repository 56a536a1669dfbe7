"""W8A8 into real int8: fold-qdq turns quantize-activations' static rounding and one-shot int8 weight grids
into the QDQ form ONNX Runtime fuses (``form="onnx"``) and the one Inductor lowers (``form="pt2e"``)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import fxcompress
from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.export import to_onnx
from fxcompress.oneshot import RTN, ActivationQuant, FakeQuantActivation
from fxcompress.passes import OneShot, QuantizeActivations, w8a8_passes
from fxcompress.passes import fold_qdq
from fxcompress.passes.fold_qdq import FoldQDQ, QParams, QuantizedWeights
from fxcompress.quant import inductor
from fxcompress.quant.ops import DEQUANTIZE

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A pre-norm transformer-style block: q/k share the normed input, an FFN reads their product, one
    output layer without bias; the norm makes input channel 3 forty times louder (SmoothQuant's case)."""

    def __init__(self):
        super().__init__()
        self.norm, self.q, self.k = nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.fc, self.out = nn.Linear(64, 128), nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            self.norm.weight[3] = 40.0

    def forward(self, x):
        h = self.norm(x)
        return x + self.out(torch.relu(self.fc(h + self.q(h) * self.k(h))))


def case():
    torch.manual_seed(0)
    return Block().eval(), [torch.randn(2, 16, 64) for _ in range(4)]


def w8a8(frontend: str = "fx", alpha: float | None = 0.5):
    model, data = case()
    simulated = fxcompress.compile(fxcompress.trace(model, data[0], frontend=frontend), data[0],
                                   w8a8_passes(data, alpha))
    return simulated, data


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_w8a8_folds_into_int8_weights_and_qdq_activations_that_onnx_runtime_reproduces(frontend):
    simulated, data = w8a8(frontend)
    folded = fxcompress.compile(simulated, data[0], [FoldQDQ()])
    assert not any(isinstance(m, FakeQuantActivation) for m in folded.modules())
    stored = {path: m for path, m in folded.named_modules() if isinstance(m, QuantizedWeights)}
    assert len(stored) == 4 and all(m.weight.dtype == torch.int8 for m in stored.values())
    assert all(m.zero_point.dtype == torch.uint8 and int(m.zero_point) == 128
               for m in folded.modules() if isinstance(m, QParams))  # the signed grid, shifted by 128
    assert not folded.meta[meta.WEIGHT_GRIDS]  # stored as integers now: no MatMulNBits, no pack-weights
    assert sum(p.numel() for p in folded.parameters()) == 128  # only the norm's float parameters are left
    x = torch.randn(3, 16, 64)
    # the same grids; only the int32 bias (on the grid input scale x weight scale) rounds, which moves a
    # few values to the neighbouring step of the next quantizer
    assert relative(folded(x), simulated(x)) < 1e-2
    result = to_onnx(folded, data[0])
    assert result.quantized and result.max_error <= result.tolerance
    int8_weights = [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 4


def test_a_wrong_activation_grid_is_caught_by_the_outputs(monkeypatch):
    """The check can fail: the same fold with zero point 0 instead of 128 is far from the simulation."""
    simulated, data = w8a8()
    x = torch.randn(3, 16, 64)
    monkeypatch.setattr(fold_qdq, "_w8a8_qparams",
                        lambda gm, node, module: QParams(module.scale, torch.tensor(0, dtype=torch.uint8)))
    broken = fxcompress.compile(simulated, data[0], [FoldQDQ()])
    assert relative(broken(x), simulated(x)) > 0.05


def test_w8a8_pt2e_form_computes_the_simulation():
    simulated, data = w8a8()
    folded = fxcompress.compile(simulated, data[0], [FoldQDQ(form="pt2e")])
    ops = inductor.decomposed_ops()
    targets = [n.target for n in folded.graph.nodes]
    assert targets.count(ops.dequantize_per_channel.default) == 4 and DEQUANTIZE not in targets
    x = torch.randn(3, 16, 64)
    assert relative(folded(x), simulated(x)) < 1e-5  # float biases: the same values to float rounding


@pytest.mark.slow
def test_w8a8_runs_oneDNN_int8_linears_under_torch_compile():
    torch._dynamo.reset()
    simulated, data = w8a8()
    folded = fxcompress.compile(simulated, data[0], [FoldQDQ(form="pt2e")])
    x = torch.randn(2, 16, 64)
    kept = x.clone()
    out, code = run_and_get_code(inductor.compile(folded), x)
    assert inductor.int8_kernels(code) == {"qlinear": 4}
    # the residual add runs as a post-op accumulating into its other operand, here the caller's input
    assert torch.equal(x, kept)
    assert relative(out, folded(x)) < 1e-2


def test_grids_that_int8_kernels_do_not_take_stay_for_pack_weights_and_matmul_nbits():
    model, data = case()
    passes = [OneShot(RTN(bits=4, group_size=32), data, progress=False),
              QuantizeActivations(ActivationQuant(), data)]
    simulated = fxcompress.compile(model, data[0], passes)
    folded = fxcompress.compile(simulated, data[0], [FoldQDQ()])
    assert len(folded.meta[meta.WEIGHT_GRIDS]) == 4
    assert not any(isinstance(m, QuantizedWeights) for m in folded.modules())
    x = torch.randn(3, 16, 64)
    assert torch.equal(folded(x), simulated(x))  # q(dq(x)) in place of the fake rounding: the same values


def test_dynamic_per_token_activations_have_no_qdq_form_and_the_error_names_the_quantizer():
    model, data = case()
    simulated = fxcompress.compile(model, data[0], w8a8_passes(data, None, granularity="token"))
    with pytest.raises(ConfigError, match=r"act_quant_q.*dynamic.*ActivationQuant\('tensor'\)"):
        fxcompress.compile(simulated, data[0], [FoldQDQ()])


def test_a_weight_moved_off_its_grid_is_refused_by_name():
    simulated, data = w8a8(alpha=None)
    with torch.no_grad():
        simulated.get_submodule("fc").weight[0, 0] += 1e-3
    with pytest.raises(ConfigError, match="layer 'fc'.*not on the grid"):
        fxcompress.compile(simulated, data[0], [FoldQDQ()])
