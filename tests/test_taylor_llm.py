"""Issue 17: first-order Taylor scores on a grouped-query-attention Llama's groups.

``P.Taylor`` scores a channel by ``Σ |w · ∂L/∂w|`` over each of its group's weight slices (``∂L/∂w`` summed
over the calibration batches), then takes the mean over the slices. The oracle here computes that sum from
a plain autograd run of the Hugging Face model, over slices listed from Llama's architecture (not from
fxcompress's channel analysis): a GQA group's query heads, its key/value head and the ``o_proj`` columns
reading them; an FFN channel's ``gate``/``up`` rows and ``down`` column; a hidden channel's every
q/k/v/gate/up column, o/down row, RMSNorm gamma, embedding column and ``lm_head`` column (a tied embedding
and ``lm_head`` are one tensor, counted once with its whole gradient). The analysis is used only to name
which of its groups is which.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fxcompress
from fxcompress import prune as P
from fxcompress.analysis import get_analysis
from fxcompress.examples_llm import logits_of
from fxcompress.masks import forward_value, own_masks
from fxcompress.passes import InsertMasks, PropagateChannels, standard_pruning
from fxcompress.writeback import from_pretrained

transformers = pytest.importorskip("transformers")

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, LAYERS, VOCAB = 4, 2, 16, 64, 128, 2, 128


def _llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=None, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm gammas start at one: make them differ so a wrong gamma slice shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (2, 16), generator=g) for _ in range(2)]


def _loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = logits_of(model(batch))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


def _evaluator() -> P.Evaluator:
    return P.Evaluator(_batches(), loss=_loss, progress=False)


def _compile(model, passes=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the capture's notes and the causal mask's opaque ops
        return fxcompress.compile(model, (_batches()[0],), list(passes))


# ---------------------------------------------------------------------------- the oracle


def _channels(size: int, per_channel: int) -> np.ndarray:
    """Channel of each index along a dim: ``per_channel`` consecutive indices each."""
    return np.arange(size) // per_channel


def _gqa_slices(layer) -> list[tuple[torch.Tensor, int, np.ndarray]]:
    """A layer's GQA groups as channels: kv head ``j`` with the query heads that share it."""
    attn, per_group = layer.self_attn, HEADS // KV_HEADS * HEAD_DIM
    return [(attn.q_proj.weight, 0, _channels(HEADS * HEAD_DIM, per_group)),
            (attn.k_proj.weight, 0, _channels(KV_HEADS * HEAD_DIM, HEAD_DIM)),
            (attn.v_proj.weight, 0, _channels(KV_HEADS * HEAD_DIM, HEAD_DIM)),
            (attn.o_proj.weight, 1, _channels(HEADS * HEAD_DIM, per_group))]


def _ffn_slices(layer) -> list[tuple[torch.Tensor, int, np.ndarray]]:
    mlp, each = layer.mlp, np.arange(FFN)
    return [(mlp.gate_proj.weight, 0, each), (mlp.up_proj.weight, 0, each), (mlp.down_proj.weight, 1, each)]


def _hidden_slices(model) -> list[tuple[torch.Tensor, int, np.ndarray]]:
    each, pieces = np.arange(HIDDEN), []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        pieces += [(w, 1, each) for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                          mlp.gate_proj.weight, mlp.up_proj.weight)]
        pieces += [(w, 0, each) for w in (attn.o_proj.weight, mlp.down_proj.weight,
                                          layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
    pieces += [(model.model.norm.weight, 0, each), (model.model.embed_tokens.weight, 1, each)]
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        pieces.append((model.lm_head.weight, 1, each))
    return pieces


def _expected(model, groups: dict[str, list]) -> dict[str, np.ndarray]:
    """Per named group: the mean over its slices of ``Σ |w · g|`` per channel, ``g`` summed over the batches."""
    model.zero_grad()
    for batch in _batches():
        _loss(model, batch).backward()  # .grad accumulates: the sum over batches
    expected = {}
    for name, pieces in groups.items():
        per_slice = []
        for weight, dim, channel in pieces:
            product = (weight.detach().double() * weight.grad.double()).abs().movedim(dim, 0)
            rows = product.reshape(product.shape[0], -1).sum(1).numpy()
            per_slice.append(np.bincount(channel, weights=rows))
        expected[name] = np.mean(per_slice, axis=0)
    model.zero_grad()
    return expected


def _named_groups(model) -> dict[str, list]:
    groups = {"hidden": _hidden_slices(model)}
    for i, layer in enumerate(model.model.layers):
        groups[f"heads{i}"] = _gqa_slices(layer)
        groups[f"ffn{i}"] = _ffn_slices(layer)
    return groups


def _which(analysis, group) -> str:
    """The oracle's name for one of the analysis' groups, from the tensor it produces."""
    for k in group.slices:
        piece = analysis.slices[k]
        layer = piece.target.split(".")[2] if piece.target.startswith("model.layers.") else None
        if piece.target.endswith("k_proj.weight") and piece.dim == 0:
            return f"heads{layer}"
        if piece.target.endswith("gate_proj.weight") and piece.dim == 0:
            return f"ffn{layer}"
        if piece.target.endswith("o_proj.weight") and piece.dim == 0:
            return "hidden"
    raise AssertionError(f"unexpected group {analysis.describe(group)}")


def _taylor_scores(gm) -> dict[str, np.ndarray]:
    analysis = get_analysis(gm)
    groups = analysis.prunable_groups()
    scores = P.Taylor(evaluator=_evaluator(), num_batches=2).group_scores(gm, analysis, groups)
    return {_which(analysis, g): s for g, s in zip(groups, scores)}


def _row_positions(rows: torch.Tensor, dense: torch.Tensor) -> list[int]:
    """Where each of ``rows`` is among ``dense``'s rows (each must be there, up to cdist's rounding)."""
    distance = torch.cdist(rows.detach().double(), dense.detach().double())
    nearest = distance.argmin(1)
    assert torch.all(distance.gather(1, nearest[:, None]) < 1e-6), "a kept row is not a dense row"
    return nearest.tolist()


# ---------------------------------------------------------------------------- tests



@pytest.mark.parametrize("tied", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["untied", "tied"])
def test_taylor_scores_equal_autograd_sums_over_each_group(tied):
    model = _llama(tied)
    scores = _taylor_scores(_compile(model))
    expected = _expected(model, _named_groups(model))
    assert scores.keys() == expected.keys()
    assert len(scores["heads0"]) == KV_HEADS and len(scores["ffn1"]) == FFN and len(scores["hidden"]) == HIDDEN
    for name, want in expected.items():
        assert want.min() > 0, name
        np.testing.assert_allclose(scores[name], want, rtol=1e-6, err_msg=name)


def test_taylor_scores_a_masked_graph_by_its_masked_weights():
    """With heads and FFN channels already masked, the score is Σ |w·g| of the masked model (gradients reach
    the dense values through the masks of tensors the captured graph reads with ``get_attr``): the oracle
    runs the HF model with the masked weights copied in. The hidden size stays (excluding the embedding
    keeps its group): a masked hidden channel changes what RMSNorm averages over, which copied weights
    alone do not reproduce."""
    model = _llama(tied=False)
    gm = _compile(model, [InsertMasks(P.L1Norm(0.5, exclude=("model.embed_tokens",))), PropagateChannels()])
    masked = {f"{path}.{name}".lstrip("."): forward_value(module, name).detach()
              for path, module in gm.named_modules() for name in own_masks(module)}
    assert {"model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight"} <= masked.keys()
    assert not any(name.startswith("model.embed_tokens") for name in masked)
    oracle = _llama(tied=False)
    with torch.no_grad():
        for name, value in masked.items():
            oracle.get_parameter(name).copy_(value)
    scores = _taylor_scores(gm)
    for name, want in _expected(oracle, _named_groups(oracle)).items():
        np.testing.assert_allclose(scores[name], want, rtol=1e-6, atol=1e-12, err_msg=name)


def test_taylor_width_pruned_llama_keeps_its_best_channels_generates_and_saves(tmp_path):
    model = _llama(tied=False)
    ffn_scores = _expected(model, {"ffn0": _ffn_slices(model.model.layers[0])})["ffn0"]
    passes = standard_pruning(P.Taylor(0.5, evaluator=_evaluator(), num_batches=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxcompress.compile(model, (_batches()[0],), passes, output="module")
    assert type(small) is type(model)
    assert small.config.intermediate_size == FFN // 2 and small.config.hidden_size == HIDDEN // 2
    # the kept FFN channels of layer 0 are its top half by Taylor score (found by matching rows: the kept
    # hidden channels by the final norm's gammas, then the kept gate_proj rows read at those columns)
    hidden = _row_positions(small.model.norm.weight[:, None], model.model.norm.weight[:, None])
    gate = model.model.layers[0].mlp.gate_proj.weight[:, hidden]
    kept = _row_positions(small.model.layers[0].mlp.gate_proj.weight, gate)
    assert sorted(kept) == sorted(np.argsort(-ffn_scores)[: FFN // 2])
    prompt = torch.tensor([[1, 5, 9, 17]])
    generated = small.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    small.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, transformers.LlamaForCausalLM).eval()
    assert torch.equal(loaded.generate(prompt, max_new_tokens=5, do_sample=False), generated)
