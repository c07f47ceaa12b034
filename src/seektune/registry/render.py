"""How `seektune registry` shows versions on a terminal (rich tables and trees); `--json` skips this."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

_SHOWN_METRICS = 2


def _metric_text(metrics: dict[str, Any], primary: str | None) -> str:
    names = [m for m in (primary, "perplexity") if m and metrics.get(m) is not None]
    if not names:  # no quality metric: what there is (size, speed)
        names = [m for m in metrics if m not in ("n", "mean_new_tokens") and metrics[m] is not None]
    parts = [f"{m} {_num(metrics[m])}" for m in names[:_SHOWN_METRICS]]
    return ", ".join(parts) or "-"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _size(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def versions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="registered versions")
    table.add_column("version", no_wrap=True)
    for column in ("kind", "stage", "tags", "metrics", "size", "created"):
        table.add_column(column)
    for row in rows:
        removed = " (no files)" if row["artefact_removed"] else ""
        table.add_row(
            row["ref"],
            row["kind"],
            row["stage"] + removed,
            ", ".join(row["tags"]) or "-",
            _metric_text(row["metrics"], row["primary_metric"]),
            _size(row["size_bytes"]),
            (row["created_at"] or "")[:10],
        )
    return table


def print_version(view: dict[str, Any], console: Console, with_config: bool = False) -> None:
    artefact = view["artefact"]
    lines = [
        ("version", view["ref"]),
        ("kind / method", f"{view['kind']} / {view['method'] or '-'}"),
        ("stage", view["stage"]),
        ("tags", ", ".join(view["tags"]) or "-"),
        ("base model", f"{view['base_model']} (revision {view['base_revision'] or '-'})"),
        ("base fingerprint", view["base_fingerprint"] or "-"),
        ("parent", view["parent"] or "- (trained on the base)"),
        ("derived", ", ".join(view["children"]) or "-"),
        ("data fingerprint", view["data_fingerprint"] or "-"),
        ("artefact", f"{artefact['path']} ({artefact['files']} files, {_size(artefact['bytes'])})"),
        ("sha256", artefact["sha256"]),
        ("registered from", artefact["registered_from"] or "-"),
        ("run", view["run_dir"] or "-"),
        ("created", f"{view['created_at']} by {view['created_by']}"),
    ]
    if artefact["removed_at"]:
        lines.append(("files removed", artefact["removed_at"]))
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in lines:
        table.add_row(key, str(value))
    console.print(table)
    if view["evaluations"]:
        evaluations = Table(title="evaluations")
        for column in ("source", "at", "metrics", "test data"):
            evaluations.add_column(column)
        for e in view["evaluations"]:
            evaluations.add_row(
                e["source"],
                (e["at"] or "")[:16],
                _metric_text(e["metrics"], view["primary_metric"]),
                (e["data_fingerprint"] or "-")[:12],
            )
        console.print(evaluations)
    else:
        console.print("no evaluation yet: seektune eval --model registry:" + view["ref"])
    if view["stage_history"]:
        history = Table(title="stage history")
        for column in ("at", "from", "to", "by", "reason"):
            history.add_column(column)
        for t in view["stage_history"]:
            history.add_row((t["at"] or "")[:16], t["from"], t["to"], t["by"], t["reason"] or "")
        console.print(history)
    if with_config and view.get("config_yaml"):
        console.print(view["config_yaml"], markup=False, highlight=False)


def _label(view: dict[str, Any], focus: str | None) -> str:
    mark = "[bold]" if view["ref"] == focus else ""
    end = "[/bold]" if mark else ""
    metrics = _metric_text(view["metrics"], view["primary_metric"])
    stage = f" ({view['stage']})" if view["stage"] != "none" else ""
    return f"{mark}{escape(view['ref'])}{end}  {view['kind']}{stage}  {escape(metrics)}"


def lineage_tree(lineage: dict[str, Any]) -> list[Tree]:
    """One tree per root: the base model, the ancestors, then the version and all derived from it."""
    trees = []
    focus = lineage.get("focus")
    for entry in lineage["trees"]:
        base = entry["base"]
        revision = f" @ {base['revision']}" if base.get("revision") else ""
        tree = Tree(f"{base['model'] or 'unknown base'}{revision}  base model")
        node = tree
        for ancestor in entry["ancestors"]:
            node = node.add(_label(ancestor, focus))
        _add_descendants(node, entry["version"], focus)
        trees.append(tree)
    return trees


def _add_descendants(node: Tree, view: dict[str, Any], focus: str | None) -> None:
    child = node.add(_label(view, focus))
    for grandchild in view["children"]:
        _add_descendants(child, grandchild, focus)


def compare_table(comparison: dict[str, Any]) -> Table:
    table = Table(title=f"{comparison['a']} (A) against {comparison['b']} (B)")
    for column in ("", "A", "B", "B - A"):
        table.add_column(column, justify="left" if not column else "right")
    for key, pair in comparison["facts"].items():
        table.add_row(key, str(pair["a"]), str(pair["b"]), "" if pair["a"] == pair["b"] else "differs")
    for row in comparison["metrics"]:
        diff = "" if row["diff"] is None else f"{row['diff']:+.4g}"
        table.add_row(row["metric"], _num(row["a"]), _num(row["b"]), diff)
    return table
