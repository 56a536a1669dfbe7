"""ONNX export of one-shot low-bit weights as ONNX Runtime's com.microsoft MatMulNBits: the packed layout holds the
grid exactly, ONNX Runtime computes what the fake-quantized GraphModule does, the file shrinks, and what the op
cannot take (3 bits, act-order groups, sparsity masks) exports dense and says so."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.examples_llm import tiny_llama_config
from fxcompress.export import nbits_weight, onnx_session, to_onnx, unpack_nbits
from fxcompress.oneshot import AWQ, GPTQ, RTN, Wanda
from fxcompress.oneshot.engine import Layer
from fxcompress.passes import OneShot

pytestmark = pytest.mark.usefixtures("one_thread")


def nbits_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"]


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()


def quantized(algorithm, model=None):
    model = mlp() if model is None else model
    data = [torch.randn(8, 64) for _ in range(4)]
    return fxcompress.compile(model, data[0], [OneShot(algorithm, data, progress=False)]), data[0]


@pytest.mark.parametrize("bits, symmetric, columns, group_size", [(4, False, 64, 32), (4, True, 48, 32), (2, False, 64, 64),
                                                                  (8, False, 64, 16), (4, False, 40, 0)])
def test_the_packed_layout_holds_the_grid_exactly(bits, symmetric, columns, group_size):
    out = RTN(bits=bits, group_size=group_size, symmetric=symmetric).compress(Layer("w", torch.randn(24, columns)), None)
    low = nbits_weight(out.weight, out.grid)
    if group_size == 0:  # one group of 40 columns: not a power of two
        assert "groups of 40 columns" in low
        return
    blocks = -(-columns // group_size)
    assert tuple(low.packed.shape) == (24, blocks, group_size * bits // 8) and low.packed.dtype == torch.uint8
    assert tuple(low.scales.shape) == (24, blocks)
    assert (low.zero_points is None) == symmetric  # a symmetric grid's zero is the op's default, 2^(bits-1)
    assert torch.equal(unpack_nbits(low), out.weight)


@pytest.mark.parametrize("algorithm", [GPTQ(bits=4, group_size=32), RTN(bits=4, group_size=64, symmetric=True),
                                       AWQ(bits=4, group_size=32, grid_points=4), RTN(bits=8, group_size=128),
                                       RTN(bits=2, group_size=32)],
                         ids=["gptq4", "rtn4-symmetric", "awq4", "rtn8", "rtn2"])
def test_quantized_linear_layers_export_as_matmul_nbits(algorithm):
    gm, x = quantized(algorithm)
    result = to_onnx(gm, x)
    nodes = nbits_nodes(result.model)
    assert result.low_bit_layers == ("0", "2") and len(nodes) == 2
    assert not any(n.op_type in ("Gemm", "MatMul") for n in result.model.graph.node)
    group = min(algorithm.group_size, 64)
    assert [attributes(n) for n in nodes] == [{"K": 64, "N": 128, "bits": algorithm.bits, "block_size": group},
                                              {"K": 128, "N": 32, "bits": algorithm.bits, "block_size": algorithm.group_size}]
    assert all(n.domain == "com.microsoft" for n in nodes)
    assert [len(n.input) for n in nodes] == [3 if algorithm.symmetric else 4] * 2  # zero points unless symmetric
    assert sum(n.op_type == "Div" for n in result.model.graph.node) == (2 if isinstance(algorithm, AWQ) else 0)
    # ONNX Runtime against the fake-quantized GraphModule, on a new input (float rounding only: the grid is exact)
    probe = torch.randn(5, 64)
    got = onnx_session(result.model).run(None, {"input_0": probe.numpy()})[0]
    want = gm(probe).detach().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert result.max_error <= result.tolerance


def test_a_tiny_llama_exports_every_decoder_linear_as_4_bit_and_a_smaller_file(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = tiny_llama_config(hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, seq_len=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxcompress.compile(model, tokens[:1], [OneShot(GPTQ(bits=4, group_size=32, exclude=("lm_head",)),
                                                            tuple(tokens.split(1)), progress=False)],
                                frontend="export", verify=False)
        low = to_onnx(gm, tokens[:1], tmp_path / "int4.onnx", dynamic_axes=None)
        dense = to_onnx(gm, tokens[:1], tmp_path / "fp32.onnx", dynamic_axes=None, low_bit=False, check=False)
    nodes = nbits_nodes(low.model)
    assert len(low.low_bit_layers) == len(nodes) == 7  # q, k, v, o, gate, up, down; lm_head excluded
    assert {attributes(n)["bits"] for n in nodes} == {4} and {attributes(n)["block_size"] for n in nodes} == {32}
    assert not nbits_nodes(dense.model)
    assert low.max_error <= low.tolerance
    got = onnx_session(low.model).run(None, {"input_0": tokens[1:2].numpy()})[0]
    want = gm(tokens[1:2])
    want = (want.logits if hasattr(want, "logits") else want[0]).detach().numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight"))
    saved = (tmp_path / "fp32.onnx").stat().st_size - (tmp_path / "int4.onnx").stat().st_size
    assert saved > 0.8 * decoder * (4 - 0.5 - 4 / 32 * 2)  # fp32 -> 4 bits plus a scale and a zero point per 32


def test_what_matmul_nbits_cannot_take_exports_dense_and_says_so():
    gm, x = quantized(RTN(bits=3, group_size=32))
    with pytest.warns(UserWarning, match=r"2 quantized linear layer\(s\) exported with float weights.*3-bit weights"):
        result = to_onnx(gm, x)
    assert not nbits_nodes(result.model) and result.low_bit_layers == ()
    gm, x = quantized(GPTQ(bits=4, group_size=32, static_groups=False))
    with pytest.warns(UserWarning, match="groups that are not contiguous"):
        assert not nbits_nodes(to_onnx(gm, x).model)


def test_sparsity_masks_export_dense_with_a_warning():
    gm, x = quantized(Wanda(n=2, m=4))
    with pytest.warns(UserWarning, match=r"2 weight\(s\) carry sparsity masks .*2:4.*dense weights with their zeros"):
        result = to_onnx(gm, x)
    assert not nbits_nodes(result.model) and result.max_error <= result.tolerance
    weights = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer if t.dims and len(t.dims) == 2]
    assert weights and all(abs(float((w == 0).mean()) - 0.5) < 1e-6 for w in weights)
