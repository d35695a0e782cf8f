"""``edgelm system info``: what this machine offers to the engines."""

from __future__ import annotations

import typer
from rich.table import Table

from edgelm.cli.common import JSON_OPTION, human_bytes, print_table, show
from edgelm.sysinfo import system_info

app = typer.Typer(help="Describe this machine.")


@app.command("info")
def info(as_json: bool = JSON_OPTION) -> None:
    """CPU, SIMD features, memory, GPUs, engines and ONNX Runtime providers."""
    data = system_info()
    show(data, as_json, lambda: print_table(_system_table(data)))


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
