"""``edgelm cache list | location | remove``: the downloaded model files."""

from __future__ import annotations

import typer
from rich.table import Table

from edgelm.catalog import Catalog
from edgelm.cli.common import (
    JSON_OPTION,
    console,
    fail,
    human_bytes,
    print_table,
    settings_of,
    show,
)
from edgelm.model_cache import ModelStore

app = typer.Typer(help="Manage the model cache ($EDGELM_HOME/models by default).")


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Models on disk with their size."""
    store = ModelStore(settings_of(ctx))
    rows = [
        {"alias": item.alias, "size_bytes": item.size_bytes, "path": str(item.path)}
        for item in store.list()
    ]

    def human() -> None:
        if not rows:
            console().print(f"no models in {store.location()}")
            return
        table = Table(title=str(store.location()))
        for column in ("alias", "size", "path"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["alias"], human_bytes(row["size_bytes"]), row["path"])
        print_table(table)

    show(rows, as_json, human)


@app.command("verify")
def verify(ctx: typer.Context, alias: str | None = typer.Argument(None)) -> None:
    """Check downloaded files against the catalog's SHA-256 (all, or one model)."""
    settings = settings_of(ctx)
    catalog = Catalog.load(settings.home)
    store = ModelStore(settings)
    entries = (
        [catalog.resolve(alias)]
        if alias
        else [e for e in catalog if e.needs_file and e.sha256 and store.is_cached(e) and not e.path]
    )
    if not entries:
        console().print("nothing to verify")
        return
    bad = []
    for entry in entries:
        with console().status(f"hashing {entry.alias}…"):
            ok = store.verify(entry)
        console().print(f"{'[green]ok[/]' if ok else '[red]CORRUPT[/]'}  {entry.alias}")
        if not ok:
            bad.append(entry.alias)
    if bad:
        fail(
            "corrupt: "
            + ", ".join(bad)
            + "; download again with: "
            + "; ".join(f"edgelm model download {a} --force" for a in bad)
        )


@app.command("location")
def location(ctx: typer.Context) -> None:
    """Print the cache directory."""
    console().print(str(ModelStore(settings_of(ctx)).location()))


@app.command("remove")
def remove(ctx: typer.Context, alias: str) -> None:
    """Delete a downloaded model's files."""
    settings = settings_of(ctx)
    entry = Catalog.load(settings.home).resolve(alias)
    if not ModelStore(settings).remove(entry):
        fail(f"'{entry.alias}' is not in the cache")
    console().print(f"removed {entry.alias}")
