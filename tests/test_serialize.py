"""Issue 15, item 3: ``fxcompress.save``/``load`` round-trip compressed models bit for bit, as data only."""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
import zipfile

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.passes import standard_pruning, standard_ptq
from fxcompress.prune import L1Norm
from fxcompress.quant import QConfig
from fxcompress.serialize import MANIFEST, PROGRAM, WEIGHTS, SavedModelError

torchvision = pytest.importorskip("torchvision")


def _compile(model, inputs, passes, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxcompress.compile(model, inputs, passes, **options)


def _forbid_pickle(monkeypatch) -> None:
    """Loading must not unpickle anything: every unpickling entry point fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("load unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _round_trip(model, path, monkeypatch, inputs):
    fxcompress.save(model, path)
    with monkeypatch.context() as patch:
        _forbid_pickle(patch)
        loaded = fxcompress.load(path)
    with torch.no_grad():
        expected, got = model(*inputs), loaded(*inputs)
    return loaded, expected, got


def test_pruned_resnet50_round_trips_bit_exactly(tmp_path, monkeypatch):
    model = torchvision.models.resnet50().eval()
    x = torch.randn(2, 3, 64, 64)
    small = _compile(model, x, standard_pruning(L1Norm(0.5)), verify=False)
    loaded, expected, got = _round_trip(small, tmp_path / "r50.fxc", monkeypatch, (x,))
    assert torch.equal(expected, got)
    assert fxcompress.report.count_params(loaded) == fxcompress.report.count_params(small)
    fresh = torch.randn(2, 3, 64, 64)  # not the inputs the program was exported with
    with torch.no_grad():
        assert torch.equal(small(fresh), loaded(fresh))


def test_pruned_int8_resnet18_keeps_its_int8_weights(tmp_path, monkeypatch):
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    q = _compile(model, x, standard_pruning(L1Norm(0.5)) + standard_ptq(QConfig.int8(), (x,)), verify=False)
    loaded, expected, got = _round_trip(q, tmp_path / "r18q.fxc", monkeypatch, (x,))
    assert torch.equal(expected, got)
    saved = {k: v for k, v in q.state_dict().items()}
    restored = dict(loaded.state_dict())
    assert saved["layer1.0.conv1.weight"].dtype == torch.int8
    int8 = sorted(k for k, v in saved.items() if v.dtype == torch.int8)
    assert len(int8) == 42  # 21 layers: weight and per-channel zero point
    for key in int8:
        assert restored[key].dtype == torch.int8 and torch.equal(restored[key], saved[key]), key
    assert sum(n.target is fxcompress.quant.ops.QUANTIZE for n in loaded.graph.nodes) == sum(
        n.target is fxcompress.quant.ops.QUANTIZE for n in q.graph.nodes)
    archive_bytes = (tmp_path / "r18q.fxc").stat().st_size
    assert archive_bytes < 0.3 * sum(v.numel() * 4 for v in saved.values())  # int8 on disk, not float


def test_pruned_bert_captured_by_export_round_trips(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 200, (2, 16))
    small = _compile(model, (ids,), standard_pruning(L1Norm(0.5)), frontend="export")
    _, expected, got = _round_trip(small, tmp_path / "bert.fxc", monkeypatch, (ids,))
    leaves_expected, leaves_got = torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
    assert len(leaves_expected) == len(leaves_got) == 2
    for a, b in zip(leaves_expected, leaves_got):
        assert torch.equal(a, b)


class Tied(nn.Module):
    """An embedding whose matrix is also the output projection's weight (as in language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_tied_weights_stay_one_parameter(tmp_path):
    model = Tied().eval()
    ids = torch.tensor([[1, 2, 3]])
    fxcompress.save(model, tmp_path / "tied.fxc", (ids,))
    loaded = fxcompress.load(tmp_path / "tied.fxc")
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.embed.weight is loaded.head.weight
    assert isinstance(loaded.embed.weight, nn.Parameter) and loaded.embed.weight.requires_grad


def _small(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.fxc"
    fxcompress.save(_compile(model, x, standard_pruning(L1Norm(0.5))), path)
    return path, x


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {n: archive.read(n) for n in archive.namelist()}


def _rewrite(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_loaded_model_keeps_example_inputs_and_saves_again(tmp_path):
    path, x = _small(tmp_path)
    loaded = fxcompress.load(path)
    assert torch.equal(loaded.meta["fxcompress.example_inputs"][0], x)
    fxcompress.save(loaded, tmp_path / "again.fxc")
    assert torch.equal(fxcompress.load(tmp_path / "again.fxc")(x), loaded(x))


@pytest.mark.parametrize("member", [PROGRAM, WEIGHTS])
def test_a_changed_member_is_refused(tmp_path, member):
    path, _ = _small(tmp_path)
    members = _members(path)
    data = bytearray(members[member])
    data[len(data) // 2] ^= 1
    members[member] = bytes(data)
    _rewrite(path, members)
    with pytest.raises(SavedModelError, match=rf"{member} does not match the checksum .* refusing to load it"):
        fxcompress.load(path)


def test_a_program_calling_other_code_is_refused_even_with_fixed_checksums(tmp_path):
    path, _ = _small(tmp_path)
    members = _members(path)
    program = members[PROGRAM].replace(b'"torch.ops.aten.relu.default"', b'"torch.hub.load"')
    assert program != members[PROGRAM]
    manifest = json.loads(members[MANIFEST])
    manifest["sha256"][PROGRAM] = hashlib.sha256(program).hexdigest()
    _rewrite(path, {MANIFEST: json.dumps(manifest).encode(), PROGRAM: program, WEIGHTS: members[WEIGHTS]})
    with pytest.raises(SavedModelError, match=r"calls 'torch.hub.load', which fxcompress.save never writes"):
        fxcompress.load(path)


def test_a_pickled_graph_module_is_not_loaded(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(nn.Linear(2, 2), path)  # torch.save writes a zip too, with pickled code references
    with pytest.raises(SavedModelError, match=r"not the members fxcompress.save writes"):
        fxcompress.load(path)


def test_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "junk.fxc"
    path.write_bytes(b"not a model")
    with pytest.raises(SavedModelError, match=r"is not a file fxcompress.save wrote"):
        fxcompress.load(path)


def test_plain_module_needs_example_inputs(tmp_path):
    with pytest.raises(SavedModelError, match=r"save needs example_inputs"):
        fxcompress.save(nn.Linear(2, 2), tmp_path / "x.fxc")


def test_readme_example(tmp_path, monkeypatch):
    """The README's "Saving and shipping a compressed model" example, as written there."""
    monkeypatch.chdir(tmp_path)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    # --- README example starts
    small = fxcompress.compile(model, x, standard_pruning(L1Norm(0.5)))
    fxcompress.save(small, "small.fxc")      # one zip: torch.export program (JSON) + safetensors weights
    loaded = fxcompress.load("small.fxc")    # unpickles nothing: safe on a file from anywhere
    assert torch.equal(loaded(x), small(x))  # bit for bit
    # --- README example ends
    assert (tmp_path / "small.fxc").exists()


def test_readme_example_is_the_tested_one():
    """The README shows exactly the lines ``test_readme_example`` runs."""
    import inspect
    import pathlib
    import textwrap

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Saving and shipping a compressed model\n\n```python\n", 1)[1].split("```", 1)[0]
    source = inspect.getsource(test_readme_example)
    tested = source.split("# --- README example starts\n", 1)[1].split("    # --- README example ends", 1)[0]
    assert textwrap.dedent(tested) == block
