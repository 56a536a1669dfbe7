"""ActivationNorm (Wanda-style |W|·||X|| per channel): its ranking against L1, the formula, and an exported Llama."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from fxcompress.passes import standard_pruning
from torch import nn

import fxcompress
from fxcompress import prune as P
from fxcompress.analysis import get_analysis
from fxcompress.channels import Role
from fxcompress.errors import ConfigError
from fxcompress.pipeline import VerifyOutputs
from fxcompress.prune.data_aware import linear_input_norms

torch.set_num_threads(2)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _loud_small_channel() -> MLP:
    """Hidden channel 3 has tiny weights on both sides but a bias of 100: the loudest activation by far."""
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([1.0, 0.9, 0.8, 0.01]).view(4, 1).expand(4, 4))
        model.fc1.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
        model.fc2.weight.copy_(torch.tensor([1.0, 1.0, 1.0, 0.05]).expand(2, 4))
    return model


def _evaluator(shape, n_batches=2) -> P.Evaluator:
    data = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(n_batches)]
    return P.Evaluator(data, loss=lambda m, b: m(b).sum(), progress=False)


def _removed(masks: dict, target: str) -> list[int]:
    return torch.nonzero(masks[target].flatten(1).eq(0).all(1)).flatten().tolist()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_small_weight_loud_channel_is_kept_by_activation_norm_and_removed_by_l1(frontend):
    model, ev = _loud_small_channel(), _evaluator((16, 4))
    gm = fxcompress.trace(model, ev.data[0], frontend=frontend)
    analysis = get_analysis(gm)
    l1 = P.L1Norm(0.25).compute_masks(gm, analysis)
    act = P.ActivationNorm(0.25, evaluator=ev).compute_masks(gm, analysis)
    assert _removed(l1, "fc1.weight") == [3]
    assert _removed(act, "fc1.weight") != [3] and len(_removed(act, "fc1.weight")) == 1
    assert all(p.grad is None for p in gm.parameters())


def test_scores_follow_the_formula():
    model, ev = _loud_small_channel(), _evaluator((16, 4))
    gm = fxcompress.trace(model, ev.data[0])
    analysis = get_analysis(gm)
    (group,) = P.ActivationNorm(0.25, evaluator=ev).selected_groups(gm, analysis)
    (scores,) = P.ActivationNorm(0.25, evaluator=ev).group_scores(gm, analysis, [group])
    with torch.no_grad():
        x = torch.relu(model.fc1(torch.cat(ev.data)))  # fc2's input over every calibration token
        expected = (model.fc2.weight.norm(dim=0) * x.norm(dim=0)).double().numpy()
    (k,) = [k for k in analysis.slices_of(group) if analysis.slices[k].target == "fc2.weight"]
    positions, local = analysis.positions(k, group)
    np.testing.assert_allclose(scores, np.bincount(local, weights=expected[positions], minlength=4), rtol=1e-5)


def test_text_pipeline_reaches_it_and_says_what_it_needs():
    model = MLP().eval()
    with pytest.raises(ConfigError, match="ActivationNorm needs calibration batches"):
        fxcompress.compile(model, torch.randn(2, 4), "insert-masks{pruner=activation-norm,sparsity=0.5},shrink")
    assert isinstance(P.make_pruner("activation-norm", sparsity=0.5, evaluator=_evaluator((8, 4))), P.ActivationNorm)


def test_tiny_llama_shrinks_equal_to_masked_through_the_standard_pipeline():
    pytest.importorskip("transformers")
    from fxcompress import examples_llm as L

    model = L.tiny_llama(L.tiny_llama_config(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, seq_len=32)).eval()
    calibration = torch.randint(0, L.VOCAB_SIZE, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [calibration[:4], calibration[4:]]
    ev = P.Evaluator(data, loss=lambda m, b: L.logits_of(m(b)).mean(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxcompress.trace(model, (calibration[:2],))
    analysis = get_analysis(gm)
    consumers = {analysis.slices[k].target for g in analysis.prunable_groups() for k in analysis.slices_of(g, Role.CONSUMER)}
    norms = linear_input_norms(gm, ev, consumers, 2)  # every group is read by measured linears: no L1 fallback
    assert set(norms) == consumers and len(consumers) == 15  # 2 x (q, k, v, o, gate, up, down) + lm_head
    verifier = VerifyOutputs((calibration[:2],), rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxcompress.compile(model, (calibration[:2],),
                                   standard_pruning(P.ActivationNorm(evaluator=ev, num_batches=2), target="params=1.333333"),
                                   verify=False, hooks=[verifier])
    assert verifier.errors["shrink"] <= 1e-4
    params = sum(p.numel() for p in small.parameters())
    assert params < 0.85 * sum(p.numel() for p in model.parameters())
    assert torch.isfinite(L.logits_of(small(calibration[:2]))).all()
