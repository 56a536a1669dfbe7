"""Issue 17, part 1: the shrink written back into the user's own module (``fxcompress.writeback``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from fxcompress.passes import standard_pruning
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, VerificationError
from fxcompress.pipeline import VerifyOutputs
from fxcompress.prune import L1Norm
from fxcompress.writeback import WIDTHS_KEY, from_pretrained, write_back

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None)
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
}
EMBEDDING = "model.embed_tokens"  # excluded: heads and FFN channels go, the residual width stays


def _decoder(family: str, **overrides) -> nn.Module:
    config_name, model_name, extra = DECODERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**TINY, **extra, **overrides})
    return getattr(transformers, model_name)(config).eval()


def _gpt2(**overrides) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1,
                                     eos_token_id=None, **overrides)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids(length: int = 8) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(1))


def _compile(model, inputs, exclude=(), verify=True, **kwargs):
    """The standard pipeline; ``verify=False`` checks the shrink with a hook that has no oracle (GPT-2's tied
    embeddings break the oracle's ``functional_call`` today, see the final note of the issue)."""
    hooks = [] if verify else [VerifyOutputs(inputs, rtol=1e-4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxcompress.compile(model, inputs, standard_pruning(L1Norm(0.5, exclude=exclude)), verify=verify,
                                  hooks=hooks, **kwargs)


def _greedy_graph(graph, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Step-by-step argmax of the shrunk graph, re-run on the growing sequence (exported with a dynamic length)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, graph(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _round_trip(mine: nn.Module, path, load) -> nn.Module:
    mine.save_pretrained(path)
    again = load(path)
    ids = _ids(11)
    assert _state_equal(again, mine)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, mine(ids).logits)
    return again


def _generation_matches(mine: nn.Module, graph) -> None:
    ids = _ids()
    with torch.no_grad():
        generated = mine.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
    assert generated.shape == (1, 28)
    assert torch.equal(generated, _greedy_graph(graph, ids, 20))


#: Architectures whose write-back is Llama's own code path (same attention and MLP classes' fields): their cases
#: run with ``-m slow``, the default run keeps one of each kind (Llama, Phi-3's fused projections, Gemma's head_dim).
LLAMA_LIKE = {"mistral", "qwen2"}


def _family_params(families):
    return [pytest.param(f, marks=pytest.mark.slow) if f in LLAMA_LIKE else f for f in families]


@pytest.mark.parametrize("family", _family_params(DECODERS))
def test_decoder_generates_as_the_graph_and_round_trips(family, tmp_path):
    model = _decoder(family)
    before = copy.deepcopy(model.state_dict())
    graph = _compile(model, {"input_ids": _ids()}, (EMBEDDING,))
    mine = write_back(model, graph)
    assert type(mine) is type(model) and mine.config is not model.config
    attention = mine.model.layers[0].self_attn
    assert attention.num_key_value_groups == 2 and mine.config.num_key_value_heads == 1  # one KV group of two left
    assert mine.config.num_attention_heads == 2 and mine.config.head_dim == 16
    _generation_matches(mine, graph)
    assert getattr(mine.config, WIDTHS_KEY, None) is None  # uniform widths: the plain loader reads them
    _round_trip(mine, tmp_path, getattr(transformers, type(model).__name__).from_pretrained)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the user's model is untouched
    assert model.config.num_key_value_heads == 2 and model.model.layers[0].mlp.down_proj.in_features == 128


def test_uniform_pruning_loads_with_plain_auto_from_pretrained(tmp_path):
    model = _decoder("llama")
    mine = fxcompress.compile(model, {"input_ids": _ids()}, standard_pruning(L1Norm(0.5, exclude=(EMBEDDING,))),
                              output="module")
    assert isinstance(mine, transformers.LlamaForCausalLM)
    assert mine.config.intermediate_size == 64 and getattr(mine.config, WIDTHS_KEY, None) is None
    again = _round_trip(mine, tmp_path, transformers.AutoModelForCausalLM.from_pretrained)
    assert type(again) is transformers.LlamaForCausalLM
    assert again.model.layers[1].self_attn.num_key_value_groups == 2


def test_pruned_residual_stream_sets_hidden_size(tmp_path):
    model = _decoder("llama")
    graph = _compile(model, {"input_ids": _ids()})
    mine = write_back(model, graph)
    assert mine.config.hidden_size == 32 and mine.model.layers[0].hidden_size == 32
    assert mine.config.head_dim == 16 and mine.model.norm.weight.shape == (32,)
    _generation_matches(mine, graph)
    _round_trip(mine, tmp_path, transformers.AutoModelForCausalLM.from_pretrained)


@pytest.mark.parametrize("family", ["llama", pytest.param("phi3", marks=pytest.mark.slow)])
def test_per_layer_widths_are_recorded_and_reloaded(family, tmp_path):
    """Layer 1 unpruned: the config keeps the dense sizes, the recorded widths rebuild layer 0; plain
    ``from_pretrained`` refuses the checkpoint rather than load it wrong."""
    model = _decoder(family)
    graph = _compile(model, {"input_ids": _ids()}, (EMBEDDING, "model.layers.1.*"))
    mine = write_back(model, graph)
    widths = getattr(mine.config, WIDTHS_KEY)
    assert mine.config.num_attention_heads == 4 and mine.config.intermediate_size == 128
    assert widths["model.layers.0.mlp.down_proj"] == {"in_features": 64, "out_features": 64}
    assert not any(p.startswith("model.layers.1") for p in widths)
    if family == "phi3":  # Phi-3 splits qkv at self.config.num_attention_heads: layer 0 has its own config
        assert mine.model.layers[0].self_attn.config.num_attention_heads == 2
        assert mine.model.layers[1].self_attn.config is mine.config
    _generation_matches(mine, graph)
    mine.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="mismatch"):
        getattr(transformers, type(model).__name__).from_pretrained(tmp_path)
    _round_trip(mine, tmp_path, from_pretrained)


@pytest.mark.parametrize("hidden", ["keep", "prune"])
def test_gpt2_writes_back(hidden, tmp_path):
    """Kept hidden size: two heads of 16 in a 64-wide model, which GPT2Config cannot say (head_dim is
    n_embd // n_head): recorded widths and fxcompress's loader. Pruned to 32: the config says it."""
    model = _gpt2()
    exclude = ("lm_head",) if hidden == "keep" else ()  # wte is tied to lm_head, which the graph reads
    graph = _compile(model, (_ids(),), exclude, verify=False)
    mine = write_back(model, graph)
    attention = mine.transformer.h[0].attn
    assert attention.num_heads == 2 and attention.split_size == 32 and attention.head_dim == 16
    assert mine.lm_head.weight is mine.transformer.wte.weight  # still tied
    _generation_matches(mine, graph)
    recorded = getattr(mine.config, WIDTHS_KEY, None)
    assert (recorded is not None) == (hidden == "keep")
    _round_trip(mine, tmp_path, from_pretrained if recorded else transformers.GPT2LMHeadModel.from_pretrained)


def test_bert_encoder_writes_back(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=128)
    model = transformers.BertForSequenceClassification(config).eval()
    batch = {"input_ids": _ids(16), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    mine = fxcompress.compile(model, batch, standard_pruning(L1Norm(0.5)), output="module")
    attention = mine.bert.encoder.layer[0].attention.self
    assert attention.num_attention_heads == 2 and attention.all_head_size == attention.query.out_features
    assert mine.config.intermediate_size == 64
    mine.save_pretrained(tmp_path)
    again = from_pretrained(tmp_path)
    assert _state_equal(again, mine)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, mine(**batch).logits)


def test_hf_vit_writes_back():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(1, 3, 32, 32)
    mine = fxcompress.compile(model, x, standard_pruning(L1Norm(0.5)), output="module")
    assert isinstance(mine, transformers.ViTForImageClassification)
    assert mine.config.num_attention_heads == 2 and mine.config.intermediate_size == 64
    attention = mine.vit.layers[0].attention
    assert attention.q_proj.out_features == 32 and attention.num_attention_heads == 2
    with torch.no_grad():  # another batch size than the example's: the module is not bound to captured shapes
        assert mine(torch.randn(3, 3, 32, 32)).logits.shape == (3, 10)


def test_timm_resnet_keeps_its_methods():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    mine = fxcompress.compile(model, x, standard_pruning(L1Norm(0.5)), output="module")
    assert type(mine) is type(model) and mine.num_features == mine.fc.in_features < model.num_features
    assert mine.layer1[0].conv1.out_channels == mine.layer1[0].bn1.num_features < model.layer1[0].conv1.out_channels
    with torch.no_grad():
        assert mine.forward_features(x).shape[1] == mine.num_features
        mine.reset_classifier(5)
        assert mine(x).shape == (1, 5)
    assert model.num_features == 512 and model.fc.out_features == 10


def test_output_module_on_a_plain_module_and_unknown_output():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    mine = fxcompress.compile(model, x, standard_pruning(L1Norm(0.5)), output="module")
    assert type(mine) is nn.Sequential and mine[0].out_features == 8 and model[0].out_features == 16
    graph = fxcompress.compile(model, x, standard_pruning(L1Norm(0.5)))
    assert torch.equal(mine(x), graph(x))
    with pytest.raises(ConfigError, match="unknown output 'modules'"):
        fxcompress.compile(model, x, output="modules")


def _wrong_rule(monkeypatch, right, field):
    """Swap one of ``COMPOSITE_RULES`` for a copy that gets ``field`` one too high."""
    import fxcompress.writeback as wb

    def wrong(module, path):
        found = dict(right(module, path))
        found[field] += 1
        return found

    monkeypatch.setattr(wb, "COMPOSITE_RULES", tuple((t, wrong if r is right else r) for t, r in wb.COMPOSITE_RULES))


@pytest.mark.parametrize("family, field", [("llama", "num_key_value_groups"),
                                           pytest.param("phi3", "num_key_value_heads", marks=pytest.mark.slow)])
def test_a_wrong_attribute_update_is_caught(monkeypatch, family, field):
    """Llama's SDPA never reads ``num_key_value_groups`` on a prompt (eager attention and one-token decoding
    do): verification runs eager attention too, and names the attribute it changed. Phi-3 splits its fused
    qkv at ``num_key_value_heads`` (here left at 2: nothing changed to name, the output is named)."""
    import fxcompress.writeback as wb

    _wrong_rule(monkeypatch, wb._q_k_v_attention if family == "llama" else wb._qkv_attention, field)
    model = _decoder(family)
    graph = _compile(model, {"input_ids": _ids()}, (EMBEDDING,))
    with pytest.raises(VerificationError, match=field if family == "llama" else "logits") as info:
        write_back(model, graph)
    assert "output ['logits']" in str(info.value) or "fails on the example inputs" in str(info.value)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2  # the user's model is untouched


def test_a_config_left_at_the_old_heads_is_caught(monkeypatch):
    """Phi-3 reads ``self.config.num_attention_heads`` in ``forward``: left at 4 heads, the split of qkv is wrong."""
    import fxcompress.writeback as wb

    monkeypatch.setattr(wb, "update_config", lambda model: [])
    monkeypatch.setattr(wb, "CONFIG_READS", ())
    original = wb._set_attribute
    monkeypatch.setattr(wb, "_set_attribute", lambda m, p, n, *a: None if n.startswith("config.") else original(m, p, n, *a))
    model = _decoder("phi3")
    graph = _compile(model, {"input_ids": _ids()}, (EMBEDDING,))
    with pytest.raises(VerificationError, match="written-back Phi3ForCausalLM"):
        write_back(model, graph)


@pytest.mark.slow  # ~5 s; the default run keeps under 5 minutes
def test_a_tied_embedding_excluded_by_its_own_name_keeps_the_hidden_size():
    """Gemma ties ``lm_head`` to the embedding and the captured graph reads the tensor as ``lm_head.weight``:
    excluding ``model.embed_tokens`` still keeps the residual width; without the exclusion the hidden size
    is pruned through the tied tensor, and the result still generates as the graph does."""
    kept = write_back(_decoder("gemma"), _compile(_decoder("gemma"), {"input_ids": _ids()}, (EMBEDDING,)))
    assert kept.config.hidden_size == 64 and kept.config.intermediate_size == 64
    model = _decoder("gemma")
    graph = _compile(model, {"input_ids": _ids()})
    narrow = write_back(model, graph)
    assert narrow.config.hidden_size == 32 and narrow.lm_head.weight is narrow.model.embed_tokens.weight
    _generation_matches(narrow, graph)
