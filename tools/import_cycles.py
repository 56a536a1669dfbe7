"""Import cycles between fxcompress's modules, counting imports inside functions too.

Every ``import`` statement of ``fxcompress/`` and ``passes/`` (installed as
``fxcompress.passes``) is an edge from its module to the imported module, at
whatever depth it is written: a deferred import inside a function still ties
the two modules together. ``from package import name`` is an edge to the
submodule ``package.name`` when one exists, else to the package. Two kinds of
block are left out because they never run as an import of the module:
``if TYPE_CHECKING:`` (annotations only) and ``if __name__ == "__main__":``
(the module is then ``__main__``, not itself). Cycles are found with
``networkx.simple_cycles``.

Usage: ``python tools/import_cycles.py`` prints each cycle and exits 1 when
there is one; ``tests/test_house.py`` asserts there are none.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the module path it is installed as
PACKAGES = {"fxcompress": ("fxcompress",), "passes": ("fxcompress", "passes")}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    files = {}
    for folder, prefix in PACKAGES.items():
        for path in (root / folder).rglob("*.py"):
            parts = [*prefix, *path.relative_to(root / folder).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _never_imported(node: ast.If) -> bool:
    """``if TYPE_CHECKING:`` and ``if __name__ == "__main__":`` blocks."""
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or test.replace("'", '"') == '__name__ == "__main__"'


def _imports(tree: ast.AST):
    """Import statements under ``tree``, skipping the blocks that never run on import."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _never_imported(child):
            yield from (i for n in child.orelse for i in _imports_of(n))
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def import_graph(files: dict[str, Path]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.level == 0 and node.module:
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in files] or [node.module]
            else:
                continue
            graph.add_edges_from((module, t) for t in targets if t in files and t != module)
    return graph


def cycles(root: Path = ROOT) -> list[list[str]]:
    return sorted(nx.simple_cycles(import_graph(module_files(root))), key=len)


def main() -> int:
    found = cycles()
    for cycle in found:
        print(" -> ".join([*cycle, cycle[0]]))
    print(f"{len(found)} import cycle{'s' * (len(found) != 1)} among {len(module_files())} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
