"""Issue 15, item 5 (command line): fail before any work, one stderr line, exit 2; ``--out`` saves safely."""

from __future__ import annotations

import os
import textwrap
import warnings

import pytest
import torch

import fxcompress
from fxcompress.cli import main

TINY = textwrap.dedent(
    """\
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()

    def example_inputs():
        return (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    {extra}
    """
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _file(tmp_path, extra: str = "", inputs: str | None = None) -> str:
    text = TINY.format(extra=extra)
    if inputs is not None:
        text = text.replace("torch.randn(1, 3, 8, 8,", f"torch.randn({inputs},")
    path = tmp_path / "tiny.py"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _fails(argv: list[str], capsys, message: str) -> None:
    """The command exits 2 with exactly one stderr line holding ``message``, having written nothing."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "params" not in out  # no compile ran: the before/after table was never printed


@pytest.fixture
def readonly(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
@pytest.mark.parametrize("option", ["--out", "--onnx", "--json"])
def test_unwritable_output_fails_before_compiling(tmp_path, readonly, option, capsys):
    _fails(["compress", _file(tmp_path), option, str(readonly / "x")], capsys, f"{option} {readonly / 'x'} is not writable")


@pytest.mark.parametrize("option", ["--out", "--onnx", "--json"])
def test_output_under_a_file_fails_before_compiling(tmp_path, option, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(["compress", _file(tmp_path), option, str(blocker / "x")], capsys, f"{option} {blocker / 'x'}: cannot create")


@pytest.mark.parametrize("option", ["--out", "--onnx", "--json"])
def test_output_path_that_is_a_directory_fails_before_compiling(tmp_path, option, capsys):
    _fails(["compress", _file(tmp_path), option, str(tmp_path)], capsys, f"{option} {tmp_path} is a directory")


def test_trace_passes_under_a_file_fails_before_compiling(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(["compress", _file(tmp_path), "--trace-passes", str(blocker / "dumps")], capsys,
           f"--trace-passes {blocker / 'dumps'}: cannot create")


def test_auto_checks_its_output_before_searching(tmp_path, capsys):
    _fails(["auto", _file(tmp_path), "--json", str(tmp_path)], capsys, f"--json {tmp_path} is a directory")


def test_duplicated_pipeline_option_is_an_error(tmp_path, capsys):
    _fails(["compress", _file(tmp_path), "--pipeline",
            "insert-masks{pruner=l1,sparsity=0.9,sparsity=0.1},analyze-groups,propagate-channels,shrink"], capsys,
           "option 'sparsity' of pass 'insert-masks' is given twice")


def test_model_file_calling_sys_exit_is_an_error(tmp_path, capsys):
    _fails(["compress", _file(tmp_path, "import sys; sys.exit(0)")], capsys, "called sys.exit(0)")


def test_negative_rtol_is_one_line(tmp_path, capsys):
    _fails(["compress", _file(tmp_path), "--rtol", "-1"], capsys, "--rtol must be positive, got -1.0")


def test_wrong_input_shape_is_one_line(tmp_path, capsys):
    _fails(["compress", _file(tmp_path, inputs="1, 5, 8, 8")], capsys, "tiny.py")


def test_join_with_an_unknown_study_names_it(tmp_path, capsys):
    storage = str(tmp_path / "study.journal")
    _fails(["auto", _file(tmp_path), "--join", "--storage", storage, "--study", "nope"], capsys,
           f"no study 'nope' in storage '{storage}'")


def test_resume_with_an_unknown_study_names_it(tmp_path, capsys):
    _fails(["auto", _file(tmp_path), "--resume", "--study", "nope", "--json", str(tmp_path / "r.json")], capsys,
           f"no study 'nope' in storage '{tmp_path / 'nope.journal'}'")


def test_out_writes_a_file_fxcompress_load_reads(tmp_path, capsys):
    path = tmp_path / "small.fxc"
    assert main(["compress", _file(tmp_path), "--runs", "0", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "weights_only=False" not in out and f"saved the compressed model to {path}" in out
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    small = fxcompress.load(path)
    assert small.meta["fxcompress.example_inputs"][0].equal(x)
    assert small(x).shape == (1, 4, 4, 4)
