"""fold-qdq{form=pt2e} under torch.compile: Inductor runs oneDNN int8 kernels and computes the simulated model.

Inductor compiles are slow (10-20 s for the small conv net on two cores):
the default suite compiles one model; the fallbacks are ``-m slow``.
"""

import dataclasses
import warnings

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import fxcompress
from fxcompress.errors import VerificationError
from fxcompress.export import QUANTIZED_RTOL
from fxcompress.passes import Calibrate, FakeQuantize, InsertObservers
from fxcompress.passes.fold_qdq import FoldQDQ
from fxcompress.quant import INT8_ACTIVATION, INT8_WEIGHT, MinMaxObserver, QuantSpec, inductor
from quant_helpers import config, inputs, ptq


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_compiled_small_cnn_runs_int8_kernels_and_matches_the_simulation(one_thread):
    torch._dynamo.reset()
    simulated = ptq().eval()  # eval: a quantizer in training mode moves its grid with every forward
    folded = fxcompress.compile(simulated, inputs(4), [FoldQDQ(form="pt2e")])
    x = inputs(8, 2)
    compiled = inductor.compile(folded)
    out, code = run_and_get_code(compiled, x)
    assert inductor.int8_kernels(code) == {"qconv": 2, "qlinear": 2}  # every layer, none left in float
    assert _relative(out, folded(x)) <= QUANTIZED_RTOL  # the same arithmetic up to float accumulation order
    assert inductor.relative_error(out, folded(x)) == _relative(out, folded(x))
    assert (out - simulated(x)).abs().max() <= 2 * float(simulated.fc2_aq.scale)
    assert torch.equal(out.argmax(1), simulated(x).argmax(1))


class _Flat(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x).flatten()


_AFFINE_WEIGHTS = QuantSpec(dataclasses.replace(INT8_WEIGHT, symmetric=False), MinMaxObserver())


@pytest.mark.slow
@pytest.mark.parametrize("layer, shape, spec, kernels, reason", [
    (nn.Conv2d(4, 8, 3), (1, 4, 8, 8), {}, {"qconv": 1}, None),
    (nn.Linear(16, 8), (2, 5, 16), {}, {"qlinear": 1}, None),
    (nn.Conv1d(4, 8, 3), (1, 4, 16), {}, {}, "conv1d"),  # lowered, it fails on the reshape that follows
    (nn.Conv2d(4, 8, 3), (1, 4, 8, 8), {"weight": _AFFINE_WEIGHTS}, {}, "zero points"),  # lowered, it is wrong
    (nn.Conv2d(4, 8, 3), (1, 4, 8, 8), {"activation": QuantSpec(INT8_ACTIVATION, MinMaxObserver())}, {}, "uint8"),
])
def test_layers_inductor_cannot_lower_fall_back_to_float(one_thread, layer, shape, spec, kernels, reason):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(*shape)
    cfg = dataclasses.replace(config(), **spec)
    simulated = fxcompress.compile(_Flat(layer).eval(), x, [InsertObservers(cfg), Calibrate((x,), progress=False),
                                                             FakeQuantize()]).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = fxcompress.compile(simulated, x, [FoldQDQ(form="pt2e")])
    named = [str(w.message) for w in caught if "fold-qdq" in str(w.message)]
    assert (reason is None and not named) or (len(named) == 1 and reason in named[0])
    out, code = run_and_get_code(inductor.compile(folded), x)
    assert inductor.int8_kernels(code) == kernels
    assert _relative(out, folded(x)) <= QUANTIZED_RTOL


def test_compile_with_example_inputs_verifies_against_the_model(one_thread):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    x = torch.randn(2, 8)
    assert inductor.compile(model, x).max_error <= 1e-5

    class Wrong(nn.Module):  # eager and compiled runs disagree: verification must say so
        def forward(self, x):
            return x + 1.0 if torch.compiler.is_compiling() else x

    with pytest.raises(VerificationError, match="differs from the model's"):
        inductor.compile(Wrong(), torch.ones(3))
