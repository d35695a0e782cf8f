"""What every command shares: settings from global flags, one console, one way to fail."""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from rich.console import Console

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
