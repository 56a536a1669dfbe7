"""Issue 5: attention heads and FFN channels of transformers, through both frontends."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.analysis import get_analysis
from fxcompress.errors import TraceError
from fxcompress.modules import HeadPrunedMultiheadAttention
from fxcompress.passes import AnalyzeGroups, InsertMasks, PropagateChannels, standard_pruning
from fxcompress.pipeline import VerifyOutputs
from fxcompress.prune import L1Norm


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GQABlock(nn.Module):
    """A pre-norm decoder block written the way people write them: GQA, RoPE, constants in view()."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2, ffn: int = 128) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.up, self.gate, self.down = nn.Linear(dim, ffn), nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        angles = torch.arange(16)[:, None] * torch.arange(1, self.head_dim // 2 + 1)[None, :] * 0.1
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1))
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, 8, 8).transpose(1, 2)
        k = self.k(h).view(b, s, 2, 8).transpose(1, 2)
        v = self.v(h).view(b, s, 2, 8).transpose(1, 2)
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        k = torch.repeat_interleave(k, 4, dim=1)
        v = v[:, :, None].expand(b, 2, 4, s, 8).reshape(b, 8, s, 8)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, 64))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _compile_checked(model, inputs, pruner=None, frontend="auto"):
    verifier = VerifyOutputs(inputs, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxcompress.compile(model, inputs, standard_pruning(pruner or L1Norm(0.5)), verify=False,
                                   hooks=[verifier], frontend=frontend)
    return small, verifier.errors["shrink"]


def test_gqa_block_prunes_whole_kv_groups_and_rewrites_view_constants():
    torch.manual_seed(0)
    model = GQABlock().eval()
    x = torch.randn(1, 16, 64)
    masked = fxcompress.compile(model, x, [InsertMasks(L1Norm(0.5)), AnalyzeGroups(), PropagateChannels()])
    analysis = get_analysis(masked)
    sizes = sorted(len(g) for g in analysis.prunable_groups())
    assert sizes == [2, 128]  # two KV groups (4 query heads each) and the gated FFN's hidden channels
    small, error = _compile_checked(model, x)
    assert error <= 1e-4
    assert small.q.out_features == 32 and small.k.out_features == 8 and small.o.in_features == 32
    assert small.up.out_features == small.gate.out_features == small.down.in_features == 64
    views = [n.args for n in small.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert [a[3] for a in views] == [4, 1, 1]  # heads in view(b, s, heads, 8) were rewritten
    assert small(x).shape == model(x).shape


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.ff(x + y)


def test_multihead_attention_loses_heads_and_stays_exact():
    torch.manual_seed(0)
    block = AttentionBlock().eval()
    x = torch.randn(2, 5, 32)
    small, error = _compile_checked(block, x)
    assert error <= 1e-4
    attention = small.attn
    assert isinstance(attention, HeadPrunedMultiheadAttention) and attention.num_heads == 2
    assert small.get_submodule("ff.0").out_features == 32
    small.train()  # the replacement is a real module: trainable
    small(x).sum().backward()
    assert attention.in_proj_weight.grad is not None


def test_decomposed_multihead_attention_through_export():
    """``nn.TransformerEncoderLayer`` has control flow, so ``auto`` exports it; heads prune in the aten graph."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    small, error = _compile_checked(layer, x)
    assert error <= 1e-4
    assert small.self_attn.in_proj_weight.shape == (48, 32)  # 2 of 4 heads kept, for q, k and v
    assert small.linear1.weight.shape == (32, 32)
    small(x).sum().backward()  # exported graphs keep their mode but stay differentiable
    assert small.self_attn.in_proj_weight.grad is not None


def _zoo():
    import importlib.util
    import pathlib

    if "zoo_transformers" in sys.modules:
        return sys.modules["zoo_transformers"]
    spec = importlib.util.spec_from_file_location(
        "zoo_transformers", pathlib.Path(__file__).parents[1] / "tools" / "zoo_transformers.py"
    )
    zoo = importlib.util.module_from_spec(spec)
    sys.modules["zoo_transformers"] = zoo  # dataclasses look their module up while the class is built
    spec.loader.exec_module(zoo)
    return zoo


ZOO = ["bert", "gpt2", "llama-gqa", "hf-vit", "vit_b_16", "swin_t"]


@pytest.mark.parametrize("name", ZOO)
def test_transformer_zoo_tiny(name):
    pytest.importorskip("transformers")
    row = _zoo().run_one(name, size="tiny", latency=False)
    assert row["max_rel_error"] <= 1e-4
    assert row["macs_ratio"] > 1.15  # heads and FFN channels really left
    dense, small = (int(w) for w in row["hidden"].split(" -> "))
    # the residual width prunes too, except where it is a graph output (BertModel's last_hidden_state)
    assert small == (dense if name == "bert" else dense // 2), row["hidden"]


def test_transformer_zoo_can_keep_the_hidden_size():
    pytest.importorskip("transformers")
    row = _zoo().run_one("llama-gqa", size="tiny", latency=False, hidden="keep")
    assert row["hidden"] == "128 -> 128" and row["macs_ratio"] > 1.15


def test_neither_frontend_names_both_failures():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # symbolic_trace cannot branch on a tensor
                return x * 2
            return torch.nonzero(x).float().sum() + x  # export cannot guard on nonzero's size

    with pytest.raises(TraceError) as info:
        fxcompress.compile(DataDependent(), torch.randn(3))
    message = str(info.value)
    assert "symbolic_trace" in message and "torch.export" in message


def test_export_frontend_on_request():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    small, error = _compile_checked(model, torch.randn(2, 8), frontend="export")
    assert error <= 1e-4
    assert any(n.op == "get_attr" for n in small.graph.nodes)  # parameters are get_attr nodes in exported graphs
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("swin_t", "hf-vit") else n
                                  for n in ZOO])
def test_shrunk_transformers_export_to_onnx(name, tmp_path):
    """The shrunk model exports to ONNX; ``to_onnx`` checks it in ONNX Runtime against the GraphModule."""
    pytest.importorskip("transformers")
    case = _zoo().MODELS[name]
    torch.manual_seed(0)
    model, inputs = case.build("tiny"), case.inputs("tiny")
    small, _ = _compile_checked(model, inputs, frontend=case.frontend)
    result = fxcompress.to_onnx(small, inputs, str(tmp_path / f"{name}.onnx"))
    assert result.max_error <= 1e-4


@pytest.mark.parametrize("criterion", ["taylor", "mean-activation", "l1-global"])
def test_head_importance_criteria_prune_whole_heads(criterion):
    """Gradient-, activation- and weight-based criteria (local or global ranking) all remove whole KV groups."""
    import fxcompress.prune as P

    torch.manual_seed(0)
    model, x = GQABlock().eval(), torch.randn(4, 16, 64)
    data = [(torch.randn(4, 16, 64), torch.randn(4, 16, 64)) for _ in range(4)]
    evaluator = P.Evaluator(data=lambda: iter(data), loss=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), progress=False)
    pruner = (P.L1Norm(0.5, allocation="global") if criterion == "l1-global"
              else P.make_pruner(criterion, sparsity=0.5, evaluator=evaluator))
    small, error = _compile_checked(model, x, pruner)
    assert error <= 1e-4
    # whole KV groups only: each kept KV head (8 wide) keeps its 4 query heads. Local criteria drop one of the
    # two; a global ranking competes with the residual width and the FFN and may keep both
    assert small.k.out_features in (8, 16) and small.q.out_features == 4 * small.k.out_features
    if criterion != "l1-global":
        assert small.k.out_features == 8
