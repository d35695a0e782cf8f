"""``edgelm model list | info | download | convert | optimize | run | load | unload | add | remove``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from edgelm import daemon
from edgelm.catalog import Catalog, CatalogEntry
from edgelm.cli.common import (
    JSON_OPTION,
    console,
    fail,
    hide_secret,
    human_bytes,
    print_table,
    settings_of,
    show,
)
from edgelm.client import EdgelmClient
from edgelm.model_cache import ModelStore
from edgelm.settings import Settings

app = typer.Typer(help="Find, download, register and run models.")


def _catalog(settings: Settings) -> Catalog:
    return Catalog.load(settings.home)


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """The catalog: aliases, tiers, sizes and whether each model is downloaded."""
    settings = settings_of(ctx)
    store = ModelStore(settings)
    rows = [
        {
            "alias": entry.alias,
            "aliases": entry.aliases,
            "tier": entry.tier,
            "name": entry.name,
            "engine": entry.engine_name(settings.compute.engine),
            "parameters": entry.parameters,
            "quantization": entry.quantization,
            "size_bytes": entry.size_bytes,
            "license": entry.license,
            "cached": store.is_ready(entry),
            "user": entry.user,
        }
        for entry in _catalog(settings)
    ]
    show(rows, as_json, lambda: print_table(_models_table(rows)))


def _models_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="edgelm models")
    for column in ("alias", "tier", "name", "params", "quant", "size", "licence", "cached"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["alias"],
            row["tier"],
            row["name"] or "-",
            row["parameters"] or "-",
            row["quantization"] or "-",
            human_bytes(row["size_bytes"]),
            row["license"] or "-",
            "yes" if row["cached"] else "no",
        )
    return table


@app.command("info")
def info(ctx: typer.Context, alias: str, as_json: bool = JSON_OPTION) -> None:
    """Everything the catalog knows about one model."""
    settings = settings_of(ctx)
    entry = _catalog(settings).resolve(alias)
    store = ModelStore(settings)
    data = entry.model_dump(mode="json")
    data["options"] = {k: hide_secret(k, v) for k, v in entry.options.items()}
    if entry.needs_file:
        data["cached_path"] = str(store.path_for(entry))
        data["cached"] = store.is_cached(entry)
    else:
        data["cached"] = True
    data["serves_with"] = variant_choice(settings, _catalog(settings), alias)
    show(data, as_json, lambda: print_table(_info_table(entry, data)))


def variant_choice(settings: Settings, catalog: Catalog, alias: str) -> dict[str, Any]:
    """Which variant a bare alias loads here and why, with the measured figures."""
    from edgelm.variants import VariantChooser

    choice = VariantChooser(settings, ModelStore(settings).is_ready).choose(catalog, alias)
    return {
        "variant": choice.entry.alias,
        "engine": choice.entry.engine_name(settings.compute.engine),
        "how": choice.how,
        "why": choice.reason,
        "measured": choice.record.as_dict() if choice.record else None,
    }


def _info_table(entry: CatalogEntry, data: dict[str, Any]) -> Table:
    table = Table(show_header=False, title=entry.alias)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    shown_below = ("source", "options", "cached_path", "cached", "serves_with")
    for key, value in data.items():
        if key not in shown_below and value not in (None, "", [], {}):
            table.add_row(key, str(value))
    for i, source in enumerate(entry.source, 1):
        if source.kind == "hub":
            where = f"{source.repo}/{source.file}@{source.revision}"
        else:
            where = f"{len(source.parts)} PyPI package(s): {source.parts[0].package} …"
        table.add_row(f"source {i} ({source.kind})", where)
    if entry.needs_file:
        table.add_row("path", data["cached_path"])
        table.add_row("cached", "yes" if data["cached"] else "no")
    chosen = data["serves_with"]
    table.add_row("serves with", f"{chosen['variant']} ({chosen['engine']}): {chosen['why']}")
    if chosen["measured"]:
        table.add_row("measured", _figures_text(chosen["measured"]))
    return table


def _figures_text(record: dict[str, Any]) -> str:
    rows = [
        f"{f['variant']}: pp {f['pp_tokens_per_s'] or '-'}, tg {f['tg_tokens_per_s']} tok/s"
        for f in record["figures"]
    ]
    return "; ".join(rows) + f" (on {record['machine'].get('cpu')}, {record['measured_at']})"


def download_with_progress(settings: Settings, entry: CatalogEntry, force: bool = False) -> Path:
    """Download ``entry`` showing a progress bar; used by ``model download`` and ``model run``."""
    store = ModelStore(settings)
    if store.is_cached(entry) and not force:
        return store.path_for(entry)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console(), transient=False) as progress:
        task = progress.add_task(entry.alias, total=entry.size_bytes or None)

        def report(stage: str, done: int, total: int | None) -> None:
            progress.update(
                task, description=f"{entry.alias}: {stage}", completed=done, total=total
            )

        return store.download(entry, progress=report, force=force)


@app.command("download")
def download(
    ctx: typer.Context,
    alias: str,
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
) -> None:
    """Download a model, verify its SHA-256 and place it in the cache."""
    settings = settings_of(ctx)
    entry = _catalog(settings).resolve(alias)
    if not entry.needs_file:
        console().print(f"'{entry.alias}' needs no download ({entry.engine} engine)")
        return
    path = download_with_progress(settings, entry, force=force)
    console().print(f"[green]✓[/] {entry.alias} ready at {path}")


@app.command("convert")
def convert(
    ctx: typer.Context,
    alias: str,
    to: str = typer.Option("onnx", "--to", help="Target format (onnx: ONNX Runtime GenAI)."),
    precision: str = typer.Option("int4", help="Weights: int4, int8, fp16 or fp32."),
    provider: str = typer.Option(
        "cpu", help="Execution provider the model is built for: cpu, cuda, dml or webgpu."
    ),
    force: bool = typer.Option(False, "--force", help="Convert again even if converted."),
) -> None:
    """Convert a downloaded GGUF model for another engine; it appears as ALIAS:onnx-cpu-int4.

    The first conversion installs its tools (torch, transformers, onnxruntime-genai's model
    builder) into a separate environment under $EDGELM_HOME/tools, from the package index.
    """
    from rich.markup import escape

    from edgelm.convert import convert_to_onnx

    if to != "onnx":
        fail(f"cannot convert to '{to}'; the only target is: onnx")
    settings = settings_of(ctx)
    out = console()
    with out.status(f"converting {alias}…") as status:

        def report(line: str) -> None:
            headings = ("step ", "warning:", "installing", "creating", "conversion", "checkpoint")
            if line.startswith(headings):
                style = "yellow" if line.startswith("warning:") else "bold"
                out.print(f"[{style}]{escape(line)}[/]")
            status.update(escape(line[:120]))

        result = convert_to_onnx(
            alias,
            settings,
            precision=precision,
            provider=provider,
            force=force,
            progress=report,
        )
    peak = human_bytes(result.peak_rss_bytes) if result.peak_rss_bytes else "-"
    how = "already converted" if result.cached else f"converted in {result.seconds:.0f} s"
    out.print(
        f"[green]✓[/] {result.alias}: {how}, {human_bytes(result.size_bytes)} at {result.path} "
        f"(peak memory {peak})"
    )
    out.print(f"  run it: edgelm model run {result.alias}")


@app.command("optimize")
def optimize(
    ctx: typer.Context,
    alias: str,
    n_prompt: int = typer.Option(256, "--n-prompt", help="Prompt tokens for the pp figure."),
    n_gen: int = typer.Option(64, "--n-gen", help="Generated tokens for the tg figure."),
    reps: int = typer.Option(3, help="Repetitions of each figure (mean)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Measure every variant of a model this machine can run; serve the alias with the fastest.

    Uses the bench's micro mode (raw pp/tg, as 'bench run --micro'), records the result in
    $EDGELM_HOME/variants.json with this CPU's identity and the date, and from then on
    'model run', the service and the router load the fastest variant for the bare alias
    (unless a variant is named, or pinned with the setting models.pin). Close other
    programs first: figures from a busy machine choose badly.
    """
    from edgelm.bench.micro import micro_measure
    from edgelm.variants import optimize as measure_variants

    settings = settings_of(ctx)
    out = console()
    with out.status(f"measuring the variants of {alias}…") as status:

        def report(line: str) -> None:
            if line.startswith("measuring"):
                status.update(line)
            else:
                out.print(line)

        record = measure_variants(
            alias,
            settings,
            micro_measure(n_prompt, n_gen, reps),
            ModelStore(settings).is_ready,
            progress=report,
        )
    data = record.as_dict()
    if as_json:
        show(data, True, lambda: None)
        return
    fastest = record.fastest
    assert fastest is not None
    others = [f for f in record.ranking if f is not fastest]
    gain = f", {fastest.tg / others[0].tg:.2f}x the next one's decode" if others else ""
    out.print(
        f"[green]✓[/] {record.alias} now serves with {fastest.variant} "
        f"({fastest.engine}, tg {fastest.tg:.1f} tok/s{gain}); recorded in "
        f"{settings.home / 'variants.json'}"
    )


@app.command("add")
def add(
    ctx: typer.Context,
    name: str,
    file: Path | None = typer.Option(None, "--file", help="A local GGUF file to register."),
    engine: str | None = typer.Option(None, help="Engine: llamacpp, onnx, remote or fake."),
    upstream: list[str] = typer.Option(
        [],
        help="Remote models: the upstream's model name; or an upstream URL (http://host:port/v1, "
        "URL#name when that replica knows the model by another name). Repeat the URL for "
        "replicas of the model: requests are balanced and fail over between them.",
    ),
    base_url: list[str] = typer.Option(
        [], help="Remote models: the upstream's base URL (repeat for replicas)."
    ),
    tier: str = typer.Option("custom", help="tiny, slm, llm or custom."),
    context_length: int = typer.Option(4096, help="Context length to assume."),
) -> None:
    """Register a local model file, or a model on a remote OpenAI-compatible upstream."""
    settings = settings_of(ctx)
    options: dict[str, Any] = {}
    urls = [*base_url, *(u for u in upstream if u.startswith(("http://", "https://")))]
    names = [u for u in upstream if not u.startswith(("http://", "https://"))]
    if len(names) > 1:
        fail(f"give the upstream's model name once (got {', '.join(names)})")
    if urls and engine is None:
        engine = "remote"
    if urls and engine != "remote":
        fail(f"upstream URLs are for remote models, not the {engine} engine")
    if engine == "remote":
        if len(urls) == 1 and "#" not in urls[0]:
            options["base_url"] = urls[0]
        elif urls:
            options["replicas"] = urls
    elif engine == "fake":
        pass
    else:
        if file is None:
            fail("give the model file with --file PATH (or --engine remote / fake)")
        file = file.expanduser().resolve()
        if not file.is_file():
            fail(f"{file} does not exist or is not a file")
        with file.open("rb") as handle:
            magic = handle.read(4)
        if file.suffix.lower() == ".gguf" and magic != b"GGUF":
            fail(f"{file} is not a GGUF file (its header is {magic!r})")
    entry = CatalogEntry(
        alias=name,
        name=name,
        tier=tier,  # type: ignore[arg-type]
        engine=engine,  # type: ignore[arg-type]
        path=file,
        filename=file.name if file else "",
        size_bytes=file.stat().st_size if file else 0,
        context_length=context_length,
        upstream_model=names[0] if names else None,
        options=options,
    )
    _catalog(settings).add_user_entry(entry)
    where = f" ({len(urls)} replicas)" if len(urls) > 1 else ""
    console().print(f"[green]✓[/] registered {name}{where}")


@app.command("remove")
def remove(ctx: typer.Context, name: str) -> None:
    """Forget a model registered with 'model add' (its file is left alone)."""
    if not _catalog(settings_of(ctx)).remove_user_entry(name):
        fail(f"'{name}' is not a model you registered")
    console().print(f"removed {name}")


@app.command("export-web")
def export_web(
    ctx: typer.Context,
    alias: str,
    force: bool = typer.Option(False, "--force", help="Export again even if up to date."),
) -> None:
    """Export a downloaded GGUF model to ONNX for in-browser inference in the playground."""
    from edgelm.web_export import export_web_model

    settings = settings_of(ctx)
    out = console()
    with out.status(f"exporting {alias} for the browser (a minute or two)…"):
        path = export_web_model(alias, settings, force=force, progress=lambda m: out.print(m))
    out.print(f"[green]✓[/] in-browser model ready at {path}")
    out.print(
        "  open the playground (edgelm service start, then /) and pick it in 'In this browser'"
    )


def _client(settings: Settings) -> EdgelmClient:
    return EdgelmClient.for_settings(settings)


@app.command("load")
def load(ctx: typer.Context, alias: str) -> None:
    """Load a model into the running service."""
    settings = settings_of(ctx)
    data = _client(settings).load(alias)
    console().print(f"loaded {data['id']} in {data['load_seconds']} s")


@app.command("unload")
def unload(ctx: typer.Context, alias: str) -> None:
    """Unload a model from the running service."""
    settings = settings_of(ctx)
    data = _client(settings).unload(alias)
    console().print(f"{data['id']}: {'unloaded' if data['unloaded'] else 'was not loaded'}")


@app.command("run")
def run(
    ctx: typer.Context,
    alias: str,
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Answer once and exit."),
    system: str | None = typer.Option(None, "--system", help="A system prompt."),
    temperature: float | None = typer.Option(None, help="Sampling temperature."),
    max_tokens: int | None = typer.Option(None, help="Longest answer in tokens."),
) -> None:
    """Chat with a model in the terminal, starting the service and downloading if needed."""
    from edgelm.chat import ChatSession, run_repl

    settings = settings_of(ctx)
    entry = _catalog(settings).resolve(alias)
    client = _client(settings)
    if not settings.client.endpoint and entry.needs_file:
        download_with_progress(settings, entry)
    if not client.is_up():
        if settings.client.endpoint:
            fail(f"the service at {settings.endpoint} is not reachable")
        with console().status("starting the edgelm service…"):
            daemon.start_detached(settings)
    with console().status(f"loading {entry.alias}…"):
        loaded = client.load(entry.alias)
    if loaded.get("id") not in (None, entry.alias):
        console().print(f"[dim]{entry.alias} serves with {loaded['id']} (edgelm model info)[/]")
    params = {"temperature": temperature, "max_tokens": max_tokens}
    session = ChatSession(client, entry.alias, system=system, params=params)
    if prompt is not None:
        run_repl(session, console(), once=prompt)
    else:
        run_repl(session, console())
