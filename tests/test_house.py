"""The codebase's shape: no import cycles, one owner of the masked-storage layout, algorithms below passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_no_import_cycles_between_modules(helpers):
    assert helpers.load_tool("import_cycles").cycles() == []


def test_the_cycle_check_finds_a_deferred_import_cycle_and_skips_type_checking_blocks(helpers, tmp_path):
    tool = helpers.load_tool("import_cycles")
    (tmp_path / "fxcompress").mkdir()
    (tmp_path / "passes").mkdir()
    (tmp_path / "fxcompress" / "__init__.py").write_text("")
    (tmp_path / "passes" / "__init__.py").write_text("")
    (tmp_path / "fxcompress" / "a.py").write_text("def f():\n    from fxcompress import b\n")
    (tmp_path / "fxcompress" / "b.py").write_text("from fxcompress.passes import p\n")
    (tmp_path / "passes" / "p.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fxcompress.b\n"
        "if __name__ == '__main__':\n    import fxcompress.b\n"
    )
    assert tool.cycles(tmp_path) == []
    (tmp_path / "passes" / "p.py").write_text("import fxcompress.a\n")
    assert [sorted(c) for c in tool.cycles(tmp_path)] == [["fxcompress.a", "fxcompress.b", "fxcompress.passes.p"]]


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (ROOT / folder).rglob("*.py")]


def test_only_masks_py_knows_how_masked_tensors_are_stored():
    storage = re.compile(r"""["'`]_(orig|mask)["'`]|\w_orig\b|\bweight_mask\b""")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _sources("fxcompress", "passes")
        if path.name != "masks.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if storage.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("module", ["passes", "pipeline"])
def test_algorithms_never_import_passes_or_the_pipeline(module):
    pattern = re.compile(rf"^\s*(from|import)\s+fxcompress\.{module}\b|^\s*from\s+fxcompress\s+import\s+.*\b{module}\b")
    offenders = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in _sources("fxcompress/prune")
        for line in path.read_text().splitlines()
        if pattern.search(line)
    ]
    assert offenders == []
