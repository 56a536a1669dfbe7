"""A ``--quick`` run of ``tools/bench_deploy.py`` on the small CNN: the table's shape and the int8 rows' agreement."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

pytest.importorskip("onnxruntime")

TOOLS = pathlib.Path(__file__).parents[1] / "tools"
ROWS = ["dense-eager", "pruned-eager", "int8-ort", "int8-compile"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sys.path.insert(0, str(TOOLS))
    try:
        import bench_deploy
    finally:
        sys.path.remove(str(TOOLS))
    path = tmp_path_factory.mktemp("deploy") / "deploy.json"
    bench_deploy.main(["--quick", "--models", "small-cnn", "--rows", *ROWS, "--json", str(path)])
    return json.loads(path.read_text())


def test_table_has_every_requested_row_timed(report):
    rows = report["models"]["small-cnn"]["rows"]
    assert [r["key"] for r in rows] == ROWS
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in rows), [r["note"] for r in rows]
    dense = rows[0]
    assert dense["speedup"] == 1.0 and dense["macs_ratio"] == 1.0 and dense["reference"] is None
    by = {r["key"]: r for r in rows}
    assert by["pruned-eager"]["macs_ratio"] > 2.0 and by["int8-ort"]["macs_ratio"] == 1.0
    assert report["settings"]["threads"] == 2 and report["settings"]["quick"] is True


def test_rows_reproduce_their_references(report):
    by = {r["key"]: r for r in report["models"]["small-cnn"]["rows"]}
    assert by["pruned-eager"]["err"] <= 1e-4  # float rows: the shrunk model, with inference passes
    # int8 rows: the fake-quantized model they were folded from, each runtime's placement
    for key, reference in (("int8-ort", "fake-quant"), ("int8-compile", "fake-quant (inductor)")):
        assert by[key]["reference"] == reference and by[key]["err"] <= 0.1, by[key]
        assert by[key]["float_reference"] == "dense" and by[key]["float_err"] <= 0.2, by[key]  # and the float one
    assert by["int8-compile"]["note"] == "qconv x2, qlinear x2"  # oneDNN int8 kernels, every layer
