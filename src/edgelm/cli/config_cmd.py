"""``edgelm config get | set | unset | list | path``."""

from __future__ import annotations

import json
import types
import typing

import typer
from rich.table import Table

from edgelm.cli.common import JSON_OPTION, console, hide_secret, print_table, settings_of, show
from edgelm.engines.auto_explain import explain_auto
from edgelm.settings import get_value, iter_keys, set_in_file, unset_in_file

app = typer.Typer(help="Read and change settings (stored in $EDGELM_HOME/config.toml).")


def _show(value: object, key: str = "") -> str:
    value = hide_secret(key, value)
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
def list_(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Every key with its type, current value and description; for an "auto" value, what it
    comes to on this machine and why (``effective`` in the JSON)."""
    settings = settings_of(ctx)
    effective = explain_auto(settings)
    rows = []
    for key, field in iter_keys():
        row = {
            "key": key,
            "type": _type_name(field.annotation),
            "value": _show(get_value(settings, key), key),
            "description": field.description or "",
        }
        if key in effective:
            row["effective"] = effective[key]
        rows.append(row)
    show(rows, as_json, lambda: print_table(_settings_table(settings.config_path, rows)))


def _type_name(annotation: object) -> str:
    """``int``, ``str``... and unions as ``int | 'auto'``."""
    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args and typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if annotation is type(None):
        return "None"
    name = getattr(annotation, "__name__", None) or str(annotation)
    return name.replace("typing.", "")


def _settings_table(path: object, rows: list[dict[str, str]]) -> Table:
    table = Table(title=f"settings ({path})")
    for column in ("key", "type", "value", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        value = f"{row['value']} ({row['effective']})" if "effective" in row else row["value"]
        table.add_row(row["key"], row["type"], value, row["description"])
    return table


@app.command("path")
def path(ctx: typer.Context) -> None:
    """Where the config file lives."""
    console().print(str(settings_of(ctx).config_path))
