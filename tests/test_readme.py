"""The README is a user guide whose every example runs, whose commands are CI's, and which stays short.

Every ```python block of ``README.md`` is executed. Blocks are grouped by their
``## `` section (a ``### `` subsection belongs to the section above it, so
"Saving and shipping a compressed model" continues the quantization example's
``model`` and ``x``): each section is one test and runs its blocks in order in a
fresh namespace, in a temporary working directory. A section other than the quick
start first gets the quick start's import statements, because the README says the
examples below it reuse them; everything else (models, inputs, data) each section
defines itself. Tracebacks point at README.md's own line numbers.

The other tests check that the README has at most 200 lines, that its install and
test commands are, byte for byte, the two commands ``.ci/run`` runs, that every
command-line example parses with the real argument parser, and that every headline
figure names a tool script that exists and a commit that ``docs/benchmarks.md``
records.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
MAX_LINES = 200
QUICK_START = "Quick start"
INSTALL = "Install"


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: its language, its section, the README line of its first code line, its text."""

    language: str
    section: str
    line: int
    source: str


def read_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` in order; an unclosed fence is an error."""
    blocks, section, fence = [], "", None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None and line.startswith("## "):
            section = line[3:].strip()
        elif fence is None and line.startswith("```"):
            fence, start, body = line[3:].strip(), number + 1, []
        elif fence is not None and line.strip() == "```":
            blocks.append(Block(fence, section, start, "\n".join(body) + "\n"))
            fence = None
        elif fence is not None:
            body.append(line)
    assert fence is None, f"README.md: the ```{fence} block opened before the end is never closed"
    return blocks


BLOCKS = read_blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.language == "python"]
SECTIONS = list(dict.fromkeys(b.section for b in PYTHON))


def _compiled(block: Block):
    """``block`` compiled with README.md's line numbers, so a failure points at the README itself."""
    return compile("\n" * (block.line - 1) + block.source, str(README), "exec")


def _imports(block: Block):
    """Only the top-level import statements of ``block``, compiled with their README line numbers."""
    tree = ast.parse("\n" * (block.line - 1) + block.source, str(README))
    tree.body = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return compile(tree, str(README), "exec")


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/ (limit {MAX_LINES})"


def test_code_blocks_are_python_or_shell():
    """Every example is either executed here (python) or a shell command checked below (bash)."""
    assert PYTHON and {b.language for b in BLOCKS} <= {"python", "bash"}, [b.language for b in BLOCKS]
    assert SECTIONS[0] == QUICK_START, "the first Python example is the quick start, whose imports the others reuse"


@pytest.mark.parametrize("section", SECTIONS)
def test_python_examples_run(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write files (small.fxc, ONNX models, pictures) where they run
    namespace = {"__name__": "__readme__"}
    if section != QUICK_START:
        exec(_imports(PYTHON[0]), namespace)
    for block in (b for b in PYTHON if b.section == section):
        exec(_compiled(block), namespace)


def _ci_commands() -> list[str]:
    """The commands ``.ci/run`` runs from the README: the pip install line and the pytest line."""
    lines = [line.strip() for line in CI.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line.startswith(("pip install", "python -m pytest"))]


def test_install_and_test_commands_are_what_ci_runs():
    install = [b for b in BLOCKS if b.section == INSTALL]
    assert len(install) == 1 and install[0].language == "bash", "the Install section has one bash block"
    assert install[0].source.splitlines() == _ci_commands() == [
        'pip install -e ".[test]" && python -m fxcompress compress examples/resnet18.py',
        "python -m pytest -q",
    ]
    assert "the README's two" in CI.read_text(encoding="utf-8"), ".ci/run should say it runs the README's two commands"


def _shell_commands(block: Block) -> list[str]:
    """The commands of a bash block: comments dropped, backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", block.source)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_command_line_examples_parse():
    from fxcompress.cli import build_parser

    commands = [c for b in BLOCKS if b.language == "bash" for c in _shell_commands(b) if c.startswith("python -m fxcompress")]
    assert commands, "the README shows the command line"
    for command in commands:
        try:
            build_parser().parse_args(shlex.split(command, comments=True)[3:])
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"README command does not parse (exit {exc.code}): {command}")


def _figure_rows() -> list[list[str]]:
    text = README.read_text(encoding="utf-8").split("## Headline figures", 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("|")][2:]  # skip the header and its rule
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_headline_figures_name_their_command_and_commit():
    rows = _figure_rows()
    assert rows, "the README has a table of headline figures"
    recorded = BENCHMARKS.read_text(encoding="utf-8")
    for figure, value, command, measured in rows:
        script = re.fullmatch(r"`python (tools/\w+\.py)[^`]*`", command)
        assert script and (ROOT / script.group(1)).is_file(), f"{figure}: {command} is not a tools/ command"
        when = re.fullmatch(r"(\d{4}-\d{2}-\d{2}), `([0-9a-f]{7,40})`", measured)
        assert when, f"{figure}: 'measured' should be 'YYYY-MM-DD, `commit`', got {measured!r}"
        assert when.group(2) in recorded, f"{figure}: commit {when.group(2)} is not in docs/benchmarks.md"
