"""Tests of the command line (fxcompress.cli): every subcommand on the bundled example, and its errors.

Most run ``main([...])`` in this process (importing torch once); the exit-code
and stderr contract is checked through real ``python -m`` subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fxcompress.cli import ModelFileError, load_model_file, main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "resnet18.py")
PIPELINE = "insert-masks{pruner=l1,sparsity=0.5},analyze-groups,propagate-channels,shrink"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_bad_path_exits_2_with_one_clear_line():
    result = _run("fxcompress", "compress", "no/such/model.py")
    assert result.returncode == 2
    assert result.stderr.strip() == "python -m fxcompress compress: error: model file no/such/model.py does not exist"


def test_malformed_pipeline_exits_2_before_loading_the_model():
    result = _run("fxcompress", "compress", EXAMPLE, "--pipeline", "insert-masks{pruner=l1,analyze-groups")
    assert result.returncode == 2
    assert "error: malformed pipeline at character 0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # 3 s: a fresh interpreter
def test_viz_module_entry_point_has_complete_help():
    result = _run("fxcompress.viz", "--help")
    assert result.returncode == 0
    for option in ("--sparsity", "--pruner", "--out", "--format", "--collapse", "--engine"):
        assert option in result.stdout


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("insert-masks{pruner=l1},no-such-pass", "unknown pass 'no-such-pass'; known passes:"),
        ("insert-masks{pruner=l9}", "unknown pruner 'l9'"),
        ("insert-masks{sparsity}", "must look like key=value"),
        ("shrink", "needs 'propagate-channels' to run before it"),
    ],
)
def test_bad_pipelines_are_usage_errors(tmp_path, capsys, pipeline, message):
    tiny = tmp_path / "tiny.py"
    tiny.write_text("import torch\nmodel = torch.nn.Linear(4, 2)\nexample_inputs = (torch.randn(1, 4),)\n")
    assert main(["compress", str(tiny), "--pipeline", pipeline, "--runs", "0"]) == 2
    assert message in capsys.readouterr().err


def test_model_file_convention_errors(tmp_path, capsys):
    no_inputs = tmp_path / "no_inputs.py"
    no_inputs.write_text("import torch\ndef model():\n    return torch.nn.Linear(2, 2)\n")
    assert main(["viz", str(no_inputs)]) == 2
    assert "defines no 'example_inputs'" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ModelFileError, match="importing model file .* failed: RuntimeError: boom"):
        load_model_file(broken)
    not_python = tmp_path / "model.txt"
    not_python.write_text("")
    with pytest.raises(ModelFileError, match="must be a .py file"):
        load_model_file(not_python)


def test_module_level_objects_follow_the_convention(tmp_path):
    path = tmp_path / "objects.py"
    path.write_text("import torch\nmodel = torch.nn.Linear(4, 2)\nexample_inputs = torch.randn(3, 4)\n")
    loaded = load_model_file(path)
    assert isinstance(loaded.model, torch.nn.Linear) and loaded.example_inputs[0].shape == (3, 4)


def test_unknown_option_is_an_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["viz", EXAMPLE, "--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_passes_lists_passes_and_pruners(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("insert-masks", "analyze-groups", "propagate-channels", "shrink", "l1", "l2"):
        assert name in out
    fpgm = next(line for line in out.splitlines() if line.startswith("fpgm "))
    assert "sparsity: float = 0.5" in fpgm and "vectors: str = squared" in fpgm and "op_types" in fpgm


def test_compress_exports_onnx_saves_and_traces_passes(tmp_path, capsys):
    onnx_path, saved, trace_dir, figures = tmp_path / "r18.onnx", tmp_path / "r18.pt", tmp_path / "passes", tmp_path / "c.json"
    code = main(["compress", EXAMPLE, "--pipeline", PIPELINE, "--onnx", str(onnx_path), "--out", str(saved),
                 "--trace-passes", str(trace_dir), "--json", str(figures), "--runs", "0", "--no-verify"])
    assert code == 0
    out = capsys.readouterr().out
    assert "shrink" in out and "params" in out
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    first_conv = next(init for init in graph.initializer if len(init.dims) == 4)
    assert first_conv.dims[0] == 32  # the stem's 64 channels halved in the exported model
    import fxcompress

    compressed = fxcompress.load(saved)  # no pickle: the program as data, weights in safetensors
    assert compressed.conv1.weight.shape[0] == 32
    assert (trace_dir / "04-shrink.txt").exists() and (trace_dir / "passes.json").exists()
    data = json.loads(figures.read_text())
    assert data["after"]["params"] < data["before"]["params"] / 3
    assert set(data["pass_seconds"]) == {"insert-masks", "analyze-groups", "propagate-channels", "shrink"}


def test_report_of_the_model_and_of_a_pipeline(tmp_path, capsys):
    assert main(["report", EXAMPLE, "--runs", "1", "--warmup", "0", "--json", str(tmp_path / "one.json")]) == 0
    single = json.loads((tmp_path / "one.json").read_text())
    assert single["model"]["params"] == 11_689_512 and single["model"]["latency_ms"] > 0
    assert main(["report", EXAMPLE, "--pipeline", PIPELINE, "--runs", "0", "--no-verify",
                 "--json", str(tmp_path / "two.json")]) == 0
    out = capsys.readouterr().out
    assert "before/after" in out
    pair = json.loads((tmp_path / "two.json").read_text())
    assert pair["comparison"]["after"]["params"] < pair["comparison"]["before"]["params"]


def test_viz_writes_requested_formats_and_prints_groups(tmp_path, capsys):
    out = tmp_path / "r18"
    assert main(["viz", EXAMPLE, "--sparsity", "0.5", "--out", str(out), "--format", "txt,json"]) == 0
    printed = capsys.readouterr().out
    assert "64 → 32" in printed and "no: graph input 'x'" in printed
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["groups"]) == 14 and sum(g["prunable"] for g in data["groups"]) == 12
    assert out.with_suffix(".txt").read_text().startswith("group")
