"""What every edgelm report is made of: atomic file writes, escaped HTML, tables, plots.

The bench, eval and hybrid-router reports are single offline HTML files (CSS inline, no
scripts, plots as PNG data URIs), because reports get mailed, archived and opened on machines
without internet. Plots are drawn with matplotlib's Agg canvas without pyplot, so there is no
global backend state and nothing needs a display; matplotlib is imported only when a figure is
made. Files are written through a temporary file and a rename, so a reader (or a crash) never
leaves half a report or half a config file.

This module imports nothing from edgelm, so any layer may use it.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
.errors { color: #a00; }
"""
"""The one style of every HTML report."""


# ---------------------------------------------------------------------- files


def write_atomically(path: Path, text: str, newline: str | None = None) -> Path:
    """Write ``text`` via a temporary file in the same directory and a rename, so a reader
    never sees half a file; the parent directory is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------- HTML


def escape(value: Any) -> str:
    """Any value as HTML text, quotes included (safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def html_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A table with every header and cell escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: str, css: str = CSS) -> str:
    """A whole self-contained page: ``title`` is escaped here, ``body`` is HTML already."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{css}</style></head><body>{body}</body></html>\n"
    )


# ---------------------------------------------------------------------- plots


def mpl_text(text: str) -> str:
    """Text for matplotlib labels: a ``$`` in a model or target name must not start mathtext."""
    return text.replace("$", r"\$")


def new_figure(width: float = 8, height: float = 4) -> Figure:
    """A figure on its own Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_data_uri(figure: Figure) -> str:
    """The figure as a PNG ``data:`` URI, to inline in an offline HTML page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
