"""FoldQDQ: the QDQ graph (node order), integer storage, collapse of redundant pairs, agreement."""

import operator

import torch
from torch import fx

from fxcompress.passes.fold_qdq import FoldQDQ, QParams
from fxcompress.quant.ops import DEQUANTIZE, QUANTIZE
from quant_helpers import inputs, ptq

Q, DQ = "Q", "DQ"


def _ops(gm: fx.GraphModule) -> list[str]:
    names = {QUANTIZE: Q, DEQUANTIZE: DQ}
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
