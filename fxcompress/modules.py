"""Modules that shrinking produces when a ``torch.nn`` module cannot express the smaller shape."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HeadPrunedMultiheadAttention", "window_attention", "masked_layer_norm", "masked_rms_norm", "masked_mean",
    "MaskedLayerNorm", "MaskedRMSNorm", "MASKED_STATISTICS", "has_masked_statistics",
]


class HeadPrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` after head pruning: ``num_heads * head_dim`` may differ from ``embed_dim``.

    ``nn.MultiheadAttention`` ties the attention width to the embedding width,
    so it cannot lose heads. This module keeps its call signature, its
    parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) and
    its results, with any number of heads.

    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> small = HeadPrunedMultiheadAttention.from_module(mha)
    >>> x = torch.randn(1, 5, 8)
    >>> torch.allclose(small(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
    """

    def __init__(
        self, embed_dim: int, num_heads: int, head_dim: int, out_dim: int | None = None, bias: bool = True,
        dropout: float = 0.0, batch_first: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, out_dim or embed_dim, bias=bias)

    @classmethod
    def from_module(cls, mha: nn.Module) -> HeadPrunedMultiheadAttention:
        """A copy of ``mha`` (an ``nn.MultiheadAttention`` or one of these) sized from its parameters."""
        weight = mha.in_proj_weight
        inner = weight.shape[0] // 3
        num_heads = inner // mha.head_dim if inner else 0
        new = cls(weight.shape[1], num_heads, mha.head_dim, mha.out_proj.weight.shape[0],
                  bias=mha.in_proj_bias is not None, dropout=mha.dropout, batch_first=mha.batch_first)
        with torch.no_grad():
            new.in_proj_weight.copy_(weight)
            if new.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, L, H*D] -> [N, H, L, D]``."""
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (self._heads(F.linear(t, w, b)) for t, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        mask = _merge_masks(attn_mask, key_padding_mask, q)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / (self.head_dim ** 0.5)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
            weights = None
        n, _, length, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


def _merge_masks(attn_mask, key_padding_mask, q: torch.Tensor):
    """One additive float mask from ``nn.MultiheadAttention``'s boolean or float masks."""
    def additive(mask):
        if mask is None or mask.dtype != torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))

    attn_mask, key_padding_mask = additive(attn_mask), additive(key_padding_mask)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask[:, None, None, :]
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.view(q.shape[0], -1, *attn_mask.shape[-2:])
    if attn_mask is None:
        return key_padding_mask
    return attn_mask if key_padding_mask is None else attn_mask + key_padding_mask


def _shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """Additive mask that keeps shifted windows from attending across the regions the roll glued together."""
    region = torch.zeros(pad_h, pad_w, dtype=like.dtype, device=like.device)
    bounds_h = (0, pad_h - window[0], pad_h - shift[0], pad_h)
    bounds_w = (0, pad_w - window[1], pad_w - shift[1], pad_w)
    for i in range(3):
        for j in range(3):
            region[bounds_h[i] : bounds_h[i + 1], bounds_w[j] : bounds_w[j + 1]] = 3 * i + j
    cells = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1]).permute(0, 2, 1, 3)
    cells = cells.reshape(-1, window[0] * window[1])
    differs = (cells.unsqueeze(1) - cells.unsqueeze(2)) != 0
    return torch.zeros_like(differs, dtype=like.dtype).masked_fill(differs, -100.0)


def window_attention(
    input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size,
    attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None, logit_scale=None, training=True,
):
    """Swin's (shifted) window attention with the head width taken from ``qkv_weight``.

    Same arguments and results as ``torchvision.models.swin_transformer.
    shifted_window_attention``, which derives the head width from the *input*
    width (``C // num_heads``) and so cannot run with fewer heads; shrinking
    retargets pruned Swin blocks to this function.
    """
    batch, height, width, _ = input.shape
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    inner = num_heads * head_dim
    pad_r, pad_b = (-width) % window_size[1], (-height) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, channels = x.shape
    shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n_h, n_w = pad_h // window_size[0], pad_w // window_size[1]
    tokens = window_size[0] * window_size[1]
    x = x.view(batch, n_h, window_size[0], n_w, window_size[1], channels).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch * n_h * n_w, tokens, channels)
    if logit_scale is not None and qkv_bias is not None:  # Swin V2 has no key bias
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner : 2 * inner]), qkv_bias[2 * inner :]])
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(x.shape[0], tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(pad_h, pad_w, list(window_size), shift, attn)
        attn = attn.view(batch, n_h * n_w, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(attn.softmax(dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.shape[0], tokens, inner)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    out_channels = x.shape[-1]
    x = x.view(batch, n_h, n_w, window_size[0], window_size[1], out_channels).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, pad_h, pad_w, out_channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


# ---------------------------------------------------------------------------- statistics over kept channels
#
# A norm or mean over a prunable dimension computes its statistics over every
# channel, so zeroing a removed channel is not enough for the masked model to
# compute what the shrunk one will (the mean would still count it). These ops
# take a 0/1 ``keep`` vector over the last (or ``dim``) dimension and compute
# the statistics over the kept channels only; removed channels come out as 0.
# With ``keep`` all ones they equal their torch twins up to float reassociation.


def _kept_only(x: torch.Tensor, keep: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x`` with the channels ``keep`` drops along ``dim`` set to zero (also when they hold inf or nan)."""
    dropped = keep.view([-1 if d == dim % x.dim() else 1 for d in range(x.dim())]) == 0
    return x.masked_fill(dropped, 0)


def masked_layer_norm(x, normalized_shape, weight, bias, eps: float, keep: torch.Tensor):
    """``F.layer_norm`` over the last dim, with mean and variance over the channels ``keep`` marks.

    >>> x, keep = torch.randn(2, 4), torch.tensor([1.0, 0.0, 1.0, 1.0])
    >>> y = masked_layer_norm(x, (4,), None, None, 1e-5, keep)
    >>> torch.allclose(y[:, [0, 2, 3]], F.layer_norm(x[:, [0, 2, 3]], (3,)), atol=1e-6), bool((y[:, 1] == 0).all())
    (True, True)
    """
    count = keep.sum().to(x.dtype)
    x = _kept_only(x, keep)
    centred = _kept_only(x - x.sum(-1, keepdim=True) / count, keep)
    y = centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / count + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + _kept_only(bias, keep)


def masked_rms_norm(x, normalized_shape, weight, eps: float | None, keep: torch.Tensor):
    """``F.rms_norm`` over the last dim, with the mean square over the channels ``keep`` marks."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    x = _kept_only(x, keep)
    y = x * torch.rsqrt((x * x).sum(-1, keepdim=True) / keep.sum().to(x.dtype) + eps)
    return y if weight is None else y * weight


def masked_mean(x, dim: int, keepdim: bool, keep: torch.Tensor):
    """``x.mean(dim, keepdim)`` over the entries of ``dim`` that ``keep`` marks."""
    return _kept_only(x, keep, dim).sum(dim, keepdim=keepdim) / keep.sum().to(x.dtype)


class MaskedLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` whose statistics cover the kept channels of its ``channel_keep`` buffer only.

    Masking turns a ``LayerNorm`` whose normalised channels lose some into one
    of these (same parameters, hooks and state-dict names plus the buffer);
    shrinking turns it back into a plain, smaller ``LayerNorm``.
    """

    channel_keep: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.channel_keep)


class MaskedRMSNorm(nn.RMSNorm):
    """An ``nn.RMSNorm`` whose mean square covers the kept channels of its ``channel_keep`` buffer only."""

    channel_keep: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_rms_norm(x, self.normalized_shape, self.weight, self.eps, self.channel_keep)


#: plain op or module -> its masked-statistics form
MASKED_STATISTICS = {
    nn.LayerNorm: MaskedLayerNorm, nn.RMSNorm: MaskedRMSNorm,
    F.layer_norm: masked_layer_norm, torch.ops.aten.layer_norm.default: masked_layer_norm,
    F.rms_norm: masked_rms_norm, torch.ops.aten.rms_norm.default: masked_rms_norm,
    torch.mean: masked_mean, torch.ops.aten.mean.dim: masked_mean,
}


def has_masked_statistics(gm: nn.Module) -> bool:
    """Whether ``gm`` computes some statistics over kept channels only (an original module would not)."""
    masked = set(MASKED_STATISTICS.values())
    if any(type(m) in masked for m in gm.modules()):
        return True
    graph = getattr(gm, "graph", None)
    return graph is not None and any(n.op == "call_function" and n.target in masked for n in graph.nodes)
