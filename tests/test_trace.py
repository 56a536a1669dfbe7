"""The frontend's shape propagation: meta tensors, a real forward where an op needs values."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import meta

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
