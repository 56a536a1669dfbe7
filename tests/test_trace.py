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


def test_the_copy_shares_memory_until_written_and_each_side_stays_independent():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied, other = copy_model(model), copy_model(model)
    assert type(copied[0].weight) is nn.Parameter and copied[0].weight.requires_grad
    optimizer = torch.optim.SGD(copied.parameters(), lr=1.0)  # training the copy writes its parameters in place
    copied(torch.randn(8, 64)).square().sum().backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert not torch.equal(copied[0].weight, model[0].weight)
    with torch.no_grad():  # and writing the user's model leaves a copy alone
        model[0].weight.mul_(3.0)
        model[1].running_mean.add_(1.0)
    assert torch.equal(other[0].weight, before["0.weight"]) and torch.equal(other[1].running_mean, before["1.running_mean"])


def test_numpy_backed_tensors_are_copied_at_once():
    import numpy as np

    model = torch.nn.Linear(3, 3)
    model.register_buffer("table", torch.from_numpy(np.arange(6.0)))  # memory torch's allocator does not own
    copied = copy_model(model)
    copied.table.add_(1.0)
    assert torch.equal(model.table, torch.arange(6.0, dtype=torch.float64))


def test_compile_restores_the_garbage_collector_as_it_found_it():
    import gc

    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4)
    assert gc.isenabled()
    fxcompress.compile(model, x)
    assert gc.isenabled()
    gc.disable()
    try:
        fxcompress.compile(model, x)
        assert not gc.isenabled()
    finally:
        gc.enable()
