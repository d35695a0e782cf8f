"""``edgelm config get | set | unset | list | path``."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from edgelm.cli.common import console, settings_of
from edgelm.settings import get_value, iter_keys, set_in_file, unset_in_file

app = typer.Typer(help="Read and change settings (stored in $EDGELM_HOME/config.toml).")


SECRET_SUFFIXES = ("api_key", "token")


def _show(value: object, key: str = "") -> str:
    if value and key.endswith(SECRET_SUFFIXES):
        return "****"
    if hasattr(value, "model_dump"):
        return json.dumps(value.model_dump(mode="json"))  # type: ignore[attr-defined]
    if isinstance(value, list | dict | bool) or value is None:
        return json.dumps(value, default=str)
    return str(value)


@app.command("get")
def get(ctx: typer.Context, key: str) -> None:
    """Print the effective value of KEY (after file, environment and flags)."""
    console().print(_show(get_value(settings_of(ctx), key)))


@app.command("set")
def set_(ctx: typer.Context, key: str, value: str) -> None:
    """Set KEY to VALUE in the config file; the value is checked against the schema."""
    settings = settings_of(ctx)
    stored = set_in_file(settings.home, key, value)
    console().print(f"{key} = {_show(stored)}")


@app.command("unset")
def unset(ctx: typer.Context, key: str) -> None:
    """Remove KEY from the config file, so its default (or env) applies again."""
    settings = settings_of(ctx)
    get_value(settings, key)  # rejects unknown keys
    unset_in_file(settings.home, key)
    console().print(f"{key} reset to {_show(get_value(settings_of(ctx), key))}")


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every key with its type, current value and description."""
    settings = settings_of(ctx)
    rows = []
    for key, field in iter_keys():
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        rows.append(
            (
                key,
                annotation.replace("typing.", ""),
                get_value(settings, key),
                field.description or "",
            )
        )
    if as_json:
        console().print_json(
            json.dumps(
                [
                    {"key": k, "type": t, "value": _show(v, k), "description": d}
                    for k, t, v, d in rows
                ],
                default=str,
            )
        )
        return
    table = Table(title=f"settings ({settings.config_path})")
    for column in ("key", "type", "value", "description"):
        table.add_column(column, overflow="fold")
    for key, type_, value, description in rows:
        table.add_row(key, type_, _show(value, key), description)
    console().print(table)


@app.command("path")
def path(ctx: typer.Context) -> None:
    """Where the config file lives."""
    console().print(str(settings_of(ctx).config_path))
