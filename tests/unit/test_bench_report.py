"""bench reports: JSON and CSV read back, an offline HTML file, the terminal table, the text block."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from edgelm.bench import report
from edgelm.bench.results import BenchRun, ColdStart, RequestResult, ResourceSample, Scenario
from edgelm.bench.stats import SLO, summarise_scenario
from edgelm.errors import InvalidRequest

PNG_URI = 'src="data:image/png;base64,'


def _requests(scale: float, n: int = 5) -> list[RequestResult]:
    return [
        RequestResult(
            prompt_id=f"p{i}",
            ttft_s=(0.1 + 0.02 * i) * scale,
            itl_s=[0.02 * scale, 0.04 * scale],
            tpot_s=0.03 * scale,
            e2e_s=(1.0 + 0.1 * i) * scale,
            prompt_tokens=20 + 10 * i,
            completion_tokens=30,
            prompt_tokens_per_s=150.0 / scale,
            decode_tokens_per_s=(40.0 + i) / scale,
            text="<b>not markup</b>",
        )
        for i in range(n)
    ]


def make_run() -> BenchRun:
    """Two targets (one with markup-like characters in its name) at concurrency 1 and 2."""
    scenarios = []
    for target, scale in (("slm", 1.0), ("<llm> [big] $x$", 2.0)):
        for concurrency in (1, 2):
            s = Scenario(
                target=target,
                kind="service",
                model=f"{target}-model",
                concurrency=concurrency,
                requests=_requests(scale * concurrency),
                wall_s=3.0 * scale,
                resources=ResourceSample(peak_rss_bytes=int(7e8 * scale), mean_cpu_percent=150.0),
            )
            summarise_scenario(s, SLO(ttft_s=0.2))
            scenarios.append(s)
    scenarios[0].requests.append(RequestResult(ok=False, error="HTTP 503 <overloaded>"))
    scenarios[0].cold = ColdStart(load_s=1.25, first_request=RequestResult(ttft_s=0.8, e2e_s=2.0))
    return BenchRun(
        id="20261118-1106-ab12",
        created_at=1_795_000_000.0,
        name="nightly & <friends>",
        config={"endpoint": "http://127.0.0.1:5273", "max_tokens": 30},
        system={
            "os": "Linux 6.1",
            "cpu": {"model": "Xeon", "simd": ["avx2", "avx512f"], "logical_cores": 2},
            "ram_total_bytes": 24 * 2**30,
            "gpus": [],
        },
        scenarios=scenarios,
        micro=[
            {"model": "slm", "test": "pp64", "tokens_per_s": 281.5},
            {"model": "slm", "test": "tg32", "tokens_per_s": 150.25, "threads": 2},
        ],
    )


# ---------------------------------------------------------------------- JSON / CSV


def test_json_round_trip(tmp_path: Path) -> None:
    run = make_run()
    path = report.write_json(run, tmp_path / "out" / "run.json")
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    assert report.read_json(path).model_dump() == run.model_dump()


def test_read_json_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot read benchmark run"):
        report.read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scenarios": [{"target": "x"}]}))
    with pytest.raises(InvalidRequest, match=r"not an edgelm benchmark run: scenarios\.0\.kind"):
        report.read_json(bad)
    bad.write_text("{not json")
    with pytest.raises(InvalidRequest, match="not an edgelm benchmark run"):
        report.read_json(bad)


def test_csv_has_one_row_per_request(tmp_path: Path) -> None:
    run = make_run()
    path = report.write_csv(run, tmp_path / "run.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(s.requests) for s in run.scenarios) == 21
    assert list(rows[0]) == list(report.CSV_COLUMNS)
    assert {"target", "model", "kind", "concurrency", "ttft_s", "itl_mean_s", "e2e_s"} <= set(
        rows[0]
    )
    first = rows[0]
    assert (first["run_id"], first["target"], first["concurrency"]) == (run.id, "slm", "1")
    assert float(first["itl_mean_s"]) == pytest.approx(0.03)
    assert first["itl_count"] == "2"
    assert float(first["e2e_s"]) == pytest.approx(1.0)
    failed = rows[5]
    assert (failed["ok"], failed["error"], failed["ttft_s"]) == (
        "False",
        "HTTP 503 <overloaded>",
        "",
    )
    assert rows[-1]["target"] == "<llm> [big] $x$" and rows[-1]["concurrency"] == "2"


# ---------------------------------------------------------------------- HTML


def _html(run: BenchRun, tmp_path: Path) -> str:
    return report.write_html(run, tmp_path / "report.html").read_text(encoding="utf-8")


def test_html_is_self_contained_with_all_plots(tmp_path: Path) -> None:
    page = _html(make_run(), tmp_path)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count(PNG_URI) == len(report.PLOTS) == 4
    for uri in re.findall(r'src="(data:image/png;base64,[^"]+)"', page):
        assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing is fetched: no scripts, no stylesheets, no remote sources
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "@import" not in page and "url(" not in page


def test_html_content_and_escaping(tmp_path: Path) -> None:
    page = _html(make_run(), tmp_path)
    assert "slm" in page and "&lt;llm&gt; [big] $x$" in page
    assert "<llm>" not in page and "<friends>" not in page
    assert "nightly &amp; &lt;friends&gt;" in page
    assert "HTTP 503 &lt;overloaded&gt;" in page  # error messages listed, escaped
    assert "<h2>System</h2>" in page and "cpu.simd" in page and "avx2, avx512f" in page
    assert "25.8 GB" in page  # ram_total_bytes made readable
    assert "<h2>Cold start</h2>" in page and "1.25 s" in page
    assert "<h2>Micro benchmarks" in page and "tg32" in page and "150.25" in page
    assert page.count("<h3>") == 4  # a stats table per scenario
    assert "slm c=1" in page and "slm c=2" in page  # repeated targets labelled by load
    assert "goodput" in page


def test_html_skips_plots_without_data(tmp_path: Path) -> None:
    run = make_run()
    for s in run.scenarios:
        s.cold = None
        for r in s.requests:
            r.prompt_tokens = 0  # no prompt lengths → no TTFT-vs-prompt scatter
            r.decode_tokens_per_s = None  # no decode speeds → no bar chart
    run.micro = []
    page = _html(run, tmp_path)
    assert page.count(PNG_URI) == 2  # latency boxes and throughput lines remain
    assert "Decode speed" not in page and "TTFT vs prompt length" not in page
    assert "<h2>Cold start</h2>" not in page and "Micro benchmarks" not in page


def test_html_of_an_empty_run(tmp_path: Path) -> None:
    page = _html(BenchRun(), tmp_path)
    assert PNG_URI not in page and "No scenarios were measured" in page
    failed_only = BenchRun(
        scenarios=[
            Scenario(
                target="down",
                kind="openai",
                model="m",
                requests=[RequestResult(ok=False, error="connection refused")],
            )
        ]
    )
    page = _html(failed_only, tmp_path)
    assert PNG_URI not in page and "connection refused" in page


# ---------------------------------------------------------------------- terminal


def test_results_table_renders(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    console.print(report.results_table(make_run()))
    text = console.export_text()
    for header in ("target", "TTFT p50", "ITL p50", "e2e p99", "decode tok/s p50", "goodput"):
        assert header in text
    assert "<llm> [big] $x$" in text  # brackets shown as written, not eaten as markup
    lines = [line for line in text.splitlines() if line.lstrip("│┃ ").startswith("slm")]
    assert len(lines) == 2
    assert "5/6" in lines[0] and "140 ms" in lines[0]  # ok/total, TTFT p50 of 0.10..0.18 s
    assert "700" in lines[0]  # peak RSS MB


def test_print_json_block_shape() -> None:
    run = make_run()
    text = report.print_json_block(run)
    label, _, body = text.partition("\n")
    assert label == "[BENCHMARK RESULTS]"
    entries = json.loads(body)
    assert isinstance(entries, list) and len(entries) == len(run.scenarios)
    first = entries[0]
    assert (first["target"], first["model"], first["concurrency"]) == ("slm", "slm-model", 1)
    assert first["ttft_p50_s"] == pytest.approx(0.14)
    assert first["decode_tps_p50"] == pytest.approx(42.0)
    assert (first["requests"], first["ok"], first["errors"]) == (6, 5, 1)
    # the workshop's own keys, with its definitions
    assert first["alias"] == "slm" and first["rounds"] == 6
    assert first["latency_avg"] == pytest.approx(1.2)
    assert first["tokens_per_sec_avg"] == pytest.approx(
        sum((20 + 10 * i + 30) / (1.0 + 0.1 * i) for i in range(5)) / 5
    )
    assert report.print_json_block(run, label="COMPARISON RESULTS").startswith(
        "[COMPARISON RESULTS]\n["
    )


def test_throughput_plot_leaves_out_open_loop_scenarios() -> None:
    run = make_run()
    assert report.plot_throughput(run) is not None
    for s in run.scenarios:
        s.rate = 1.5
    assert report.plot_throughput(run) is None
    assert report.plot_latency(run) is not None
