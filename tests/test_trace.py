"""The frontend's shape propagation: meta tensors, a real forward where an op needs values."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import meta
from fxcompress.trace import copy_model

trace_module = importlib.import_module("fxcompress.trace")  # `fxcompress.trace` itself is the function


def _shapes(gm) -> dict[str, tuple]:
    return {n.name: tuple(n.meta[meta.TENSOR_META].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get(meta.TENSOR_META), "shape")}


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "efficientnet_b0", "swin_t"])
def test_meta_shapes_equal_real_ones(name):
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.get_model(name).eval(), torch.randn(1, 3, 64, 64)
    gm = fxcompress.trace(model, x)
    meta_shapes = _shapes(gm)
    assert all(t.device.type == "cpu" for t in [*gm.parameters(), *gm.buffers()])  # the meta twins were temporary
    trace_module.propagate_shapes(gm, (x,), exact_layout=True)  # a real forward
    assert meta_shapes == _shapes(gm)


class DataDependent(nn.Module):
    def forward(self, x):
        return x[x > 0].sum() + x  # boolean indexing: the shape depends on the values


def test_ops_meta_tensors_cannot_run_fall_back_to_a_real_forward():
    gm = fxcompress.trace(DataDependent(), torch.randn(4, 3))
    assert _shapes(gm)["add"] == (4, 3)


def test_the_capture_copy_is_independent_and_keeps_tied_weights_tied():
    first = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(first, torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4)).eval()
    model[2].weight = first.weight
    copied = copy_model(model)
    assert copied[0].weight is copied[2].weight and copied[0].weight is not first.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copied.state_dict().values()))
    with torch.no_grad():
        copied[1].running_mean.add_(1.0)
        copied[0].weight.mul_(2.0)
    assert torch.equal(model[1].running_mean, torch.zeros(4)) and not torch.equal(model[0].weight, copied[0].weight)
