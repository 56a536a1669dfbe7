"""FLAP (issue 17): the fluctuation criterion, bias compensation (``compensate-bias``) and its write-back."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import meta
from fxcompress import prune as P
from fxcompress.analysis import get_analysis
from fxcompress.errors import ConfigError
from fxcompress.passes import CompensateBias, InsertMasks, PropagateChannels, Shrink, standard_pruning
from fxcompress.pipeline import parse_pipeline
from fxcompress.prune.data_aware import ColumnStatistics

torch.set_num_threads(2)


class MLP(nn.Module):
    """``fc2(relu(fc1(x)))``; ``fc2`` has no bias, so compensation must create one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _constant_loud_channel() -> MLP:
    """Hidden channel 3 reads nothing of ``x`` (its value is relu(5) = 5 on every token) and has the largest
    ``fc2`` weights: the loudest channel, and the one with no fluctuation."""
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[3] = 0.0
        model.fc1.bias.copy_(torch.tensor([0.5, 0.5, 0.5, 5.0]))
        model.fc2.weight.copy_(torch.tensor([[1.0, 0.8, 0.6, 3.0], [0.5, 0.9, 0.7, -3.0]]))
    return model


def _evaluator(n_batches: int = 3, rows: int = 32) -> P.Evaluator:
    data = [torch.randn(rows, 4, generator=torch.Generator().manual_seed(i)) for i in range(n_batches)]
    return P.Evaluator(data, loss=lambda m, b: m(b).sum(), progress=False)


def _removed(masks: dict, target: str) -> list[int]:
    return torch.nonzero(masks[target].flatten(1).eq(0).all(1)).flatten().tolist()


# ---------------------------------------------------------------------------- the metric


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_loud_constant_channel_goes_first_by_fluctuation_and_stays_by_activation_norm(frontend):
    model, ev = _constant_loud_channel(), _evaluator()
    gm = fxcompress.trace(model, ev.data[0], frontend=frontend)
    analysis = get_analysis(gm)
    flap = P.Fluctuation(0.25, evaluator=ev).compute_masks(gm, analysis)
    act = P.ActivationNorm(0.25, evaluator=ev).compute_masks(gm, analysis)
    assert _removed(flap, "fc1.weight") == [3]
    assert 3 not in _removed(act, "fc1.weight") and len(_removed(act, "fc1.weight")) == 1


def test_scores_are_the_standardised_variance_times_squared_column_norms():
    model, ev = _constant_loud_channel(), _evaluator()
    with torch.no_grad():
        model.fc1.weight[3, 0] = 0.02  # a little fluctuation, so that no score is degenerate
    gm = fxcompress.trace(model, ev.data[0])
    analysis = get_analysis(gm)
    pruner = P.Fluctuation(0.25, evaluator=ev)
    (group,) = pruner.selected_groups(gm, analysis)
    (scores,) = pruner.group_scores(gm, analysis, [group])
    with torch.no_grad():
        x = torch.relu(model.fc1(torch.cat(ev.data))).double()  # fc2's input over every calibration token
    raw = (x.var(dim=0) * model.fc2.weight.detach().double().pow(2).sum(0)).numpy()
    expected = (raw - raw.mean()) / raw.std(ddof=1)
    assert raw.argmin() == 3 and scores.argmin() == 3
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_column_statistics_merge_batches_exactly_even_far_from_zero():
    """Batches of different sizes, a column at 1e6 with a spread of 1e-3: Σx² - n·mean² would lose it all."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 2.0])
    x[:, 1] += 1e6
    stats = ColumnStatistics.of(x[:7]).merged(ColumnStatistics.of(x[7:100])).merged(ColumnStatistics.of(x[100:]))
    assert stats.tokens == 300
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, x.var(0), rtol=1e-6)
    np.testing.assert_allclose(stats.norms, x.norm(dim=0), rtol=1e-12)


def test_text_pipeline_reaches_it_and_says_what_it_needs():
    with pytest.raises(ConfigError, match="Fluctuation needs calibration batches"):
        fxcompress.compile(MLP().eval(), torch.randn(2, 4), "insert-masks{pruner=fluctuation,sparsity=0.5},shrink")
    assert isinstance(P.make_pruner("fluctuation", sparsity=0.5, evaluator=_evaluator()), P.Fluctuation)
    passes = parse_pipeline("compensate-bias{exclude=lm_head}")
    assert passes == [CompensateBias(exclude=("lm_head",))] and passes[0].to_text() == "compensate-bias{exclude=lm_head}"


# ---------------------------------------------------------------------------- bias compensation


def _mean_output(model: nn.Module, ev: P.Evaluator) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.cat(ev.data)).double().mean(0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_compensation_keeps_the_mean_output_over_calibration(frontend):
    torch.manual_seed(1)
    model, ev = MLP().eval(), _evaluator()
    dense = _mean_output(model, ev)
    means = {}
    for compensate in (False, True):
        small = fxcompress.compile(model, ev.data[0], standard_pruning(P.Fluctuation(0.5, evaluator=ev),
                                                                       compensate=compensate), frontend=frontend)
        assert small.fc2.weight.shape == (2, 2) if frontend == "fx" else True
        means[compensate] = _mean_output(small, ev)
    assert (means[False] - dense).abs().max() > 1e-2  # the pruned channels carried a mean
    torch.testing.assert_close(means[True], dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pass_adds_one_bias_then_is_a_no_op(frontend):
    torch.manual_seed(1)
    model, ev = MLP().eval(), _evaluator()
    gm = fxcompress.compile(model, ev.data[0], [InsertMasks(P.Fluctuation(0.5, evaluator=ev))], frontend=frontend)
    nodes = len(gm.graph.nodes)
    assert CompensateBias()(gm).modified
    assert "fc2.bias" in dict(gm.named_parameters()) or "fc2.bias_orig" in dict(gm.named_parameters())
    assert len(gm.graph.nodes) == nodes + (frontend == "export")  # an exported linear reads the bias by get_attr
    assert meta.COMPENSATED in gm.meta and not CompensateBias()(gm).modified
    PropagateChannels()(gm)
    masked = _mean_output(gm, ev)
    Shrink()(gm)
    torch.testing.assert_close(_mean_output(gm, ev), masked, rtol=0, atol=1e-6)
    torch.testing.assert_close(masked, _mean_output(model, ev), rtol=0, atol=1e-5)


def test_excluded_layers_are_left_alone_and_missing_statistics_are_named():
    torch.manual_seed(1)
    model, ev = MLP().eval(), _evaluator()
    passes = [InsertMasks(P.Fluctuation(0.5, evaluator=ev)), CompensateBias(exclude="fc2")]
    gm = fxcompress.compile(model, ev.data[0], passes)
    assert gm.fc2.bias is None
    with pytest.raises(ConfigError, match="no calibration means of fc2.weight"):
        fxcompress.compile(model, ev.data[0], [InsertMasks(P.L1Norm(0.5)), CompensateBias()])


# ---------------------------------------------------------------------------- a GQA Llama, written back

transformers = pytest.importorskip("transformers")
from fxcompress import examples_llm as L  # noqa: E402

EMBEDDING = "model.embed_tokens"  # FLAP prunes heads and FFN channels; the residual width stays


def _llama_and_data():
    model = L.tiny_llama(L.tiny_llama_config(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, seq_len=32)).eval()
    calibration = torch.randint(0, L.VOCAB_SIZE, (8, 32), generator=torch.Generator().manual_seed(0))
    ev = P.Evaluator([calibration[:4], calibration[4:]], loss=lambda m, b: L.logits_of(m(b)).mean(), progress=False)
    return model, calibration, ev


def _greedy(step, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Step-by-step argmax, re-running ``step`` on the growing sequence."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, L.logits_of(step(ids))[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_tiny_gqa_llama_with_compensation_round_trips_and_generates_as_the_graph(tmp_path):
    model, calibration, ev = _llama_and_data()
    pruner = P.Fluctuation(evaluator=ev, num_batches=2, exclude=(EMBEDDING,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = fxcompress.compile(model, (calibration[:2],), standard_pruning(pruner, "params=1.333333", compensate=True))
    mine = fxcompress.writeback.write_back(model, graph)
    assert isinstance(mine, transformers.LlamaForCausalLM) and mine.config.attention_bias and mine.config.mlp_bias
    layer = mine.model.layers[0]
    assert layer.self_attn.o_proj.bias.abs().sum() > 0 and layer.mlp.down_proj.bias.abs().sum() > 0
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros_like(layer.self_attn.q_proj.bias))
    assert layer.mlp.down_proj.in_features < 64 and getattr(mine.config, fxcompress.writeback.WIDTHS_KEY, None) is None
    ids = calibration[:2, :6]  # the graph was captured at batch 2 (a dynamic batch refuses 1)
    with torch.no_grad():
        generated = mine.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(generated, _greedy(graph, ids, 12))
    mine.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is transformers.LlamaForCausalLM
    state, loaded = mine.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    assert not model.config.attention_bias and model.model.layers[0].self_attn.o_proj.bias is None  # user's untouched


@pytest.mark.slow  # 4 s: two compiles of a written-back Llama
def test_a_bias_the_config_cannot_express_is_refused_by_name_and_excluding_it_writes_back():
    """Pruning the residual stream with compensation gives ``lm_head`` a bias; LlamaConfig has no field for it.
    Without ``lm_head``, q/k/v and gate/up get compensated biases, which ``attention_bias``/``mlp_bias`` cover."""
    model, calibration, ev = _llama_and_data()
    pruner = P.Fluctuation(0.25, evaluator=ev, num_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="LlamaForCausalLM: .*lm_head.*LlamaConfig.*exclude"):
            fxcompress.compile(model, (calibration[:2],), standard_pruning(pruner, compensate=True), output="module")
        passes = [InsertMasks(pruner), CompensateBias(exclude="lm_head"), PropagateChannels(), Shrink()]
        mine = fxcompress.compile(model, (calibration[:2],), passes, output="module")
    assert mine.config.hidden_size == 24 and mine.lm_head.bias is None
    assert mine.model.layers[1].self_attn.q_proj.bias.abs().sum() > 0 and mine.model.layers[1].mlp.up_proj.bias.abs().sum() > 0
