"""``edgelm eval run | report | diff | list | datasets``: answer quality, stored and compared.

The logic lives in :mod:`edgelm.evals`; these commands parse flags, call it, and print.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgelm.cli.common import (
    JSON_OPTION,
    cell,
    console,
    err_console,
    fail,
    print_table,
    progress_bars,
    settings_of,
    show,
    show_runs,
    split_list,
)
from edgelm.client import EdgelmClient, resolve_service
from edgelm.cost import Prices
from edgelm.evals import harness, runs_db
from edgelm.evals import report as eval_report
from edgelm.evals.datasets import list_datasets
from edgelm.settings import Settings

app = typer.Typer(help="Evaluate answer quality: QA, code and RAG sets, judged and stored.")


def _db(settings: Settings) -> Path:
    return settings.home / "evals.db"


def _client(settings: Settings) -> EdgelmClient:
    client = EdgelmClient.for_settings(settings)
    if not client.is_up():
        client.close()
        fail(
            f"the edgelm service at {settings.endpoint} is not running; start it with: "
            "edgelm service start"
        )
    return client


def _load(settings: Settings, run_ids: list[str]) -> list[eval_report.LoadedRun]:
    return [eval_report.LoadedRun(*runs_db.load_run(_db(settings), rid)) for rid in run_ids]


def _print_report(runs: list[eval_report.LoadedRun], prices: Prices) -> None:
    print_table(eval_report.summary_table(runs, prices))
    metrics = eval_report.metrics_table(runs)
    if metrics is not None:
        print_table(metrics)
    print_table(eval_report.category_table(runs))


def _html_path(settings: Settings, run_ids: list[str], out: Path | None) -> Path:
    if out is not None:
        return out if out.suffix == ".html" else out / "report.html"
    return settings.home / "evals" / "_vs_".join(run_ids) / "report.html"


@app.command("run")
def run(
    ctx: typer.Context,
    models: str | None = typer.Option(
        None, "--models", "-m", help="Comma-separated models: aliases, hybrid, rag:<collection>."
    ),
    dataset: str = typer.Option(
        "general", "--dataset", "-d", help="Shipped set (general, code, rag) or a .jsonl file."
    ),
    resume: str | None = typer.Option(
        None, "--resume", help="Finish an interrupted run (id, prefix or 'latest')."
    ),
    judge: str | None = typer.Option(None, "--judge", help="Judge model for the 1–5 rubric."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Only the first N items."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    seed: int = typer.Option(0, "--seed", help="Sampling seed sent with every request."),
    code_timeout: float = typer.Option(10.0, "--code-timeout", help="Seconds per code test run."),
    rag_k: int | None = typer.Option(None, "--rag-k", help="Contexts counted by precision@k."),
    html: bool = typer.Option(True, "--html/--no-html", help="Write the HTML report at the end."),
    out: Path | None = typer.Option(None, "--out", help="Report file or directory."),
) -> None:
    """Ask every question of a set to each model (temperature 0, fixed seed) and store it all."""
    settings = settings_of(ctx)
    db = _db(settings)
    if resume is None:
        if not models:
            fail("give the models to evaluate with --models (or --resume RUN)")
        config = harness.EvalConfig(
            dataset=dataset,
            models=split_list(models),
            max_tokens=max_tokens,
            seed=seed,
            judge_model=judge,
            limit=limit,
            code_timeout_s=code_timeout,
            rag_k=rag_k,
        )
        client = _client(settings)
        run_id = harness.start_run(db, config).id
        console().print(f"run [bold]{run_id}[/]: {dataset} × {', '.join(config.models)}")
    else:
        client = _client(settings)
        run_id = runs_db.load_run(db, resume)[0].id
        console().print(f"resuming run [bold]{run_id}[/]")
    progress, bars = progress_bars()

    def update(done: int, total: int, row: runs_db.ResultRow) -> None:
        bars(done, total, f"run {run_id}")

    try:
        with client, progress:
            harness.run_eval(client, db, resume=run_id, progress=update)
    except KeyboardInterrupt:
        err_console().print(
            f"interrupted; finished answers are stored. Resume with: edgelm eval run --resume "
            f"{run_id}"
        )
        raise typer.Exit(130) from None
    prices = Prices.load(settings.home)
    runs = _load(settings, [run_id])
    _print_report(runs, prices)
    if html:
        path = eval_report.write_html(runs, _html_path(settings, [run_id], out), prices)
        console().print(f"report: {path}")
    console().print(f"run [bold]{run_id}[/] saved in {db}")


@app.command("report")
def report(
    ctx: typer.Context,
    run_ids: list[str] = typer.Argument(None, help="Run ids (prefixes, 'latest'); default latest."),
    out: Path | None = typer.Option(None, "--out", help="Report file or directory."),
    threshold: float = typer.Option(0.05, help="Quality drop that counts as a regression."),
) -> None:
    """Tables per model and category, quality vs latency and cost plots, diffs between runs."""
    settings = settings_of(ctx)
    runs = _load(settings, run_ids or ["latest"])
    prices = Prices.load(settings.home)
    _print_report(runs, prices)
    for other in runs[1:]:
        print_table(eval_report.diff_table(eval_report.diff_runs(runs[0], other, threshold)))
    path = eval_report.write_html(
        runs, _html_path(settings, [lr.run.id for lr in runs], out), prices
    )
    console().print(f"report: {path}")


@app.command("diff")
def diff(
    ctx: typer.Context,
    run_a: str,
    run_b: str,
    threshold: float = typer.Option(0.05, help="Quality drop that counts as a regression."),
) -> None:
    """Compare run B to run A; exit 1 when B regressed."""
    settings = settings_of(ctx)
    a, b = _load(settings, [run_a, run_b])
    result = eval_report.diff_runs(a, b, threshold)
    print_table(eval_report.diff_table(result))
    worse = [f for f in result["flips"] if f["regression"]]
    if worse:
        console().print(
            "items that got worse: " + ", ".join(f"{f['model']}/{f['item']}" for f in worse)
        )
    if result["regressed"]:
        raise typer.Exit(1)


@app.command("list")
def list_(
    ctx: typer.Context, limit: int = typer.Option(20, min=1), as_json: bool = JSON_OPTION
) -> None:
    """Stored evaluation runs, newest first."""
    show_runs(runs_db.list_runs(_db(settings_of(ctx)), limit), as_json, "evaluation")


@app.command("ragas")
def ragas(
    ctx: typer.Context,
    run_id: str = typer.Argument("latest", help="A stored run over a RAG set."),
    judge: str = typer.Option(..., "--judge", help="Model Ragas asks (e.g. the LLM tier)."),
    sample: int = typer.Option(3, "--sample", "-n", min=1, help="Answers to cross-check."),
) -> None:
    """Cross-check edgelm's RAG metrics with Ragas (pip install 'edgelm[ragas]') on a sample."""
    from edgelm.evals.ragas_check import compare, ragas_scorer

    settings = settings_of(ctx)
    (loaded,) = _load(settings, [run_id])
    service = resolve_service(settings)
    scorer = ragas_scorer(service.endpoint, judge, service.api_key)
    with console().status(f"Ragas is scoring {sample} answers with {judge}…"):
        rows = compare(loaded.run.items, loaded.rows, scorer, sample)
    if not rows:
        fail(f"run {loaded.run.id} has no answered RAG questions to cross-check")
    table = Table(title=f"edgelm vs Ragas on run {loaded.run.id} (judge {judge})")
    for column in ("item", "model", "metric", "edgelm", "Ragas", "Δ", "Ragas error"):
        table.add_column(column, overflow="fold")
    for r in rows:
        cells = (r.edgelm, r.ragas, r.delta)
        table.add_row(r.item_id, r.model, r.metric, *(cell(v) for v in cells), r.error)
    print_table(table, key_columns=2)
    failed = sum(1 for r in rows if r.error)
    if failed:
        console().print(
            f"Ragas could not score {failed} of {len(rows)} (its parser rejected the judge)"
        )


@app.command("datasets")
def datasets(as_json: bool = JSON_OPTION) -> None:
    """The shipped question sets with their size and licence."""
    rows = list_datasets()

    def human() -> None:
        table = Table(title="datasets")
        for column in ("name", "size", "licence", "description"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(row["name"], str(row["size"]), row["licence"], row["description"])
        print_table(table)

    show(rows, as_json, human)
