"""Bad input gets one clear error of the right ``fxcompress.errors`` class, whose message names the problem.

Each test feeds one kind of mistake a user makes — an untraceable model, wrong
example inputs, a bad pruner option, a bad pipeline — and asserts on the error
class and on the words of its message (the construct at fault and what to do).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, FxCompressError, PipelineError, TraceError
from fxcompress.passes import AnalyzeGroups, InsertMasks, Shrink, standard_pruning
from fxcompress.pipeline import parse_pipeline
from fxcompress.prune import L1Norm, L2Norm, make_pruner


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class DataDependent(nn.Module):
    """``if`` on a tensor value: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def compile_l1(model, inputs, **kwargs):
    """The standard pipeline; the fx frontend unless a test asks for another (export is slow)."""
    kwargs.setdefault("frontend", "fx")
    return fxcompress.compile(model, inputs, standard_pruning(L1Norm(0.5)), **kwargs)


# ---------------------------------------------------------------------------- the model and its inputs


@pytest.mark.parametrize("frontend", ["fx", "auto"])
def test_untraceable_model_names_the_model_and_the_cause(frontend):
    with pytest.raises(TraceError) as info:
        compile_l1(DataDependent(), torch.randn(2, 4), frontend=frontend)
    message = str(info.value)
    assert "DataDependent" in message
    assert "control flow" in message
    assert "leaf" in message  # says what to do


def test_unknown_frontend():
    with pytest.raises(TraceError, match="unknown frontend 'jit'"):
        compile_l1(TwoLayer(), torch.randn(2, 4), frontend="jit")


def test_not_a_module_is_a_trace_error():
    with pytest.raises(TraceError, match="nn.Module.*function"):
        compile_l1(lambda x: x, torch.randn(2, 4))


def test_wrong_input_shape_names_the_failing_layer():
    with pytest.raises(TraceError) as info:
        compile_l1(TwoLayer(), torch.randn(2, 5))
    message = str(info.value)
    assert "module 'fc1' of type Linear" in message
    assert "example_inputs" in message


def test_wrong_input_shape_says_which_shapes_disagree():
    with pytest.raises(TraceError, match="2x5 and 4x8"):
        compile_l1(TwoLayer(), torch.randn(2, 5), frontend="fx")


@pytest.mark.parametrize("inputs", [(), []])
def test_empty_example_inputs(inputs):
    with pytest.raises(TraceError, match="example_inputs is empty"):
        compile_l1(TwoLayer(), inputs)


@pytest.mark.parametrize("inputs, type_name", [("abc", "str"), (3.0, "float")])  # a dict is keyword inputs (test_user_inputs)
def test_example_inputs_of_the_wrong_type(inputs, type_name):
    with pytest.raises(TraceError, match=f"example_inputs must be a tensor or a tuple.*got {type_name}"):
        compile_l1(TwoLayer(), inputs)


def test_non_tensor_example_input_names_the_layer_that_needed_a_tensor():
    with pytest.raises(TraceError) as info:
        compile_l1(TwoLayer(), ([1, 2],))
    assert "module 'fc1' of type Linear" in str(info.value)
    assert "example_inputs" in str(info.value)


def test_too_many_example_inputs_is_a_trace_error():
    with pytest.raises(TraceError, match="example_inputs"):
        compile_l1(TwoLayer(), (torch.randn(2, 4), torch.randn(2, 4)))


def test_too_few_example_inputs_is_an_error():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.fc(x) + y

    with pytest.raises((TraceError, TypeError), match="example_inputs|argument"):
        compile_l1(TwoInputs(), torch.randn(2, 4))


# ---------------------------------------------------------------------------- pruner options


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1, float("nan"), "0.5", None])
@pytest.mark.parametrize("cls", [L1Norm, L2Norm])
def test_sparsity_outside_unit_interval(cls, sparsity):
    with pytest.raises(ConfigError) as info:
        cls(sparsity=sparsity)
    assert f"{cls.__name__}: sparsity must be in [0, 1), got {sparsity!r}" in str(info.value)


@pytest.mark.parametrize("sparsity", [0, 0.0, 0.999])
def test_sparsity_at_the_edges_of_the_interval_is_accepted(sparsity):
    assert L1Norm(sparsity=sparsity).sparsity == sparsity


def test_unknown_pruner_option_names_the_option_and_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        make_pruner("l1", sparsity=0.5, spasity=0.3)
    message = str(info.value)
    assert "pruner 'l1' has no option spasity" in message
    assert "sparsity" in message.split("options:")[1]


def test_unknown_pruner_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        make_pruner("l7")
    assert "unknown pruner 'l7'" in str(info.value)
    assert "l1" in str(info.value) and "l2" in str(info.value)


def test_unknown_option_on_the_pruner_class_is_pythons_type_error():
    """Constructing the dataclass directly: Python itself names the unexpected keyword."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        L1Norm(sparsity=0.5, foo=1)


@pytest.mark.parametrize("op_types, shown", [(("Conv2d",), "'Conv2d'"), ((int,), "int"), ((nn.Conv2d, 3), "3")])
def test_bad_op_types_name_the_offending_entry(op_types, shown):
    with pytest.raises(ConfigError, match=r"op_types must be nn.Module classes, got .*" + shown):
        L1Norm(0.5, op_types=op_types)


def test_single_class_as_op_types_is_accepted():
    assert L1Norm(0.5, op_types=nn.Conv2d).op_types == (nn.Conv2d,)


@pytest.mark.parametrize("round_to", [0, -2, 1.5])
def test_bad_round_to(round_to):
    with pytest.raises(ConfigError, match=f"round_to must be a positive integer, got {round_to!r}"):
        L1Norm(0.5, round_to=round_to)


def test_insert_masks_rejects_a_non_pruner():
    with pytest.raises(ConfigError, match="InsertMasks needs a pruner with compute_masks.*got str"):
        InsertMasks("l1")


# ---------------------------------------------------------------------------- passes and pipelines


def test_passes_that_are_not_passes():
    with pytest.raises(ConfigError, match="passes must be fxcompress passes, got L1Norm"):
        fxcompress.compile(TwoLayer(), torch.randn(2, 4), [L1Norm(0.5)])


def test_shrink_without_propagate_channels_is_a_pipeline_error():
    with pytest.raises(PipelineError) as info:
        fxcompress.compile(TwoLayer(), torch.randn(2, 4), [InsertMasks(L1Norm(0.5)), AnalyzeGroups(), Shrink()])
    message = str(info.value)
    assert "pass 'shrink' needs 'propagate-channels' to run before it" in message
    assert "insert-masks" in message and "analyze-groups" in message  # what did run


@pytest.mark.parametrize(
    "text, expected",
    [
        ("insert-masks{pruner=l1},frobnicate", "unknown pass 'frobnicate'; known passes: "),
        ("Shrink", "malformed pipeline at character 0"),
        ("analyze-groups{", "malformed pipeline at character 0"),
        ("analyze-groups,,shrink", "malformed pipeline at character 15"),
        ("insert-masks{pruner}", "option 'pruner' of pass 'insert-masks' must look like key=value"),
        ("analyze-groups{depth=2}", "bad options for pass 'analyze-groups'"),
        ("insert-masks{sparsity=0.5}", "insert-masks needs a pruner option"),
        ("insert-masks{pruner=l1,sparsity=1.5}", "sparsity must be in [0, 1), got 1.5"),
        ("insert-masks{pruner=l1,bogus=3}", "pruner 'l1' has no option bogus"),
        ("insert-masks{pruner=nope}", "unknown pruner 'nope'"),
    ],
)
def test_bad_pipeline_text(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_pipeline(text)
    assert expected in str(info.value)


def test_bad_pipeline_text_through_compile():
    with pytest.raises(ConfigError, match="unknown pass 'prune-everything'"):
        fxcompress.compile(TwoLayer(), torch.randn(2, 4), "analyze-groups,prune-everything")


def test_every_error_class_is_an_fxcompress_error():
    for cls in (TraceError, ConfigError, PipelineError, fxcompress.VerificationError):
        assert issubclass(cls, FxCompressError)
    assert issubclass(ConfigError, ValueError)  # callers catching ValueError keep working


def test_failed_compile_leaves_the_model_untouched():
    model = TwoLayer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TraceError):
        compile_l1(model, torch.randn(2, 5))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
