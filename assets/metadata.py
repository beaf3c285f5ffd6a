"""Stage figures as Dagster metadata: numbers stay numbers (plottable across runs in the UI), tables
become Markdown, plots become small PNGs embedded in Markdown (the UI renders data: URIs, and the
metadata then needs no file server and survives the output folder being rebuilt).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.io import StageResult


def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of dict rows (columns: the union of keys, in first-seen order)."""
    if not rows:
        return "_none_"
    cols = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def mapping_table(mapping: Mapping[str, Any], key: str = "name") -> str:
    """{name: scalar} or {name: {col: value}} as a Markdown table."""
    rows = [
        {key: name, **value} if isinstance(value, Mapping) else {key: name, "value": value}
        for name, value in mapping.items()
    ]
    return md_table(rows)


def png_markdown(fig: Any, title: str) -> dg.MetadataValue:
    """Render a matplotlib figure as a base64 PNG inside Markdown, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # headless: the code server and run workers have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def histogram_plot(edges: Sequence[float], counts: Sequence[int], title: str, xlabel: str) -> dg.MetadataValue:
    """Bars of a precomputed histogram (len(edges) == len(counts) + 1)."""
    fig, ax = _figure(title, xlabel, "rows")
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(list(edges[:-1]), list(counts), width=widths, align="edge", edgecolor="white")
    return png_markdown(fig, title)


def curve_plot(
    series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str
) -> dg.MetadataValue:
    """Lines of (x, y) points, one per named series (e.g. train and eval loss per step)."""
    fig, ax = _figure(title, xlabel, ylabel)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="." if len(points) < 50 else None, label=name)
    ax.legend()
    return png_markdown(fig, title)


def image_markdown(path: Path, title: str) -> dg.MetadataValue:
    """An existing PNG (e.g. from the evaluation report) embedded like a rendered plot."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def figures(metrics: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """Stage metrics as metadata: numbers/strings/bools as they are (non-finite floats as text, which
    Dagster's float metadata rejects), mappings of scalars as Markdown tables, the rest as JSON."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in skip or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = dg.MetadataValue.text(str(value))
        elif _is_number(value) or isinstance(value, (str, bool)):
            out[key] = value
        elif isinstance(value, Mapping) and value and all(
            _is_number(v) or isinstance(v, (str, bool, Mapping)) for v in value.values()
        ):
            out[key] = dg.MetadataValue.md(mapping_table(value))
        else:
            out[key] = dg.MetadataValue.json(value if isinstance(value, (list, dict)) else str(value))
    return out


def output_paths(result: StageResult) -> dict[str, Any]:
    return {f"path/{name}": dg.MetadataValue.path(str(path)) for name, path in result.outputs.items()}
