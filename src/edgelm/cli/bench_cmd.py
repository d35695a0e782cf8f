"""``edgelm bench [run | micro | history | diff | report]`` and ``edgelm compare``.

Options can also come from the environment variables the Foundry Local workshop scripts use
(``BENCH_MODELS``, ``BENCH_ROUNDS``, ``BENCH_PROMPT``, ``BENCH_MAX_TOKENS``, ``BENCH_STREAM``,
``SLM_ALIAS``, ``LLM_ALIAS``, ``COMPARE_PROMPT``, ``FOUNDRY_LOCAL_ENDPOINT``: see
:mod:`edgelm.bench.workshop`), so those scripts' habits carry over; ``edgelm bench`` alone
runs ``bench run`` with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.table import Table

from edgelm.bench import history, report
from edgelm.bench.background import background_load
from edgelm.bench.context import (
    CONTEXT_COLUMNS,
    ContextConfig,
    context_rows,
    context_table_cells,
    run_context_scaling,
)
from edgelm.bench.micro import RawEngine, micro_bench
from edgelm.bench.results import BenchRun
from edgelm.bench.runner import BenchConfig, run_bench
from edgelm.bench.stats import SLO, ttft_over
from edgelm.bench.targets import Target, make_target
from edgelm.bench.workloads import load_prompts
from edgelm.bench.workshop import workshop_endpoint
from edgelm.catalog import Catalog
from edgelm.cli.common import (
    JSON_OPTION,
    cell,
    console,
    fail,
    human_bytes,
    print_table,
    progress_bars,
    settings_of,
    show_runs,
    split_list,
)
from edgelm.cost import Prices, monthly_tco
from edgelm.settings import Settings
from edgelm.sysinfo import system_info

app = typer.Typer(
    help="Measure models: latency, throughput, memory, cost. Alone, `edgelm bench` runs "
    "`bench run` configured by the Foundry Local workshop's variables (BENCH_MODELS, "
    "BENCH_ROUNDS, BENCH_PROMPT, BENCH_MAX_TOKENS, BENCH_STREAM, FOUNDRY_LOCAL_ENDPOINT)."
)


@app.callback(invoke_without_command=True)
def bench(ctx: typer.Context) -> None:
    """Without a subcommand, run ``bench run`` as if typed with no options: its values then
    come from the workshop's environment variables, or its defaults."""
    if ctx.invoked_subcommand is not None:
        return
    command = ctx.command.get_command(ctx, "run")  # type: ignore[attr-defined]
    with command.make_context("run", [], parent=ctx) as run_ctx:
        command.invoke(run_ctx)


def _db(settings: Settings) -> Path:
    return settings.home / "results.db"


def _bench_settings(ctx: typer.Context) -> Settings:
    """Settings whose endpoint falls back to the workshop's FOUNDRY_LOCAL_ENDPOINT when neither
    ``--endpoint`` nor ``EDGELM_ENDPOINT`` names the service."""
    settings = settings_of(ctx)
    workshop = workshop_endpoint(os.environ)
    if workshop and not settings.client.endpoint:
        settings = settings_of(ctx, **{"client.endpoint": workshop})
    return settings


def _write_outputs(run, out: Path | None, settings: Settings, html: bool) -> Path:  # type: ignore[no-untyped-def]
    directory = out or settings.home / "bench" / run.id
    directory.mkdir(parents=True, exist_ok=True)
    report.write_json(run, directory / "results.json")
    report.write_csv(run, directory / "results.csv")
    if html:
        report.write_html(run, directory / "report.html")
    return directory


@app.command("run")
def run(
    ctx: typer.Context,
    models: str | None = typer.Option(
        None,
        "--models",
        "-m",
        envvar="BENCH_MODELS",
        help="Comma-separated targets: alias, local:alias, service:alias or URL#model.",
    ),
    rounds: int = typer.Option(
        8, "--rounds", "-n", envvar="BENCH_ROUNDS", help="Measured requests per scenario.", min=1
    ),
    warmup: int = typer.Option(1, help="Warm-up requests, excluded from the stats.", min=0),
    concurrency: str = typer.Option(
        "1", "--concurrency", "-c", help="Levels to sweep, e.g. 1,2,4,8."
    ),
    rate: float | None = typer.Option(None, help="Poisson arrival rate (requests/s) instead."),
    prompt: str | None = typer.Option(
        None, "--prompt", envvar="BENCH_PROMPT", help="One prompt for every request."
    ),
    prompts: str = typer.Option(
        "short",
        help="Prompt set: short, medium, long, mixed, unique (192 distinct questions) or a .jsonl file.",
    ),
    max_tokens: int = typer.Option(128, envvar="BENCH_MAX_TOKENS", min=1),
    ignore_eos: bool = typer.Option(
        False,
        "--ignore-eos",
        help="Every answer runs to --max-tokens (as in vLLM's bench): equal lengths across "
        "targets, and decode speed without the step that only yields the end token.",
    ),
    stream: bool = typer.Option(
        True, "--stream/--no-stream", envvar="BENCH_STREAM", help="Stream (measures TTFT) or not."
    ),
    seed: int = typer.Option(0, help="Seed for prompt order and sampling."),
    max_seconds: float = typer.Option(600.0, help="Time bound per scenario."),
    slo_ttft: float | None = typer.Option(None, help="Goodput SLO: TTFT at most this (s)."),
    slo_itl: float | None = typer.Option(None, help="Goodput SLO: time per token at most (s)."),
    micro: bool = typer.Option(False, help="Also measure the raw engine (pp/tg) as a reference."),
    interleave: bool = typer.Option(
        False,
        "--interleave",
        help="One stream, the targets answering each prompt in turn (with --micro, the raw "
        "engine's tg measured every round): a drifting machine then slows all alike. For "
        "comparing a service with its engine; in-process RSS then includes the raw engine.",
    ),
    background_load_n: int = typer.Option(
        0,
        "--background-load",
        min=0,
        max=256,
        help="Keep N busy processes (one core each) running during the measurement, as a "
        "browser or a build would on a real machine; the report says so. Works for any target.",
    ),
    out: Path | None = typer.Option(None, help="Directory for results.json/.csv/report.html."),
    html: bool = typer.Option(True, "--html/--no-html"),
    name: str = typer.Option("", help="A label for this run in the history."),
    api_key: str | None = typer.Option(None, help="Key for an external endpoint."),
) -> None:
    """Benchmark one or more targets; store the run and write JSON, CSV and an HTML report."""
    settings = _bench_settings(ctx)
    specs = split_list(models) if models else [settings.service.default_model]
    levels = [int(c) for c in split_list(concurrency)]
    if any(level < 1 or level > 64 for level in levels):
        fail("concurrency levels must be between 1 and 64")
    if interleave and (levels != [1] or rate):
        fail("--interleave compares single streams: leave out --concurrency and --rate")
    config = BenchConfig(
        requests=rounds,
        warmup=warmup,
        concurrency=levels,
        rate=rate,
        max_tokens=max_tokens,
        seed=seed,
        max_seconds=max_seconds,
        slo=SLO(ttft_s=slo_ttft, itl_s=slo_itl) if (slo_ttft or slo_itl) else None,
        ignore_eos=ignore_eos,
        interleave=interleave,
        background_load=background_load_n,
    )
    workload = load_prompts(prompts, prompt, seed)
    targets = [make_target(spec, settings, stream=stream, api_key=api_key) for spec in specs]
    # The raw engine, once per catalog model; other servers' models have no raw engine here.
    local = dict.fromkeys(t.model for t in targets if t.kind in ("in-process", "service"))
    progress, update = progress_bars()
    with progress, contextlib.ExitStack() as stack:
        raw = {}
        if micro and interleave:
            for model in local:
                raw[model] = RawEngine(model, settings)
                stack.callback(raw[model].close)
        rerun = "edgelm " + shlex.join(sys.argv[1:])
        partial: list[str] = []

        def checkpoint(so_far: BenchRun) -> None:
            partial[:] = [history.save_run(_db(settings), so_far, rerun)]

        try:
            result = run_bench(
                targets, workload, config, update, system_info(), name, raw, checkpoint
            )
            if micro and not interleave:
                with background_load(background_load_n):  # the reference under the same load
                    for model in local:
                        result.micro.extend(micro_bench(model, settings, reps=3))
        except KeyboardInterrupt:
            if partial:
                history.mark_interrupted(_db(settings), partial[0])
                console().print(
                    f"run {partial[0]} interrupted; its finished scenarios are stored. "
                    f"Measure it again with: {rerun}"
                )
            raise typer.Exit(130) from None
    run_id = history.save_run(_db(settings), result)
    directory = _write_outputs(result, out, settings, html)
    print_table(report.results_table(result))
    if result.micro or any(s.kind == "in-process" for s in result.scenarios):
        _print_engine_ratio(result)
    console().print(report.print_json_block(result), markup=False, highlight=False)
    console().print(f"run [bold]{run_id}[/] saved; files in {directory}")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1.5h`` → seconds."""
    value = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(value[-1:])
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a duration (e.g. 90s, 30m, 1h)") from None
    if seconds <= 0:
        raise typer.BadParameter("the duration must be positive")
    return seconds


@app.command("soak")
def soak(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None, "--model", "-m", help="Target: alias, service:alias, local:alias or URL#model."
    ),
    duration: str = typer.Option("30m", help="How long to hold the load: 90s, 30m, 1h."),
    concurrency: int = typer.Option(8, "--concurrency", "-c", min=1, max=64),
    interval: float = typer.Option(60.0, help="Seconds between samples.", min=0.2),
    warmup_intervals: int = typer.Option(
        1, help="First intervals left out of the verdict (allocators, caches filling up).", min=0
    ),
    prompts: str = typer.Option("short", help="Prompt set or .jsonl file (see bench run)."),
    max_tokens: int = typer.Option(128, min=1),
    out: Path | None = typer.Option(None, help="Directory for soak.json and report.html."),
    api_key: str | None = typer.Option(None, help="Key for an external endpoint."),
) -> None:
    """Hold N streams on a model for a long time; sample memory (with child processes), open
    files, threads, KV cache, TTFT p50/p99, tokens/s and errors every interval; judge RSS
    growth, TTFT drift and errors after the warm-up. Exits 1 when the verdict fails."""
    from edgelm.bench import soak_report
    from edgelm.bench.soak import SoakSample, run_soak

    settings = _bench_settings(ctx)
    seconds = parse_duration(duration)
    if interval > seconds:
        fail(f"--interval ({interval:g} s) is longer than --duration ({seconds:g} s)")
    target = make_target(model or settings.service.default_model, settings, api_key=api_key)
    config = BenchConfig(max_tokens=max_tokens, seed=0)
    workload = load_prompts(prompts, None, 0)
    progress, update = progress_bars()
    label = f"soak {target.name} ×{concurrency}"
    total = int(seconds)

    def on_sample(sample: SoakSample, elapsed: float) -> None:
        update(min(total, int(elapsed)), total, label)
        progress.console.print(
            f"[dim]{soak_report.sample_row(sample)[0]}[/] {sample.requests} requests, "
            f"{sample.errors} errors, TTFT p50 {soak_report._ms(sample.ttft_p50_s)} "
            f"p99 {soak_report._ms(sample.ttft_p99_s)}, RSS {soak_report._mb(sample.rss_bytes)}, "
            f"fds {sample.fds if sample.fds is not None else '-'}"
        )

    with progress:
        update(0, total, label)
        ticker = _Ticker(lambda elapsed: update(min(total, int(elapsed)), total, label))
        with ticker:
            result = run_soak(
                target, workload, config, seconds, concurrency, interval, warmup_intervals,
                on_sample,
            )
    result.system = system_info()
    result.id = time.strftime("soak-%Y%m%d-%H%M%S", time.gmtime(result.created_at))
    directory = out or settings.home / "bench" / result.id
    soak_report.write_json(result, directory / "soak.json")
    soak_report.write_html(result, directory / "report.html")
    print_table(soak_report.samples_table(result))
    print_table(soak_report.verdict_table(result))
    console().print(f"files in {directory}")
    if not result.verdict.get("pass"):
        raise typer.Exit(1)


class _Ticker:
    """Moves the progress bar every second between samples (a sample may be minutes apart)."""

    def __init__(self, tick: Callable[[float], None]):
        self.tick = tick
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="edgelm-soak-tick")
        self.start = time.monotonic()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.tick(time.monotonic() - self.start)

    def __enter__(self) -> _Ticker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


def _print_engine_ratio(result) -> None:  # type: ignore[no-untyped-def]
    """Service decode speed as a share of the raw engine's (with ``--micro``), both measured
    in this run, and TTFT over the in-process engine's (when one ran)."""
    tg = {row["model"]: row["tokens_per_s"] for row in result.micro if row["test"].startswith("tg")}
    table = Table(title=f"service vs {'raw' if tg else 'in-process'} engine (same run)")
    columns = ("target", "concurrency", "decode tok/s p50", "engine tg tok/s", "ratio")
    for column in (*columns, "TTFT p50 over in-process"):
        table.add_column(column)
    in_process = {(s.model, s.concurrency): s for s in result.scenarios if s.kind == "in-process"}
    shown = 0
    for scenario in result.scenarios:
        raw = tg.get(scenario.model)
        reference = in_process.get((scenario.model, scenario.concurrency))
        if raw is None and reference is None:
            continue
        decode = (scenario.stats.get("decode_tps") or {}).get("p50")
        over = (
            ttft_over(scenario, reference, turns=bool(result.config.get("interleave")))
            if scenario.kind != "in-process"
            else None
        )
        table.add_row(
            scenario.target,
            str(scenario.concurrency),
            f"{decode or 0:.1f}",
            f"{raw:.1f}" if raw else "-",
            f"{decode / raw:.1%}" if decode and raw else "-",
            f"{over * 1000:+.1f} ms" if over is not None else "-",
        )
        shown += over is not None or raw is not None
    if shown:
        print_table(table)


@app.command("context")
def context(
    ctx: typer.Context,
    models: str | None = typer.Option(
        None,
        "--models",
        "-m",
        help="Comma-separated targets: alias, local:alias, service:alias or URL#model "
        "(e.g. llama.cpp's server: http://127.0.0.1:8080/v1#qwen).",
    ),
    lengths: str = typer.Option(
        "512,2048,4096,8192", help="Prompt lengths in tokens (each target's own tokenizer)."
    ),
    rounds: int = typer.Option(3, "--rounds", "-n", min=1, help="Unique prompts per length."),
    max_tokens: int = typer.Option(64, min=2, help="Tokens each answer runs to (ignore_eos)."),
    concurrency: int = typer.Option(
        1, "--concurrency", "-c", min=1, max=64, help="Streams at once (answer lengths then vary)."
    ),
    seed: int = typer.Option(0),
    max_seconds: float = typer.Option(600.0, help="Time bound per length."),
    out: Path | None = typer.Option(None, help="Directory for results.json/.csv/report.html."),
    name: str = typer.Option("", help="A label for this run in the history."),
    api_key: str | None = typer.Option(None, help="Key for an external endpoint."),
) -> None:
    """Context scaling: TTFT, prefill tok/s and decode tok/s at each prompt length, unique
    prompts every time (no prefix cache helps), for every target, with a plot.

    In-process targets get a context that fits the longest prompt; a running edgelm service
    needs one itself (e.g. EDGELM_COMPUTE__N_CTX=9216 for 8k prompts); llama.cpp's server
    by default shares the model's trained context among its slots (-c to set it).
    """
    sizes = [int(n) for n in split_list(lengths)]
    if not sizes or any(n < 16 for n in sizes):
        fail("--lengths takes prompt lengths of at least 16 tokens, e.g. 512,2048")
    needed = max(sizes) + int(max_tokens * 1.5) + 256
    settings = _bench_settings(ctx)
    if settings.compute.n_ctx < needed:
        settings = settings_of(ctx, **{"compute.n_ctx": -(-needed // 256) * 256})
    specs = split_list(models) if models else [settings.service.default_model]
    targets = [make_target(spec, settings, api_key=api_key) for spec in specs]
    config = ContextConfig(
        lengths=sizes,
        rounds=rounds,
        max_tokens=max_tokens,
        concurrency=concurrency,
        seed=seed,
        max_seconds=max_seconds,
    )
    progress, update = progress_bars()
    with progress:
        result = run_context_scaling(targets, config, update, system_info(), name)
    run_id = history.save_run(_db(settings), result)
    directory = _write_outputs(result, out, settings, html=True)
    rows = context_rows(result)
    table = Table(title="context scaling (medians; gap ratio: longest token gap / median)")
    for column in CONTEXT_COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*context_table_cells(row))
    print_table(table)
    for row in rows:
        for error in row["errors"]:
            console().print(f"[red]{row['target']} at {row['length']} tokens:[/] {error}")
    console().print(
        "[CONTEXT SCALING]\n" + json.dumps(rows, indent=2, default=str),
        markup=False,
        highlight=False,
    )
    console().print(f"run [bold]{run_id}[/] saved; files in {directory}")


@app.command("micro")
def micro(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Catalog alias."),
    pp: int = typer.Option(512, help="Prompt tokens to process."),
    tg: int = typer.Option(128, help="Tokens to generate."),
    reps: int = typer.Option(3, min=1),
) -> None:
    """llama-bench style raw engine speed: pp and tg tokens/s."""
    settings = settings_of(ctx)
    with console().status(f"measuring {model} (pp{pp}, tg{tg}, {reps} reps)…"):
        rows = micro_bench(model, settings, pp, tg, reps)
    table = Table(title="raw engine speed")
    for column in ("model", "engine", "threads", "test", "t/s"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["model"],
            row["engine"],
            str(row["threads"]),
            row["test"],
            f"{row['tokens_per_s']:.2f} ± {row['std']:.2f}",
        )
    print_table(table)
    for row in rows:
        if "bandwidth_share" in row:
            console().print(
                f"decode reads the {row['weights_mb']:.0f} MB of weights once per token: "
                f"{row['weights_gb_per_s']:.1f} GB/s at {row['tokens_per_s']:.1f} tok/s, "
                f"{row['bandwidth_share']:.0%} of the {row['memory_gb_per_s']:.1f} GB/s this "
                f"machine reads with {row['threads']} threads "
                f"({'compute' if row['bandwidth_share'] < 0.6 else 'bandwidth'}-bound)"
            )


@app.command("history")
def history_(
    ctx: typer.Context, limit: int = typer.Option(20, min=1), as_json: bool = JSON_OPTION
) -> None:
    """Stored runs, newest first."""
    show_runs(history.list_runs(_db(settings_of(ctx)), limit), as_json, "benchmark")


@app.command("diff")
def diff(
    ctx: typer.Context,
    run_a: str,
    run_b: str,
    threshold: float = typer.Option(0.05, help="Relative change that counts as a regression."),
) -> None:
    """Compare two stored runs scenario by scenario; exit 1 if B regressed."""
    db = _db(settings_of(ctx))
    a, b = history.load_run(db, run_a), history.load_run(db, run_b)
    rows = history.diff_runs(a, b, threshold)
    table = Table(title=f"{a.id} → {b.id}")
    for column in ("scenario", "metric", "A", "B", "B/A", ""):
        table.add_column(column)
    regressed = False
    for row in rows:
        flag = "[red]regression[/]" if row.get("regression") else ""
        regressed |= bool(row.get("regression"))
        ratio = row.get("ratio")
        table.add_row(
            str(row.get("scenario", "")),
            str(row.get("metric", row.get("note", ""))),
            cell(row.get("a")),
            cell(row.get("b")),
            f"{ratio:.3f}" if isinstance(ratio, float) else "-",
            flag,
        )
    print_table(table)
    if regressed:
        raise typer.Exit(1)


@app.command("report")
def report_(
    ctx: typer.Context,
    run_id: str = typer.Argument("latest"),
    out: Path | None = typer.Option(None, help="Directory for the files."),
) -> None:
    """Write JSON, CSV and HTML for a stored run again."""
    settings = settings_of(ctx)
    result = history.load_run(_db(settings), run_id)
    directory = _write_outputs(result, out, settings, html=True)
    print_table(report.results_table(result))
    console().print(f"written to {directory}")


def compare_command(
    ctx: typer.Context,
    slm: str | None = typer.Option(
        None, envvar="SLM_ALIAS", help="Small model (default: tier slm)."
    ),
    llm: str | None = typer.Option(
        None, envvar="LLM_ALIAS", help="Large model (default: tier llm)."
    ),
    prompt: str | None = typer.Option(None, "--prompt", envvar="COMPARE_PROMPT"),
    prompts: str = typer.Option("short", help="Prompt set or .jsonl file (when no --prompt)."),
    rounds: int = typer.Option(3, "--rounds", "-n", min=1, help="Warm requests per model."),
    max_tokens: int = typer.Option(256, envvar="BENCH_MAX_TOKENS", min=1),
    requests_per_day: float = typer.Option(1000.0, help="For the monthly cost comparison."),
    quality_set: str = typer.Option(
        "general",
        "--quality",
        help="Quick eval for the quality column: a shipped set (general, rag) or a .jsonl "
        "file; 'none' to skip.",
    ),
    quality_n: int = typer.Option(12, "--quality-n", min=1, help="Items of the quick eval."),
    quality_run: str | None = typer.Option(
        None, "--quality-run", help="Take quality from a stored eval run instead (id or latest)."
    ),
) -> None:
    """Same prompts to an SLM and an LLM: latency, quality, memory, cost, answers, and a
    decision that weighs them together."""
    from edgelm.compare import compare, comparison_json, quality_from_run, quality_from_set

    settings = _bench_settings(ctx)
    catalog = Catalog.load(settings.home)
    slm_alias = slm or catalog.for_tier("slm").alias
    llm_alias = llm or catalog.for_tier("llm").alias
    pairs: list[tuple[Target, str]] = []
    for spec in (slm_alias, llm_alias):
        target = make_target(spec, settings)
        tier = catalog.resolve(target.model).tier if target.kind != "openai" else "external"
        pairs.append((target, tier))
    config = BenchConfig(requests=rounds, warmup=0, max_tokens=max_tokens)
    workload = load_prompts(prompts, prompt)
    prices = Prices.load(settings.home)
    if quality_run:
        quality = quality_from_run(settings.home / "evals.db", quality_run)
    elif quality_set.lower() != "none":
        quality = quality_from_set(quality_set, quality_n)
    else:
        quality = None
    progress, update = progress_bars()
    with progress:
        result = compare(pairs, workload, config, prices, update, quality=quality)
    _print_comparison(result, prices, requests_per_day)
    if result.decision:
        console().print(f"[bold]decision:[/] {result.decision}")
    block = json.dumps(comparison_json(result), indent=2, default=str)
    console().print("[COMPARISON RESULTS]\n" + block, markup=False, highlight=False)


def _quality_cell(quality: dict[str, float] | None) -> str:
    if not quality or quality.get("overall") is None:
        return "-"
    cell_text = f"{quality['overall']:.2f}"
    if quality.get("items"):
        cell_text += f" (n={quality['items']:.0f}"
        if quality.get("degenerate"):
            cell_text += f", {quality['degenerate']:.0%} degenerate"
        cell_text += ")"
    return cell_text


def _print_comparison(result, prices: Prices, requests_per_day: float) -> None:  # type: ignore[no-untyped-def]
    currency = prices.local.currency
    answers = Table(title="answers (first prompt)", show_lines=True)
    for m in result.models:
        answers.add_column(m.model, overflow="fold", ratio=1)
    answers.add_row(*(m.answers[0][1] if m.answers else "(failed)" for m in result.models))
    console().print(answers)  # one column per model, side by side: no key column
    decision = Table(title=f"decision table (costs per 1k requests, {currency}; {prices.source})")
    for column in (
        "model",
        "cold latency",
        "warm latency",
        "TTFT",
        "tok/s",
        "tokens out",
        "quality",
        "model memory",
        "local cost",
        "cloud-equivalent cost",
        "best use",
    ):
        decision.add_column(column, overflow="fold")
    for m in result.models:
        cloud = ", ".join(f"{k}: {v:.3f}" for k, v in m.cost["cloud_per_1k"].items())
        decision.add_row(
            m.model,
            f"{m.cold_s:.2f} s" if m.cold_s is not None else "-",
            f"{m.warm_e2e_s:.2f} s" if m.warm_e2e_s is not None else "-",
            f"{m.warm_ttft_s * 1000:.0f} ms" if m.warm_ttft_s is not None else "-",
            f"{m.decode_tokens_per_s:.1f}" if m.decode_tokens_per_s else "-",
            f"{m.completion_tokens:.0f}",
            _quality_cell(m.quality),
            human_bytes(m.model_memory_bytes),
            f"{m.cost['local_per_1k']:.4f}",
            cloud,
            m.best_use,
        )
    print_table(decision)
    tco = Table(title=f"a month at {requests_per_day:.0f} requests/day ({currency})")
    for column in ("model", "machine busy", "local total", "cloud totals"):
        tco.add_column(column, overflow="fold")
    for m in result.models:
        month = monthly_tco(
            prices, requests_per_day, m.prompt_tokens, m.completion_tokens, m.warm_e2e_s or 0.0
        )
        tco.add_row(
            m.model,
            f"{month['machine_utilisation']:.1%}",
            f"{month['local_total']:.2f}",
            ", ".join(f"{k}: {v:.2f}" for k, v in month["cloud_total"].items()),
        )
    print_table(tco)
