"""FoldQDQ: the QDQ graph (node order), integer storage, collapse of redundant pairs, agreement."""

import operator

import pytest
import torch
from torch import fx

from fxcompress.passes.fold_qdq import FoldQDQ, QParams
from fxcompress.quant.ops import DEQUANTIZE, QUANTIZE
from quant_helpers import inputs, ptq

Q, DQ = "Q", "DQ"


def _ops(gm: fx.GraphModule, names: dict | None = None) -> list[str]:
    """The graph's calls in order: quantize/dequantize spelled by ``names``, other functions by name, modules
    by class."""
    names = {QUANTIZE: Q, DEQUANTIZE: DQ} if names is None else names
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            out.append(names.get(n.target, getattr(n.target, "__name__", str(n.target))))
        elif n.op == "call_module":
            out.append(type(gm.get_submodule(n.target)).__name__)
    return out


def test_folded_graph_is_standard_qdq():
    gm = ptq(fold=True)
    assert _ops(gm) == [
        Q, DQ, DQ, DQ, "conv2d", "relu", Q, DQ, "MaxPool2d", Q, DQ,
        DQ, DQ, "conv2d", "relu", Q, DQ, "MaxPool2d", Q, DQ, "flatten", Q, DQ,
        DQ, DQ, "linear", "relu", Q, DQ, DQ, DQ, "linear", Q, DQ,
    ]


def test_weights_are_stored_as_integers():
    gm = ptq(fold=True)
    assert gm.conv1.weight.dtype == torch.int8 and gm.conv1.bias.dtype == torch.int32
    assert gm.x_aq.zero_point.dtype == torch.uint8
    assert not any(p.is_floating_point() for name, p in gm.named_buffers() if name.endswith(".weight"))


def test_folding_agrees_with_the_simulation_and_second_run_is_a_no_op():
    simulated = ptq()
    folded = ptq(fold=True)
    x = inputs(32, 2)
    ref, out = simulated(x), folded(x)
    step = float(folded.fc2_aq.scale)
    assert (out - ref).abs().max() <= 2 * step  # int32 biases move an output by at most a grid step or so
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    code = folded.code
    assert FoldQDQ()(folded).modified is False and folded.code == code


def test_back_to_back_pairs_with_the_same_parameters_collapse():
    gm = ptq(fold=True)
    graph = gm.graph
    first_dq = next(n for n in graph.nodes if n.target is DEQUANTIZE)
    user = next(iter(first_dq.users))
    with graph.inserting_after(first_dq):  # a redundant requantization with the same stored grid
        q2 = graph.call_function(QUANTIZE, (first_dq, *first_dq.args[1:3]))
    with graph.inserting_after(q2):
        dq2 = graph.call_function(DEQUANTIZE, (q2, *first_dq.args[1:4]))
    user.replace_input_with(first_dq, dq2)
    gm.recompile()
    before = gm(inputs(4))
    n_before = _ops(gm).count(Q)
    assert FoldQDQ()(gm).modified is True
    assert _ops(gm).count(Q) == n_before - 1
    assert torch.equal(gm(inputs(4)), before)


def test_identity_modules_disappear():
    class WithDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.drop = torch.nn.Dropout(0.1)
            self.out = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.drop(operator.add(self.fc(x), 1.0)))

    import fxcompress
    from fxcompress.passes.calibrate import Calibrate
    from fxcompress.passes.fake_quantize import FakeQuantize
    from fxcompress.passes.insert_observers import InsertObservers
    from quant_helpers import config

    x = torch.randn(4, 8)
    gm = fxcompress.compile(WithDropout().eval(), x, [InsertObservers(config()), Calibrate((x,), progress=False),
                                                      FakeQuantize(), FoldQDQ()])
    assert "Dropout" not in _ops(gm)
    assert any(isinstance(m, QParams) for m in gm.modules())


# ---------------------------------------------------------------------------- form="pt2e" (Inductor's int8 input)


def _pt2e_ops(gm: fx.GraphModule) -> list[str]:
    ops = torch.ops.quantized_decomposed
    return _ops(gm, {ops.quantize_per_tensor.default: Q, ops.dequantize_per_tensor.default: DQ,
                     ops.dequantize_per_channel.default: "DQc", DEQUANTIZE: "dequantize"})


def _pt2e(gm: fx.GraphModule) -> fx.GraphModule:
    import fxcompress

    return fxcompress.compile(gm, inputs(4), [FoldQDQ(form="pt2e")])


def test_pt2e_form_is_what_convert_pt2e_writes():
    gm = _pt2e(ptq())
    assert _pt2e_ops(gm) == [
        Q, DQ, "DQc", "conv2d", "relu", Q, DQ, "MaxPool2d", Q, DQ,
        "DQc", "conv2d", "relu", Q, DQ, "MaxPool2d", Q, DQ, "flatten", Q, DQ,
        "DQc", "linear", "relu", Q, DQ, "DQc", "linear", Q, DQ,
    ]
    first_q = next(n for n in gm.graph.nodes if n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default)
    scale, zero_point, qmin, qmax, dtype = first_q.args[1:]
    assert isinstance(scale, float) and isinstance(zero_point, int) and (qmin, qmax, dtype) == (0, 255, torch.uint8)
    assert gm.conv1.weight.dtype == torch.int8 and gm.conv1.bias.dtype == torch.float32
    assert gm.conv1.weight_scale.shape == (8,) and gm.conv1.weight_zero_point.dtype == torch.int64


def test_pt2e_form_agrees_with_the_simulation_and_second_run_is_a_no_op():
    from fxcompress.pipeline import parse_pipeline

    simulated = ptq().eval()  # eval: a quantizer in training mode moves its grid with every forward
    folded = _pt2e(ptq())
    x = inputs(32, 2)
    ref, out = simulated(x), folded(x)
    # float biases: only rounding ties (x * (1 / scale) against x / scale) move a value, by one step
    assert (out - ref).abs().max() <= 2 * float(simulated.fc2_aq.scale)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    code = folded.code
    assert FoldQDQ(form="pt2e")(folded).modified is False and folded.code == code
    assert parse_pipeline("fold-qdq{form=pt2e}") == [FoldQDQ(form="pt2e")] and FoldQDQ(form="pt2e").to_text() == \
        "fold-qdq{form=pt2e}"


class ThreeHeads(torch.nn.Module):
    """Query, key and value projections and a residual add reading one (3-D) activation, as in a transformer."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) * self.v(x) + x


def three_heads_pt2e() -> fx.GraphModule:
    import fxcompress
    from fxcompress.passes import Calibrate, FakeQuantize, InsertObservers
    from quant_helpers import config

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    passes = [InsertObservers(config()), Calibrate((x,), progress=False), FakeQuantize(), FoldQDQ(form="pt2e")]
    return fxcompress.compile(ThreeHeads().eval(), x, passes)


def test_pt2e_form_gives_every_user_of_an_activation_its_own_dequantize():
    """PT2E gives each of the projections its own dequantize, which is what Inductor's int8 patterns match; the
    residual add's copy carries an explicit out_dtype so that Inductor's CSE does not merge it back into theirs."""
    gm = three_heads_pt2e()
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    linears = [n for n in gm.graph.nodes if n.target is torch.nn.functional.linear]
    assert len(linears) == 3 and len({n.args[0] for n in linears}) == 3
    assert all(n.args[0].target is dequantize and len(n.args[0].users) == 1 for n in linears)
    assert all(len(n.users) == 1 for n in gm.graph.nodes if n.target is dequantize)
    shared = linears[0].args[0].args[0]
    assert sorted(str(n.kwargs.get("out_dtype")) for n in shared.users) == ["None"] * 3 + ["torch.float32"]


@pytest.mark.slow
def test_projections_sharing_an_input_with_a_residual_all_run_int8_under_torch_compile(one_thread):
    from torch._inductor.utils import run_and_get_code

    from fxcompress.quant import inductor

    torch._dynamo.reset()
    gm = three_heads_pt2e()
    x = torch.randn(2, 4, 8)
    out, code = run_and_get_code(inductor.compile(gm), x)
    assert inductor.int8_kernels(code) == {"qlinear": 3}
    assert inductor.relative_error(out, gm(x)) <= 1e-4


def test_pt2e_layers_inductor_cannot_lower_read_float_weights_and_are_named():
    import warnings

    import fxcompress
    from fxcompress.passes.calibrate import Calibrate
    from fxcompress.passes.fake_quantize import FakeQuantize
    from fxcompress.passes.insert_observers import InsertObservers
    from quant_helpers import config

    class Volume(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 4, 3)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3, 4)))

    x = torch.randn(2, 2, 5, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    sim = fxcompress.compile(Volume().eval(), x, [InsertObservers(config()), Calibrate((x,), progress=False),
                                                  FakeQuantize()]).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxcompress.compile(sim, x, [FoldQDQ(form="pt2e")])
    messages = [str(w.message) for w in caught if "fold-qdq" in str(w.message)]
    assert len(messages) == 1 and "node 'conv3d'" in messages[0] and "conv3d" in messages[0].split(":")[-1]
    assert _pt2e_ops(gm).count("dequantize") == 1 and _pt2e_ops(gm).count("DQc") == 1  # linear stays int8
    assert gm.conv.weight.dtype == torch.int8
    assert (gm(x) - sim(x)).abs().max() <= 2 * float(sim.fc_aq.scale)


def test_unknown_form_is_a_config_error():
    import pytest

    from fxcompress.errors import ConfigError

    with pytest.raises(ConfigError, match="form must be one of onnx, pt2e"):
        FoldQDQ(form="tensorrt")
