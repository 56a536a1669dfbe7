"""Packed int8/int4 CPU kernels (fxcompress.kernels) and the pack-weights pass: the packed module computes what
the dequantized weights do, for every grid the kernels take; the others stay in float, named in one warning."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import kernels, meta, native
from fxcompress.errors import ConfigError
from fxcompress.kernels import (
    INT8_KERNELS,
    Int4NativeLinear,
    Int4WeightLinear,
    Int8WeightLinear,
    kernels_available,
    pack_linear,
    pack_linears,
    packing_of,
    portable_kernels,
    split_int8,
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
    """Through torch's int4 kernel here; the native one has a test of its own."""
    weight, bias, x = torch.randn(48, 256), torch.randn(48), torch.randn(2, 5, 256)
    grid = WeightGrid.fit(weight_scheme(bits, symmetric), weight, group_size)
    dequantized = grid.dequantize(grid.integers(weight))
    packed = pack_linear(dequantized, bias, grid, "layer", int4_kernel="int4pack")
    assert type(packed) is kind
    assert relative_error(packed(x), F.linear(x, dequantized, bias)) < 1e-5
    stored = packed.weight_int4 if kind is Int4WeightLinear else packed.weight_int8
    assert stored.element_size() * stored.numel() == 48 * 256 // (2 if kind is Int4WeightLinear else 1)


@pytest.mark.skipif(bool(native.gemv_missing()), reason=native.gemv_missing() or "")
@pytest.mark.parametrize("bits, symmetric, group_size", [(4, False, 64), (4, True, 128), (4, False, 256),
                                                          (3, False, 128), (2, True, 64)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_the_native_int4_layer_computes_the_dequantized_linear(bits, symmetric, group_size, dtype, tolerance,
                                                               monkeypatch):
    """Three rows run the native kernel, ten dequantize (in blocks of 16 output rows here); groups of 32 (and
    inputs not a multiple of 128) are left to torch's kernel, which the default then picks."""
    monkeypatch.setattr(kernels, "_DEQUANTIZED_ROWS", 16)
    weight, bias = torch.randn(48, 256), torch.randn(48)
    grid = WeightGrid.fit(weight_scheme(bits, symmetric), weight, group_size)
    dequantized = grid.dequantize(grid.integers(weight))
    packed = pack_linear(dequantized.to(dtype), bias, grid, "layer")
    assert type(packed) is Int4NativeLinear and packed.weight_codes.numel() == 48 * 256 // 2
    for x in (torch.randn(3, 256), torch.randn(2, 5, 256)):
        want = F.linear(x.to(dtype).float(), dequantized, bias)
        assert relative_error(packed(x.to(dtype)).float(), want) < tolerance
    with portable_kernels(packed):
        assert packed.kernel == "dequantize" and relative_error(packed(x.to(dtype)).float(), want) < tolerance
    assert packed.kernel == "native"
    grouped_32 = WeightGrid.fit(weight_scheme(4, False), weight, 32)
    assert type(pack_linear(weight, bias, grouped_32, "layer")) is Int4WeightLinear
    with pytest.raises(ConfigError, match="the native kernel cannot run here: it takes inputs in multiples of 128"):
        pack_linear(weight, bias, grouped_32, "layer", int4_kernel="native")


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


# ---------------------------------------------------------------------------- the int8 kernels: native, oneDNN, int8pack

needs_onednn = pytest.mark.skipif(bool(kernels._onednn_missing()), reason=kernels._onednn_missing() or "")
#: The int8 kernels that run here (int8pack always does), and the CPU-specific ones among them.
RUNNABLE = [k for k in INT8_KERNELS if not kernels._int8_kernel_missing(k, 256)]
CPU_SPECIFIC = [k for k in RUNNABLE if k != "int8pack"]


@pytest.mark.parametrize("digits", [2, 3])
def test_split_int8_writes_each_row_as_int8_digits_to_the_stated_precision(digits):
    x = torch.randn(4, 300)
    x[1, 7], x[2] = 500.0, 0.0  # an outlier; a row of zeros
    q, step = split_int8(x, digits)
    assert q.dtype == torch.int8 and q.shape == (digits * 4, 300) and step.shape == (4, 1)
    assert int(q.abs().max()) == 127  # each row's largest element is the first digit's 127
    back = sum(d.double() / 254.0 ** i for i, d in enumerate(q.view(digits, 4, 300))) * step.double()
    bound = step.double() / (2 * 254.0 ** (digits - 1)) + 4 * 2.0**-24 * x.double().abs()  # + float32 rounding
    assert ((back - x.double()).abs() <= bound).all()
    assert not back[2].any()


@pytest.mark.parametrize("symmetric, awq", [(True, False), (False, False), (False, True)],
                         ids=["symmetric", "zero-point", "zero-point-awq"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 3, 255), (2, 3, 255)], ids=["decode-rows", "prompt-rows"])
def test_every_int8_kernel_computes_the_dequantized_linear_on_an_outlier_activation(symmetric, awq, dtype, tolerance,
                                                                                    shape):
    """fp32 inputs take three digits (float32 rounding); bf16 ones two, finer than bf16 itself. Three rows run
    the native kernel, six its GEMM fallback; 255 inputs leave a partial 64-column block."""
    weight, bias = torch.randn(48, 255), torch.randn(48)
    grid = WeightGrid.fit(weight_scheme(8, symmetric), weight, 255, input_scale=torch.rand(255) + 0.5 if awq else None)
    dequantized = grid.dequantize(grid.integers(weight))
    x = torch.randn(shape)
    x[0, 1, 17] = 300.0  # a massive activation, as LLMs have: the split's step is set by it
    want = F.linear(x.to(dtype).float(), dequantized, bias)
    for kernel in RUNNABLE:
        packed = pack_linear(dequantized, bias, grid, "layer", int8_kernel=kernel).to(dtype)
        assert packed.kernel == kernel and (packed.correction is None) == symmetric
        assert (packed.input_divisor is None) != awq
        output = packed(x.to(dtype))
        assert output.dtype == dtype and output.shape == (*shape[:2], 48)
        assert relative_error(output.float(), want) < tolerance, kernel


@pytest.mark.parametrize("columns", [24, 100])
def test_the_int8pack_kernel_is_right_on_bf16_rows_of_any_width(columns):
    """torch's bf16 _weight_int8pack_mm returns wrong sums on 24 columns and crashes on 100: such rows go in fp32."""
    weight = torch.randn(32, columns)
    grid = WeightGrid.fit(weight_scheme(8, True), weight, columns)
    dequantized = grid.dequantize(grid.integers(weight))
    packed = pack_linear(dequantized.bfloat16(), None, grid, "layer", int8_kernel="int8pack")
    x = torch.randn(3, columns).bfloat16()
    assert relative_error(packed(x).float(), F.linear(x.float(), dequantized)) < 2e-2


@pytest.mark.parametrize("kernel", CPU_SPECIFIC)
def test_fp32_packing_keeps_compile_verification_with_an_outlier_activation(kernel):
    """Two digits (about 15 bits) would move this output by ~7e-4 of its element, over verification's 1e-4."""
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 16)).eval()
    x = torch.randn(4, 512)
    x[:, 7] = 60.0
    packed = fxcompress.compile(model, x, [OneShot(RTN(bits=8, group_size=0), [torch.randn(8, 512)], progress=False),
                                           PackWeights(int8_kernel=kernel)])  # verify=True: raises if outputs moved
    assert packed.get_submodule("0").kernel == kernel


def test_the_default_int8_kernel_is_the_first_that_runs_here(monkeypatch):
    weight, scales = torch.randint(-128, 128, (16, 64), dtype=torch.int8), torch.rand(16)
    assert Int8WeightLinear(weight, scales, None).kernel == RUNNABLE[0]
    assert Int8WeightLinear(weight, scales, None, kernel="int8pack").kernel == "int8pack"
    assert pack_linears(nn.Sequential(nn.Linear(64, 16)), bits=8, int8_kernel="int8pack") == {"0": "int8"}
    with pytest.raises(ConfigError, match="kernel must be one of native, onednn, int8pack"):
        Int8WeightLinear(weight, scales, None, kernel="fbgemm")
    with pytest.raises(ConfigError, match="int8_kernel must be one of"):
        PackWeights(bits=8, int8_kernel="fbgemm")
    with pytest.raises(ConfigError, match="int4_kernel must be one of native, int4pack"):
        PackWeights(bits=4, int4_kernel="marlin")
    wide = torch.zeros(1, 2**31 // (127 * 128) + 1, dtype=torch.int8)  # oneDNN's int32 sums could overflow
    assert Int8WeightLinear(wide, torch.ones(1), None).kernel == ("native" if "native" in RUNNABLE else "int8pack")
    wider = torch.zeros(1, native.GEMV_MAX_INPUTS + 1, dtype=torch.int8)  # so could the native kernel's lanes
    assert Int8WeightLinear(wider, torch.ones(1), None).kernel == "int8pack"
    monkeypatch.setattr(native, "gemv_missing", lambda: "no VNNI here")
    monkeypatch.setattr(kernels, "_onednn_missing", lambda: "no oneDNN here")
    assert Int8WeightLinear(weight, scales, None).kernel == "int8pack"
    for kernel, why in [("native", "no VNNI here"), ("onednn", "no oneDNN here")]:
        with pytest.raises(ConfigError, match=f"{kernel} kernel cannot run here: {why}"):
            Int8WeightLinear(weight, scales, None, kernel=kernel)


def int8_bytes(module: nn.Module) -> int:
    """Bytes of int8 tensors the module holds, in buffers, parameters or plain attributes."""
    tensors = {id(t): t for t in [*module.buffers(), *module.parameters(), *vars(module).values()]
               if isinstance(t, torch.Tensor) and t.dtype == torch.int8}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@needs_onednn
def test_the_onednn_layer_holds_its_weight_once_and_survives_state_dict_pickling_and_copies(monkeypatch):
    weight, bias = torch.randn(48, 256), torch.randn(48)
    grid = WeightGrid.fit(weight_scheme(8, False), weight, 256)
    dequantized = grid.dequantize(grid.integers(weight))
    packed = pack_linear(dequantized, bias, grid, "layer", int8_kernel="onednn")
    x = torch.randn(3, 256)
    want = packed(x)
    assert packed.weight_packed.layout == torch._mkldnn and int8_bytes(packed) == 48 * 256  # prepacked, only
    assert torch.equal(packed.weight_int8, (grid.integers(dequantized) - 128).to(torch.int8))

    state = packed.state_dict()
    assert set(state) == {"bias", "scales", "correction", "weight_int8"} and state["weight_int8"].shape == (48, 256)
    for kernel in RUNNABLE:  # a state dict does not depend on the kernel that wrote it
        fresh = Int8WeightLinear(torch.zeros(48, 256, dtype=torch.int8), torch.ones(48), torch.zeros(48),
                                 torch.zeros(48), kernel=kernel)
        fresh.load_state_dict(state)
        assert fresh.kernel == kernel and int8_bytes(fresh) == 48 * 256
        assert relative_error(fresh(x), want) < 1e-5
    with pytest.raises(RuntimeError, match="Missing key.*weight_int8"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "weight_int8"})
    with pytest.raises(RuntimeError, match="size mismatch for weight_int8"):
        fresh.load_state_dict({**state, "weight_int8": state["weight_int8"][:, :128]})

    twin = copy.deepcopy(packed)
    assert twin.weight_packed is not packed.weight_packed and twin.weight_packed.layout == torch._mkldnn
    assert torch.equal(twin(x), want)

    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    assert pack_linears(model, bits=8, int8_kernel="onednn") == {"0": "int8", "2": "int8"}
    gm = fxcompress.trace(nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 16)).eval(), x)
    PackWeights(bits=8, int8_kernel="onednn")(gm)
    for whole in (model, gm):
        buffer = io.BytesIO()
        torch.save(whole, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded.get_submodule("0").kernel == "onednn" and torch.equal(loaded(x), whole(x))
        assert torch.equal(copy.deepcopy(whole)(x), whole(x))
    monkeypatch.setattr(native, "gemv_missing", lambda: "no VNNI here")  # loaded where neither can run
    monkeypatch.setattr(kernels, "_onednn_missing", lambda: "no oneDNN here")
    assert copy.deepcopy(model).get_submodule("0").kernel == "int8pack"


@pytest.mark.parametrize("kernel", CPU_SPECIFIC)
def test_fxcompress_save_writes_cpu_specific_int8_layers_on_the_portable_kernel(tmp_path, kernel):
    """oneDNN's prepacked weight cannot be serialized, nor a C call exported: save exports those layers on
    _weight_int8pack_mm (same weights and scales) and leaves the live model on its kernel."""
    x = torch.randn(3, 256)
    model = fxcompress.compile(nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 16)).eval(), x,
                               [PackWeights(bits=8, int8_kernel=kernel)])
    held = model.get_submodule("0").weight_packed
    fxcompress.save(model, tmp_path / "int8.fxc")
    loaded = fxcompress.load(tmp_path / "int8.fxc")
    targets = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert "aten._weight_int8pack_mm.default" in targets and not any("onednn" in t for t in targets)
    assert relative_error(loaded(x), model(x)) < 1e-5
    assert model.get_submodule("0").kernel == kernel and model.get_submodule("0").weight_packed.layout == held.layout


@pytest.mark.skipif(bool(native.gemv_missing()), reason=native.gemv_missing() or "")
def test_fxcompress_save_writes_native_int4_layers_as_ordinary_ops(tmp_path):
    """A C call cannot be exported: save writes the native int4 layers' dequantization in aten ops, which loads
    anywhere, and leaves the live model on its kernel."""
    x = torch.randn(3, 256)
    model = fxcompress.compile(nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 16)).eval(), x,
                               [PackWeights(bits=4, group_size=128, int4_kernel="native")])
    assert model.get_submodule("0").kernel == "native"
    fxcompress.save(model, tmp_path / "int4.fxc")
    loaded = fxcompress.load(tmp_path / "int4.fxc")
    assert relative_error(loaded(x), model(x)) < 1e-5 and model.get_submodule("0").kernel == "native"


@pytest.mark.parametrize("kernel", RUNNABLE)
def test_the_int8_layer_runs_under_autograd_and_its_backward_raises(kernel):
    weight = torch.randn(16, 64)
    grid = WeightGrid.fit(weight_scheme(8, True), weight, 64)
    packed = pack_linear(grid.dequantize(grid.integers(weight)), None, grid, "layer", int8_kernel=kernel)
    y = packed(torch.randn(2, 64, requires_grad=True))
    assert y.requires_grad  # not silently cut off from the graph
    with pytest.raises(RuntimeError, match="backward|derivative"):
        y.sum().backward()


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


def test_bench_kernels_times_every_kernel_against_fp32(helpers, capsys):
    rows = helpers.load_tool("bench_kernels").main(["--layers", "2", "--out", "32", "--in", "256", "--rounds", "1",
                                                    "--threads", "1"])
    names = [row[0] for row in rows]
    assert names[0] == "fp32" and names[-1] == "int4 int4pack" and "int8 int8pack" in names
    assert ("int8 onednn" in names) == (not kernels._onednn_missing())
    assert rows[0][3] == "1.00" and all(float(row[1]) > 0 and float(row[3]) > 0 for row in rows)
    assert "weight GB/s" in capsys.readouterr().out
