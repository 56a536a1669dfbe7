"""SmoothQuant and simulated W8A8 (smooth-activations, quantize-activations): float outputs unchanged by the
smoothing, outliers flattened, W8A8 error lowered against plain W8A8, folds into norms or an explicit mul."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.oneshot import ActivationQuant, FakeQuantActivation, SmoothQuant, input_absmax, outlier_ratio
from fxcompress.passes import QuantizeActivations, SmoothActivations, w8a8_passes
from fxcompress.pipeline import parse_pipeline, run_pipeline
from fxcompress.trace import fetch_attr

pytestmark = pytest.mark.usefixtures("one_thread")


def outlier_case() -> tuple[nn.Module, list[torch.Tensor]]:
    """A norm whose weight makes inputs 3 and 17 of the next linear 300 and 200 times louder than the rest (the
    weights reading them are small, so every channel matters to the output, as in LLMs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    with torch.no_grad():
        model[0].weight[[3, 17]] = torch.tensor([300.0, -200.0])
        model[1].weight[:, [3, 17]] /= 30
    return model, [torch.randn(32, 64) for _ in range(4)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().norm() / want.detach().norm())


def node_for(gm, target: str):
    return next(n for n in gm.graph.nodes if n.target == target)


def smoothed(model, data, frontend="fx", alpha=0.5):
    gm = fxcompress.trace(model, data[0], frontend=frontend)
    result = SmoothActivations(SmoothQuant(alpha), data)(gm)
    return gm, result.modified


# ---------------------------------------------------------------------------- the defining properties


def test_smoothing_leaves_the_float_outputs_unchanged_and_folds_into_the_layer_norm():
    model, data = outlier_case()
    x = torch.randn(16, 64)
    gm, modified = smoothed(model, data)
    assert modified
    assert relative_error(gm(x), model(x)) < 1e-5
    how = gm.meta[meta.SMOOTHED]
    assert how["1.weight"] == "folded into 0"  # LayerNorm's weight and bias absorbed 1/s
    assert how["3.weight"].startswith("mul node")  # after ReLU nothing can absorb it: an explicit mul
    assert not torch.equal(gm.get_submodule("0").weight, model[0].weight)
    muls = [n for n in gm.graph.nodes if n.target is torch.mul]
    assert len(muls) == 1 and list(muls[0].users) == [node_for(gm, "3")]


def test_smoothing_flattens_the_activation_outliers():
    model, data = outlier_case()
    gm = fxcompress.trace(model, data[0])
    before = outlier_ratio(input_absmax(gm, [node_for(gm, "0")], data)[node_for(gm, "0")])
    run_pipeline(gm, [SmoothActivations(SmoothQuant(0.5), data)])
    after = outlier_ratio(input_absmax(gm, [node_for(gm, "0")], data)[node_for(gm, "0")])
    assert before > 100 and after < before / 20  # 293 -> 3.1 here
    stronger = smoothed(model, data, alpha=0.9)[0]
    assert outlier_ratio(input_absmax(stronger, [node_for(stronger, "0")], data)[node_for(stronger, "0")]) < after


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_smoothquant_w8a8_loses_less_than_plain_w8a8_on_an_outlier_channel(granularity):
    model, data = outlier_case()
    x = torch.randn(64, 64)
    with torch.no_grad():
        reference = model(x)
        errors = {alpha: relative_error(fxcompress.compile(model, data[0], w8a8_passes(data, alpha, granularity))(x),
                                        reference) for alpha in (None, 0.5)}
    assert errors[0.5] < 0.2 * errors[None]  # per tensor 0.034 vs 0.53, per token 0.011 vs 0.36


def test_w8a8_weights_lie_on_per_channel_int8_grids_and_activations_on_an_int8_grid():
    model, data = outlier_case()
    q = fxcompress.compile(model, data[0], w8a8_passes(data, 0.5))
    grids = q.meta[meta.WEIGHT_GRIDS]
    assert set(grids) == {"1.weight", "3.weight"}
    for target, grid in grids.items():
        assert grid.bits == 8 and grid.scale.shape[1] == 1 and grid.holds(fetch_attr(q, target))
    quantizers = [m for m in q.modules() if isinstance(m, FakeQuantActivation)]
    assert len(quantizers) == 2 and all(m.scale is not None for m in quantizers)
    x = torch.randn(8, 64) * 3
    levels = quantizers[0](x) / quantizers[0].scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 128


def test_per_token_quantization_gives_each_row_its_own_scale():
    fake = FakeQuantActivation(8)
    x = torch.tensor([[0.3, 0.2, -0.1], [30.0, 20.0, -10.0]])
    assert torch.allclose(fake(x)[1], 100 * fake(x)[0], rtol=1e-6)
    static = FakeQuantActivation(8, torch.tensor(100.0))
    assert torch.equal(static(x)[0], torch.zeros(3))  # one scale for both rows: the quiet row rounds to 0


# ---------------------------------------------------------------------------- folds in exported graphs


class RMSNorm(nn.Module):
    """The Hugging Face Llama spelling: ``weight * normalized`` (an exported graph ends it with a ``mul``)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.gate, self.up, self.down = RMSNorm(32), nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32)
        with torch.no_grad():
            self.norm.weight[5] = 80.0

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.relu(self.gate(h)) * self.up(h))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_rms_norm_ending_in_mul_by_its_weight_absorbs_the_division(frontend):
    torch.manual_seed(0)
    model, data = Block().eval(), [torch.randn(2, 8, 32) for _ in range(2)]
    x = torch.randn(2, 8, 32)
    gm, _ = smoothed(model, data, frontend=frontend)
    assert relative_error(gm(x), model(x)) < 1e-5
    how = gm.meta[meta.SMOOTHED]
    assert how["gate.weight"] == how["up.weight"] and how["gate.weight"].startswith("folded into")  # one shared s
    assert how["down.weight"].startswith("mul node")
    assert float(gm.get_parameter("norm.weight").detach()[5]) < 80.0 / 4


def test_an_input_that_also_feeds_a_residual_gets_a_mul_node_and_the_residual_keeps_its_values():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            h = self.norm(x)
            return h + self.fc(h)

    model, data = Residual().eval(), [torch.randn(8, 16) for _ in range(2)]
    gm, _ = smoothed(model, data)
    assert gm.meta[meta.SMOOTHED]["fc.weight"].startswith("mul node")
    assert torch.equal(gm.get_submodule("norm").weight, model.norm.weight)
    x = torch.randn(4, 16)
    assert relative_error(gm(x), model(x)) < 1e-5


# ---------------------------------------------------------------------------- the passes' contract


def test_second_runs_change_nothing_and_compile_verifies_the_smoothing():
    model, data = outlier_case()
    passes = w8a8_passes(data, 0.5)
    gm = fxcompress.compile(model, data[0], passes)  # verify=True: smooth-activations must keep outputs
    for one in (passes[0], passes[2]):
        assert not one(gm).modified
    assert sum(isinstance(m, FakeQuantActivation) for m in gm.modules()) == 2


def test_excluded_layers_are_neither_smoothed_nor_quantized():
    model, data = outlier_case()
    q = fxcompress.compile(model, data[0], w8a8_passes(data, 0.5, exclude=("3",)))
    assert set(q.meta[meta.SMOOTHED]) == {"1.weight"} and set(q.meta[meta.WEIGHT_GRIDS]) == {"1.weight"}
    assert sum(isinstance(m, FakeQuantActivation) for m in q.modules()) == 1


def test_text_forms_and_bad_options():
    passes = parse_pipeline("smooth-activations{alpha=0.8,exclude=lm_head},quantize-activations{granularity=token}")
    assert passes == [SmoothActivations(SmoothQuant(0.8, exclude=("lm_head",))),
                      QuantizeActivations(ActivationQuant("token"))]
    assert [p.to_text() for p in passes] == ["smooth-activations{alpha=0.8,exclude=lm_head}",
                                             "quantize-activations{granularity=token}"]
    for bad in (lambda: SmoothQuant(alpha=1.5), lambda: ActivationQuant("channel"), lambda: ActivationQuant(bits=9),
                lambda: SmoothActivations(SmoothQuant(), torch.randn(2, 2))):
        with pytest.raises(ConfigError):
            bad()
    with pytest.raises(ConfigError, match="calibration data"):
        SmoothActivations(SmoothQuant(), [torch.randn(2, 2)]).to_text()
