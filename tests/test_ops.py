"""fxcompress.ops: the one spelling of "which op does this node run" that every op table is read with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from fxcompress.ops import lookup, op_keys, runs_one_of
from fxcompress.quant.placement import OP_ROLES, OpRole
from fxcompress.rules import RULES


class ReLUSubclass(nn.ReLU):
    pass


class NotQuiteBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2  # computes something else: must not count as a BatchNorm2d


class Doubled(nn.Module):
    def forward(self, w):
        return w * 2


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act, self.bn, self.fc = ReLUSubclass(), NotQuiteBatchNorm(3), nn.Linear(3, 3)
        parametrize.register_parametrization(self.fc, "weight", Doubled())

    def forward(self, x):
        y = self.bn(self.act(x)).add_(1.0).relu_()
        return self.fc(F.relu(y).mean((2, 3)))


class EverySubmoduleALeaf(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _nodes():
    model = Model()
    gm = fx.GraphModule(model, EverySubmoduleALeaf().trace(model))
    return gm, {n.name: n for n in gm.graph.nodes}


def test_a_subclass_is_its_base_only_while_it_inherits_forward():
    gm, nodes = _nodes()
    assert list(op_keys(gm, nodes["act"]))[:2] == [ReLUSubclass, nn.ReLU]
    assert list(op_keys(gm, nodes["bn"])) == [NotQuiteBatchNorm]
    assert RULES.lookup(gm, nodes["bn"]) is None
    assert lookup(OP_ROLES, gm, nodes["act"]) is OpRole.FOLLOWER


def test_a_parametrized_layer_is_still_its_layer():
    gm, nodes = _nodes()
    assert nn.Linear in list(op_keys(gm, nodes["fc"]))
    assert lookup({nn.Linear: "linear"}, gm, nodes["fc"]) == "linear"


def test_in_place_spellings_fall_back_to_their_functional_twins():
    gm, nodes = _nodes()
    assert list(op_keys(gm, nodes["add_"])) == [".add_", ".add"]
    assert runs_one_of({".relu"}, gm, nodes["relu_"])
    assert lookup({".add": "add"}, gm, nodes["add_"]) == "add"
    assert runs_one_of({F.relu}, gm, nodes["relu"])
    assert not runs_one_of({torch.relu}, gm, nodes["relu"])


def test_placeholders_and_outputs_run_no_op():
    gm, nodes = _nodes()
    assert list(op_keys(gm, nodes["x"])) == [] and lookup(OP_ROLES, gm, nodes["output"], "none") == "none"
