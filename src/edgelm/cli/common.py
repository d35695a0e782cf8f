"""What every command shares: settings from global flags, one console, one way to fail."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgelm.settings import Settings, load_settings


def console() -> Console:
    return Console(highlight=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


def settings_of(ctx: typer.Context, **overrides: Any) -> Settings:
    """Settings from all layers, with the global flags (``--home``) and command flags on top."""
    root = ctx.find_root()
    base = dict(root.obj or {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    return load_settings(base)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console().print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def human_bytes(n: int | float | None) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def cell(value: object, key: str = "") -> str:
    """One value as table text: times as local dates, floats to 3 places, lists joined."""
    if key == "created_at" and isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)


def records_table(title: str, rows: Sequence[Mapping[str, Any]]) -> Table:
    """A table with one column per key of the first row (stored runs of bench and eval)."""
    table = Table(title=title)
    keys = list(rows[0]) if rows else []
    for key in keys:
        table.add_column(key)
    for row in rows:
        table.add_row(*(cell(row.get(k), k) for k in keys))
    return table


def split_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: the comma lists of ``--models``, ``--policies``."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def progress_bars() -> tuple[Progress, Callable[[int, int, str], None]]:
    """A progress display and its ``update(done, total, description)``: one bar per
    description (a bench scenario, an eval run), created on first use."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(),
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(done: int, total: int, description: str) -> None:
        if description not in tasks:
            tasks[description] = progress.add_task(description, total=total)
        progress.update(tasks[description], completed=done, total=total)

    return progress, update
