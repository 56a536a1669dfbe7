"""Depth pruning by Block Influence: the scores, the removed layers, and a copy that still generates and saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from fxcompress.errors import ConfigError  # noqa: E402 - after the skip
from fxcompress.examples_llm import tiny_llama, tiny_llama_config  # noqa: E402
from fxcompress.prune import block_influence, decoder_layers, depth_prune, lowest_influence, remove_layers  # noqa: E402

torch.set_num_threads(2)


def _model(layers: int = 4, identity: int | None = 2) -> nn.Module:
    """A tiny random Llama whose layer ``identity`` adds nothing to the residual stream (its attention and FFN
    write zeros): its output equals its input, so its Block Influence is 0 and removing it changes nothing."""
    model = tiny_llama(tiny_llama_config(hidden=32, layers=layers, heads=4, kv_heads=2, ffn=64, seq_len=64), seed=1)
    if identity is not None:
        with torch.no_grad():
            model.model.layers[identity].self_attn.o_proj.weight.zero_()
            model.model.layers[identity].mlp.down_proj.weight.zero_()
    return model.eval()


def _batches(n: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 16), generator=generator) for _ in range(n)]


def test_block_influence_is_one_minus_the_cosine_and_picks_the_identity_layer():
    model = _model()
    scores = block_influence(model, _batches())
    assert scores.shape == (4,) and scores.dtype == torch.float64
    assert scores[2] == pytest.approx(0.0, abs=1e-6)  # output == input
    assert (scores[[0, 1, 3]] > 1e-3).all()
    assert lowest_influence(scores, 1) == (2,)
    # by hand for layer 0: cos of the embedding output and the first layer's output, over every token
    captured = []
    handle = model.model.layers[0].register_forward_hook(
        lambda m, a, k, out: captured.append((a[0] if a else k["hidden_states"], out)), with_kwargs=True)
    with torch.no_grad():
        for batch in _batches():
            model(batch)
    handle.remove()
    cos = torch.cat([torch.cosine_similarity(x, y[0] if isinstance(y, tuple) else y, dim=-1).flatten()
                     for x, y in captured])
    assert float(scores[0]) == pytest.approx(1 - float(cos.double().mean()), abs=1e-6)
    assert not model.training


def test_removing_the_identity_layer_keeps_the_logits_class_and_config():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = depth_prune(model, _batches(), remove=1)
    pruned = result.model
    assert result.removed == (2,) and type(pruned) is type(model)
    assert pruned.config.num_hidden_layers == 3 and model.config.num_hidden_layers == 4  # the user's is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    assert torch.equal(pruned.model.layers[2].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    x = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters()) - layer_params


def test_depth_pruned_model_generates_with_its_kv_cache_as_the_full_model_does():
    model = _model()
    pruned = remove_layers(model, [2])
    prompt = _batches(1)[0][:1, :6]
    kwargs = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=256)
    with torch.no_grad():
        out = pruned.generate(prompt, **kwargs)
        ref = model.generate(prompt, **kwargs)
        # step-by-step argmax of full forwards (no cache) gives the same tokens
        ids = prompt
        for _ in range(12):
            ids = torch.cat([ids, pruned(ids).logits[:, -1:].argmax(-1)], 1)
    assert out.shape == (1, 18) and torch.equal(out, ref) and torch.equal(out, ids)


def test_removing_layers_renumbers_and_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(layers=5, identity=None)
    pruned = remove_layers(model, [0, 3])
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    assert torch.equal(pruned.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(pruned.model.layers[2].self_attn.q_proj.weight, model.model.layers[4].self_attn.q_proj.weight)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.num_hidden_layers == 3
    state = pruned.state_dict()
    assert set(loaded.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, pruned(x).logits)


def test_layer_types_follow_the_removed_layers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    pruned = remove_layers(model, [1])
    assert pruned.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert pruned.config.num_hidden_layers == 3 and model.config.layer_types[1] == "sliding_attention"
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert pruned.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 9)


def test_depth_pruning_refuses_what_it_cannot_do():
    model = _model()
    with pytest.raises(ConfigError, match="one layer left"):
        remove_layers(model, [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="one layer left"):
        remove_layers(model, [7])
    with pytest.raises(ConfigError, match="at least one must stay"):
        lowest_influence(torch.zeros(3), 3)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))
    assert decoder_layers(model)[0] == "model.layers"
