"""Tests of fxcompress.viz: the drawing model, the HTML/PNG renderers, the pass-dump hook, headless Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import warnings

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import fxcompress
from fxcompress import meta
from fxcompress.analysis import get_analysis
from fxcompress.errors import ConfigError
from fxcompress.passes import standard_pruning
from fxcompress.prune import L1Norm
from fxcompress.viz import (
    FROZEN_COLOUR,
    DumpPasses,
    collapse_view,
    graphviz_available,
    render,
    summary_rows,
    summary_table,
    view_graph,
)

needs_graphviz = pytest.mark.skipif(
    not graphviz_available(), reason="Graphviz not installed (apt-get install graphviz; pip install graphviz)"
)


class ConcatSplit(nn.Module):
    """Two branches concatenated, then split back: groups that meet at a cat and part at a split."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.left = nn.Conv2d(16, 8, 3, padding=1)
        self.right = nn.Conv2d(16, 12, 1)
        self.mix = nn.Conv2d(20, 20, 1)
        self.head_a = nn.Conv2d(8, 4, 1)
        self.head_b = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        a, b = torch.split(torch.relu(self.mix(y)), [8, 12], dim=1)
        return self.head_a(a) + self.head_b(b)


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (1, 3, 64, 64)),
    "concat_split": (ConcatSplit, (1, 3, 16, 16)),
}


def _trace(name: str):
    factory, shape = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxcompress.trace(factory(), torch.randn(shape))


@pytest.fixture(scope="module")
def traced():
    return {name: _trace(name) for name in MODELS}


def _png_colours(data: bytes) -> int:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 24))


@needs_graphviz
@pytest.mark.parametrize("name", list(MODELS))
def test_html_and_png_show_every_group(traced, tmp_path, name):
    gm = traced[name]
    view = view_graph(gm, pruner=L1Norm(0.5), title=name)
    paths = render(view, tmp_path / name, ("html", "png"))
    page = paths["html"].read_text()
    rows = re.findall(r'<tr class="group[^"]*" data-group="(\d+)"', page)
    assert sorted(map(int, rows)) == list(range(len(get_analysis(gm).groups)))
    prunable = [g for g in view.groups if g.prunable]
    for group in prunable:  # every prunable group is drawn: some SVG element carries its class
        assert re.search(rf'class="(node|edge)[^"]*\bg{group.id}\b', page), f"group {group.id} not drawn"
    assert not re.search(r'(src|href)="https?://', page)  # self-contained: nothing fetched from the network
    assert "<script src" not in page and "<link" not in page  # self-contained
    png = paths["png"].read_bytes()
    assert len(png) > 10_000
    assert _png_colours(png) >= len({g.colour for g in prunable}) + 2


def test_networkx_fallback_renders_without_graphviz(traced, tmp_path):
    view = view_graph(traced["concat_split"], title="concat")
    paths = render(view, tmp_path / "nx", ("html", "png", "svg"), engine="networkx")
    page = paths["html"].read_text()
    assert page.count('class="group') == len(view.groups)
    assert "<svg" in page
    png = paths["png"].read_bytes()
    assert len(png) > 5_000 and _png_colours(png) > 10


def test_fallback_drawing_of_mobilenet_v2_shows_every_label_and_edge_without_overlap(tmp_path):
    """Without Graphviz: every node's label lies inside the picture, clear of every other label, and every
    edge is drawn; the page says which layout it used."""
    import itertools

    from fxcompress.viz import _layered_positions, _matplotlib_figure

    gm = fxcompress.compile(torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 64, 64), [])
    view = view_graph(gm, pruner=L1Norm(0.5))
    figure = _matplotlib_figure(view, _layered_positions(view))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    drawn = {kind: [t for t in figure.axes[0].texts if (t.get_gid() or "").startswith(kind)] for kind in ("node", "edge")}
    assert sorted(t.get_text() for t in drawn["node"]) == sorted(n.label for n in view.nodes)
    assert len(drawn["edge"]) == len(view.edges) > 150
    boxes = [t.get_window_extent(renderer) for t in drawn["node"]]
    assert all(figure.bbox.contains(b.x0, b.y0) and figure.bbox.contains(b.x1, b.y1) for b in boxes)
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]
    page = render(view, tmp_path / "mnv2", ("html",), engine="networkx")["html"].read_text()
    assert "Layout: networkx layered layout" in page


def test_pruned_counts_match_the_shrunk_model():
    inputs = torch.randn(1, 3, 16, 16)
    view = view_graph(fxcompress.trace(ConcatSplit(), inputs), pruner=L1Norm(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shrunk = fxcompress.compile(ConcatSplit(), inputs, standard_pruning(L1Norm(0.5)))
    kept = {g.members[0]: (g.channels, g.kept) for g in view.groups if g.prunable}
    assert kept["stem"] == (16, shrunk.stem.out_channels) == (16, 8)
    assert kept["left"] == (8, shrunk.left.out_channels) and kept["right"] == (12, shrunk.right.out_channels)
    edge = next(e for e in view.edges if e.src == "cat")  # the concatenation carries both branches
    assert (edge.channels, edge.kept) == (20, shrunk.mix.in_channels)


def test_frozen_groups_are_grey_with_their_reason(traced):
    view = view_graph(traced["resnet18"])
    frozen = {g.id: g for g in view.groups if not g.prunable}
    assert {g.frozen_reason for g in frozen.values()} == {"graph input 'x'", "graph output"}
    assert all(g.colour == FROZEN_COLOUR for g in frozen.values())
    assert len({g.colour for g in view.groups if g.prunable}) == len(view.groups) - len(frozen)
    placeholder = next(n for n in view.nodes if n.name == "x")
    assert placeholder.colour == FROZEN_COLOUR and "graph input 'x'" in placeholder.tooltip
    rows = summary_rows(view)
    assert rows[0]["prunable"] is False and rows[0]["frozen_reason"] == "graph input 'x'"
    assert "no: graph output" in summary_table(view)


def test_masked_module_shows_its_own_masks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = fxcompress.compile(ConcatSplit(), torch.randn(1, 3, 16, 16), standard_pruning(L1Norm(0.5))[:-1])
    view = view_graph(masked)
    assert view.pruned
    stem = next(g for g in view.groups if g.prunable and g.members[0] == "stem")
    assert (stem.channels, stem.kept) == (16, 8)


def test_collapse_merges_nodes_by_module_path(traced):
    view = view_graph(traced["resnet18"])
    collapsed = collapse_view(view, 2)
    names = {n.name for n in collapsed.nodes}
    assert {"layer1.0", "layer1.1", "layer4.1"} <= names
    assert not any(n.startswith("layer1_0") for n in names)
    assert len(collapsed.nodes) < len(view.nodes) // 2
    assert all(e.src != e.dst for e in collapsed.edges)
    assert all(e.src in names and e.dst in names for e in collapsed.edges)
    assert view_graph(traced["resnet18"], max_nodes=30).collapsed == 1


def test_bad_options_are_config_errors(traced, tmp_path):
    view = view_graph(traced["concat_split"])
    with pytest.raises(ConfigError, match="unknown output format gif"):
        render(view, tmp_path / "x", "html,gif")
    with pytest.raises(ConfigError, match="unknown layout engine"):
        render(view, tmp_path / "x", "html", engine="circo")
    with pytest.raises(ConfigError, match="collapse depth"):
        collapse_view(view, 0)


def test_dump_passes_writes_each_pass_and_timings(tmp_path):
    dump = DumpPasses(tmp_path / "passes", formats=("html",), engine="auto" if graphviz_available() else "networkx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxcompress.compile(ConcatSplit(), torch.randn(1, 3, 16, 16), standard_pruning(L1Norm(0.5)), hooks=[dump])
    names = ["input", "insert-masks", "propagate-channels", "shrink"]
    for i, name in enumerate(names):
        assert (tmp_path / "passes" / f"{i:02d}-{name}.txt").read_text().startswith("opcode")
        assert (tmp_path / "passes" / f"{i:02d}-{name}.html").exists()
    records = json.loads((tmp_path / "passes" / "passes.json").read_text())
    assert [r["pass"] for r in records] == names
    assert records[0]["seconds"] is None and all(r["seconds"] >= 0 for r in records[1:])
    assert records[-1]["params"] < records[0]["params"]
    assert "shrink" in (tmp_path / "passes" / "passes.txt").read_text()


def test_dump_passes_leaves_the_analysis_cache_alone(tmp_path):
    gm = _trace("concat_split")
    DumpPasses(tmp_path, formats=())(None, gm, None)
    assert meta.ANALYSIS not in gm.meta  # so a later analyze-groups still reports its change honestly


# ---------------------------------------------------------------------------- headless Chromium


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium; .ci/run does this)"
)


def _chromium(page, screenshot) -> str:
    """Open ``page`` headless, save a screenshot; return Chromium's log (console messages included)."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--enable-logging=stderr", "--v=0", "--window-size=1280,900", f"--screenshot={screenshot}",
         "--virtual-time-budget=2000", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    return result.stdout + result.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]


@needs_chromium
def test_console_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    assert _console_errors(_chromium(page, tmp_path / "broken.png")), "the console check would miss errors"


@needs_chromium
@needs_graphviz
def test_html_opens_in_headless_chromium_and_shows_the_graph(traced, tmp_path):
    view = view_graph(traced["resnet18"], pruner=L1Norm(0.5), title="resnet18")
    page = render(view, tmp_path / "resnet18", "html")["html"]
    shot = tmp_path / "shot.png"
    log = _chromium(page, shot)
    assert not _console_errors(log), log
    image = Image.open(shot).convert("RGB")
    colours = {c for _, c in image.getcolors(maxcolors=1 << 24)}
    group_colours = {tuple(int(g.colour[i:i + 2], 16) for i in (1, 3, 5)) for g in view.groups if g.prunable}
    assert len(colours & group_colours) >= 3, "the screenshot shows too few group colours: no graph drawn?"
