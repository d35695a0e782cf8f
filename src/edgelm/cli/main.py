"""Entry point of the ``edgelm`` command, in the shape of Foundry Local's CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import typer
from pydantic import ValidationError
from rich.markup import escape
from typer.core import TyperGroup

from edgelm import __version__
from edgelm.cli import (
    bench_cmd,
    cache_cmd,
    config_cmd,
    eval_cmd,
    hybrid_cmd,
    model_cmd,
    rag_cmd,
    service_cmd,
    system_cmd,
)
from edgelm.cli.common import err_console
from edgelm.errors import EdgelmError


class EdgelmGroup(TyperGroup):
    """Turns any edgelm error raised by a command into one red line and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except EdgelmError as exc:
            err_console().print(f"[bold red]error:[/] {escape(exc.message)}")
            raise typer.Exit(1) from None
        except ValidationError as exc:  # a value typed on the command line failed the schema
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            err_console().print(f"[bold red]error:[/] {problems}")
            raise typer.Exit(1) from None


app = typer.Typer(
    name="edgelm",
    cls=EdgelmGroup,
    help="Run language models locally behind an OpenAI-compatible service, and measure them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(model_cmd.app, name="model")
app.add_typer(service_cmd.app, name="service")
app.add_typer(cache_cmd.app, name="cache")
app.add_typer(config_cmd.app, name="config")
app.add_typer(system_cmd.app, name="system")
app.add_typer(bench_cmd.app, name="bench")
app.command("compare")(bench_cmd.compare_command)
app.add_typer(hybrid_cmd.app, name="hybrid")
app.add_typer(rag_cmd.app, name="rag")
app.add_typer(eval_cmd.app, name="eval")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgelm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Path | None = typer.Option(
        None, "--home", envvar="EDGELM_HOME", help="State directory (default ~/.edgelm)."
    ),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="Talk to the service at this URL (EDGELM_ENDPOINT)."
    ),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        help="Bearer key every command sends to the service (default: client.api_key, "
        "else service.api_key / EDGELM_API_KEY).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Global options; every command reads its settings through them, and every command
    that talks to a service finds it and its key through :func:`edgelm.client.resolve_service`."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    ctx.obj = {"home": home, "client.endpoint": endpoint, "client.api_key": api_key}


def main() -> None:
    """Run the CLI; an edgelm error is one red line and exit code 1, never a traceback."""
    try:
        app()
    except EdgelmError as exc:
        err_console().print(f"[bold red]error:[/] {escape(exc.message)}")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
