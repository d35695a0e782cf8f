"""``edgelm service start | stop | status | restart``."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from edgelm import daemon
from edgelm.cli.common import JSON_OPTION, console, fail, print_json, print_table, settings_of
from edgelm.client import EdgelmClient

app = typer.Typer(help="Run the local OpenAI-compatible service.")


@app.command("start")
def start(
    ctx: typer.Context,
    foreground: bool = typer.Option(
        False, "--foreground", "-f", help="Serve in this terminal instead of in the background."
    ),
    host: str | None = typer.Option(None, help="Bind address (setting service.host)."),
    port: int | None = typer.Option(None, help="TCP port (setting service.port)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Load this model at start."),
    api_key: str | None = typer.Option(None, "--api-key", help="Require this bearer key."),
) -> None:
    """Start the service (detached unless --foreground)."""
    settings = settings_of(
        ctx, **{"service.host": host, "service.port": port, "service.api_key": api_key}
    )
    if foreground:
        daemon.serve_foreground(settings, preload=model)
        return
    current = daemon.info(settings)
    if current.running:
        console().print(f"the service is already running at {current.endpoint}")
        return
    started = daemon.start_detached(settings, preload=model)
    console().print(
        f"service started at [bold]{started.endpoint}[/] (pid {started.pid}, log {started.log_file})"
    )


@app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop the detached service (waits for open streams to finish)."""
    if daemon.stop(settings_of(ctx)):
        console().print("service stopped")
    else:
        console().print("no service was running")


@app.command("restart")
def restart(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m"),
    api_key: str | None = typer.Option(None, "--api-key", help="Require this bearer key."),
) -> None:
    """Stop, then start the service in the background (with --api-key, requiring that key:
    like `start`, a key given there is not remembered)."""
    settings = settings_of(ctx, **{"service.api_key": api_key})
    daemon.stop(settings)
    started = daemon.start_detached(settings, preload=model)
    console().print(f"service restarted at [bold]{started.endpoint}[/] (pid {started.pid})")


@app.command("status")
def status(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Endpoint, uptime and loaded models of the service (exit code 1 when it is not running).

    With ``--json``: ``{"running": false, "endpoint": …}`` when it is down, else ``running``,
    ``endpoint`` and the service's own ``status`` report (``status.loaded`` lists the models).
    """
    settings = settings_of(ctx)
    client = EdgelmClient.for_settings(settings)
    if not client.is_up():
        if as_json:
            print_json({"running": False, "endpoint": settings.endpoint})
            raise typer.Exit(1)
        fail(
            f"the service at {settings.endpoint} is not running; start it with: edgelm service start"
        )
    data = client.status()
    if as_json:
        print_json({"running": True, "endpoint": settings.endpoint, "status": data})
        return
    _print_status(settings.endpoint, data)


def _print_status(endpoint: str, data: dict[str, Any]) -> None:
    console().print(f"service running at [bold]{endpoint}[/] (edgelm {data['version']})")
    console().print(f"uptime {data['uptime_s']} s, model dir {data['model_dir']}")
    loaded = data.get("loaded") or []
    if not loaded:
        console().print("no models loaded")
        return
    table = Table(title="loaded models")
    for column in ("model", "engine", "memory", "requests", "idle s", "threads", "streams"):
        table.add_column(column)
    notes = []
    for item in loaded:
        runtime = item.get("runtime") or {}
        table.add_row(
            str(item["id"]),
            str(item["engine"]),
            f"{int(item['memory_bytes']) / 1e6:.0f} MB",
            str(item["requests"]),
            str(item["idle_seconds"]),
            _threads_cell(runtime),
            str(runtime.get("slots", "-")),
        )
        for key in ("threads_reason", "parallel_reason"):
            if runtime.get(key):
                notes.append(f"{item['id']}: {runtime[key]}")
    print_table(table)
    for note in notes:
        console().print(note, markup=False, highlight=False)


def _threads_cell(runtime: dict[str, Any]) -> str:
    """"1 of 2 (auto)" for adaptive threads, "2" for a fixed count, "-" for none."""
    threads = runtime.get("threads")
    if threads is None:
        return "-"
    if runtime.get("threads_mode") == "auto":
        return f"{threads} of {runtime.get('threads_max')} (auto)"
    return str(threads)
