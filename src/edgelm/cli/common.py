"""What every command shares: settings from global flags, one console, one way to fail."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

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


# Output for people and for scripts: every listing and status command takes --json.

JSON_OPTION = typer.Option(
    False, "--json", help="Print one JSON document and nothing else (for scripts and jq)."
)

SECRET_SUFFIXES = ("api_key", "token")


def hide_secret(key: str, value: Any) -> Any:
    """``****`` for a set API key or token, so listings can be pasted into a bug report."""
    return "****" if value and key.endswith(SECRET_SUFFIXES) else value


def print_json(data: Any) -> None:
    """``data`` as one JSON document on stdout and nothing else, so ``edgelm … --json | jq``
    works: plain text (no rich markup, colour or wrapping at the terminal width)."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def show(data: Any, as_json: bool, human: Callable[[], object]) -> None:
    """What every listing and status command ends with: ``data`` as JSON with ``--json``,
    otherwise ``human()`` prints it for people (tables, sentences)."""
    if as_json:
        print_json(data)
    else:
        human()


def show_runs(rows: Sequence[Mapping[str, Any]], as_json: bool, what: str) -> None:
    """A listing of stored runs (bench history, eval runs): JSON, or a table of ``what``
    runs, or a line saying there are none yet."""

    def human() -> None:
        if not rows:
            console().print(f"no {what} runs stored yet")
            return
        print_table(records_table(f"{what} runs", [_without(r, "rerun") for r in rows]))
        for row in rows:  # a run whose process died or was stopped: how to finish it
            if row.get("rerun"):
                console().print(
                    f"run {row['id']} was interrupted; finish it with: {row['rerun']}",
                    markup=False,
                    highlight=False,
                )

    show(rows, as_json, human)


def _without(row: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != key}


# Wide enough for any table's natural width; only used to measure.
_UNBOUNDED = 10_000
# Characters a folded column keeps when a terminal is too narrow for the whole table.
_NARROWEST = 4


def print_table(table: Table, key_columns: int = 1, out: Console | None = None) -> None:
    """Print ``table`` without ever cutting its first ``key_columns`` columns: the alias, id or
    name that a reader or ``grep`` looks for.

    Left alone, rich fits a table to the terminal by shrinking every column and cutting words
    with '…'; piped, it has no terminal and assumes 80 columns, so ``edgelm model list | grep
    qwen2.5-1.5b`` found nothing. Here the key columns never wrap and keep their widest cell,
    and the other columns fold onto more lines instead of losing text. In a terminal the table
    fits its width when folding can make room (wider when it cannot); piped, every row stays on
    one line at the table's natural width, which is what ``grep`` and ``awk`` read.
    """
    out = out or console()
    wide = out.options.update_width(_UNBOUNDED)

    def widest(column: Column) -> int:
        cells = [column.header, *column.cells]
        return max(Measurement.get(out, wide, c).maximum for c in cells)

    folding = 0  # how much the folding columns can give up
    for index, column in enumerate(table.columns):
        if index < key_columns:
            column.no_wrap = True
            column.min_width = max(column.min_width or 0, widest(column))
        else:
            if column.overflow == "ellipsis":
                column.overflow = "fold"
            if not column.no_wrap and column.width is None:
                folding += max(0, widest(column) - _NARROWEST)
    natural = Measurement.get(out, wide, table).maximum
    needed = natural - folding if out.is_terminal else natural
    if needed <= out.width:
        out.print(table)
        return
    terminal_width = out.width
    out.width = needed
    try:
        out.print(table)
    finally:
        out.width = terminal_width
