"""Normalised channels prune: LayerNorm / RMSNorm / mean over channels compute statistics over kept channels.

A norm over a prunable dim is switched, when propagation removes some of its
channels, to a masked twin whose statistics cover the kept channels only
(``fxcompress.modules``); shrinking turns it back into the plain, smaller op.
GroupNorm prunes whole groups. Verification (shrunk == masked, removed
channels filled with noise) runs inside every compile here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.modules import MaskedLayerNorm, MaskedRMSNorm, masked_layer_norm, masked_mean, masked_rms_norm
from fxcompress.passes import InsertMasks, PropagateChannels, standard_pruning
from fxcompress.prune import L1Norm

KEEP = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
KEPT = KEEP.bool()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "mean"])
def test_masked_statistics_equal_the_plain_op_on_the_kept_channels(op):
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 6), torch.randn(6), torch.randn(6)
    if op == "layer_norm":
        got, want = masked_layer_norm(x, (6,), w, b, 1e-5, KEEP), F.layer_norm(x[..., KEPT], (4,), w[KEPT], b[KEPT])
    elif op == "rms_norm":
        got, want = masked_rms_norm(x, (6,), w, 1e-6, KEEP), F.rms_norm(x[..., KEPT], (4,), w[KEPT], 1e-6)
    else:
        got, want = masked_mean(x, -1, True, KEEP), x[..., KEPT].mean(-1, keepdim=True)
    if op != "mean":
        assert torch.all(got[..., ~KEPT] == 0)
        got = got[..., KEPT]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class TinyDecoder(nn.Module):
    """A residual stream read through every norm spelling: nn.LayerNorm, F.layer_norm, nn.RMSNorm, and
    Llama's hand-written RMSNorm (``x * rsqrt(x.pow(2).mean(-1) + eps)``), with a tied-width embedding."""

    def __init__(self, vocab: int = 20, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(1, 6, width))
        self.ln = nn.LayerNorm(width)
        self.rms = nn.RMSNorm(width)
        self.up, self.down = nn.Linear(width, 32), nn.Linear(32, width)
        self.up2, self.down2 = nn.Linear(width, 32), nn.Linear(32, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position
        h = h + self.down(F.gelu(self.up(self.ln(h))))
        h = h + self.down2(F.gelu(self.up2(F.layer_norm(h, (h.shape[-1],)))))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head(self.rms(h))


def _tokens():
    return torch.randint(0, 20, (2, 6))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_residual_stream_width_prunes_through_every_norm(frontend):
    torch.manual_seed(0)
    model, tokens = TinyDecoder().eval(), _tokens()
    small = fxcompress.compile(model, tokens, standard_pruning(L1Norm(0.5)), frontend=frontend)
    widths = {name: p.shape[-1] for name, p in small.named_parameters() if name.endswith(("embed.weight", "position"))}
    assert set(widths.values()) == {8}, widths
    assert not any(isinstance(m, (MaskedLayerNorm, MaskedRMSNorm)) for m in small.modules())
    assert small(tokens).shape == model(tokens).shape


def test_masking_switches_norms_to_kept_statistics_and_a_second_run_changes_nothing():
    torch.manual_seed(0)
    model, tokens = TinyDecoder().eval(), _tokens()
    masked = fxcompress.compile(model, tokens, [InsertMasks(L1Norm(0.5)), PropagateChannels()])
    assert isinstance(masked.ln, MaskedLayerNorm) and isinstance(masked.rms, MaskedRMSNorm)
    masked_calls = {n.target for n in masked.graph.nodes if n.op == "call_function"}
    assert {masked_layer_norm, masked_mean} <= masked_calls
    assert int(masked.ln.channel_keep.sum()) == 8
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    assert PropagateChannels()(masked).modified is False
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())


def test_group_norm_prunes_whole_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 5, 3)).eval()
    small = fxcompress.compile(model, torch.randn(2, 3, 8, 8), standard_pruning(L1Norm(0.5)))
    norm = small.get_submodule("1")
    assert (norm.num_groups, norm.num_channels) == (2, 8)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tied_input_and_output_embeddings_stay_tied(frontend):
    torch.manual_seed(0)
    model, tokens = TinyDecoder().eval(), _tokens()
    model.head.weight = model.embed.weight  # GPT-2 / Llama style weight tying
    small = fxcompress.compile(model, tokens, standard_pruning(L1Norm(0.5)), frontend=frontend)
    assert small.embed.weight is small.head.weight
    assert small.embed.weight.shape == (20, 8)
