"""``edgelm system info``: what this machine offers to the engines."""

from __future__ import annotations

import typer
from rich.table import Table

from edgelm.cli.common import JSON_OPTION, human_bytes, print_table, settings_of, show
from edgelm.errors import EdgelmError
from edgelm.settings import Settings
from edgelm.sysinfo import system_info

app = typer.Typer(help="Describe this machine.")


@app.command("info")
def info(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """CPU, SIMD features, memory, GPUs, engines, ONNX Runtime providers, chosen variants."""
    data = system_info()
    data["variants"] = chosen_variants(settings_of(ctx))
    show(data, as_json, lambda: print_table(_system_table(data)))


def chosen_variants(settings: Settings) -> dict[str, str]:
    """For each model measured by 'model optimize': the variant it serves with, and why."""
    from edgelm.catalog import Catalog
    from edgelm.model_cache import ModelStore
    from edgelm.variants import VariantChooser

    catalog = Catalog.load(settings.home)
    chooser = VariantChooser(settings, ModelStore(settings).is_ready)
    out: dict[str, str] = {}
    for alias in chooser.records.aliases():
        try:
            choice = chooser.choose(catalog, alias)
        except EdgelmError as exc:  # a model removed from the catalog, a bad pin
            out[alias] = f"? ({exc})"
            continue
        out[alias] = f"{choice.entry.alias}: {choice.reason}"
    return out


def _system_table(data: dict[str, object]) -> Table:
    table = Table(title="system", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        table.add_row(key, _render(key, value))
    return table


def _render(key: str, value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_render(k, v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_render(key, v) for v in value) or "none"
    if isinstance(value, int) and ("bytes" in key or key.startswith("ram")):
        return human_bytes(value)
    return str(value)
