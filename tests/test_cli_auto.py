"""Tests of ``python -m fxcompress auto``: search, joining a shared study, sensitivity, and usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from fxcompress.cli import main

ROOT = Path(__file__).resolve().parents[1]

MODEL_FILE = textwrap.dedent(
    """\
    import torch
    from fxcompress.examples import SmallCNN, accuracy

    torch.manual_seed(0)
    _MODEL = SmallCNN().eval()
    _X = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _Y = _MODEL(_X).argmax(1)

    def model():
        return _MODEL

    def example_inputs():
        return (_X[:1],)

    def evaluate(m):
        return accuracy(m, _X, _Y)
    """
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def model_file(tmp_path) -> str:
    path = tmp_path / "cnn.py"
    path.write_text(MODEL_FILE, encoding="utf-8")
    return str(path)


def test_auto_search_prints_summary_and_writes_json(model_file, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["auto", model_file, "--budget", "macs=3", "--trials", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv2.weight[0]" in printed and "uniform at the same budget" in printed
    data = json.loads(out.read_text())
    assert data["measured_cost"] <= data["dense_cost"] / 3
    assert set(data["pruner"]["sparsities"]) == {"conv1.weight[0]", "conv2.weight[0]", "fc1.weight[0]"}


def test_auto_join_adds_trials_to_a_shared_study(model_file, tmp_path, capsys):
    storage = str(tmp_path / "study.log")
    common = ["--storage", storage, "--study", "shared", "--budget", "params=2"]
    assert main(["auto", model_file, "--trials", "2", *common]) == 0
    capsys.readouterr()
    assert main(["auto", model_file, "--trials", "4", "--join", *common]) == 0
    assert "ran 2 trials of study 'shared'" in capsys.readouterr().out


def test_auto_sensitivity_writes_plot_and_resumes_from_cache(model_file, tmp_path, capsys):
    png, cache = tmp_path / "sens.png", tmp_path / "sens.json"
    args = ["auto", model_file, "--sensitivity", str(png), "--ladder", "0.5", "--cache", str(cache)]
    assert main(args) == 0
    assert "(3 cells evaluated" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(args) == 0
    assert "(0 cells evaluated" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "macs"], "budget 'macs' must look like METRIC=RATIO"),
        (["--join"], "--join needs --storage and --study"),
        (["--criterion", "level"], "is not a channel criterion"),
    ],
)
def test_auto_usage_errors_exit_2_with_one_line(model_file, extra, message, capsys):
    assert main(["auto", model_file, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_auto_without_evaluate_exits_2_in_a_real_process():
    result = subprocess.run([sys.executable, "-m", "fxcompress", "auto", str(ROOT / "examples" / "resnet18.py")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("defines no 'evaluate': define evaluate(model) -> float "
                                          "(higher is better) to use auto")
