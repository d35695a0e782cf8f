"""`edgelm bench ...` and `edgelm compare` end to end on fake models (in-process)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from edgelm.bench.report import read_json
from edgelm.catalog import Catalog, CatalogEntry
from tests.unit.test_cli import run


def register(home: Path) -> None:
    catalog = Catalog.load(home)
    catalog.add_user_entry(
        CatalogEntry(
            alias="small",
            engine="fake",
            tier="custom",
            options={"reply": "short answer", "token_delay_s": 0.002},
        )
    )
    catalog.add_user_entry(
        CatalogEntry(
            alias="large",
            engine="fake",
            tier="custom",
            options={
                "reply": "a much longer and more careful answer",
                "token_delay_s": 0.004,
                "memory_mb": 50,
            },
        )
    )


def test_bench_run_history_diff_report(isolated_home: Path, tmp_path: Path) -> None:
    register(isolated_home)
    out = tmp_path / "out"
    result = run(
        "bench",
        "run",
        "-m",
        "local:small,local:large",
        "-n",
        "3",
        "-c",
        "1,2",
        "--out",
        str(out),
        "--name",
        "first",
    )
    assert result.exit_code == 0, result.output
    assert "[BENCHMARK RESULTS]" in result.output
    block = json.loads(result.output.split("[BENCHMARK RESULTS]", 1)[1].split("\nrun ", 1)[0])
    assert {row["target"] for row in block} == {"local:small", "local:large"}
    saved = read_json(out / "results.json")
    assert [(s.target, s.concurrency) for s in saved.scenarios] == [
        ("local:small", 1),
        ("local:small", 2),
        ("local:large", 1),
        ("local:large", 2),
    ]
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 12
    assert "data:image/png;base64," in (out / "report.html").read_text()

    env = {
        "BENCH_MODELS": "local:small",
        "BENCH_ROUNDS": "2",
        "BENCH_MAX_TOKENS": "1",
        "BENCH_STREAM": "1",
    }
    second = run("bench", "run", "--no-html", env=env)
    assert second.exit_code == 0, second.output
    history = run("bench", "history")
    assert history.exit_code == 0 and "first" in history.output
    ids = [row for row in history.output.split() if row.count("-") == 2 and row[:8].isdigit()]
    assert len(ids) == 2
    newest, oldest = ids
    diff = run("bench", "diff", oldest, newest)
    assert "ttft" in diff.output
    report = run("bench", "report", "latest", "--out", str(tmp_path / "again"))
    assert report.exit_code == 0 and (tmp_path / "again" / "report.html").exists()
    missing = run("bench", "report", "nope")
    assert missing.exit_code == 1 and "error" in missing.output


def test_bench_bad_options(isolated_home: Path) -> None:
    register(isolated_home)
    assert run("bench", "run", "-m", "local:small", "-c", "0").exit_code == 1
    bad = run("bench", "run", "-m", "local:nothing")
    assert bad.exit_code == 1 and "not in the catalog" in bad.output
    micro = run("bench", "micro", "small")
    assert micro.exit_code == 1 and "no raw pp/tg" in micro.output


def test_compare(isolated_home: Path) -> None:
    register(isolated_home)
    result = run(
        "compare",
        "--slm",
        "local:small",
        "--llm",
        "local:large",
        "-n",
        "2",
        "--prompt",
        "What is 2+2?",
    )
    assert result.exit_code == 0, result.output
    assert "decision table" in result.output and "a month at" in result.output
    rows = json.loads(result.output.split("[COMPARISON RESULTS]", 1)[1])
    by_model = {row["model"]: row for row in rows}
    assert by_model["small"]["answer"] == "short answer"
    assert by_model["large"]["answer"] == "a much longer and more careful answer"
    assert by_model["small"]["warm_e2e_s"] < by_model["large"]["warm_e2e_s"]
    assert "lowest warm latency" in by_model["small"]["best_use"]
    assert by_model["small"]["cost"]["cloud_per_1k"]


def test_interleaved_run_prints_ttft_over_the_in_process_engine(
    isolated_home: Path, serve_app
) -> None:
    """Without --micro there is no raw tg to divide by, but a TTFT comparison still shows."""
    from edgelm.server.app import create_app
    from edgelm.settings import load_settings

    register(isolated_home)
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    base = serve_app(create_app(settings, catalog=Catalog.load(isolated_home)))
    result = run(
        "--endpoint", base, "bench", "run", "-m", "local:small,service:small",
        "--interleave", "-n", "4", "--max-tokens", "2", "--no-html",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "service vs in-process engine" in result.output
    table = result.output.split("TTFT p50 over in-process", 1)[1].split("[BENCHMARK RESULTS]")[0]
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if "│" in line}
    assert set(rows) == {"local:small", "small"}
    # a TTFT difference for the service, and no decode ratio without a raw tg
    assert re.search(r"│ [+-]\d+\.\d ms", rows["small"]) and "%" not in rows["small"]
