"""Low-rank adapters (``fxcompress.prune.lora``): they start as the base model, only they train, merging folds
them in exactly enough to reproduce the adapted model, and recovery through them works on a pruned Llama."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import fxcompress  # noqa: E402 - after the skip
from fxcompress.errors import ConfigError  # noqa: E402
from fxcompress.examples_llm import stdlib_corpus  # noqa: E402
from llm_helpers import trained_teacher  # noqa: E402
from fxcompress.passes import standard_pruning  # noqa: E402
from fxcompress.prune import L1Norm, LoRA, LoRALinear, Recovery, add_adapters, distillation_loss, recover  # noqa: E402
from fxcompress.prune import remove_layers, token_windows  # noqa: E402

PROJECTIONS = ("model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj")


@pytest.fixture(scope="module")
def teacher():
    return trained_teacher()


def _ids(n: int = 4, seed: int = 5) -> torch.Tensor:
    return token_windows(stdlib_corpus().split("valid")[:50_000], n, 32)(torch.Generator().manual_seed(seed))


def _data():
    return token_windows(stdlib_corpus().split("train")[:200_000], batch_size=4, seq_len=32)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _randomize_B(model: nn.Module) -> None:
    """Give every adapter a nonzero update, as training would."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.05)


def test_adapters_start_as_the_base_model_and_train_alone(teacher):
    model = copy.deepcopy(teacher)
    x = _ids()
    before, state = _logits(model, x), _state(model)
    adapters = add_adapters(model, LoRA(rank=4, op_names=PROJECTIONS))
    assert len(adapters.layers) == 3 * 7 and "lm_head" not in adapters.layers
    assert torch.equal(_logits(model, x), before)  # B = 0: not one bit changes
    trainable = adapters.trainable()
    assert {id(p) for p in trainable} == {id(p) for m in model.modules() if isinstance(m, LoRALinear)
                                          for p in (m.lora_A, m.lora_B)}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        distillation_loss(model(x).logits, before + torch.randn_like(before)).backward()
        optimizer.step()
    adapted = model.state_dict()
    assert all(torch.equal(v, adapted[k.replace("_proj.", "_proj.base.")]) for k, v in state.items())
    assert all(m.lora_B.detach().abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    assert not torch.allclose(_logits(model, x), before)


def test_merging_reproduces_the_adapted_model_with_the_users_class_and_keys(teacher):
    model = copy.deepcopy(teacher)
    x, keys = _ids(), list(model.state_dict())
    adapters = add_adapters(model, LoRA(rank=4, alpha=8))
    _randomize_B(model)
    adapted = _logits(model, x)
    assert not torch.allclose(adapted, _logits(teacher, x), atol=1e-3)  # the update matters
    merged = adapters.merge()
    assert merged is model and type(merged) is transformers.LlamaForCausalLM
    assert list(merged.state_dict()) == keys and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())  # unfrozen as before
    torch.testing.assert_close(_logits(merged, x), adapted, rtol=1e-5, atol=1e-5)
    assert adapters.merge() is model and torch.equal(_logits(model, x), _logits(merged, x))  # a second merge: nothing


def test_recovery_through_adapters_lowers_the_kl_and_moves_only_low_rank_updates(teacher):
    student = remove_layers(teacher, [1])
    before_state, x = _state(student), _ids(8)
    kl = lambda: float(distillation_loss(_logits(student, x), _logits(teacher, x)))  # noqa: E731
    before = kl()
    lora = LoRA(rank=4, op_names=PROJECTIONS)
    result = recover(student, teacher, _data(), Recovery(steps=25, lr=1e-2, adapters=lora))
    after = kl()
    assert after < 0.8 * before, (before, after)  # on held-out text
    linears = {n: m for n, m in student.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert result.trainable_params == sum(4 * (m.in_features + m.out_features) for m in linears.values())
    assert type(student) is transformers.LlamaForCausalLM and list(student.state_dict()) == list(before_state)
    for name, value in student.state_dict().items():
        layer = name.removesuffix(".weight")
        if layer in linears:  # the merged update B·A has rank <= 4 (and is not zero)
            assert torch.linalg.matrix_rank(value - before_state[name], rtol=1e-4) in range(1, 5), name
        else:
            assert torch.equal(value, before_state[name]), name  # embeddings, norms, lm_head: frozen


def test_norms_and_biases_train_only_when_asked():
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3, bias=False))
    plain = add_adapters(model, LoRA(rank=2))
    assert {id(p) for p in plain.trainable()} == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    plain.merge()
    both = add_adapters(model, LoRA(rank=2, train_norms=True, train_biases=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B", "0.base.bias", "1.weight", "1.bias"}
    both.merge()
    assert all(p.requires_grad for p in model.parameters())


def test_a_pruned_written_back_llama_recovers_with_lora_and_round_trips(teacher, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxcompress.compile(teacher, (_ids(2),), standard_pruning(L1Norm(0.5, exclude=("model.embed_tokens",))),
                                    output="module")
    assert type(pruned) is transformers.LlamaForCausalLM and pruned.config.intermediate_size == 32
    keys, x = list(pruned.state_dict()), _ids(8)
    before = float(distillation_loss(_logits(pruned, x), _logits(teacher, x)))
    result = recover(pruned, teacher, _data(), Recovery(steps=8, lr=1e-2, adapters=LoRA(rank=4)))
    assert float(distillation_loss(_logits(pruned, x), _logits(teacher, x))) < before and result.steps == 8
    assert list(pruned.state_dict()) == keys
    pruned.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is transformers.LlamaForCausalLM
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in pruned.state_dict().items())
    assert torch.equal(_logits(again, x), _logits(pruned, x))


def test_lora_refuses_what_it_cannot_adapt_and_leaves_tied_weights_out():
    with pytest.raises(ConfigError, match="rank"):
        LoRA(rank=0)
    with pytest.raises(ConfigError, match="init"):
        LoRA(init="xavier")
    with pytest.raises(ConfigError, match="adapters"):
        Recovery(steps=1, adapters=8)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="rank 4 exceeds.*'1'"):
        add_adapters(model, LoRA(rank=4))
    assert all(p.requires_grad for p in model.parameters()) and type(model[0]) is nn.Linear  # nothing changed
    with pytest.raises(ConfigError, match="no nn.Linear"):
        add_adapters(model, LoRA(op_names="encoder.*"))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)
    with pytest.raises(ConfigError, match="'0' carries pruning masks"):
        add_adapters(model, LoRA(rank=2))
    adapters = add_adapters(model, LoRA(rank=2, exclude="0"))
    with pytest.raises(ConfigError, match="already has adapters"):
        add_adapters(model, LoRA(rank=2, exclude="0"))
    adapters.merge()
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.Linear(4, 5, bias=False))
    tied[2].weight = tied[0].weight
    with pytest.warns(UserWarning, match="leaves out 2: the weight is shared"):
        assert add_adapters(tied, LoRA(rank=2)).layers == ("1",)


def test_a_layer_read_by_its_weight_sees_the_adapted_weight():
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` rather than calling ``out_proj``: the adapter must
    still apply there, train there and merge to the same model."""
    model = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    adapters = add_adapters(model, LoRA(rank=2))
    assert "self_attn.out_proj" in adapters.layers
    nn.init.normal_(model.self_attn.out_proj.lora_B, std=0.1)
    adapted = model(x)
    adapted.square().sum().backward()
    assert model.self_attn.out_proj.lora_A.grad.abs().max() > 0
    with torch.no_grad():
        model.self_attn.out_proj.lora_B.zero_()
        base = model(x)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the out_proj adapter changed the output
    nn.init.normal_(model.self_attn.out_proj.lora_B, std=0.1)
    adapted = model(x).detach()
    adapters.merge()
    assert type(model.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
