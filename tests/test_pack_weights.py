"""Packed int8/int4 CPU kernels (fxcompress.kernels) and the pack-weights pass: the packed module computes what
the dequantized weights do, for every grid the kernels take; the others stay in float, named in one warning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.kernels import (
    Int4WeightLinear,
    Int8WeightLinear,
    kernels_available,
    pack_linear,
    pack_linears,
    packing_of,
)
from fxcompress.oneshot import AWQ, GPTQ, RTN, WeightGrid
from fxcompress.oneshot.grid import weight_scheme
from fxcompress.passes import OneShot, PackWeights
from fxcompress.pipeline import parse_pipeline

pytestmark = [pytest.mark.skipif(not all(kernels_available().values()), reason="this torch lacks the packed CPU kernels"),
              pytest.mark.usefixtures("one_thread")]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


# ---------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("bits, symmetric, group_size, kind", [
    (4, False, 32, Int4WeightLinear), (4, True, 64, Int4WeightLinear), (4, False, 128, Int4WeightLinear),
    (4, False, 256, Int4WeightLinear), (3, False, 32, Int4WeightLinear), (2, True, 64, Int4WeightLinear),
    (8, True, 256, Int8WeightLinear), (8, False, 256, Int8WeightLinear), (6, False, 256, Int8WeightLinear),
], ids=lambda v: str(getattr(v, "__name__", v)))
def test_the_packed_module_computes_the_dequantized_linear(bits, symmetric, group_size, kind):
    weight, bias, x = torch.randn(48, 256), torch.randn(48), torch.randn(2, 5, 256)
    grid = WeightGrid.fit(weight_scheme(bits, symmetric), weight, group_size)
    dequantized = grid.dequantize(grid.integers(weight))
    packed = pack_linear(dequantized, bias, grid, "layer")
    assert type(packed) is kind
    assert relative_error(packed(x), F.linear(x, dequantized, bias)) < 1e-5
    stored = packed.weight_int4 if kind is Int4WeightLinear else packed.weight_int8
    assert stored.element_size() * stored.numel() == 48 * 256 // (2 if kind is Int4WeightLinear else 1)


def test_an_awq_input_scale_divides_the_input_before_the_kernel():
    weight, x = torch.randn(32, 64), torch.randn(3, 64)
    grid = WeightGrid.fit(weight_scheme(4, False), weight, 32, input_scale=torch.rand(64) + 0.5)
    dequantized = grid.dequantize(grid.integers(weight))
    packed = pack_linear(dequantized, None, grid, "layer")
    assert packed.input_divisor is not None
    assert relative_error(packed(x), x @ dequantized.T) < 1e-5


def test_bf16_activations_run_on_bf16_scales():
    weight, x = torch.randn(32, 128), torch.randn(4, 128)
    for bits in (4, 8):
        grid = WeightGrid.fit(weight_scheme(bits, bits == 8), weight, 128 if bits == 8 else 64)
        dequantized = grid.dequantize(grid.integers(weight))
        packed = pack_linear(dequantized, None, grid, "layer").to(torch.bfloat16)
        y = packed(x.bfloat16())
        assert y.dtype == torch.bfloat16 and relative_error(y.float(), x @ dequantized.T) < 2e-2


@pytest.mark.parametrize("grid, shape, reason", [
    (lambda w: WeightGrid.fit(weight_scheme(4, False), w, 16), (32, 64), "groups of 16"),
    (lambda w: WeightGrid.fit(weight_scheme(8, True), w, 32), (32, 64), "2 groups per row"),
    (lambda w: WeightGrid.fit(weight_scheme(4, False), w[:8], 32), (8, 64), "not a multiple of 16"),
], ids=["int4-group-16", "grouped-int8", "8-rows"])
def test_grids_no_kernel_takes_say_why(grid, shape, reason):
    assert reason in packing_of(grid(torch.randn(32, 64)), shape).reason


# ---------------------------------------------------------------------------- the pass


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()


@pytest.mark.parametrize("algorithm, kind", [(GPTQ(bits=4, group_size=32, block_size=32), Int4WeightLinear),
                                             (AWQ(bits=4, group_size=32, grid_points=4), Int4WeightLinear),
                                             (RTN(bits=8, group_size=0, symmetric=True), Int8WeightLinear),
                                             (RTN(bits=8, group_size=0), Int8WeightLinear)],
                         ids=["gptq-int4", "awq-int4", "rtn-int8", "rtn-int8-asymmetric"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pack_weights_keeps_the_quantized_models_outputs(algorithm, kind, frontend):
    model, data = two_layers(), [torch.randn(8, 64) for _ in range(2)]
    gm = fxcompress.trace(model, data[0], frontend=frontend)
    OneShot(algorithm, data, progress=False)(gm)
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = gm(x)
    result = PackWeights()(gm)
    assert result.modified and not PackWeights()(gm).modified
    assert [type(gm.get_submodule(p)) for p in ("0", "2")] == [kind, kind]
    assert gm.meta[meta.WEIGHT_GRIDS] == {}
    assert not any(n.op == "get_attr" or n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
    assert sum(n.op == "call_module" and n.target in ("0", "2") for n in gm.graph.nodes) == 2
    with torch.no_grad():
        assert relative_error(gm(x), before) < 1e-5


def test_compile_verifies_packing_and_on_the_fly_quantization_packs_every_linear():
    model, x = two_layers(), torch.randn(4, 64)
    data = [torch.randn(8, 64)]
    packed = fxcompress.compile(model, x, [OneShot(GPTQ(bits=4, group_size=32), data, progress=False), PackWeights()])
    assert isinstance(packed.get_submodule("2"), Int4WeightLinear)
    for bits, kind in ((8, Int8WeightLinear), (4, Int4WeightLinear)):
        small = fxcompress.compile(model, x, [PackWeights(bits=bits, group_size=32)])
        assert all(isinstance(small.get_submodule(p), kind) for p in ("0", "2"))
        assert 0 < relative_error(small(x), model(x)) < (0.02 if bits == 8 else 0.2)


def test_layers_no_kernel_takes_stay_in_float_named_in_one_warning():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    data = [torch.randn(8, 64) for _ in range(2)]
    gm = fxcompress.trace(model, data[0])
    OneShot(GPTQ(bits=4, group_size=16, exclude=("2",)), data, progress=False)(gm)  # 16: no int4 kernel
    OneShot(GPTQ(bits=4, group_size=32, static_groups=False, op_names=("2",)), data, progress=False)(gm)
    with pytest.warns(UserWarning, match=r"2 linear layer\(s\) left in float: 0 \(int4 groups of 16.*; 2 \(groups "
                                         r"that are not contiguous"):
        assert not PackWeights()(gm).modified
    assert isinstance(gm.get_submodule("0"), nn.Linear) and len(gm.meta[meta.WEIGHT_GRIDS]) == 2


def test_a_weight_changed_after_quantization_is_not_packed():
    model, data = two_layers(), [torch.randn(8, 64)]
    gm = fxcompress.trace(model, data[0])
    OneShot(RTN(bits=4, group_size=32), data, progress=False)(gm)
    with torch.no_grad():
        gm.get_submodule("0").weight[0, 0] += 0.123  # a fine-tuning step, say
    with pytest.warns(UserWarning, match="0 .its weight no longer lies on its recorded grid"):
        PackWeights()(gm)
    assert isinstance(gm.get_submodule("0"), nn.Linear) and isinstance(gm.get_submodule("2"), Int4WeightLinear)


def test_options_and_text_form():
    assert PackWeights(bits=4, group_size=64).to_text() == "pack-weights{bits=4,group_size=64}"
    assert parse_pipeline("pack-weights{bits=8,exclude=lm_head}") == [PackWeights(bits=8, exclude=("lm_head",))]
    assert PackWeights().preserves_outputs and not PackWeights(bits=4).preserves_outputs
    with pytest.raises(ConfigError, match="bits must be 0"):
        PackWeights(bits=3)


# ---------------------------------------------------------------------------- packing as one-shot goes (pack=True)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_one_shot_pack_packs_each_layer_as_a_separate_pack_weights_would(frontend):
    model, data = two_layers(), [torch.randn(8, 64) for _ in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    algorithm = GPTQ(bits=4, group_size=32, block_size=32)
    separate = fxcompress.compile(model, data[0], [OneShot(algorithm, data, progress=False), PackWeights()],
                                  frontend=frontend)
    at_once = fxcompress.compile(model, data[0], [OneShot(algorithm, data, progress=False, pack=True)],
                                 frontend=frontend)
    assert [type(at_once.get_submodule(p)) for p in ("0", "2")] == [Int4WeightLinear, Int4WeightLinear]
    assert at_once.meta[meta.WEIGHT_GRIDS] == {}
    assert not any(n.target is torch.ops.aten.linear.default for n in at_once.graph.nodes)
    for path in ("0", "2"):
        assert torch.equal(at_once.get_submodule(path).weight_int4, separate.get_submodule(path).weight_int4)
    x = torch.randn(5, 64)
    assert torch.equal(at_once(x), separate(x))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the user's model is untouched


def test_one_shot_pack_frees_each_dense_weight_as_it_goes_and_leaves_the_rest_shared():
    """The memory behaviour behind tools/gptq_scale.py: the compiled copy shares the tensors it never rewrites
    with the user's model, and a packed layer's dense module is freed while the engine walks on."""
    import gc
    import weakref

    from fxcompress.oneshot import compress_layers
    from fxcompress.passes.pack_weights import LayerPacker

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    data = [torch.randn(8, 64) for _ in range(2)]
    gm = fxcompress.trace(model, data[0])
    assert gm.get_submodule("4").weight.const_data_ptr() == model[4].weight.const_data_ptr()  # not copied
    packer, freed = LayerPacker(gm), []

    def pack(site):
        dense = weakref.ref(gm.get_submodule(site.node.target))
        packer(site)
        gc.collect()  # (after a torch.export run in the same process, a cycle may hold it until then)
        freed.append(dense() is None)

    compress_layers(gm, data, GPTQ(bits=4, group_size=32, exclude=("4",)), after=pack)
    packer.finish()
    assert freed == [True, True]
    assert isinstance(gm.get_submodule("2"), Int4WeightLinear)
    assert gm.get_submodule("4").weight.const_data_ptr() == model[4].weight.const_data_ptr()  # still shared


def test_one_shot_pack_text_form_and_layers_left_in_float():
    assert OneShot(GPTQ(), pack=True).to_text() == "one-shot{algorithm=gptq,pack=true}"
    assert parse_pipeline("one-shot{algorithm=gptq,pack=true}")[0].pack
    assert OneShot(GPTQ()).keeps_analysis and not OneShot(GPTQ(), pack=True).keeps_analysis
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    data = [torch.randn(8, 64) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"2 linear layer\(s\) left in float: 0 \(int4 groups of 16 columns"):
        gm = fxcompress.compile(model, data[0], [OneShot(RTN(bits=4, group_size=16), data, progress=False, pack=True)])
    assert isinstance(gm.get_submodule("2"), nn.Linear) and len(gm.meta[meta.WEIGHT_GRIDS]) == 2


# ---------------------------------------------------------------------------- eager models


def test_pack_linears_packs_an_eager_model_in_place():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()  # 8 outputs: no int4 block
    x = torch.randn(3, 64)
    reference = model(x).detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pack_linears(model, bits=4, group_size=32) == {"0": "int4"}
    assert len(caught) == 1 and "2 (8 outputs, not a multiple of 16" in str(caught[0].message)
    assert isinstance(model[0], Int4WeightLinear) and isinstance(model[2], nn.Linear)
    assert 0 < relative_error(model(x), reference) < 0.2
    assert pack_linears(nn.Sequential(nn.Linear(64, 8)), bits=8) == {"0": "int8"}
