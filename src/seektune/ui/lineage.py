"""The registry's lineage as a drawing: boxes for the base model and each version, arrows parent → child.

`seektune.registry.catalog.lineage` gives trees (base model → root version → derived versions); this
lays them out left to right, a column per generation and a row per leaf, so the page can draw them as
SVG without a graph library in the browser. Why our own code: graphviz needs a binary, and a tree this
small lays out in a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BOX_W, BOX_H = 190, 46
COL_GAP, ROW_GAP = 60, 16
MARGIN = 10


@dataclass
class Node:
    id: str
    label: str
    sub: str
    x: int
    y: int
    ref: str | None = None  # None for the base model
    stage: str | None = None
    kind: str | None = None
    focus: bool = False


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[int, int, int, int]] = field(default_factory=list)  # x1, y1, x2, y2
    width: int = 0
    height: int = 0


def _base_label(base: dict[str, Any]) -> str:
    model = str(base.get("model") or "base model")
    return model.rstrip("/").split("/")[-1]


def layout_lineage(found: dict[str, Any]) -> Graph:
    """Positions of every box and arrow of `lineage(...)`'s trees, one under the other."""
    graph = Graph()
    focus = found.get("focus")
    row = 0  # the next free row

    def place(view: dict[str, Any], depth: int) -> Node:
        nonlocal row
        children = view.get("children") or []
        child_nodes = [place(child, depth + 1) for child in children]
        if child_nodes:
            y = (child_nodes[0].y + child_nodes[-1].y) // 2
        else:
            y = MARGIN + row * (BOX_H + ROW_GAP)
            row += 1
        node = _version_node(view, depth, y, focus)
        graph.nodes.append(node)
        for child in child_nodes:
            graph.edges.append(_edge(node, child))
        return node

    for tree in found.get("trees", []):
        chain = [*tree.get("ancestors", [])]
        top = tree["version"]
        # ancestors (when one version is in focus) form a straight line before it
        depth0 = 1 + len(chain)
        start_row = row
        last = place(top, depth0)
        y = last.y
        previous = last
        for depth, view in reversed(list(enumerate(chain, start=1))):
            node = _version_node(view, depth, y, focus)
            graph.nodes.append(node)
            graph.edges.append(_edge(node, previous))
            previous = node
        base = tree.get("base") or {}
        revision = base.get("revision")
        base_node = Node(
            f"base-{len(graph.nodes)}",
            _base_label(base),
            f"base model{' @ ' + str(revision)[:10] if revision else ''}",
            MARGIN,
            y,
        )
        graph.nodes.append(base_node)
        graph.edges.append(_edge(base_node, previous))
        row = max(row, start_row + 1)
    depth_max = max((n.x for n in graph.nodes), default=0)
    graph.width = depth_max + BOX_W + MARGIN
    graph.height = MARGIN + row * (BOX_H + ROW_GAP)
    return graph


def _version_node(view: dict[str, Any], depth: int, y: int, focus: str | None) -> Node:
    tags = ", ".join(view.get("tags") or [])
    sub = " · ".join(
        x for x in (view.get("kind"), view.get("stage") if view.get("stage") != "none" else None, tags) if x
    )
    return Node(
        view["ref"],
        view["ref"],
        sub,
        MARGIN + depth * (BOX_W + COL_GAP),
        y,
        ref=view["ref"],
        stage=view.get("stage"),
        kind=view.get("kind"),
        focus=view["ref"] == focus,
    )


def _edge(parent: Node, child: Node) -> tuple[int, int, int, int]:
    return (parent.x + BOX_W, parent.y + BOX_H // 2, child.x, child.y + BOX_H // 2)
