"""Reports of evaluation runs: summaries, per-category tables, plots, and diffs between runs.

Everything is computed from the stored result rows (see :mod:`edgelm.evals.runs_db`), so a
report of a resumed run or of a run read back months later shows the same figures. An error
row counts as quality 0 (the user got no answer) and is also counted on its own. Costs use
:mod:`edgelm.cost`: local cost from each answer's measured end-to-end latency (energy plus
written-off hardware while the machine was busy with it) and cloud-equivalent cost from its
token counts at the prices file's per-token rates. The HTML report is made with
:mod:`edgelm.reporting`, like the bench's (inline CSS, matplotlib Agg PNGs as data URIs, no
scripts, no network).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from edgelm.bench.stats import percentile
from edgelm.cost import Prices, local_cost_per_request
from edgelm.evals.judge import CRITERIA
from edgelm.evals.runs_db import EvalRun, ResultRow
from edgelm.reporting import (
    escape,
    figure_data_uri,
    html_page,
    html_table,
    mpl_text,
    new_figure,
    write_atomically,
)

HIGHER_IS_WORSE = frozenset({"false_refusal", "escalated"})
"""Metrics where a rise is a regression (every other metric: a fall is). ``escalated`` is the
share of a hybrid model's answers the LLM wrote: more of it costs latency."""


@dataclass
class LoadedRun:
    """A run with its rows, as the report functions take them."""

    run: EvalRun
    rows: list[ResultRow]

    def label(self, model: str, many: bool) -> str:
        return f"{self.run.id}:{model}" if many else model


def _mean(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return sum(data) / len(data) if data else None


def _quality(row: ResultRow) -> float:
    return float(row.metrics.get("quality") or 0.0) if row.ok else 0.0


def _fired_checks(extension: dict[str, Any] | None) -> set[str]:
    """The answer checks that fired for one answer: the hybrid route's firing policy, or the
    RAG answer's ``checks``."""
    if not extension:
        return set()
    found = {str(c.get("policy")) for c in extension.get("checks") or [] if isinstance(c, dict)}
    if extension.get("fired"):
        found.add(str(extension["fired"]))
    return found


def summarize(loaded: LoadedRun, prices: Prices | None = None) -> list[dict[str, Any]]:
    """One dict per model of the run: quality, every metric's mean, judge, latency, cost."""
    prices = prices or Prices()
    by_model: dict[str, list[ResultRow]] = defaultdict(list)
    for row in loaded.rows:
        by_model[row.model].append(row)
    expected = len(loaded.run.items)
    out = []
    for model in loaded.run.models:
        rows = by_model.get(model, [])
        ok = [r for r in rows if r.ok]
        metric_names = sorted({k for r in ok for k in r.metrics if k != "quality"})
        metrics = {m: _mean(r.metrics.get(m) for r in ok) for m in metric_names}
        routes = [str(r.extension["route"]) for r in ok if r.extension and r.extension.get("route")]
        if routes:  # a hybrid model: how often the LLM answered (refine or direct)
            metrics["escalated"] = sum(route != "draft" for route in routes) / len(routes)
        fired = [_fired_checks(r.extension) for r in ok]
        for check in ("degenerate", "unsupported"):  # answers the checks kept from the user
            if any(check in f for f in fired):
                metrics[f"{check}_caught"] = sum(check in f for f in fired) / len(ok)
        judged = [r for r in ok if r.judge_scores or r.judge_error]
        local = [local_cost_per_request(prices, r.e2e_s or 0.0)["total"] for r in ok]
        summary: dict[str, Any] = {
            "model": model,
            "answered": f"{len(rows)}/{expected}",
            "n": len(rows),
            "errors": len(rows) - len(ok),
            "quality": _mean(_quality(r) for r in rows),
            "metrics": metrics,
            "judge": {c: _mean((r.judge_scores or {}).get(c) for r in ok) for c in CRITERIA}
            if judged
            else {},
            "judge_mean": _mean(
                sum(r.judge_scores.values()) / len(r.judge_scores) for r in ok if r.judge_scores
            ),
            "judge_parse_failures": sum(1 for r in judged if r.judge_error),
            "ttft_p50_s": percentile([r.ttft_s for r in ok], 50),
            "e2e_p50_s": percentile([r.e2e_s for r in ok], 50),
            "e2e_mean_s": _mean(r.e2e_s for r in ok),
            "prompt_tokens_mean": _mean(float(r.prompt_tokens) for r in ok),
            "completion_tokens_mean": _mean(float(r.completion_tokens) for r in ok),
            "currency": prices.local.currency,
            "local_cost_per_1k": (sum(local) / len(local) * 1000) if local else None,
            "cloud_cost_per_1k": {
                c.name: _mean(c.per_request(r.prompt_tokens, r.completion_tokens) for r in ok)
                * 1000
                if ok
                else None
                for c in prices.cloud
            },
        }
        out.append(summary)
    return out


def by_category(loaded: LoadedRun) -> dict[str, dict[str, tuple[float, int]]]:
    """``{model: {category: (mean quality, n)}}`` for the run's items' categories."""
    category = {it.id: it.category or "-" for it in loaded.run.items}
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in loaded.rows:
        groups[row.model][category.get(row.item_id, "-")].append(_quality(row))
    return {
        model: {cat: (sum(v) / len(v), len(v)) for cat, v in sorted(cats.items())}
        for model, cats in groups.items()
    }


def diff_runs(
    a: LoadedRun,
    b: LoadedRun,
    threshold: float = 0.05,
    latency_threshold: float = 0.25,
) -> dict[str, Any]:
    """Compare B to A model by model: metric deltas, regressions, and items that flipped.

    Quality-type metrics (0–1) regress when they fall by more than ``threshold`` (absolute),
    judge scores (1–5) when they fall by more than ``threshold * 4``, and latency when
    B/A exceeds ``1 + latency_threshold``. When the runs share no model name but each has one
    model, those two are compared (e.g. the same set on a new model).
    """
    sa, sb = {s["model"]: s for s in summarize(a)}, {s["model"]: s for s in summarize(b)}
    pairs = [(m, m) for m in sa if m in sb]
    if not pairs and len(sa) == 1 and len(sb) == 1:
        pairs = [(next(iter(sa)), next(iter(sb)))]
    rows: list[dict[str, Any]] = []
    flips: list[dict[str, Any]] = []
    for ma, mb in pairs:
        x, y = sa[ma], sb[mb]
        label = ma if ma == mb else f"{ma} → {mb}"
        values = [("quality", x["quality"], y["quality"], threshold, False)]
        for name in sorted(set(x["metrics"]) | set(y["metrics"])):
            values.append(
                (
                    name,
                    x["metrics"].get(name),
                    y["metrics"].get(name),
                    threshold,
                    name in HIGHER_IS_WORSE,
                )
            )
        values.append(("judge_mean", x["judge_mean"], y["judge_mean"], threshold * 4, False))
        values.append(("errors", float(x["errors"]), float(y["errors"]), 0.5, True))
        for name, va, vb, limit, worse_up in values:
            if va is None and vb is None:
                continue
            delta = None if va is None or vb is None else vb - va
            regression = delta is not None and (delta > limit if worse_up else delta < -limit)
            rows.append(
                {
                    "model": label,
                    "metric": name,
                    "a": va,
                    "b": vb,
                    "delta": delta,
                    "regression": regression,
                }
            )
        la, lb = x["e2e_p50_s"], y["e2e_p50_s"]
        if la and lb:
            rows.append(
                {
                    "model": label,
                    "metric": "e2e_p50_s",
                    "a": la,
                    "b": lb,
                    "delta": lb - la,
                    "regression": lb / la > 1 + latency_threshold,
                }
            )
        qa = {r.item_id: _quality(r) for r in a.rows if r.model == ma}
        qb = {r.item_id: _quality(r) for r in b.rows if r.model == mb}
        for item_id in sorted(set(qa) & set(qb)):
            if qa[item_id] != qb[item_id]:
                flips.append(
                    {
                        "model": label,
                        "item": item_id,
                        "a": qa[item_id],
                        "b": qb[item_id],
                        "regression": qb[item_id] < qa[item_id],
                    }
                )
    return {
        "a": a.run.id,
        "b": b.run.id,
        "rows": rows,
        "flips": flips,
        "regressed": any(r["regression"] for r in rows),
    }


# ------------------------------------------------------------------ terminal


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(runs: Sequence[LoadedRun], prices: Prices | None = None) -> Table:
    """Per-model headline figures of one or more runs."""
    many = len(runs) > 1
    table = Table(title="evaluation summary (quality: contains / pass@1 / RAG correct)")
    columns = ["model", "answered", "errors", "quality", "EM", "F1", "judge", "judge fails",
               "TTFT p50", "e2e p50", "tokens out", "local /1k"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for loaded in runs:
        for s in summarize(loaded, prices):
            table.add_row(
                loaded.label(s["model"], many),
                s["answered"],
                str(s["errors"]),
                _f(s["quality"]),
                _f(s["metrics"].get("exact_match")),
                _f(s["metrics"].get("f1")),
                _f(s["judge_mean"], 2),
                str(s["judge_parse_failures"]) if s["judge"] else "–",
                _f(s["ttft_p50_s"], 2),
                _f(s["e2e_p50_s"], 2),
                _f(s["completion_tokens_mean"], 1),
                _f(s["local_cost_per_1k"], 4),
            )
    return table


def metrics_table(runs: Sequence[LoadedRun]) -> Table | None:
    """Every metric's mean per model (RAG and code metrics included); None if only quality."""
    many = len(runs) > 1
    summaries = [(lr, s) for lr in runs for s in summarize(lr)]
    names = sorted({m for _, s in summaries for m in s["metrics"]})
    if not names:
        return None
    table = Table(title="metrics (means over answered items)")
    table.add_column("model")
    for name in names:
        table.add_column(name, justify="right")
    for lr, s in summaries:
        table.add_row(lr.label(s["model"], many), *(_f(s["metrics"].get(n)) for n in names))
    return table


def category_table(runs: Sequence[LoadedRun]) -> Table:
    """Quality per category (rows) and model (columns)."""
    many = len(runs) > 1
    columns: list[tuple[str, dict[str, tuple[float, int]]]] = []
    for lr in runs:
        for model, cats in by_category(lr).items():
            columns.append((lr.label(model, many), cats))
    categories = sorted({c for _, cats in columns for c in cats})
    table = Table(title="quality per category")
    table.add_column("category")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for cat in categories:
        cells = []
        for _, cats in columns:
            value = cats.get(cat)
            cells.append(f"{value[0]:.2f} (n={value[1]})" if value else "–")
        table.add_row(cat, *cells)
    return table


def diff_table(diff: dict[str, Any]) -> Table:
    table = Table(title=f"{diff['a']} → {diff['b']}")
    for column in ("model", "metric", "A", "B", "Δ", ""):
        table.add_column(column)
    for row in diff["rows"]:
        table.add_row(
            row["model"],
            row["metric"],
            _f(row["a"]),
            _f(row["b"]),
            _f(row["delta"]),
            "[red]regression[/]" if row["regression"] else "",
        )
    return table


# ------------------------------------------------------------------ plots


def _points(
    runs: Sequence[LoadedRun], prices: Prices | None, x_key: str
) -> list[tuple[str, float, float]]:
    many = len(runs) > 1
    points = []
    for lr in runs:
        for s in summarize(lr, prices):
            x = s.get(x_key)
            if x is not None and s["quality"] is not None:
                points.append((lr.label(s["model"], many), float(x), float(s["quality"])))
    return points


def plot_quality_latency(runs: Sequence[LoadedRun]) -> str | None:
    """Scatter: median end-to-end latency (x) against quality (y), one point per model."""
    points = _points(runs, None, "e2e_p50_s")
    if not points:
        return None
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    for label, x, y in points:
        axes.scatter([x], [y], s=60)
        axes.annotate(mpl_text(label), (x, y), textcoords="offset points", xytext=(6, 4))
    axes.set_xlabel("end-to-end latency p50 (s)")
    axes.set_ylabel("quality")
    axes.set_ylim(-0.05, 1.05)
    axes.set_title("Quality vs latency")
    axes.grid(alpha=0.3)
    return figure_data_uri(figure)


def plot_quality_cost(runs: Sequence[LoadedRun], prices: Prices) -> str | None:
    """Scatter: cost per 1k requests (log x) against quality; local cost as circles and each
    cloud-equivalent price as another marker for the same model's tokens."""
    many = len(runs) > 1
    series: list[tuple[str, str, float, float]] = []
    for lr in runs:
        for s in summarize(lr, prices):
            if s["quality"] is None:
                continue
            label = lr.label(s["model"], many)
            if s["local_cost_per_1k"]:
                series.append(("local", label, s["local_cost_per_1k"], s["quality"]))
            for name, cost in s["cloud_cost_per_1k"].items():
                if cost:
                    series.append((name, label, cost, s["quality"]))
    if not series:
        return None
    figure = new_figure(8, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    markers = "os^Dvp*"
    kinds = list(dict.fromkeys(kind for kind, *_ in series))
    for index, kind in enumerate(kinds):
        xs = [x for k, _, x, _ in series if k == kind]
        ys = [y for k, _, _, y in series if k == kind]
        axes.scatter(xs, ys, marker=markers[index % len(markers)], s=55, label=mpl_text(kind))
    for kind, label, x, y in series:
        if kind == "local":
            axes.annotate(mpl_text(label), (x, y), textcoords="offset points", xytext=(6, 4))
    axes.set_xscale("log")
    axes.set_xlabel(f"cost per 1,000 requests ({prices.local.currency}, log scale)")
    axes.set_ylabel("quality")
    axes.set_ylim(-0.05, 1.05)
    axes.set_title("Quality vs cost (local measured; cloud = same tokens at example prices)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure_data_uri(figure)


# ------------------------------------------------------------------ HTML


def _cell(value: Any, digits: int = 3) -> str:
    return _f(value, digits)


def render_html(runs: Sequence[LoadedRun], prices: Prices | None = None) -> str:
    """One self-contained HTML page for one or more runs (diffs: first run against each)."""
    prices = prices or Prices()
    many = len(runs) > 1
    parts = [f"<h1>edgelm eval {escape(', '.join(lr.run.id for lr in runs))}</h1>"]
    for lr in runs:
        r = lr.run
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))
        params = ", ".join(f"{k}={v}" for k, v in sorted(r.params.items()))
        parts.append(
            f"<p class='meta'>run {escape(r.id)} · {escape(when)} · dataset {escape(r.dataset)} "
            f"({len(r.items)} items) · models {escape(', '.join(r.models))} · judge "
            f"{escape(r.judge_model or 'none')} · status {escape(r.status)}<br>{escape(params)}</p>"
        )
    header = ["model", "answered", "errors", "quality", "judge", "judge parse failures",
              "TTFT p50 s", "e2e p50 s", "tokens in", "tokens out",
              f"local /1k {prices.local.currency}",
              *(f"{c.name} /1k" for c in prices.cloud)]  # fmt: skip
    body = []
    for lr in runs:
        for s in summarize(lr, prices):
            body.append(
                [
                    lr.label(s["model"], many),
                    s["answered"],
                    s["errors"],
                    _cell(s["quality"]),
                    _cell(s["judge_mean"], 2),
                    s["judge_parse_failures"],
                    _cell(s["ttft_p50_s"], 2),
                    _cell(s["e2e_p50_s"], 2),
                    _cell(s["prompt_tokens_mean"], 1),
                    _cell(s["completion_tokens_mean"], 1),
                    _cell(s["local_cost_per_1k"], 4),
                    *(_cell(s["cloud_cost_per_1k"].get(c.name), 4) for c in prices.cloud),
                ]
            )
    parts.append("<h2>Per model</h2>" + html_table(header, body))
    names = sorted({m for lr in runs for s in summarize(lr) for m in s["metrics"]})
    if names:
        metric_rows = [
            [lr.label(s["model"], many), *(_cell(s["metrics"].get(n)) for n in names)]
            for lr in runs
            for s in summarize(lr)
        ]
        parts.append("<h2>Metrics</h2>" + html_table(["model", *names], metric_rows))
    columns = [(lr.label(m, many), cats) for lr in runs for m, cats in by_category(lr).items()]
    categories = sorted({c for _, cats in columns for c in cats})
    cat_rows = [
        [cat, *(f"{cats[cat][0]:.2f} (n={cats[cat][1]})" if cat in cats else "–"
                for _, cats in columns)]
        for cat in categories
    ]  # fmt: skip
    parts.append(
        "<h2>Quality per category</h2>" + html_table(["category", *(c for c, _ in columns)], cat_rows)
    )
    plots = [
        ("Quality vs latency", plot_quality_latency(runs)),
        ("Quality vs cost", plot_quality_cost(runs, prices)),
    ]
    parts.append("<h2>Plots</h2>")
    for title, uri in plots:
        if uri:
            parts.append(f"<figure><img alt='{escape(title)}' src='{uri}'></figure>")
    parts.append(f"<p class='meta'>costs: {escape(prices.source or 'default example prices')}</p>")
    for other in runs[1:]:
        diff = diff_runs(runs[0], other)
        parts.append(f"<h2>Diff {escape(diff['a'])} → {escape(diff['b'])}</h2>")
        parts.append(
            html_table(
                ["model", "metric", "A", "B", "Δ", ""],
                (
                    [r["model"], r["metric"], _cell(r["a"]), _cell(r["b"]), _cell(r["delta"]),
                     "REGRESSION" if r["regression"] else ""]
                    for r in diff["rows"]
                ),
            )
        )  # fmt: skip
        lost = [f for f in diff["flips"] if f["regression"]]
        if lost:
            parts.append(
                "<p class='errors'>items that got worse: "
                + escape(", ".join(f"{f['model']}/{f['item']}" for f in lost))
                + "</p>"
            )
    parts.append(_answers_section(runs, many))
    return html_page("edgelm eval", "".join(parts))


def _answers_section(runs: Sequence[LoadedRun], many: bool) -> str:
    rows = []
    for lr in runs:
        questions = {it.id: it for it in lr.run.items}
        for r in lr.rows:
            item = questions.get(r.item_id)
            rows.append(
                [
                    lr.label(r.model, many),
                    r.item_id,
                    item.question[:160] if item else "",
                    " | ".join(item.answers[:3]) if item else "",
                    (r.answer[:300] if r.ok else f"ERROR: {r.error}"),
                    _cell(_quality(r), 2),
                ]
            )
    return "<h2>Answers</h2>" + html_table(
        ["model", "item", "question", "reference", "answer", "quality"], rows
    )


def write_html(runs: Sequence[LoadedRun], path: Path, prices: Prices | None = None) -> Path:
    """Write the report atomically (a reader never sees half a file)."""
    return write_atomically(Path(path), render_html(runs, prices))
