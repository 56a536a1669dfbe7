"""Issue 17: per-layer allocation of an LLM's structured pruning: uniform, global, or found by ``auto.search``.

A tiny GQA ``LlamaForCausalLM`` (3 layers, 4 query heads sharing 2 key/value heads, FFN 64) has one head group
(whole GQA groups) and one FFN group per layer plus the hidden size. Each allocation is reached by its documented
option, and the models with per-layer widths are saved and loaded back with ``writeback.from_pretrained``; those
keep the hidden size (``exclude=EMBEDDING``) or prune it in steps of the head count (``round_to``), since
transformers' config check refuses a hidden size the head count does not divide.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import fxcompress  # noqa: E402 - after the skip
from fxcompress import examples_llm as L  # noqa: E402
from fxcompress import prune as P  # noqa: E402
from fxcompress.auto import Budget, PerGroupSparsity, Workspace, search, searched_parameters  # noqa: E402
from fxcompress.auto.search import SearchConfig  # noqa: E402
from fxcompress.errors import ConfigError  # noqa: E402
from fxcompress.passes import standard_pruning  # noqa: E402
from fxcompress.writeback import WIDTHS_KEY, from_pretrained  # noqa: E402

torch.set_num_threads(2)
LAYERS = 3
TARGET = "params=1.25"
BY_LAYER = r"layers\.\d+\."
EMBEDDING = ("model.embed_tokens",)  #: excluded: the residual width stays


class _CountedBatches:
    """Calibration batches that count how often they are read (a data-aware criterion reads them per scoring)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


@pytest.fixture(scope="module")
def model():
    return L.tiny_llama(L.tiny_llama_config(hidden=32, layers=LAYERS, heads=4, kv_heads=2, ffn=64, seq_len=64)).eval()


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return L.calibration_sequences(8, 64)


@pytest.fixture(scope="module")
def uniform(model, calibration):
    """Uniform allocation (``allocation="local"``, the default) of heads, FFN channels and the hidden size."""
    return _compile(model, calibration, _criterion(calibration), target=TARGET)


def _criterion(calibration: torch.Tensor, **options) -> P.ActivationNorm:
    data = _CountedBatches(L.batches(calibration, 4))
    evaluator = P.Evaluator(data, loss=lambda m, b: L.logits_of(m(b)).mean(), progress=False)
    return P.ActivationNorm(evaluator=evaluator, num_batches=2, **options)


def _compile(model, calibration, pruner, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export's notes on the causal mask's ops
        return fxcompress.compile(model, (calibration[:2],), standard_pruning(pruner, **options), output="module")


def _widths(llama) -> list[tuple[int, int]]:
    """Per decoder layer: key/value projection rows (kept GQA groups x head dim) and FFN channels."""
    return [(layer.self_attn.k_proj.out_features, layer.mlp.gate_proj.out_features) for layer in llama.model.layers]


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _reloads(mine, path, calibration) -> None:
    """``save_pretrained`` then ``writeback.from_pretrained`` gives the same weights and logits."""
    mine.save_pretrained(path)
    again = from_pretrained(path)
    assert type(again) is type(mine) and _widths(again) == _widths(mine)
    with torch.no_grad():
        assert torch.equal(again(calibration[:2]).logits, mine(calibration[:2]).logits)


def test_uniform_allocation_prunes_every_layer_by_the_same_fraction(model, uniform):
    widths = _widths(uniform)
    assert len(set(widths)) == 1 and widths[0][1] < 64  # every layer the same width, and pruned
    assert getattr(uniform.config, WIDTHS_KEY, None) is None  # uniform: the config alone says the widths
    assert uniform.config.intermediate_size == widths[0][1] and uniform.config.hidden_size < 32
    assert _params(model) / _params(uniform) == pytest.approx(1.25, rel=0.02)


def test_a_hidden_size_the_heads_do_not_divide_is_announced_and_round_to_avoids_it(model, calibration, tmp_path):
    """transformers' config check refuses a hidden size the heads do not divide, even with ``head_dim`` explicit:
    write-back says so when it happens, and pruning in steps of the head count gives a model that saves."""
    with pytest.warns(UserWarning, match=r"fails its own checks.*round_to=4"):
        fxcompress.compile(model, (calibration[:2],), standard_pruning(_criterion(calibration), target=TARGET),
                           output="module")
    stepped = _compile(model, calibration, _criterion(calibration, round_to=4), target=TARGET)
    assert stepped.config.hidden_size % 4 == 0 and stepped.config.hidden_size < 32
    _reloads(stepped, tmp_path, calibration)


def test_global_allocation_ranks_across_layers_and_the_widths_reload(model, calibration, tmp_path):
    mine = _compile(model, calibration, _criterion(calibration, allocation="global", exclude=EMBEDDING), target=TARGET)
    ffn = [w for _, w in _widths(mine)]
    assert len(set(ffn)) > 1 and max(ffn) < 64  # one ranking: layers lose different shares
    assert getattr(mine.config, WIDTHS_KEY) == {**getattr(mine.config, WIDTHS_KEY)}  # recorded per layer
    assert _params(model) / _params(mine) == pytest.approx(1.25, rel=0.02)
    _reloads(mine, tmp_path, calibration)


@pytest.mark.slow  # 5 s: a 4-trial search
def test_searched_allocation_reaches_the_users_class_and_reloads(model, calibration, tmp_path):
    """``auto.search`` scored by minus the calibration perplexity, one sparsity per decoder layer (``tie``);
    the pruner it finds gives the user's ``LlamaForCausalLM`` through ``output="module"``."""
    def evaluate(candidate) -> float:
        return -L.perplexity(candidate, calibration)

    criterion = _criterion(calibration, exclude=EMBEDDING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search(model, (calibration[:2],), evaluate, TARGET, n_trials=4, criterion=criterion, tie=BY_LAYER,
                        progress=False)
    assert criterion.evaluator.data.reads == 1  # the workspace scored its graph once for every trial
    trials = result.study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(len(t.params) == LAYERS for t in trials)  # one per decoder layer
    assert len(searched_parameters(list(result.sizes), None)) == 2 * LAYERS  # untied: heads and FFN of each
    assert result.measured_cost <= result.dense_cost / Budget.parse(TARGET).ratio
    assert result.value >= result.uniform_value  # the uniform allocation is one of the trials
    assert result.value == pytest.approx(evaluate(result.model))

    mine = _compile(model, calibration, result.pruner)
    assert isinstance(mine, type(model))
    kept = {key: result.pruner.kept(n, result.sparsities.get(key, 0.0)) for key, n in result.sizes.items()}
    assert [w for _, w in _widths(mine)] == [kept[f"model.layers.{i}.mlp.gate_proj.weight[0]"] for i in range(LAYERS)]
    assert mine.config.hidden_size == 32
    with torch.no_grad():
        torch.testing.assert_close(mine(calibration[:2]).logits, result.model(calibration[:2]).logits)
    assert (getattr(mine.config, WIDTHS_KEY, None) is not None) == (len(set(_widths(mine))) > 1)
    _reloads(mine, tmp_path, calibration)


@pytest.mark.slow  # 5 s: trials against fresh pruners
def test_workspace_scores_once_and_trials_rank_as_a_fresh_pruner_would(model, calibration):
    criterion = _criterion(calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ws = Workspace.trace(model, (calibration[:2],), criterion)
    sparsities = {"model.layers.0.mlp.gate_proj.weight[0]": 0.5, "model.layers.2.mlp.gate_proj.weight[0]": 0.25}
    trial = ws.compile(sparsities)
    again = ws.compile({"model.layers.1.mlp.gate_proj.weight[0]": 0.5})
    assert criterion.evaluator.data.reads == 1
    fresh = _compile(model, calibration, PerGroupSparsity(criterion, sparsities))  # scores on its own trace
    assert criterion.evaluator.data.reads == 2
    with torch.no_grad():
        torch.testing.assert_close(trial(calibration[:2]).logits, fresh(calibration[:2]).logits)
    assert tuple(again.get_parameter("model.layers.1.mlp.gate_proj.weight").shape) == (32, 32)


def test_tie_groups_by_a_pattern_and_bad_patterns_are_named():
    keys = ["model.embed_tokens.weight[1]"] + [f"model.layers.{i}.{part}" for i in range(2)
                                               for part in ("self_attn.q_proj.weight[0]", "mlp.gate_proj.weight[0]")]
    by_layer = searched_parameters(keys, BY_LAYER)
    assert sorted(set(by_layer.values())) == ["model.embed_tokens.weight[1]", "tie:layers.0.", "tie:layers.1."]
    by_kind = searched_parameters(keys, r"layers\.\d+\.mlp|self_attn")  # one per FFN, one for every layer's heads
    assert [by_kind[k] for k in keys[1:]] == ["tie:self_attn", "tie:layers.0.mlp", "tie:self_attn", "tie:layers.1.mlp"]
    assert searched_parameters(keys, None) == {k: k for k in keys}
    with pytest.raises(ConfigError, match="matches none of this model's groups"):
        searched_parameters(keys, r"blocks\.\d+")
    with pytest.raises(ConfigError, match="not a regular expression"):
        SearchConfig(tie="layers.(")
    assert SearchConfig.from_dict(SearchConfig(tie=BY_LAYER).to_dict()).tie == BY_LAYER
