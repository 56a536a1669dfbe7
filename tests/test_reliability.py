"""Reliability: verification that can fail, inputs never modified, faults named by their cause (issue 15).

The verification cases live in the ``test_verify_*`` functions below; save/load
cases belong in their own functions.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, VerificationError
from fxcompress.passes import standard_pruning
from fxcompress.pipeline import Pass, VerifyOutputs, run_pipeline
from fxcompress.prune import L1Norm
from fxcompress.verify import clone_inputs, leaf_error, output_leaves, worst_leaf


class _Scale(Pass):
    """A pass that breaks output-preservation on purpose: scales one parameter."""

    name = "scale-one"

    def __init__(self, target: str, factor: float, index=None) -> None:
        self.target, self.factor, self.index = target, factor, index

    def run(self, gm) -> bool:
        with torch.no_grad():
            p = gm.get_parameter(self.target)
            if self.index is None:
                p.mul_(self.factor)
            else:
                p[self.index] *= self.factor
        return True


class TwoHeads(nn.Module):
    """A large-valued and a small-valued output: the small one must be checked on its own scale."""

    def __init__(self) -> None:
        super().__init__()
        self.big, self.small = nn.Linear(4, 3), nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return {"logits": self.big(x) * 1000.0, "aux": (self.small(x),)}


def _verify(model, x, passes):
    gm = fxcompress.trace(model, x)
    return run_pipeline(gm, passes, [VerifyOutputs((x,))])


def test_verify_small_leaf_error_is_not_hidden_by_a_large_leaf():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    with pytest.raises(VerificationError, match=r"changed output \['aux'\]\[0\] by 2\.00e-01 relative to its scale"):
        _verify(TwoHeads(), x, [_Scale("small.weight", 1.2)])


def test_verify_names_leaf_and_index():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    with pytest.raises(VerificationError, match=r"changed output \['logits'\] .* at index \(\d, 1\)"):
        _verify(TwoHeads(), x, [_Scale("big.weight", 2.0, index=1)])


def test_verify_elementwise_catches_error_on_small_elements():
    a = torch.tensor([1000.0, 1.0])
    err = leaf_error("0", a, torch.tensor([1000.0, 1.3]))
    assert (err.kind, err.index, err.expected) == ("element", (1,), 1.0)
    assert err.error == pytest.approx(0.3 / 1.0 / 100.0)
    assert worst_leaf(a, a.clone() + torch.tensor([1e-3, 0.0]), rtol=1e-4) is None


def test_verify_leaves_of_dataclass_and_model_output():
    from transformers.modeling_outputs import BaseModelOutput

    out = BaseModelOutput(last_hidden_state=torch.ones(2), hidden_states=(torch.zeros(1),))
    assert list(output_leaves(out)) == ["['last_hidden_state']", "['hidden_states'][0]"]
    assert list(output_leaves(torch.ones(1))) == ["0"]


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        x.mul_(2)
        return self.fc2(torch.relu(self.fc1(x)))


def test_verify_never_changes_the_users_inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    before = x.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxcompress.compile(InPlace().eval(), x, standard_pruning(L1Norm(0.5)))
    assert torch.equal(x, before)
    assert small.fc1.out_features == 8
    y = (x,)
    assert clone_inputs(y)[0] is not x and torch.equal(clone_inputs(y)[0], x)


def test_verify_nonfinite_weights_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(VerificationError, match=r"the model's '0\.weight' holds nan or inf values"):
        fxcompress.compile(model, torch.randn(2, 4), standard_pruning(L1Norm(0.5)))


class ClampedLinear(nn.Module):
    """timm's Gemma 4 ``ClippableLinear``: infinite clamp bounds in buffers mean "no clipping"."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("input_min", torch.tensor(float("-inf")))
        self.register_buffer("input_max", torch.tensor(float("inf")))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.clamp(self.input_min, self.input_max))))


def test_infinite_buffers_are_bounds_not_broken_weights():
    small = fxcompress.compile(ClampedLinear().eval(), torch.randn(2, 4), standard_pruning(L1Norm(0.5)))
    assert small.fc1.out_features == 4
    broken = ClampedLinear().eval()
    broken.input_max.fill_(float("nan"))
    with pytest.raises(VerificationError, match=r"the model's 'input_max' holds nan or inf values"):
        fxcompress.compile(broken, torch.randn(2, 4), standard_pruning(L1Norm(0.5)))


class Pow(nn.Module):
    def forward(self, x):
        return x.pow(-0.5)


def test_verify_nonfinite_outputs_named():
    with pytest.raises(VerificationError, match=r"output 0 holds nan or inf on example_inputs"):
        fxcompress.compile(Pow(), torch.tensor([[0.0, 1.0]]), standard_pruning(L1Norm(0.5)))


def test_verify_train_mode_dropout_asks_for_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    with pytest.raises(VerificationError, match=r"stochastic.*call model\.eval\(\) before compiling"):
        fxcompress.compile(model, torch.randn(2, 4), standard_pruning(L1Norm(0.5)), frontend="export")


def _masked_hook(model, x, original):
    from fxcompress.passes import AnalyzeGroups, InsertMasks, PropagateChannels

    gm = fxcompress.trace(model, x)
    hook = VerifyOutputs(gm.meta["fxcompress.example_inputs"], original=original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = run_pipeline(gm, [InsertMasks(L1Norm(0.5)), AnalyzeGroups(), PropagateChannels()], [hook])
    return masked, hook


def test_verify_oracle_matches_original_with_masked_weights_for_both_frontends():
    from transformers import BertConfig, BertModel

    from fxcompress.modules import has_masked_statistics
    from fxcompress.verify import oracle_outputs, unreachable_error, forward

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    cases = [(InPlace().eval(), (torch.randn(2, 8),)), (bert.eval(), (torch.randint(0, 100, (1, 8)),))]
    for model, x in cases:
        masked, _ = _masked_hook(model, x, model)
        out = forward(masked, x)
        oracle = oracle_outputs(model, masked, x)  # None where norms use kept-channel statistics
        assert (oracle is None) == has_masked_statistics(masked)
        assert oracle is None or worst_leaf(oracle, out, 1e-4) is None
        assert unreachable_error(masked, x, out, 1e-4) is None


class InPlaceTanh(InPlace):
    """Same tensors as ``InPlace``, different computation: stands in for a graph a rule got wrong."""

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x * 2)))


def test_verify_oracle_catches_a_masked_graph_that_differs_from_the_original():
    torch.manual_seed(0)
    model, x = InPlace().eval(), torch.randn(2, 8)
    with pytest.raises(VerificationError, match=r"the original model run with the masked weights disagrees .* output 0"):
        _masked_hook(model, x, InPlaceTanh().eval())


def test_verify_oracle_steps_aside_when_the_tensors_no_longer_correspond():
    from fxcompress.verify import oracle_outputs

    torch.manual_seed(0)
    model, x = InPlace().eval(), (torch.randn(2, 8),)
    masked, _ = _masked_hook(model, x, None)
    extra = nn.Sequential(InPlace(), nn.Linear(4, 4)).eval()  # a tensor the graph lacks, as after folding
    assert oracle_outputs(extra, masked, x) is None


def test_verify_perturbation_restores_the_masked_model():
    from fxcompress.verify import forward, perturbed_removed_channels

    torch.manual_seed(0)
    x = (torch.randn(2, 8),)
    masked, _ = _masked_hook(InPlace().eval(), x, None)
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    out = forward(masked, x)
    with perturbed_removed_channels(masked):
        assert not torch.equal(masked.fc1.weight, masked.fc1.weight_orig * before["fc1.weight_mask"])
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())
    assert torch.equal(forward(masked, x), out)


class SizeAsNumber(nn.Module):
    """``y / y.shape[1]``: a channel count used as a number changes when channels are removed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.a(x)
        return self.head(y / y.shape[1])


def test_verify_refuses_a_channel_count_used_as_a_number():
    """Until the rule table freezes such dims, verification must refuse the wrong shrunk model (16/8 = 2x off)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(VerificationError, match=r"pass 'shrink' changed output 0 by \d\.\d\de-01 relative to its scale"):
            fxcompress.compile(SizeAsNumber().eval(), torch.randn(4, 8), standard_pruning(L1Norm(0.5)))


class PowExponent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.pow(self.a(x).abs() + 1, self.b(x)))


def test_verify_pow_with_tensor_exponent_compiles_correctly():
    """The issue's reproduction: base and exponent channels are coupled, so the pruned model is verified and smaller."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxcompress.compile(PowExponent().eval(), torch.randn(4, 8), standard_pruning(L1Norm(0.5)))
    assert (small.a.out_features, small.b.out_features, small.head.in_features) == (8, 8, 8)


@pytest.mark.parametrize("wrap", [nn.utils.parametrizations.weight_norm, nn.utils.weight_norm])
def test_weight_norm_is_refused_with_the_module_named(wrap):
    model = nn.Sequential(wrap(nn.Conv2d(3, 8, 1)), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with pytest.raises(ConfigError, match=r"module '0' \(.*Conv2d\) is re-parametrised .* fold it first"):
        fxcompress.compile(model, torch.randn(2, 3, 4, 4), standard_pruning(L1Norm(0.5)))


def test_a_fake_quantized_model_is_not_mistaken_for_weight_norm():
    from fxcompress.passes import Calibrate, FakeQuantize, FoldQDQ, InsertObservers
    from fxcompress.quant import QConfig

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    qat = fxcompress.compile(model, x, [InsertObservers(QConfig()), Calibrate([x]), FakeQuantize()])
    folded = fxcompress.compile(qat.eval(), x, [FoldQDQ()])
    assert folded(x).shape == (2, 4, 4, 4)


class LiteralView(nn.Module):
    """``x.view(n, 8, 16)``: a size literal the shrink must rewrite to the kept channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv1d(8, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x).view(x.shape[0], 8, 16))


def test_a_shrunk_graph_that_fails_to_run_is_one_error_naming_its_line_and_prints_nothing(monkeypatch, capfd):
    """With the view's size rewrite broken the shrunk model cannot run: torch.fx would print a traceback
    of its generated code to stderr; verification turns that into the failing line in its own error."""
    import dataclasses

    from fxcompress.rules import RULES

    monkeypatch.setitem(RULES._rules, ".view", dataclasses.replace(RULES._rules[".view"], shrink=None))
    with pytest.raises(VerificationError, match=r"after pass 'shrink' the model fails on example_inputs") as caught:
        fxcompress.compile(LiteralView().eval(), torch.randn(1, 3, 4, 4), standard_pruning(L1Norm(0.5)))
    assert "line" in str(caught.value) and "view(" in str(caught.value)  # the graph line that failed
    assert capfd.readouterr().err == ""


@dataclasses.dataclass(frozen=True)
class Nudge(Pass):
    """Scales the last layer's weight by 1 + 1e-6: an output change well inside the tolerance."""

    name: ClassVar[str] = "nudge"

    def run(self, gm):
        with torch.no_grad():
            gm.get_submodule("2").weight.mul_(1 + 1e-6)
        return True


def test_verification_records_the_error_it_measured_not_only_failures():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False)).eval()
    x = torch.randn(1, 3, 8, 8)
    verifier = VerifyOutputs((x,), rtol=1e-4)
    fxcompress.compile(model, x, [Nudge()], verify=False, hooks=[verifier])
    assert verifier.errors["nudge"] == pytest.approx(1e-6, rel=0.2)


class TiedHead(nn.Module):
    """An output layer sharing the embedding's weight (GPT-2's ``lm_head``): two names, one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(16, 8), nn.Linear(8, 12), nn.Linear(12, 8)
        self.out = nn.Linear(8, 16, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.head(torch.relu(self.mid(self.emb(ids)))))


def test_the_oracle_runs_a_model_with_tied_weights():
    torch.manual_seed(0)
    small = fxcompress.compile(TiedHead().eval(), torch.randint(0, 16, (2, 5)), standard_pruning(L1Norm(0.5)))
    assert small.mid.out_features == 6 and small.out.weight is small.emb.weight
