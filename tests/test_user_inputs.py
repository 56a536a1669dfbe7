"""Issue 13 item 4: the model is used as the user uses it.

Example inputs in every form a user holds (a tensor, a tuple, a tokenizer's dict,
``(args, kwargs)``); captured models called by name and at other batch sizes and
sequence lengths; Hugging Face caches off in the captured copy only; no traceback
on the way.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.analysis import OpaqueOpWarning
from fxcompress.errors import TraceError
from fxcompress.passes import standard_pruning
from fxcompress.prune import L1Norm
from fxcompress.trace import ExampleInputs, copy_model, normalize_example_inputs
from fxcompress.verify import oracle_outputs, worst_leaf

trace_module = importlib.import_module("fxcompress.trace")  # `fxcompress.trace` itself is the function

class Tokens(nn.Module):
    """A token model written the way people write them: keyword arguments with defaults."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, input_ids, attention_mask=None, scale: float = 1.0):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        h = h + self.down(torch.relu(self.up(h))) * scale
        return self.head(h)


class KeepMasked:
    """Hook: a copy of the masked model (after ``propagate-channels``), to compare the shrunk one with."""

    masked: nn.Module | None = None

    def __call__(self, previous, gm, next_pass) -> None:
        if getattr(previous, "name", None) == "propagate-channels":
            self.masked = copy_model(gm)


def _tokens(batch: int, length: int, vocab: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, : length // 4] = 0  # some padding, as a tokenizer gives for a batch of unequal texts
    return {"input_ids": ids, "attention_mask": mask}


def _compile(model, inputs, **options):
    keep = KeepMasked()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpaqueOpWarning)
        small = fxcompress.compile(model, inputs, standard_pruning(L1Norm(0.5)), hooks=[keep], **options)
    return small, keep.masked


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- the forms of example_inputs


def test_every_form_binds_to_forward_positions():
    model = Tokens()
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    batch_encoding = pytest.importorskip("transformers").BatchEncoding({"input_ids": ids, "attention_mask": mask})
    forms = {
        "tensor": (ids, (ids,)),
        "tuple": ((ids, mask), (ids, mask)),
        "list": ([ids, mask], (ids, mask)),
        "dict": ({"attention_mask": mask, "input_ids": ids}, (ids, mask)),
        "tokenizer output": (batch_encoding, (ids, mask)),
        "(args, kwargs)": (((ids,), {"scale": 2.0}), (ids, None, 2.0)),
        "ExampleInputs": (ExampleInputs((ids,), {"attention_mask": mask}), (ids, mask)),
    }
    for form, (given, expected) in forms.items():
        got = normalize_example_inputs(given, model)
        assert len(got) == len(expected), form
        assert all(a is b for a, b in zip(got, expected)), form  # the user's own objects, not copies


@pytest.mark.parametrize("inputs, words", [
    ({"input_idz": torch.ones(1, 2, dtype=torch.long)}, "do not match forward.*input_idz"),
    ({"attention_mask": torch.ones(1, 2)}, "leave out forward\\(\\)'s required argument 'input_ids'"),
    ({1: torch.ones(1, 2)}, "argument names \\(strings\\)"),
    ({}, "empty dict"),
    (3.0, "must be a tensor or a tuple.*a dict of keyword arguments.*got float"),
    ((torch.ones(1, 2), 1.0, 2.0, 3.0), "do not match forward"),
])
def test_bad_inputs_say_what_is_wrong_and_what_to_do(inputs, words):
    with pytest.raises(TraceError, match=words):
        normalize_example_inputs(inputs, Tokens())


def test_keywords_without_a_position_are_refused_with_what_to_do():
    class KeywordOnly(nn.Module):
        def forward(self, x, *, scale=1.0, **options):
            return x * scale

    for inputs in ({"x": torch.ones(2), "scale": 2.0}, {"x": torch.ones(2), "temperature": 2.0}):
        with pytest.raises(TraceError, match="keyword-only or extra.*Wrap the model"):
            normalize_example_inputs(inputs, KeywordOnly())
    with pytest.raises(TraceError, match="only the model can place"):
        normalize_example_inputs({"x": torch.ones(2)})


# ---------------------------------------------------------------------------- both frontends take keywords


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_tokenizer_dict_compiles_and_the_result_is_called_as_the_model_is(frontend):
    torch.manual_seed(0)
    model = Tokens().eval()
    inputs = _tokens(1, 8)
    kept = {k: v.clone() for k, v in inputs.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small, masked = _compile(model, inputs, frontend=frontend)
    assert _params(small) < _params(model)
    assert list(inputs) == ["input_ids", "attention_mask"] and all(inputs[k].equal(kept[k]) for k in kept)
    assert all(model.state_dict()[k].equal(v) for k, v in state.items())  # the user's model is untouched
    for batch, length in [(1, 8), (3, 5), (2, 20)]:  # traced at one shape, run at others
        other = _tokens(batch, length, seed=batch)
        by_name = small(**other)
        assert by_name.shape == (batch, length, 3)
        assert torch.equal(by_name, small(other["input_ids"], other["attention_mask"]))
        assert worst_leaf(masked(**other), by_name, rtol=1e-4) is None  # shrunk == masked at this shape


def test_a_model_that_fixes_a_dim_says_so():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.reshape(2, 4))  # the batch of (1, 8) inputs, written as a constant

    with pytest.warns(UserWarning, match="Fixed's code refuses batch size 2 \\(x; .*Guard failed.*\\).*Trace at"):
        fxcompress.trace(Fixed(), torch.randn(1, 8), frontend="export")


def test_a_model_that_exports_only_at_fixed_shapes_is_captured_with_a_warning(monkeypatch):
    capture = trace_module._export_program

    def no_dynamic_dims(model, args, dims):
        if dims:
            raise RuntimeError("Constraints violated (batch)! the model needs batch == 1")
        return capture(model, args, dims)

    monkeypatch.setattr(trace_module, "_export_program", no_dynamic_dims)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(1, 4)
    with pytest.warns(UserWarning, match="could not capture Sequential with dynamic.*Constraints violated.*"
                                         "runs at those shapes only"):
        gm = fxcompress.trace(model, x, frontend="export")
    assert torch.allclose(gm(x), model(x))


def test_shapes_that_meta_tensors_cannot_compute_come_from_a_real_forward_silently(capfd):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum() + x  # boolean indexing: meta tensors cannot know the shape

    gm = fxcompress.trace(DataDependent(), torch.randn(4, 3), frontend="fx")
    printed = capfd.readouterr()
    assert printed.err == printed.out == ""  # torch's ShapeProp printed a traceback before falling back
    assert [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.name == "add"] == [(4, 3)]


# ---------------------------------------------------------------------------- Hugging Face


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)  # use_cache=True by default
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_llama_with_its_default_config_is_captured_with_the_cache_off_in_the_copy_only():
    model = _llama()
    assert model.config.use_cache
    gm = fxcompress.trace(model, torch.randint(0, 64, (2, 8)), frontend="export")
    assert model.config.use_cache  # the user's model keeps its cache for generation
    out = gm(torch.randint(0, 64, (2, 8)))
    assert out.logits.shape == (2, 8, 64) and getattr(out, "past_key_values", None) is None


def test_llama_traced_at_one_shape_runs_at_batch_1_to_4_and_sequence_8_to_128():
    model = _llama()
    example = _tokens(1, 16, vocab=64)
    small, masked = _compile(model, example)
    assert _params(small) < _params(model) and model.config.use_cache
    for batch in (1, 2, 3, 4):
        for length in (8, 128):
            logits = small(**_tokens(batch, length, vocab=64, seed=length)).logits
            assert logits.shape == (batch, length, 64) and torch.isfinite(logits).all()
    other = _tokens(3, 40, vocab=64, seed=1)
    shrunk, reference = small(**other), masked(**other)
    assert worst_leaf(reference, shrunk, rtol=1e-4) is None  # shrunk == masked at a second shape
    # the user's model run with the masked weights, where it can be (not once norms use kept-channel statistics)
    original = oracle_outputs(model, masked, normalize_example_inputs(other, model))
    assert original is None or worst_leaf(original, reference, rtol=1e-4) is None


def test_capturing_bert_prints_no_traceback(capfd):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    inputs = dict(_tokens(1, 16, vocab=64), token_type_ids=torch.zeros(1, 16, dtype=torch.long))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fxcompress.compile(model, inputs, standard_pruning(L1Norm(0.5)))
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + printed.out
    internals = ("lift_fresh_copy", "detach_", "add_.", "sym_size")
    assert not [str(w.message) for w in caught if any(op in str(w.message) for op in internals)]
    assert _params(small) < _params(model)
