"""The timm zoo sweep's row function on a few tiny timm models (tools/zoo_timm.py)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("timm")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "zoo_timm.py"
_SPEC = importlib.util.spec_from_file_location("fxcompress_tools_zoo_timm", _PATH)
zoo_timm = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = zoo_timm  # dataclasses look their module up there
_SPEC.loader.exec_module(zoo_timm)


def _check_equivalent(row: dict) -> None:
    assert row["status"] == "ok", row.get("error")
    assert row["fresh_error"] <= zoo_timm.TOLERANCE
    assert row["verify_error"] <= zoo_timm.TOLERANCE
    assert row["compile_s"] > 0 and row["verify_s"] >= 0
    assert row["macs_dense"] > 0 and row["params_dense"] > 0


def test_resnet10t_row_is_equivalent_and_pruned():
    row = zoo_timm.row(zoo_timm.spec("resnet10t", "resnet", size=64))
    _check_equivalent(row)
    assert row["frontend"] == "fx"
    assert row["input"] == "64x64"
    assert row["macs_ratio"] > 1.5
    assert row["why"] == ""  # explained only below 1.5x
    assert 0 <= row["frozen_share"] < 0.5


@pytest.mark.slow  # 3 s; tools/zoo_timm.py runs every timm module
def test_efficientnet_b0_and_small_vit_rows_are_equivalent():
    for name, size in (("efficientnet_b0", 64), ("vit_tiny_patch16_224", 32)):
        row = zoo_timm.row(zoo_timm.spec(name, size=size))
        _check_equivalent(row)


def test_failing_model_becomes_a_row():
    row = zoo_timm.row(zoo_timm.TimmSpec("no_such_timm_model", "nowhere", (32, 32)), peer="tp")
    assert row["status"] == "FAIL"
    assert "no_such_timm_model" in row["error"]
    assert row["why"] == row["error"]
    assert "tp_error" in row
    summary = zoo_timm.summarize([row])
    assert summary["failed"] == 1 and summary["equivalent"] == 0


def test_timeout_becomes_a_row():
    row = zoo_timm.row(zoo_timm.spec("resnet10t", "resnet", size=64), timeout=1e-3)
    assert row["status"] == "FAIL"
    assert "timeout" in row["error"]


def test_peer_tp_row_has_both_times():
    pytest.importorskip("torch_pruning")
    row = zoo_timm.row(zoo_timm.spec("resnet10t", "resnet", size=64), peer="tp", tp_first=True)
    _check_equivalent(row)
    assert row["tp_s"] > 0 and row["compile_s"] > 0
    assert row["tp_macs_ratio"] > 1.5
    summary = zoo_timm.summarize([row])
    assert summary["both_handled"] == 1
    assert summary["both_time_ratio_fx_over_tp"] == pytest.approx(row["compile_s"] / row["tp_s"])
    assert "TP s" in zoo_timm.format_table([row], peer=True)


@pytest.mark.slow
def test_repeat_takes_median_times():
    pytest.importorskip("torch_pruning")
    row = zoo_timm.row(zoo_timm.spec("resnet10t", "resnet", size=64), peer="tp", repeat=3)
    assert len(row["compile_runs"]) == 3 and len(row["tp_runs"]) == 3
    assert row["compile_s"] == sorted(row["compile_runs"])[1] and row["tp_s"] == sorted(row["tp_runs"])[1]


def test_blocker_ranking():
    low = {"model": "m", "status": "ok", "macs_ratio": 1.1,
           "freezes": [{"op": "LayerNorm", "opaque": False, "channels": 192, "share": 0.5, "where": ["norm"]},
                       {"op": "Tensor.unbind", "opaque": True, "channels": 64, "share": 0.1, "where": ["a"]}]}
    high = {**low, "model": "n", "macs_ratio": 3.0}
    ranked = zoo_timm.rank_blockers([low, high])
    assert [e["construct"] for e in ranked] == ["LayerNorm", "Tensor.unbind [no rule]"]
    assert ranked[0]["models"] == 1 and ranked[0]["top_in"] == 1 and ranked[0]["examples"] == ["m"]
    assert ranked[0]["mean_share"] == 0.5


def test_memory_limit_becomes_a_row():
    row = zoo_timm.row(zoo_timm.spec("resnet10t", "resnet", size=64), max_gb=0.01)
    assert row["status"] == "FAIL"
    assert "memory" in row["error"]
