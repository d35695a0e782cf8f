"""A soak's files: ``soak.json`` (every sample) and ``report.html`` (verdict, plots over time,
the samples table), built on :mod:`edgelm.reporting` like the other bench reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from edgelm.bench.soak import SoakRun, SoakSample
from edgelm.reporting import (
    escape,
    figure_data_uri,
    html_page,
    html_table,
    mpl_text,
    new_figure,
    write_atomically,
)

COLUMNS = ("time", "requests", "errors", "TTFT p50", "TTFT p99", "tok/s", "RSS", "fds", "threads")


def _ms(value: float | None) -> str:
    return f"{value * 1000:.0f} ms" if value is not None else "-"


def _mb(value: int | None) -> str:
    return f"{value / 1e6:.0f} MB" if value else "-"


def sample_row(sample: SoakSample) -> list[str]:
    return [
        f"{int(sample.t_s // 60)}:{int(sample.t_s % 60):02d}",
        str(sample.requests),
        str(sample.errors),
        _ms(sample.ttft_p50_s),
        _ms(sample.ttft_p99_s),
        f"{sample.tokens_per_s:.1f}" if sample.tokens_per_s is not None else "-",
        _mb(sample.rss_bytes),
        str(sample.fds) if sample.fds is not None else "-",
        str(sample.threads) if sample.threads is not None else "-",
    ]


def verdict_rows(run: SoakRun) -> list[list[str]]:
    rows = []
    for name, check in run.verdict.get("checks", {}).items():
        value, limit = check["value"], check["limit"]
        if name == "rss_growth":
            shown, bound = f"{value:+.1%}", f"< {limit:.0%}"
        elif name == "ttft_p99_drift":
            shown, bound = f"{value:.2f}×", f"≤ {limit:.1f}× or < 20 ms (last / first third)"
        elif name == "requests":
            shown, bound = str(value), "> 0"
        else:
            shown, bound = f"{value:+g}" if name.endswith("growth") else str(value), f"≤ {limit:g}"
        rows.append([name, shown, bound, "pass" if check["pass"] else "FAIL"])
    return rows


def verdict_table(run: SoakRun) -> Table:
    passed = run.verdict.get("pass")
    table = Table(title=f"soak verdict: {'[green]PASS[/]' if passed else '[red]FAIL[/]'}")
    for column in ("check", "value", "target", ""):
        table.add_column(column)
    for row in verdict_rows(run):
        table.add_row(*row[:3], "[green]pass[/]" if row[3] == "pass" else "[red]FAIL[/]")
    return table


def samples_table(run: SoakRun) -> Table:
    table = Table(title=f"soak of {run.target}: {run.concurrency} streams, every {run.interval_s:g} s")
    for column in COLUMNS:
        table.add_column(column)
    for sample in run.samples:
        table.add_row(*sample_row(sample))
    return table


def write_json(run: SoakRun, path: Path) -> Path:
    return write_atomically(path, run.model_dump_json(indent=2))


def plot(run: SoakRun) -> str | None:
    """RSS, TTFT p50/p99, tokens/s, descriptors/threads and the engine's live figures (KV
    cache use, or streams running and waiting) over time; the warm-up shaded."""
    if not run.samples:
        return None
    minutes = [s.t_s / 60 for s in run.samples]
    # The KV cache's figures when the engine reports them, else its streams running/waiting.
    live = {k for s in run.samples for k in s.runtime}
    kv = sorted(k for k in live if "kv" in k.lower()) or [
        k for k in ("running", "waiting") if k in live
    ]
    panels = 4 + bool(kv)
    figure = new_figure(9, 2.3 * panels)
    axes = figure.subplots(panels, 1, sharex=True)

    def series(values: list[Any], scale: float = 1.0) -> list[float]:
        return [v * scale if v is not None else float("nan") for v in values]

    axes[0].plot(minutes, series([s.rss_bytes for s in run.samples], 1e-6), marker="o")
    axes[0].set_ylabel("RSS (MB)")
    axes[1].plot(minutes, series([s.ttft_p50_s for s in run.samples], 1e3), marker="o", label="p50")
    axes[1].plot(minutes, series([s.ttft_p99_s for s in run.samples], 1e3), marker="o", label="p99")
    axes[1].set_ylabel("TTFT (ms)")
    axes[1].legend(loc="upper left")
    axes[2].plot(minutes, series([s.tokens_per_s for s in run.samples]), marker="o")
    axes[2].set_ylabel("tokens/s")
    errors = [s.errors for s in run.samples]
    if any(errors):
        twin = axes[2].twinx()
        twin.bar(minutes, errors, width=0.3 * run.interval_s / 60, color="#c33", alpha=0.5)
        twin.set_ylabel("errors")
    axes[3].plot(minutes, series([s.fds for s in run.samples]), marker="o", label="open fds")
    axes[3].plot(minutes, series([s.threads for s in run.samples]), marker="o", label="threads")
    axes[3].set_ylabel("count")
    axes[3].legend(loc="upper left")
    if kv:
        for key in kv:
            axes[4].plot(minutes, series([s.runtime.get(key) for s in run.samples]), label=key)
        axes[4].set_ylabel("KV cache" if any("kv" in k.lower() for k in kv) else "streams")
        axes[4].legend(loc="upper left")
    if run.warmup_intervals and len(run.samples) > run.warmup_intervals:
        end = run.samples[run.warmup_intervals - 1].t_s / 60
        for ax in axes:
            ax.axvspan(0, end, color="#eee", zorder=0)
    for ax in axes:  # plain figures on the axes, not "+1.582e4" offsets
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    axes[0].set_ylim(bottom=0)  # growth in proportion: a 1 MB wobble is not a cliff
    axes[-1].set_xlabel("minutes (shaded: warm-up, left out of the verdict)")
    axes[0].set_title(mpl_text(f"{run.target}, {run.concurrency} streams"))
    return figure_data_uri(figure)


def write_html(run: SoakRun, path: Path) -> Path:
    passed = run.verdict.get("pass")
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created_at))
    body = [
        f"<h1>Soak: {escape(run.target)}</h1>",
        f"<p class='meta'>{escape(stamp)} · {run.concurrency} streams for "
        f"{run.duration_s / 60:.1f} min, sampled every {run.interval_s:g} s, "
        f"max_tokens {run.max_tokens}, warm-up intervals left out: {run.warmup_intervals}"
        + (f" · pid {run.pid} (with its children)" if run.pid else " · no local process")
        + "</p>",
        f"<h2>Verdict: {'PASS' if passed else 'FAIL'}</h2>",
        html_table(("check", "value", "target", ""), verdict_rows(run)),
    ]
    image = plot(run)
    if image:
        body.append(f"<h2>Over time</h2><figure><img alt='soak plots' src='{image}'></figure>")
    body.append("<h2>Samples</h2>")
    body.append(html_table(COLUMNS, [sample_row(s) for s in run.samples]))
    errors = [e for s in run.samples for e in s.error_examples]
    if errors:
        items = "".join(f"<li>{escape(e)}</li>" for e in dict.fromkeys(errors))
        body.append(f"<h2>Errors</h2><ul class='errors'>{items}</ul>")
    return write_atomically(path, html_page(f"soak {run.target}", "".join(body)))
