"""The four pruning passes, one at a time, and the pipeline that runs them.

For each pass: the expected graph and parameters afterwards, an honest
``modified`` flag (and a second run that changes nothing), and numeric
agreement with the module before the pass where the pass preserves outputs.
Then the pipeline machinery: ordering requirements, hooks, and parsing
pipelines written as text.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress import meta
from fxcompress.analysis import get_analysis
from fxcompress.errors import ConfigError, PipelineError, VerificationError
from fxcompress.masks import current_masks
from fxcompress.passes import AnalyzeGroups, InsertMasks, PropagateChannels, Shrink, standard_pruning
from fxcompress.pipeline import Pass, TimePasses, VerifyOutputs, parse_pipeline, run_pipeline
from fxcompress.prune import L1Norm

INPUT = (2, 3, 6, 6)


class Tiny(nn.Module):
    """conv-bn-relu, conv-relu, spatial mean, linear: two prunable groups of 8 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@dataclasses.dataclass(frozen=True)
class RowsOf:
    """A hand-written pruner (the ``Pruner`` protocol): mask given output rows of one layer's weight and bias.

    A channel is removed only when everything that produces it is masked: a
    live bias would still write a constant into it.
    """

    layer: str
    rows: tuple[int, ...]

    def compute_masks(self, gm, analysis):
        masks = {}
        for name in ("weight", "bias"):
            mask = torch.ones_like(getattr(gm.get_submodule(self.layer), name))
            mask[list(self.rows)] = 0
            masks[f"{self.layer}.{name}"] = mask
        return masks


def node_signature(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(op, target) of every node, in order: what 'the graph did not change' means."""
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


def shapes(gm: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


@pytest.fixture
def traced() -> fx.GraphModule:
    model = Tiny().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.bias.uniform_(-1, 1)
    return fxcompress.trace(model, torch.randn(INPUT), frontend="fx")


def run(gm, *passes):
    """Run passes one by one as the pipeline would; return the ``modified`` flag of each."""
    flags = []
    for p in passes:
        result = p(gm)
        if result.modified:
            gm.recompile()
        flags.append(result.modified)
    return flags


@torch.no_grad()
def output(gm, x):
    return gm.eval()(x)


# ---------------------------------------------------------------------------- InsertMasks


def test_insert_masks_reparametrises_weights_without_touching_the_graph(traced):
    before = node_signature(traced)
    assert run(traced, InsertMasks(L1Norm(0.5))) == [True]
    assert node_signature(traced) == before
    masks = current_masks(traced)
    assert {"conv1.weight", "conv2.weight"} <= masks.keys()
    for name in ("conv1", "conv2"):
        module = traced.get_submodule(name)
        assert hasattr(module, "weight_orig") and hasattr(module, "weight_mask")
        rows_alive = masks[f"{name}.weight"].flatten(1).any(dim=1)
        assert int(rows_alive.sum()) == 4  # half of 8 output channels
        assert torch.all(module.weight[~rows_alive] == 0)
    assert "fc.weight" not in masks or bool(masks["fc.weight"].flatten(1).any(dim=1).all())  # output group frozen


def test_insert_masks_twice_is_a_no_op(traced):
    pruner = L1Norm(0.5)
    assert run(traced, InsertMasks(pruner)) == [True]
    masks = {k: v.clone() for k, v in current_masks(traced).items()}
    assert run(traced, InsertMasks(pruner)) == [False]
    again = current_masks(traced)
    assert masks.keys() == again.keys() and all(torch.equal(masks[k], again[k]) for k in masks)


def test_insert_masks_with_nothing_to_prune_reports_no_change(traced):
    state = copy.deepcopy(traced.state_dict())
    assert run(traced, InsertMasks(L1Norm(0.0))) == [False]
    assert current_masks(traced) == {}
    assert shapes(traced) == {k: tuple(v.shape) for k, v in state.items()}


# ---------------------------------------------------------------------------- AnalyzeGroups


def test_analyze_groups_annotates_without_changing_graph_or_outputs(traced):
    x = torch.randn(INPUT)
    before, reference = node_signature(traced), output(traced, x)
    assert run(traced, AnalyzeGroups()) == [True]
    assert node_signature(traced) == before
    assert torch.equal(output(traced, x), reference)
    assert meta.ANALYSIS in traced.meta
    for node in traced.graph.nodes:
        if node.op in ("call_module", "call_function", "placeholder") and node.name != "output":
            assert meta.CHANNELS in node.meta, node.name
    groups = get_analysis(traced).groups
    assert sorted((len(g), g.prunable) for g in groups) == [(3, False), (4, False), (8, True), (8, True)]


def test_analyze_groups_twice_is_a_no_op(traced):
    assert run(traced, AnalyzeGroups(), AnalyzeGroups()) == [True, False]


# ---------------------------------------------------------------------------- PropagateChannels


def test_propagate_channels_masks_everything_coupled_to_a_removed_channel(traced):
    run(traced, InsertMasks(RowsOf("conv1", (1, 5))))
    assert set(current_masks(traced)) == {"conv1.weight", "conv1.bias"}
    before = node_signature(traced)
    # InsertMasks already computed (and kept) the analysis, so AnalyzeGroups has nothing to do
    assert run(traced, AnalyzeGroups(), PropagateChannels()) == [False, True]
    assert node_signature(traced) == before
    masks = current_masks(traced)
    assert set(masks) == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight"}
    dead = [1, 5]
    assert torch.all(masks["bn1.weight"][dead] == 0) and torch.all(masks["bn1.bias"][dead] == 0)
    conv2 = masks["conv2.weight"]
    assert torch.all(conv2[:, dead] == 0) and torch.all(conv2[:, [0, 2, 3, 4, 6, 7]] == 1)


def test_propagate_channels_twice_is_a_no_op(traced):
    run(traced, InsertMasks(RowsOf("conv1", (0,))), AnalyzeGroups())
    assert run(traced, PropagateChannels(), PropagateChannels()) == [True, False]


def test_propagate_channels_without_masks_reports_no_change(traced):
    assert run(traced, AnalyzeGroups(), PropagateChannels()) == [True, False]
    assert current_masks(traced) == {}


@dataclasses.dataclass(frozen=True)
class WeightRowOnly(RowsOf):
    """Masks a whole weight row but leaves the bias: the channel still carries the bias."""

    def compute_masks(self, gm, analysis):
        return {f"{self.layer}.weight": RowsOf.compute_masks(self, gm, analysis)[f"{self.layer}.weight"]}


def test_a_live_bias_keeps_its_channel(traced):
    run(traced, InsertMasks(WeightRowOnly("conv1", (2,))), AnalyzeGroups())
    assert run(traced, PropagateChannels()) == [False]
    assert set(current_masks(traced)) == {"conv1.weight"}


def test_partially_masked_rows_do_not_remove_a_channel(traced):
    """A producer row that still has a nonzero weight keeps its channel alive."""

    @dataclasses.dataclass(frozen=True)
    class OnePlane(RowsOf):
        def compute_masks(self, gm, analysis):
            masks = RowsOf.compute_masks(self, gm, analysis)
            masks["conv1.weight"][2, 0] = 1  # filter 2 keeps one input plane
            return masks

    run(traced, InsertMasks(OnePlane("conv1", (2,))), AnalyzeGroups())
    assert run(traced, PropagateChannels()) == [False]
    assert set(current_masks(traced)) == {"conv1.weight", "conv1.bias"}


# ---------------------------------------------------------------------------- Shrink


def test_shrink_slices_parameters_and_keeps_the_graph(traced):
    x = torch.randn(INPUT)
    run(traced, InsertMasks(L1Norm(0.5)), AnalyzeGroups(), PropagateChannels())
    before, reference = node_signature(traced), output(traced, x)
    assert run(traced, Shrink()) == [True]
    assert node_signature(traced) == before
    assert shapes(traced) == {
        "conv1.weight": (4, 3, 3, 3), "conv1.bias": (4,),
        "bn1.weight": (4,), "bn1.bias": (4,), "bn1.running_mean": (4,), "bn1.running_var": (4,),
        "bn1.num_batches_tracked": (),
        "conv2.weight": (4, 4, 3, 3), "conv2.bias": (4,),
        "fc.weight": (4, 4), "fc.bias": (4,),
    }
    assert (traced.conv1.out_channels, traced.bn1.num_features, traced.conv2.in_channels) == (4, 4, 4)
    assert (traced.conv2.out_channels, traced.fc.in_features) == (4, 4)
    assert current_masks(traced) == {}  # every structured mask became a smaller dense tensor
    shrunk = output(traced, x)
    scale = reference.abs().max()
    assert (shrunk - reference).abs().max() <= 1e-4 * scale


def test_shrink_twice_is_a_no_op(traced):
    run(traced, InsertMasks(L1Norm(0.5)), AnalyzeGroups(), PropagateChannels())
    assert run(traced, Shrink()) == [True]
    state = copy.deepcopy(traced.state_dict())
    assert run(traced, Shrink()) == [False]
    assert all(torch.equal(state[k], v) for k, v in traced.state_dict().items())


def test_shrink_updates_shape_metadata(traced):
    run(traced, InsertMasks(L1Norm(0.5)), AnalyzeGroups(), PropagateChannels(), Shrink())
    conv1 = next(n for n in traced.graph.nodes if n.target == "conv1")
    assert tuple(conv1.meta[meta.TENSOR_META].shape) == (2, 4, 6, 6)


def test_shrink_without_propagate_channels_is_refused(traced):
    run(traced, InsertMasks(L1Norm(0.5)), AnalyzeGroups())
    with pytest.raises(PipelineError, match="'shrink' needs 'propagate-channels'"):
        Shrink()(traced)
    assert traced.conv1.weight.shape[0] == 8  # nothing was sliced


# ---------------------------------------------------------------------------- the pipeline runner and hooks


def test_standard_pipeline_is_the_three_passes_in_order_with_no_no_op_pass():
    pruner = L1Norm(0.3)
    assert standard_pruning(pruner) == [InsertMasks(pruner), PropagateChannels(), Shrink()]


def test_pipeline_records_history_and_times_every_pass(traced):
    timer = TimePasses()
    gm = run_pipeline(traced, standard_pruning(L1Norm(0.5)), [timer])
    assert gm.meta[meta.PASS_HISTORY] == ["insert-masks", "propagate-channels", "shrink"]
    assert set(timer.seconds) == {"insert-masks", "propagate-channels", "shrink"}
    assert all(s >= 0 for s in timer.seconds.values())


@dataclasses.dataclass(frozen=True)
class ScaleWeights(Pass):
    """A broken pass: claims to preserve outputs but doubles a weight."""

    name: ClassVar[str] = "scale-weights"

    def run(self, gm):
        with torch.no_grad():
            gm.fc.weight.mul_(2)
        return True


def test_verify_outputs_catches_a_pass_that_changes_outputs(traced):
    hook = VerifyOutputs(traced.meta[meta.EXAMPLE_INPUTS], rtol=1e-4)
    with pytest.raises(VerificationError, match="pass 'scale-weights' changed output 0 by"):
        run_pipeline(traced, [AnalyzeGroups(), ScaleWeights()], [hook])


def test_verify_outputs_ignores_passes_that_may_change_outputs(traced):
    """InsertMasks changes outputs on purpose; the check starts again from its result."""
    hook = VerifyOutputs(traced.meta[meta.EXAMPLE_INPUTS], rtol=1e-4)
    gm = run_pipeline(traced, standard_pruning(L1Norm(0.5)), [hook])
    assert gm.conv1.out_channels == 4


# ---------------------------------------------------------------------------- textual pipelines


def test_parse_standard_pipeline_round_trips():
    text = "insert-masks{pruner=l1,sparsity=0.25}, propagate-channels ,shrink"
    assert parse_pipeline(text) == standard_pruning(L1Norm(0.25))


def test_parse_pipeline_converts_option_values():
    [insert] = parse_pipeline("insert-masks{pruner=l2,sparsity=0.5,round-to=4}")
    assert type(insert.pruner).__name__ == "L2Norm"
    assert insert.pruner.sparsity == 0.5 and insert.pruner.round_to == 4
    assert isinstance(insert.pruner.round_to, int)


def test_parse_empty_pipeline_is_empty():
    assert parse_pipeline("") == [] and parse_pipeline("   ") == []


def test_compile_accepts_a_text_pipeline():
    model = Tiny().eval()
    gm = fxcompress.compile(
        model, torch.randn(INPUT), "insert-masks{pruner=l1,sparsity=0.5},analyze-groups,propagate-channels,shrink",
        frontend="fx",
    )
    assert (gm.conv1.out_channels, gm.conv2.out_channels) == (4, 4)


@pytest.mark.parametrize(
    "text",
    ["shrink;analyze-groups", "analyze-groups{}}", "{pruner=l1}", "analyze_groups", "insert-masks{pruner=l1"],
)
def test_malformed_pipeline_text(text):
    with pytest.raises(ConfigError):
        parse_pipeline(text)


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5"])
def test_shrink_updates_shapes_without_a_forward_pass(name):
    """Shrink derives every node's new shape from kept channel counts; a real forward must agree."""
    torchvision = pytest.importorskip("torchvision")
    from fxcompress.passes import standard_pruning
    from fxcompress.trace import propagate_shapes

    x = torch.randn(1, 3, 64, 64)
    shrunk = fxcompress.compile(torchvision.models.get_model(name).eval(), x, standard_pruning(L1Norm(0.5)))
    derived = {n.name: tuple(n.meta[meta.TENSOR_META].shape) for n in shrunk.graph.nodes
               if hasattr(n.meta.get(meta.TENSOR_META), "shape")}
    propagate_shapes(shrunk, (x,))
    real = {n.name: tuple(n.meta[meta.TENSOR_META].shape) for n in shrunk.graph.nodes if n.name in derived}
    assert derived == real


# ---------------------------------------------------------------- pipelines as text, both ways

ROUND_TRIPS = [
    "insert-masks{pruner=l1,sparsity=0.3},analyze-groups,propagate-channels,shrink",
    "insert-masks{pruner=fpgm,sparsity=0.3,exclude=fc*,round_to=8,vectors=weights}",
    "insert-masks{pruner=lamp,sparsity=0.6,allocation=local,max_sparsity_per_layer=0.9}",
    "insert-masks{pruner=l2,sparsity=0.4,target=params=3}",
    "insert-masks{pruner=nm,n=1,m=8},fold-batch-norm,channels-last",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_every_pass_prints_back_to_the_text_it_was_parsed_from(text):
    """Options at their defaults are left out, so these texts are written without them."""
    from fxcompress.pipeline import format_pipeline

    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text
    assert parse_pipeline(format_pipeline(passes)) == passes


def test_options_without_a_text_form_are_named():
    from fxcompress.prune import Evaluator, Taylor

    taylor = Taylor(0.5, evaluator=Evaluator([(torch.zeros(1, 3), torch.zeros(1))], lambda m, b: m(b[0]).sum()))
    with pytest.raises(ConfigError, match="option evaluator=.*has no text form"):
        InsertMasks(taylor).to_text()
    with pytest.raises(ConfigError, match="option op_types=.*has no text form"):
        InsertMasks(L1Norm(0.5, op_types=(nn.Conv2d,))).to_text()
    with pytest.raises(ConfigError, match="option exclude=.*has no text form"):
        InsertMasks(L1Norm(0.5, exclude=("a", "b"))).to_text()
