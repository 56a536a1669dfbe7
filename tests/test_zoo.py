"""The fast subset of the model-zoo sweep (tools/zoo.py): one model per architecture family, small inputs.

Each model is pruned with L1Norm(0.5) and the standard pipeline; the shrunk
model must reproduce the masked model to 1e-4 of its output scale and do
fewer MACs than the dense model. The full 80-model sweep is ``python tools/zoo.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ZOO_PATH = Path(__file__).resolve().parents[1] / "tools" / "zoo.py"


def _load_zoo():
    spec = importlib.util.spec_from_file_location("fxcompress_tools_zoo", ZOO_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


def test_fast_subset_covers_the_families_issue_2_names():
    families = ["resnet", "densenet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "regnet", "shufflenet",
                "convnext", "googlenet", "inception", "squeezenet", "vgg", "vit", "swin", "maxvit"]
    assert len(zoo.FAST) >= 12
    for family in families:
        assert any(name.startswith(family) for name in zoo.FAST), family


#: residual streams normalised by LayerNorm: they prune too (statistics over kept channels), so L1Norm(0.5)
#: must reach about what it reaches on convnets
NORMALISED = {"vit_b_16": 3.0, "swin_t": 3.0, "convnext_tiny": 3.0, "maxvit_t": 3.0}


@pytest.mark.parametrize("name", zoo.FAST)
def test_shrunk_model_matches_masked_model_and_saves_macs(name):
    check = zoo.run_model(zoo.spec(name, small=True))
    assert check.error <= zoo.TOLERANCE, f"{name}: masked vs shrunk relative error {check.error:.2e}"
    assert check.macs_ratio > NORMALISED.get(name, 1.0), f"{name}: MACs ratio {check.macs_ratio:.2f} ({check.why})"
    assert check.params_shrunk < check.params_dense


def test_a_failing_model_becomes_a_table_row_not_an_exception():
    row = zoo._row(zoo.ZooSpec("no_such_model", 32), sparsity=0.5)
    assert row["status"] == "FAIL"
    assert "no_such_model" in row["why"]


def test_summary_counts_passes_and_takes_medians():
    rows = [
        {"model": "resnet50", "input": 224, "status": "ok", "compile_s": 0.4, "macs_ratio": 4.0, "params_ratio": 3.0,
         "why": ""},
        {"model": "a", "input": 224, "status": "ok", "compile_s": 1.0, "macs_ratio": 2.0, "params_ratio": 1.0,
         "why": ""},
        {"model": "b", "input": 224, "status": "MISMATCH", "compile_s": 2.0, "macs_ratio": 1.0, "params_ratio": 1.0,
         "why": "x"},
        {"model": "c", "input": 224, "status": "FAIL", "why": "TraceError: ..."},
    ]
    summary = zoo.summarize(rows)
    assert summary["passed"] == 2 and summary["total"] == 4
    assert summary["median_macs_ratio"] == 2.0
    assert summary["compile_s_sum"] == pytest.approx(3.4)
    assert summary["resnet50_compile_s"] == 0.4
    table = zoo.format_table(rows)
    assert "TraceError" in table and "MISMATCH" in table


def test_full_size_spec_uses_299_for_inception_and_224_otherwise():
    assert zoo.spec("inception_v3").size == 299
    assert zoo.spec("resnet50").size == 224
    assert zoo.spec("resnet50", size=96).size == 96
