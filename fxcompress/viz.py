"""Pictures of the dependency groups: why a channel was, or was not, pruned.

``view_graph(gm)`` turns a traced module and its channel analysis into a
small drawing model (:class:`GraphView`): one box per node, filled with the
colour of the group its output channels belong to (grey when that group is
frozen), one edge per tensor, labelled with its channel count (``64 → 32``
when a pruner is given). ``render(view, "out/resnet18")`` writes a
self-contained HTML page (inline, zoomable SVG with one legend entry per
group and the frozen reasons) and a PNG. Layout comes from Graphviz's ``dot``
when it is installed and from networkx's layered layout (drawn with
matplotlib) otherwise.

>>> import torch, torchvision, fxcompress
>>> gm = fxcompress.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
>>> view = view_graph(gm, pruner=fxcompress.prune.L1Norm(0.5))
>>> print(summary_table(view).splitlines()[3])
1        64 → 32     yes                  conv1, layer1.0.conv2, layer1.1.conv2, bn1 +6 more

From the shell: ``python -m fxcompress.viz examples/resnet18.py --sparsity 0.5``
(see ``python -m fxcompress viz --help``).
"""

from __future__ import annotations

import colorsys
import dataclasses
import html
import io
import json
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import networkx as nx
import numpy as np
from tabulate import tabulate
from torch import fx

from fxcompress import meta
from fxcompress.analysis import ChannelAnalysis, OpaqueOpWarning, analyze, get_analysis
from fxcompress.channels import Role
from fxcompress.errors import ConfigError
from fxcompress.masks import current_masks, kept_components
from fxcompress.rules import Multi

__all__ = [
    "GroupInfo",
    "NodeInfo",
    "EdgeInfo",
    "GraphView",
    "view_graph",
    "collapse_view",
    "summary_rows",
    "summary_table",
    "graphviz_available",
    "to_dot",
    "PALETTE",
    "render_svg",
    "render_png",
    "html_page",
    "render",
    "FORMATS",
    "parse_formats",
    "DumpPasses",
]

FROZEN_COLOUR = "#c8c8c8"
NO_GROUP_COLOUR = "#ffffff"
FORMATS = ("html", "png", "svg", "dot", "txt", "json")
#: Graphs with more nodes than this are collapsed by module path unless told otherwise.
MAX_NODES = 400


# ---------------------------------------------------------------------------- the drawing model


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """One dependency group as drawn: its colour, members and channel counts."""

    id: int
    description: str  #: ``analysis.describe(group)``, e.g. ``"conv1.weight[0] +2 (64 channels)"``
    members: tuple[str, ...]  #: module paths owning the group's slices, producers first
    channels: int
    kept: int  #: channels left after pruning (``channels`` when no pruner was given)
    frozen_reason: str | None
    colour: str

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    name: str
    label: str
    path: str  #: module path the node belongs to ("" at the root)
    groups: tuple[int, ...]  #: groups of the node's output channels
    colour: str
    tooltip: str


@dataclasses.dataclass(frozen=True)
class EdgeInfo:
    src: str
    dst: str
    groups: tuple[int, ...]
    channels: int | None  #: size of the tensor's grouped dimension, None when it has none
    kept: int | None


@dataclasses.dataclass
class GraphView:
    """Everything a renderer needs; no torch objects, so it is cheap to keep and to serialise."""

    title: str
    nodes: list[NodeInfo]
    edges: list[EdgeInfo]
    groups: list[GroupInfo]
    pruned: bool = False  #: whether ``kept`` counts come from a pruner or masks
    collapsed: int | None = None  #: module-path depth nodes were merged at, if any

    def group(self, gid: int) -> GroupInfo:
        return self.groups[gid]


#: Fill colours of the first prunable groups, light enough for black labels: ColorBrewer's Set3
#: and matplotlib's light tab20 shades, without greys (grey means frozen). Edges use darker shades.
PALETTE = (
    "#8dd3c7", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#bebada", "#fccde5", "#ffed6f", "#bc80bd",
    "#ccebc5", "#ffffb3", "#ff9896", "#aec7e8", "#98df8a", "#ffbb78", "#c5b0d5", "#9edae5", "#c49c94",
)


def _darker(colour: str, factor: float = 0.62) -> str:
    """The same hue, darker: edges in a group's colour that stay visible on white."""
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    h, lightness, sat = colorsys.rgb_to_hls(r, g, b)
    r, g, b = colorsys.hls_to_rgb(h, lightness * factor, min(1.0, sat * 1.2))
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _colour(index: int) -> str:
    """Distinct colours for any number of groups: the palette, then golden-ratio hue steps."""
    if index < len(PALETTE):
        return PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    lightness = 0.62 if index % 2 == 0 else 0.74
    r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.65)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _group_infos(analysis: ChannelAnalysis, keep: np.ndarray) -> list[GroupInfo]:
    infos, colour_index = [], 0
    for group in analysis.groups:
        order = analysis.slices_of(group, Role.PRODUCER) + [
            k for k in group.slices if analysis.slices[k].role is not Role.PRODUCER
        ]
        members = tuple(dict.fromkeys(analysis.slices[k].owner or "(root)" for k in order))
        if group.prunable:
            colour, colour_index = _colour(colour_index), colour_index + 1
        else:
            colour = FROZEN_COLOUR
        kept = int(np.count_nonzero(keep[group.components]))
        infos.append(GroupInfo(group.id, analysis.describe(group), members, len(group), kept, group.frozen_reason, colour))
    return infos


def _grouped_dim(channels, analysis: ChannelAnalysis) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """The ids of the first dimension of an output that belongs to a group, and all groups the output touches."""
    if channels is None:
        return None, ()
    if isinstance(channels, Multi):
        parts = [_grouped_dim(c, analysis) for c in channels]
        ids = [p[0] for p in parts if p[0] is not None]
        groups = tuple(dict.fromkeys(g for p in parts for g in p[1]))
        return (np.concatenate(ids) if ids else None), groups
    found, groups = None, []
    for ids in channels:
        of = analysis.group_of[analysis.labels[ids]]
        touched = [int(g) for g in np.unique(of) if g >= 0]
        if touched and found is None:
            found = ids
        groups.extend(touched)
    return found, tuple(dict.fromkeys(groups))


def _module_path(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return node.op


def _node_info(gm: fx.GraphModule, node: fx.Node, analysis: ChannelAnalysis, groups: list[GroupInfo]) -> NodeInfo:
    _, touched = _grouped_dim(node.meta.get(meta.CHANNELS), analysis)
    kind, path = _kind(gm, node), _module_path(gm, node)
    short = path.partition(".")[2] or path if node.op == "call_module" else node.name  # its cluster names the rest
    label = short if short == kind else f"{short}\n{kind}"
    prunable = [g for g in touched if groups[g].prunable]
    colour = groups[prunable[0]].colour if prunable else (FROZEN_COLOUR if touched else NO_GROUP_COLOUR)
    lines = [f"{node.name}: {kind}" + (f" in {path}" if path else "")]
    shape = getattr(node.meta.get(meta.TENSOR_META), "shape", None)
    if shape is not None:
        lines.append("output " + "×".join(str(s) for s in shape))
    for g in touched:
        info = groups[g]
        lines.append(f"group {g}: " + ("prunable" if info.prunable else f"frozen ({info.frozen_reason})"))
    return NodeInfo(node.name, label, path, touched, colour, "\n".join(lines))


def _edge_info(src: fx.Node, dst: fx.Node, analysis: ChannelAnalysis, keep: np.ndarray) -> EdgeInfo:
    ids, touched = _grouped_dim(src.meta.get(meta.CHANNELS), analysis)
    if ids is None:
        return EdgeInfo(src.name, dst.name, touched, None, None)
    return EdgeInfo(src.name, dst.name, touched, len(ids), int(np.count_nonzero(keep[analysis.labels[ids]])))


def _keep(gm: fx.GraphModule, analysis: ChannelAnalysis, pruner) -> tuple[np.ndarray, bool]:
    """Which components survive: the pruner's choice, else the masks already on the module, else all."""
    if pruner is not None:
        return kept_components(analysis, pruner.compute_masks(gm, analysis)), True
    masks = current_masks(gm)
    if masks:
        return kept_components(analysis, masks), True
    return np.ones(analysis.solution.num_components, dtype=bool), False


def view_graph(
    gm: fx.GraphModule,
    analysis: ChannelAnalysis | None = None,
    *,
    pruner=None,
    title: str | None = None,
    collapse: int | None = None,
    max_nodes: int = MAX_NODES,
) -> GraphView:
    """Build the drawing model of a traced module (``fxcompress.trace``) and its groups.

    ``pruner`` (e.g. ``L1Norm(0.5)``) adds after-pruning channel counts; a
    masked module shows its own masks. ``collapse=2`` merges the nodes of each
    module path two levels deep (``layer1.0``) into one box; graphs bigger
    than ``max_nodes`` are collapsed at the shallowest depth that fits.
    """
    analysis = analysis if analysis is not None else get_analysis(gm)
    keep, pruned = _keep(gm, analysis, pruner)
    groups = _group_infos(analysis, keep)
    nodes = [_node_info(gm, n, analysis, groups) for n in gm.graph.nodes if _drawn(n)]
    drawn = {n.name for n in nodes}
    edges = [
        _edge_info(src, node, analysis, keep)
        for node in gm.graph.nodes
        if node.name in drawn
        for src in node.all_input_nodes
        if src.name in drawn
    ]
    view = GraphView(title or type(gm).__name__, nodes, edges, groups, pruned)
    if collapse is None and len(nodes) > max_nodes:
        collapse = _depth_that_fits(view, max_nodes)
    return collapse_view(view, collapse) if collapse else view


def _drawn(node: fx.Node) -> bool:
    """Nodes without tensor output or input (Python arithmetic on sizes) are left out of the picture."""
    return node.op in ("placeholder", "output") or meta.CHANNELS in node.meta and node.meta[meta.CHANNELS] is not None


# ---------------------------------------------------------------------------- collapsing


def _collapse_key(node: NodeInfo, depth: int) -> str:
    atoms = node.path.split(".") if node.path else []
    return ".".join(atoms[:depth]) if len(atoms) >= depth else node.name


def _depth_that_fits(view: GraphView, max_nodes: int) -> int | None:
    for depth in range(1, 6):
        if len({_collapse_key(n, depth) for n in view.nodes}) <= max_nodes:
            return depth
    return 1


def collapse_view(view: GraphView, depth: int) -> GraphView:
    """Merge every node whose module path is at least ``depth`` deep into one box per path prefix.

    The merged box takes the colour of its last node (a block's output) and
    lists every group inside it in its tooltip; edges inside a box disappear.
    """
    if depth < 1:
        raise ConfigError(f"collapse depth must be at least 1, got {depth}")
    key = {n.name: _collapse_key(n, depth) for n in view.nodes}
    members: dict[str, list[NodeInfo]] = {}
    for node in view.nodes:
        members.setdefault(key[node.name], []).append(node)
    nodes = [_merge(name, inside) for name, inside in members.items()]
    edges, seen = [], set()
    for edge in view.edges:
        pair = (key[edge.src], key[edge.dst])
        if pair[0] == pair[1] or pair in seen:
            continue
        seen.add(pair)
        edges.append(dataclasses.replace(edge, src=pair[0], dst=pair[1]))
    return dataclasses.replace(view, nodes=nodes, edges=edges, collapsed=depth)


def _merge(name: str, inside: list[NodeInfo]) -> NodeInfo:
    if len(inside) == 1:
        return inside[0]
    groups = tuple(dict.fromkeys(g for n in inside for g in n.groups))
    tooltip = f"{name}: {len(inside)} nodes\n" + "\n".join(n.tooltip.splitlines()[0] for n in inside)
    return NodeInfo(name, f"{name}\n({len(inside)} ops)", name, groups, inside[-1].colour, tooltip)


# ---------------------------------------------------------------------------- text


def _channels_text(channels: int | None, kept: int | None, pruned: bool) -> str:
    if channels is None:
        return ""
    return f"{channels} → {kept}" if pruned and kept != channels else str(channels)


def summary_rows(view: GraphView) -> list[dict]:
    """One dict per group: id, members, channels (before/after), prunable and why not (JSON-ready)."""
    return [
        {
            "group": g.id,
            "channels": g.channels,
            "kept": g.kept,
            "prunable": g.prunable,
            "frozen_reason": g.frozen_reason,
            "members": list(g.members),
            "colour": g.colour,
        }
        for g in view.groups
    ]


def _members_text(members: Sequence[str], shown: int = 4) -> str:
    more = f" +{len(members) - shown} more" if len(members) > shown else ""
    return ", ".join(members[:shown]) + more


def summary_table(view: GraphView) -> str:
    """The groups as a text table (tabulate), e.g. for a terminal or a report."""
    rows = [
        [
            g.id,
            _channels_text(g.channels, g.kept, view.pruned),
            "yes" if g.prunable else f"no: {g.frozen_reason}",
            _members_text(g.members),
        ]
        for g in view.groups
    ]
    return tabulate(rows, headers=["group", "channels", "prunable", "members"], disable_numparse=True)


# ---------------------------------------------------------------------------- Graphviz


def graphviz_available() -> bool:
    """Whether the ``graphviz`` Python package and Graphviz's ``dot`` program are both installed."""
    try:
        import graphviz  # noqa: F401
    except ImportError:
        return False
    return shutil.which("dot") is not None


def _cluster_of(node: NodeInfo) -> str | None:
    return node.path.split(".")[0] if "." in node.path or (node.path and node.name != node.path) else None


def _edge_colour(edge: EdgeInfo, view: GraphView) -> str:
    colours = [_darker(view.group(g).colour) for g in edge.groups[:3]]
    return ":".join(colours) if colours else "#666666"


def to_dot(view: GraphView, rankdir: str = "TB", dpi: int = 72):
    """The view as a ``graphviz.Digraph``: nodes clustered by top-level module, classes ``g<id>`` per group."""
    import graphviz

    dot = graphviz.Digraph(
        "fxcompress",
        graph_attr={"rankdir": rankdir, "fontname": "Helvetica", "nodesep": "0.15", "ranksep": "0.3",
                    "dpi": str(dpi), "tooltip": view.title, "bgcolor": "white"},
        node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10",
                   "height": "0.3", "margin": "0.06,0.03"},
        edge_attr={"fontname": "Helvetica", "fontsize": "8", "arrowsize": "0.5", "penwidth": "1.4"},
    )
    clusters: dict[str | None, list[NodeInfo]] = {}
    for node in view.nodes:
        clusters.setdefault(_cluster_of(node), []).append(node)
    for cluster, nodes in clusters.items():
        target = dot if cluster is None else graphviz.Digraph(f"cluster_{cluster}")
        if cluster is not None:
            target.attr(label=cluster, style="rounded,dashed", color="#999999", fontsize="10", fontname="Helvetica")
        for node in nodes:
            target.node(node.name, node.label, fillcolor=node.colour, tooltip=node.tooltip,
                        **{"class": " ".join(f"g{g}" for g in node.groups)})
        if cluster is not None:
            dot.subgraph(target)
    for edge in view.edges:
        dot.edge(edge.src, edge.dst, label=_channels_text(edge.channels, edge.kept, view.pruned),
                 color=_edge_colour(edge, view), tooltip=f"{edge.src} → {edge.dst}",
                 **{"class": " ".join(f"g{g}" for g in edge.groups)})
    return dot


# ---------------------------------------------------------------------------- networkx + matplotlib fallback


def _layered_positions(view: GraphView) -> dict[str, tuple[float, float]]:
    """networkx's multipartite layout over topological generations: inputs at the top, outputs at the bottom."""
    graph = nx.DiGraph()
    graph.add_nodes_from(n.name for n in view.nodes)
    graph.add_edges_from((e.src, e.dst) for e in view.edges)
    condensed = nx.condensation(graph)  # collapsed views may contain cycles
    for depth, layer in enumerate(nx.topological_generations(condensed)):
        for component in layer:
            for name in condensed.nodes[component]["members"]:
                graph.nodes[name]["layer"] = -depth
    return nx.multipartite_layout(graph, subset_key="layer", align="horizontal", scale=1.0)


def _matplotlib_figure(view: GraphView, positions: dict[str, tuple[float, float]]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    xs, ys = [x for x, _ in positions.values()], [y for _, y in positions.values()]
    per_layer = Counter(round(y, 6) for y in ys)
    layers, widest = len(per_layer), max(per_layer.values())
    # room for a two-line label per node: 1.8 in across, 0.55 in down (labels are drawn in points)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 1.8 * widest), 40.0), max(4.0, 0.55 * layers)))
    ax.set_axis_off()
    # texts do not widen the data limits: set them to the nodes, half a step beyond the outermost ones
    half_x = ((max(xs) - min(xs)) / max(widest - 1, 1) or 1.0) / 2
    half_y = ((max(ys) - min(ys)) / max(layers - 1, 1) or 1.0) / 2
    ax.set_xlim(min(xs) - half_x, max(xs) + half_x)
    ax.set_ylim(min(ys) - half_y, max(ys) + half_y)
    for edge in view.edges:
        (x0, y0), (x1, y1) = positions[edge.src], positions[edge.dst]
        colour = _darker(view.group(edge.groups[0]).colour) if edge.groups else "#666666"
        line = ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.2})
        line.set_gid("edge " + " ".join(f"g{g}" for g in edge.groups))
        label = _channels_text(edge.channels, edge.kept, view.pruned)
        if label:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, label, fontsize=6, ha="left", va="center", color="#333333")
    for node in view.nodes:
        x, y = positions[node.name]
        text = ax.text(x, y, node.label, fontsize=7, ha="center", va="center",
                       bbox={"boxstyle": "round,pad=0.3", "facecolor": node.colour, "edgecolor": "#444444"})
        text.set_gid("node " + " ".join(f"g{g}" for g in node.groups))
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
    return fig


def _matplotlib_bytes(view: GraphView, fmt: str, dpi: int) -> bytes:
    from matplotlib import pyplot as plt

    fig = _matplotlib_figure(view, _layered_positions(view))
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- renderers


def _resolve_engine(engine: str) -> str:
    if engine == "auto":
        return "graphviz" if graphviz_available() else "networkx"
    if engine == "graphviz" and not graphviz_available():
        raise ConfigError("engine 'graphviz' needs Graphviz (apt-get install graphviz) and `pip install graphviz`")
    if engine not in ("graphviz", "networkx"):
        raise ConfigError(f"unknown layout engine {engine!r}; use auto, graphviz or networkx")
    return engine


def render_svg(view: GraphView, engine: str = "auto", rankdir: str = "TB") -> str:
    """The picture as SVG text (Graphviz ``dot`` layout, or networkx + matplotlib without Graphviz)."""
    if _resolve_engine(engine) == "graphviz":
        return to_dot(view, rankdir).pipe(format="svg").decode("utf-8")
    return _matplotlib_bytes(view, "svg", 72).decode("utf-8")


def render_png(view: GraphView, engine: str = "auto", rankdir: str = "TB", dpi: int = 72) -> bytes:
    """The picture as PNG bytes."""
    if _resolve_engine(engine) == "graphviz":
        return to_dot(view, rankdir, dpi).pipe(format="png")
    return _matplotlib_bytes(view, "png", dpi)


_HTML_STYLE = """
body { margin: 0; font: 13px Helvetica, Arial, sans-serif; display: flex; height: 100vh; }
#canvas { flex: 1; overflow: hidden; cursor: grab; background: #fafafa; }
#canvas svg { width: 100%; height: 100%; }
aside { width: 380px; overflow: auto; border-left: 1px solid #ddd; padding: 8px; }
h1 { font-size: 15px; margin: 4px 0; }
table { border-collapse: collapse; width: 100%; }
td, th { padding: 2px 4px; border-bottom: 1px solid #eee; vertical-align: top; text-align: left; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #555; }
tr.group:hover { background: #ffe; }
svg .dim { opacity: 0.15; }
.frozen td { color: #777; }
"""

_HTML_SCRIPT = """
(function () {
  const svg = document.querySelector('#canvas svg');
  if (!svg) return;
  const box = svg.viewBox.baseVal;
  const full = [box.x, box.y, box.width, box.height];
  let start = null;
  function fit(readable) {  // readable: fill the pane's width at most 1.2 px per point, from the top
    const r = svg.getBoundingClientRect();
    const s = readable ? Math.min(r.width / full[2], 1.2) : Math.min(r.width / full[2], r.height / full[3]);
    box.width = r.width / s; box.height = r.height / s;
    box.x = full[0] + (full[2] - box.width) / 2;
    box.y = readable ? full[1] : full[1] + (full[3] - box.height) / 2;
  }
  fit(true);
  svg.addEventListener('dblclick', function () { fit(false); });
  svg.addEventListener('wheel', function (e) {
    e.preventDefault();
    const k = e.deltaY > 0 ? 1.15 : 1 / 1.15;
    const r = svg.getBoundingClientRect();
    const px = box.x + (e.clientX - r.left) / r.width * box.width;
    const py = box.y + (e.clientY - r.top) / r.height * box.height;
    box.x = px - (px - box.x) * k; box.y = py - (py - box.y) * k;
    box.width *= k; box.height *= k;
  }, { passive: false });
  svg.addEventListener('mousedown', function (e) { start = [e.clientX, e.clientY, box.x, box.y]; });
  window.addEventListener('mouseup', function () { start = null; });
  window.addEventListener('mousemove', function (e) {
    if (!start) return;
    const r = svg.getBoundingClientRect();
    box.x = start[2] - (e.clientX - start[0]) * box.width / r.width;
    box.y = start[3] - (e.clientY - start[1]) * box.height / r.height;
  });
  document.querySelectorAll('tr.group').forEach(function (row) {
    const cls = 'g' + row.dataset.group;
    row.addEventListener('mouseenter', function () {
      svg.querySelectorAll('.node, .edge').forEach(function (el) {
        el.classList.toggle('dim', !el.classList.contains(cls));
      });
    });
    row.addEventListener('mouseleave', function () {
      svg.querySelectorAll('.dim').forEach(function (el) { el.classList.remove('dim'); });
    });
  });
})();
"""


def _inline_svg(svg: str) -> str:
    """Strip the XML prolog and fixed size so the SVG embeds in HTML and fills its pane."""
    start = svg.find("<svg")
    svg = svg[start:] if start >= 0 else svg
    return re.sub(r'<svg([^>]*?)\s(width|height)="[^"]*"([^>]*?)\s(width|height)="[^"]*"', r"<svg\1\3", svg, count=1)


def _legend_row(group: GroupInfo, pruned: bool) -> str:
    status = "prunable" if group.prunable else f"frozen: {html.escape(group.frozen_reason)}"
    members = html.escape(_members_text(group.members, 6))
    css = "group" if group.prunable else "group frozen"
    return (
        f'<tr class="{css}" data-group="{group.id}" title="{html.escape(", ".join(group.members))}">'
        f'<td><span class="swatch" style="background:{group.colour}"></span> {group.id}</td>'
        f"<td>{_channels_text(group.channels, group.kept, pruned)}</td><td>{status}</td><td>{members}</td></tr>"
    )


#: How each layout engine is named on the page.
LAYOUT_NAMES = {
    "graphviz": "Graphviz dot",
    "networkx": "networkx layered layout (topological generations), drawn with matplotlib",
}


def html_page(view: GraphView, svg: str, engine: str = "graphviz") -> str:
    """A self-contained page: the SVG inline (wheel to zoom, drag to pan) and one legend row per group.

    Hovering a legend row dims everything outside that group; hovering a box
    shows the node, its output shape and the frozen reason of its groups.
    """
    prunable = sum(g.prunable for g in view.groups)
    rows = "\n".join(_legend_row(g, view.pruned) for g in view.groups)
    note = f"; nodes merged by module path at depth {view.collapsed}" if view.collapsed else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(view.title)} dependency groups</title><style>{_HTML_STYLE}</style></head><body>"
        f'<div id="canvas">{_inline_svg(svg)}</div>'
        f"<aside><h1>{html.escape(view.title)}</h1>"
        f"<p>{len(view.nodes)} nodes, {len(view.groups)} groups, {prunable} prunable{note}. "
        "Wheel to zoom, drag to pan, double-click to see it all, hover a row to highlight its group. "
        "Grey: frozen (never pruned); hover a box for its reason.</p>"
        f'<p class="layout">Layout: {LAYOUT_NAMES[engine]}.</p>'
        f'<table class="legend"><tr><th>group</th><th>channels</th><th>status</th><th>members</th></tr>\n{rows}\n'
        f"</table></aside><script>{_HTML_SCRIPT}</script></body></html>\n"
    )


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    """``"html,png"`` or ``["html", "png"]`` as a checked list of output formats."""
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = [f for f in items if f not in FORMATS]
    if unknown or not items:
        raise ConfigError(f"unknown output format {', '.join(unknown) or '(none)'}; choose from {', '.join(FORMATS)}")
    return items


def render(
    view: GraphView,
    out: str | Path,
    formats: str | Iterable[str] = ("html", "png"),
    *,
    engine: str = "auto",
    rankdir: str = "TB",
    dpi: int = 72,
) -> dict[str, Path]:
    """Write ``out.<format>`` for each format (html, png, svg, dot, txt, json); return the paths by format."""
    formats = parse_formats(formats)
    engine = _resolve_engine(engine)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    svg = render_svg(view, engine, rankdir) if {"html", "svg"} & set(formats) else None
    for fmt in formats:
        path = out.with_name(out.name + "." + fmt)
        if fmt == "png":
            path.write_bytes(render_png(view, engine, rankdir, dpi))
        else:
            path.write_text(_text_output(view, fmt, svg, rankdir, engine), encoding="utf-8")
        written[fmt] = path
    return written


def _text_output(view: GraphView, fmt: str, svg: str | None, rankdir: str, engine: str) -> str:
    if fmt == "html":
        return html_page(view, svg, engine)
    if fmt == "svg":
        return svg
    if fmt == "dot":
        if not graphviz_available():
            raise ConfigError("the dot format needs the graphviz Python package and Graphviz")
        return to_dot(view, rankdir).source
    if fmt == "txt":
        return summary_table(view) + "\n"
    return json.dumps({"title": view.title, "groups": summary_rows(view),
                       "nodes": [dataclasses.asdict(n) for n in view.nodes],
                       "edges": [dataclasses.asdict(e) for e in view.edges]}, indent=1) + "\n"


# ---------------------------------------------------------------------------- pass introspection


def _fresh_analysis(gm: fx.GraphModule) -> ChannelAnalysis:
    """The module's cached analysis, or a new one that is *not* cached.

    A hook must not change what the passes see: caching here would make a
    later ``analyze-groups`` report that it changed nothing.
    """
    cached = gm.meta.get(meta.ANALYSIS)
    if cached is not None:
        return cached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpaqueOpWarning)
        return analyze(gm)


@dataclasses.dataclass
class DumpPasses:
    """Hook ``hook(previous_pass, gm, next_pass)``: write the graph after every pass, and time each pass.

    In ``directory`` it writes ``00-input.txt``, ``01-<pass>.txt``, ... (the
    graph's code and node table) and the same picture as :func:`render`
    (``.html`` by default), then ``passes.txt``/``passes.json`` with seconds,
    node and parameter counts per pass. The seconds are the wall time between
    two calls of this hook minus its own work, i.e. the pass plus any other
    hook in between (compile with ``verify=False`` for the pass alone)::

        fxcompress.compile(model, x, "insert-masks{pruner=l1},propagate-channels,shrink",
                           hooks=[DumpPasses("out/passes")])
    """

    directory: str | Path
    formats: tuple[str, ...] = ("html",)
    engine: str = "auto"
    records: list[dict] = dataclasses.field(default_factory=list)
    _last: float | None = None
    _index: int = 0

    def __call__(self, previous, gm: fx.GraphModule, next_pass) -> None:
        elapsed = None if self._last is None else time.perf_counter() - self._last
        directory = Path(self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = "input" if previous is None else previous.name
        stem = directory / f"{self._index:02d}-{name}"
        stem.with_suffix(".txt").write_text(_graph_text(gm), encoding="utf-8")
        if self.formats:
            view = view_graph(gm, _fresh_analysis(gm), title=f"after {name}")
            render(view, stem, self.formats, engine=self.engine)
        self.records.append({"index": self._index, "pass": name, "seconds": elapsed,
                             "nodes": len(gm.graph.nodes), "params": sum(p.numel() for p in gm.parameters())})
        self._index += 1
        if next_pass is None:
            self._write_timings(directory)
        self._last = time.perf_counter()

    def _write_timings(self, directory: Path) -> None:
        rows = [[r["index"], r["pass"], "" if r["seconds"] is None else f"{r['seconds']:.4f}", r["nodes"], r["params"]]
                for r in self.records]
        table = tabulate(rows, headers=["#", "after pass", "seconds", "nodes", "params"], disable_numparse=True)
        (directory / "passes.txt").write_text(table + "\n", encoding="utf-8")
        (directory / "passes.json").write_text(json.dumps(self.records, indent=1) + "\n", encoding="utf-8")


def _graph_text(gm: fx.GraphModule) -> str:
    rows = [[n.op, n.name, _target_text(n), getattr(n.meta.get(meta.TENSOR_META), "shape", "")] for n in gm.graph.nodes]
    table = tabulate(rows, headers=["opcode", "name", "target", "shape"], disable_numparse=True)
    return f"{table}\n\n{gm.code.strip()}\n"


def _target_text(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


if __name__ == "__main__":  # python -m fxcompress.viz model.py [options]
    from fxcompress.cli import main

    sys.exit(main(["viz", *sys.argv[1:]]))
