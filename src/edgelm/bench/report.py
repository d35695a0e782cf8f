"""Reports of a benchmark run: JSON, CSV, one offline HTML file, a terminal table, a text block.

Every report is computed from the run's raw requests (statistics through
:func:`edgelm.bench.stats.stats_for`), so a run read back from JSON or SQLite reports the same
figures as when it was measured. The HTML report is a single file with no network use at all
(CSS inline, no scripts, plots as PNG data URIs), made with :mod:`edgelm.reporting` like the
eval and hybrid-router reports.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from edgelm.bench.background import describe
from edgelm.bench.context import (
    CONTEXT_COLUMNS,
    context_rows,
    context_table_cells,
    plot_context_scaling,
)
from edgelm.bench.results import BenchRun, RequestResult, Scenario
from edgelm.bench.stats import percentile, stats_for
from edgelm.errors import InvalidRequest
from edgelm.reporting import (
    escape,
    figure_data_uri,
    html_page,
    html_table,
    mpl_text,
    new_figure,
    write_atomically,
)

CSV_REQUEST_FIELDS = (
    "ok",
    "error",
    "prompt_id",
    "started_at",
    "prepare_s",
    "send_s",
    "ttft_s",
    "itl_mean_s",
    "itl_count",
    "tpot_s",
    "e2e_s",
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_per_s",
    "decode_tokens_per_s",
)
CSV_COLUMNS = (
    "run_id",
    "target",
    "model",
    "kind",
    "concurrency",
    "rate",
    "request",
    *CSV_REQUEST_FIELDS,
)

OVERVIEW_COLUMNS = (
    "target",
    "concurrency",
    "ok/total",
    "TTFT p50",
    "TTFT p90",
    "ITL p50",
    "e2e p50",
    "e2e p99",
    "decode tok/s p50",
    "throughput tok/s",
    "goodput",
    "peak RSS MB",
    "CPU %",
)

MISSING = "–"


# ---------------------------------------------------------------------- formatting


def _fmt_seconds(value: float | None) -> str:
    """Latencies as people read them: milliseconds below a second, seconds above."""
    if value is None:
        return MISSING
    if value < 1:
        return f"{value * 1000:.1f} ms" if value < 0.01 else f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def _fmt_number(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}"


def _fmt_mb(value: float | None) -> str:
    return MISSING if value is None else f"{value / 1e6:,.0f}"


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return MISSING
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _fmt_value(value: Any) -> str:
    """Any value from a free-form dict (system, config, micro rows) as short text."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(str(v) for v in value) or MISSING
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _fmt_time(timestamp: float) -> str:
    if not timestamp:
        return MISSING
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))


def _load(s: Scenario) -> str:
    """How the scenario loaded the target: closed-loop concurrency, or an open arrival rate."""
    return f"{s.concurrency} @ {s.rate:g}/s" if s.rate is not None else str(s.concurrency)


def _labels(run: BenchRun) -> list[str]:
    """One short label per scenario: the target, plus its load when a target appears twice."""
    counts: dict[str, int] = {}
    for s in run.scenarios:
        counts[s.target] = counts.get(s.target, 0) + 1
    labels = []
    for s in run.scenarios:
        label = s.target if counts[s.target] == 1 else f"{s.target} c={_load(s)}"
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def _goodput(stats: dict[str, Any]) -> str:
    rate, share = stats.get("goodput_requests_per_s"), stats.get("goodput_share")
    if rate is None and share is None:
        return MISSING
    share_text = f" ({share:.0%})" if share is not None else ""
    return f"{_fmt_number(rate, 2)} req/s{share_text}"


def _overview_row(s: Scenario, stats: dict[str, Any]) -> list[str]:
    return [
        s.target,
        _load(s),
        f"{stats['ok']}/{stats['requests']}",
        _fmt_seconds(stats["ttft"]["p50"]),
        _fmt_seconds(stats["ttft"]["p90"]),
        _fmt_seconds(stats["itl"]["p50"]),
        _fmt_seconds(stats["e2e"]["p50"]),
        _fmt_seconds(stats["e2e"]["p99"]),
        _fmt_number(stats["decode_tps"]["p50"]),
        _fmt_number(stats["throughput_tokens_per_s"]),
        _goodput(stats),
        _fmt_mb(s.resources.peak_rss_bytes),
        _fmt_number(s.resources.mean_cpu_percent, 0),
    ]


def _overview_rows(run: BenchRun) -> list[list[str]]:
    return [_overview_row(s, stats_for(s)) for s in run.scenarios]


# ---------------------------------------------------------------------- files


def write_json(run: BenchRun, path: Path) -> Path:
    """The whole run, raw requests included: the lossless export (``read_json`` reads it)."""
    return write_atomically(Path(path), run.model_dump_json(indent=2) + "\n")


def read_json(path: Path) -> BenchRun:
    """A run written by :func:`write_json`; a clear :class:`InvalidRequest` for anything else."""
    path = Path(path)
    try:
        return BenchRun.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise InvalidRequest(f"cannot read benchmark run {path}: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise InvalidRequest(
            f"{path} is not an edgelm benchmark run: {where}: {first['msg']}"
        ) from exc


def _csv_request_values(req: RequestResult) -> list[Any]:
    gaps = [g for g in req.itl_s if g is not None]
    values = req.model_dump(include=set(CSV_REQUEST_FIELDS))
    values["itl_mean_s"] = math.fsum(gaps) / len(gaps) if gaps else None
    values["itl_count"] = len(gaps)
    return ["" if values[name] is None else values[name] for name in CSV_REQUEST_FIELDS]


def write_csv(run: BenchRun, path: Path) -> Path:
    """One row per request with its scenario's columns, for spreadsheets and pandas.

    Inter-token gaps are reduced to their mean and count; the full lists are in the JSON.
    Missing measurements are empty cells, not zeros.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for s in run.scenarios:
        scenario = [
            run.id,
            s.target,
            s.model,
            s.kind,
            s.concurrency,
            "" if s.rate is None else s.rate,
        ]
        for idx, req in enumerate(s.requests):
            writer.writerow([*scenario, idx, *_csv_request_values(req)])
    return write_atomically(Path(path), buffer.getvalue(), newline="")


# ---------------------------------------------------------------------- terminal


def results_table(run: BenchRun) -> Table:
    """The run's headline figures, one row per scenario, for ``rich`` consoles.

    Cells are ``Text`` objects, so a target name with square brackets is shown as written
    instead of being read as rich markup.
    """
    title = f"edgelm bench {run.name or run.id}".strip()
    load = describe(run.config.get("background_load") or 0)
    if load:
        title += f" — with {load}"
    table = Table(title=Text(title), title_justify="left")
    for column in OVERVIEW_COLUMNS:
        table.add_column(column, justify="left" if column == "target" else "right")
    for row in _overview_rows(run):
        table.add_row(*(Text(cell) for cell in row))
    return table


def _block_entry(s: Scenario, background: int = 0) -> dict[str, Any]:
    stats = stats_for(s)
    ok = [r for r in s.requests if r.ok]
    tps = [(r.prompt_tokens + r.completion_tokens) / r.e2e_s for r in ok if r.e2e_s > 0]
    entry = {
        "target": s.target,
        "model": s.model,
        "kind": s.kind,
        "concurrency": s.concurrency,
        "rate": s.rate,
        "requests": stats["requests"],
        "ok": stats["ok"],
        "errors": stats["errors"],
        "ttft_p50_s": stats["ttft"]["p50"],
        "ttft_p90_s": stats["ttft"]["p90"],
        "itl_p50_s": stats["itl"]["p50"],
        "tpot_p50_s": stats["tpot"]["p50"],
        "e2e_p50_s": stats["e2e"]["p50"],
        "e2e_p99_s": stats["e2e"]["p99"],
        "decode_tps_p50": stats["decode_tps"]["p50"],
        "prompt_tps_p50": stats["prompt_tps"]["p50"],
        "throughput_tokens_per_s": stats["throughput_tokens_per_s"],
        "requests_per_s": stats["requests_per_s"],
        "goodput_requests_per_s": stats.get("goodput_requests_per_s"),
        "peak_rss_bytes": s.resources.peak_rss_bytes,
        "background_load": background,
        # The workshop scripts' own keys, with their definitions, for tools that parse them.
        "alias": s.target,
        "latency_avg": stats["e2e"]["mean"],
        "latency_p95": percentile([r.e2e_s for r in ok], 95),
        "tokens_per_sec_avg": math.fsum(tps) / len(tps) if tps else None,
        "rounds": stats["requests"],
        "first_token_latency_avg": stats["ttft"]["mean"],
    }
    return entry


def print_json_block(run: BenchRun, label: str = "BENCHMARK RESULTS") -> str:
    """``[BENCHMARK RESULTS]`` and a JSON list, one object per scenario, as text to print.

    This is the shape the Foundry Local workshop scripts print, so their readers keep working:
    each object carries the workshop's keys (``alias``, ``latency_avg``, ``latency_p95``,
    ``tokens_per_sec_avg`` = (prompt + completion tokens) / end-to-end time, ``rounds``,
    ``first_token_latency_avg``) next to edgelm's (decode tok/s over decode time, percentiles).
    """
    background = run.config.get("background_load") or 0
    entries = [_block_entry(s, background) for s in run.scenarios]
    return f"[{label}]\n{json.dumps(entries, indent=2)}"


# ---------------------------------------------------------------------- plots


def _ok_values(s: Scenario, get: Callable[[RequestResult], float | None]) -> list[float]:
    values = (get(r) for r in s.requests if r.ok)
    return [v for v in values if v is not None and not math.isnan(v)]


def _label_axis(axes: Any, labels: Sequence[str]) -> None:
    axes.set_xticks(range(1, len(labels) + 1), [mpl_text(label) for label in labels])
    if len(labels) > 3 or max(len(label) for label in labels) > 14:
        axes.tick_params(axis="x", labelrotation=25)


def plot_latency(run: BenchRun) -> str | None:
    """Box plots of TTFT and end-to-end latency per scenario; None when nothing was timed."""
    labels = _labels(run)
    panels = []
    for title, get in (
        ("Time to first token", lambda r: r.ttft_s),
        ("End-to-end latency", lambda r: r.e2e_s),
    ):
        series = [
            (label, _ok_values(s, get)) for label, s in zip(labels, run.scenarios, strict=True)
        ]
        series = [(label, values) for label, values in series if values]
        if series:
            panels.append((title, series))
    if not panels:
        return None
    figure = new_figure(5 * len(panels) + 1, 4)
    for index, (title, series) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        axes.boxplot([values for _, values in series])
        _label_axis(axes, [label for label, _ in series])
        axes.set_title(title)
        axes.set_ylabel("seconds")
        axes.grid(axis="y", alpha=0.3)
    return figure_data_uri(figure)


def plot_decode(run: BenchRun) -> str | None:
    """Decode tokens/s per scenario: the median as a bar, p10–p90 as the error bar."""
    bars = []
    for label, s in zip(_labels(run), run.scenarios, strict=True):
        values = _ok_values(s, lambda r: r.decode_tokens_per_s)
        if values:
            p10, p50, p90 = (percentile(values, q) or 0.0 for q in (10, 50, 90))
            bars.append((label, p50, p50 - p10, p90 - p50))
    if not bars:
        return None
    figure = new_figure(max(5, 1.2 * len(bars) + 2), 4)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(1, len(bars) + 1)
    errors = [[low for *_, low, _ in bars], [high for *_, high in bars]]
    axes.bar(positions, [p50 for _, p50, _, _ in bars], yerr=errors, capsize=4, color="#4c78a8")
    _label_axis(axes, [label for label, *_ in bars])
    axes.set_title("Decode speed (p50, error bars p10–p90)")
    axes.set_ylabel("tokens/s")
    axes.grid(axis="y", alpha=0.3)
    return figure_data_uri(figure)


def plot_throughput(run: BenchRun) -> str | None:
    """Aggregate completion tokens/s against concurrency, one line per target.

    Open-loop scenarios (an arrival ``rate``) are left out: their concurrency is not the load
    they ran under, and plotting them at it would put two different loads on one x value.
    """
    lines: dict[str, list[tuple[int, float]]] = {}
    for s in run.scenarios:
        if s.rate is not None:
            continue
        throughput = stats_for(s)["throughput_tokens_per_s"]
        if throughput is not None:
            lines.setdefault(s.target, []).append((s.concurrency, throughput))
    if not lines:
        return None
    figure = new_figure(7, 4)
    axes = figure.add_subplot(1, 1, 1)
    for target, points in lines.items():
        points.sort()
        axes.plot([c for c, _ in points], [t for _, t in points], marker="o", label=mpl_text(target))
    concurrency = sorted({c for points in lines.values() for c, _ in points})
    axes.set_xticks(concurrency)
    axes.set_xlabel("concurrency")
    axes.set_ylabel("completion tokens/s")
    axes.set_title("Aggregate throughput vs concurrency")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure_data_uri(figure)


def plot_ttft_vs_prompt(run: BenchRun) -> str | None:
    """TTFT against prompt length per target: shows prefill cost growing with the prompt."""
    points: dict[str, list[tuple[int, float]]] = {}
    for s in run.scenarios:
        for r in s.requests:
            if r.ok and r.ttft_s is not None and r.prompt_tokens > 0:
                points.setdefault(s.target, []).append((r.prompt_tokens, r.ttft_s))
    if not points:
        return None
    figure = new_figure(7, 4)
    axes = figure.add_subplot(1, 1, 1)
    for target, xy in points.items():
        axes.scatter([x for x, _ in xy], [y for _, y in xy], s=14, alpha=0.7, label=mpl_text(target))
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("TTFT (s)")
    axes.set_title("Time to first token vs prompt length")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure_data_uri(figure)


PLOTS: tuple[tuple[str, Callable[[BenchRun], str | None]], ...] = (
    ("Latency distributions", plot_latency),
    ("Decode speed", plot_decode),
    ("Throughput vs concurrency", plot_throughput),
    ("TTFT vs prompt length", plot_ttft_vs_prompt),
)


# ---------------------------------------------------------------------- HTML


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as dotted keys; sizes in ``*_bytes`` keys made readable."""
    rows = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, f"{name}."))
        elif str(key).endswith("_bytes") and isinstance(value, int | float):
            rows.append((name, _fmt_bytes(value)))
        else:
            rows.append((name, _fmt_value(value)))
    return rows


def _html_header(run: BenchRun) -> str:
    title = run.name or run.id or "unsaved run"
    meta = f"run {run.id or '(unsaved)'} · {_fmt_time(run.created_at)}"
    meta += f" · {len(run.scenarios)} scenario(s)"
    load = describe(run.config.get("background_load") or 0)
    if load:
        meta += f" · with {load}"
    return f"<h1>edgelm bench: {escape(title)}</h1><p class='meta'>{escape(meta)}</p>"


def _html_dict_section(title: str, data: dict[str, Any]) -> str:
    if not data:
        return ""
    return f"<h2>{escape(title)}</h2>" + html_table(("key", "value"), _flatten(data))


def _html_overview(run: BenchRun) -> str:
    if not run.scenarios:
        return "<h2>Summary</h2><p>No scenarios were measured.</p>"
    return "<h2>Summary</h2>" + html_table(OVERVIEW_COLUMNS, _overview_rows(run))


def _html_plots(run: BenchRun) -> str:
    figures = []
    for title, plot in PLOTS:
        uri = plot(run)
        if uri is not None:
            figures.append(
                f'<figure><img src="{uri}" alt="{escape(title)}"><figcaption>{escape(title)}'
                "</figcaption></figure>"
            )
    return "<h2>Plots</h2>" + "".join(figures) if figures else ""


SUMMARY_ROWS: tuple[tuple[str, str, float], ...] = (
    ("TTFT (ms)", "ttft", 1000.0),
    ("ITL, chunk gaps (ms)", "itl", 1000.0),
    ("TPOT (ms)", "tpot", 1000.0),
    ("end-to-end (ms)", "e2e", 1000.0),
    ("decode tok/s", "decode_tps", 1.0),
    ("prompt tok/s", "prompt_tps", 1.0),
)
SUMMARY_KEYS = ("n", "mean", "std", "min", "p50", "p90", "p99", "max")


def _summary_cells(summary: dict[str, Any], scale: float) -> list[str]:
    cells = [str(summary.get("n", 0))]
    for key in SUMMARY_KEYS[1:]:
        value = summary.get(key)
        cells.append(MISSING if value is None else f"{value * scale:,.1f}")
    return cells


def _scenario_facts(s: Scenario, stats: dict[str, Any]) -> list[tuple[str, str]]:
    res = s.resources
    rate = f", rate {s.rate:g}/s" if s.rate is not None else ""
    error_rate = stats["error_rate"]
    tokens = (
        _fmt_number(stats["prompt_tokens_mean"]),
        _fmt_number(stats["completion_tokens_mean"]),
    )
    cpu = (_fmt_number(res.mean_cpu_percent, 0), _fmt_number(res.peak_cpu_percent, 0))
    facts = [
        ("kind · model", f"{s.kind} · {s.model}"),
        ("load", f"concurrency {s.concurrency}{rate}"),
        ("requests (ok / errors)", f"{stats['requests']} ({stats['ok']} / {stats['errors']})"),
        ("error rate", MISSING if error_rate is None else f"{error_rate:.1%}"),
        ("wall time", _fmt_seconds(s.wall_s)),
        ("throughput (completion tok/s)", _fmt_number(stats["throughput_tokens_per_s"])),
        ("requests/s", _fmt_number(stats["requests_per_s"], 2)),
        ("mean prompt / completion tokens", " / ".join(tokens)),
        ("peak RSS", _fmt_bytes(res.peak_rss_bytes)),
        ("CPU % mean / peak", " / ".join(cpu)),
    ]
    if "slo" in stats:
        bounds = {k: v for k, v in stats["slo"].items() if v is not None}
        facts += [("goodput", _goodput(stats)), ("SLO", _fmt_value(bounds))]
    if res.gpu_peak_memory_bytes is not None or res.gpu_mean_util_percent is not None:
        util = _fmt_number(res.gpu_mean_util_percent, 0)
        facts.append(("GPU", f"{_fmt_bytes(res.gpu_peak_memory_bytes)} peak, {util} % util"))
    if res.energy_joules is not None:
        facts.append(("energy", f"{res.energy_joules:,.1f} J ({res.energy_source or 'unknown'})"))
    return facts


def _html_scenario(label: str, s: Scenario) -> str:
    stats = stats_for(s)
    rows = [(name, *_summary_cells(stats[key], scale)) for name, key, scale in SUMMARY_ROWS]
    parts = [
        f"<h3>{escape(label)}</h3>",
        html_table(("", "value"), _scenario_facts(s, stats)),
        html_table(("metric", *SUMMARY_KEYS), rows),
    ]
    errors = list(dict.fromkeys(r.error or "unknown error" for r in s.requests if not r.ok))
    if errors:
        shown = "".join(f"<li>{escape(message)}</li>" for message in errors[:5])
        parts.append(f"<p class='errors'>Errors:</p><ul class='errors'>{shown}</ul>")
    return "".join(parts)


def _html_scenarios(run: BenchRun) -> str:
    if not run.scenarios:
        return ""
    sections = [
        _html_scenario(label, s) for label, s in zip(_labels(run), run.scenarios, strict=True)
    ]
    return "<h2>Scenarios</h2>" + "".join(sections)


def _html_cold(run: BenchRun) -> str:
    rows = []
    for s in run.scenarios:
        if s.cold is None:
            continue
        first = s.cold.first_request
        rows.append(
            (
                s.target,
                s.model,
                _fmt_seconds(s.cold.load_s),
                _fmt_seconds(first.ttft_s if first else None),
                _fmt_seconds(first.e2e_s if first else None),
                MISSING if first is None else ("ok" if first.ok else first.error or "error"),
            )
        )
    if not rows:
        return ""
    header = ("target", "model", "load", "first TTFT", "first e2e", "first request")
    return "<h2>Cold start</h2>" + html_table(header, rows)


def _html_micro(run: BenchRun) -> str:
    if not run.micro:
        return ""
    columns = list(dict.fromkeys(key for row in run.micro for key in row))
    rows = [[_fmt_value(row.get(key)) for key in columns] for row in run.micro]
    return "<h2>Micro benchmarks (prompt processing / token generation)</h2>" + html_table(
        columns, rows
    )


def _html_context(run: BenchRun) -> str:
    """The context-scaling scenario's table and plot, for runs of ``bench context`` only."""
    rows = context_rows(run)
    if not rows:
        return ""
    cells = [context_table_cells(row) for row in rows]
    uri = plot_context_scaling(run)
    figure = f'<figure><img src="{uri}" alt="Context scaling"></figure>' if uri else ""
    return "<h2>Context scaling</h2>" + html_table(CONTEXT_COLUMNS, cells) + figure


def render_html(run: BenchRun) -> str:
    """The report as one HTML string; every text from the run is escaped."""
    body = "".join(
        (
            _html_header(run),
            _html_dict_section("System", run.system),
            _html_dict_section("Configuration", run.config),
            _html_overview(run),
            _html_context(run),
            _html_plots(run),
            _html_scenarios(run),
            _html_cold(run),
            _html_micro(run),
        )
    )
    return html_page(f"edgelm bench {run.name or run.id}".strip(), body)


def write_html(run: BenchRun, path: Path) -> Path:
    """A self-contained offline HTML report: open it anywhere, no network needed."""
    return write_atomically(Path(path), render_html(run))
