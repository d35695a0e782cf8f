"""bench history: runs stored in SQLite, read back exactly, listed, and diffed."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from edgelm.bench import history
from edgelm.bench.history import diff_runs, list_runs, load_run, save_run
from edgelm.bench.results import (
    BenchRun,
    ColdStart,
    RequestResult,
    ResourceSample,
    Scenario,
)
from edgelm.bench.stats import SLO, summarise_scenario
from edgelm.errors import InvalidRequest


def _requests(scale: float = 1.0, n: int = 4, decode: float = 40.0) -> list[RequestResult]:
    return [
        RequestResult(
            prompt_id=f"p{i}",
            started_at=0.25 * i,
            prepare_s=0.001,
            send_s=0.01 * scale,
            ttft_s=(0.1 + 0.05 * i) * scale,
            itl_s=[0.02 * scale, 0.025 * scale, 0.03 * scale],
            tpot_s=0.025 * scale,
            e2e_s=(1.0 + 0.1 * i) * scale,
            prompt_tokens=12 + i,
            completion_tokens=32,
            prompt_tokens_per_s=120.0 / scale,
            decode_tokens_per_s=decode / scale,
            text=f"answer {i} — ünïcode",
            server_timings={"queue_s": 0.0, "decode_tokens_per_s": decode} if i % 2 else None,
        )
        for i in range(n)
    ]


def make_run(name: str = "baseline", scale: float = 1.0, rss: int | None = 700_000_000) -> BenchRun:
    """Two targets, the SLM at two concurrency levels, one failed request, a cold start."""
    slm = Scenario(
        target="qwen2.5-0.5b",
        kind="service",
        model="qwen2.5-0.5b",
        concurrency=1,
        warmup=1,
        requests=_requests(scale),
        wall_s=4.6 * scale,
        resources=ResourceSample(
            peak_rss_bytes=rss, mean_cpu_percent=180.5, peak_cpu_percent=199.0
        ),
        cold=ColdStart(load_s=1.5, first_request=RequestResult(ttft_s=0.9, e2e_s=2.0)),
    )
    slm4 = Scenario(
        target="qwen2.5-0.5b",
        kind="service",
        model="qwen2.5-0.5b",
        concurrency=4,
        requests=[*_requests(scale * 2), RequestResult(ok=False, error="HTTP 503: overloaded")],
        wall_s=3.0 * scale,
        resources=ResourceSample(peak_rss_bytes=rss),
    )
    llm = Scenario(
        target="qwen2.5-1.5b",
        kind="openai",
        model="Qwen/Qwen2.5-1.5B",
        concurrency=1,
        rate=0.5,
        requests=_requests(scale * 2.5, decode=20.0),
        wall_s=11.0 * scale,
    )
    for s in (slm, slm4, llm):
        summarise_scenario(s, SLO(ttft_s=0.5))
    return BenchRun(
        name=name,
        created_at=1_795_000_000.25,
        config={"max_tokens": 32, "prompts": ["a", "b"], "nested": {"x": 1}},
        system={"cpu": {"model": "Xeon", "simd": ["avx2"]}, "ram_total_bytes": 24 * 2**30},
        scenarios=[slm, slm4, llm],
        micro=[{"model": "qwen2.5-0.5b", "test": "pp64", "tokens_per_s": 140.2}],
    )


@pytest.fixture
def db(isolated_home: Path) -> Path:
    return isolated_home / "results.db"


# ---------------------------------------------------------------------- save / load


def test_round_trip_is_exact(db: Path) -> None:
    run = make_run()
    run_id = save_run(db, run)
    assert run.id == run_id
    assert re.fullmatch(r"\d{8}-\d{4}-[0-9a-f]{4}", run_id)
    assert run_id.startswith("20261118-1106-")  # created_at, in UTC
    loaded = load_run(db, run_id)
    assert loaded.model_dump() == run.model_dump()


def test_saving_sets_created_at_and_keeps_a_given_id(db: Path) -> None:
    run = make_run()
    run.created_at = 0.0
    run.id = "my-run"
    assert save_run(db, run) == "my-run"
    assert run.created_at > 0
    assert load_run(db, "my-run").created_at == run.created_at


def test_resaving_replaces_the_run(db: Path) -> None:
    run = make_run()
    save_run(db, run)
    run.scenarios = run.scenarios[:1]
    run.name = "edited"
    save_run(db, run)
    loaded = load_run(db, run.id)
    assert loaded.name == "edited" and len(loaded.scenarios) == 1
    assert len(list_runs(db)) == 1


def test_prefix_latest_and_errors(db: Path) -> None:
    ids = ["20260101-0900-aaaa", "20260101-0900-aabb", "20260102-1000-cccc"]
    for i, run_id in enumerate(ids):
        run = make_run(name=f"run {i}")
        run.id, run.created_at = run_id, 1_000_000.0 + i
        save_run(db, run)
    assert load_run(db, "20260101-0900-aab").id == ids[1]
    assert load_run(db, "20260102").id == ids[2]
    assert load_run(db, ids[0]).id == ids[0]
    assert load_run(db, "latest").name == "run 2"
    with pytest.raises(InvalidRequest, match=r"ambiguous.*20260101-0900-aa"):
        load_run(db, "20260101-0900-a")
    with pytest.raises(InvalidRequest, match=r"no benchmark run 'nope'.*recent runs: 20260102"):
        load_run(db, "nope")
    with pytest.raises(InvalidRequest, match="run id is required"):
        load_run(db, "  ")


def test_loading_without_a_database(db: Path) -> None:
    with pytest.raises(InvalidRequest, match="no benchmark runs are stored yet"):
        load_run(db, "latest")
    assert list_runs(db) == []
    assert not db.exists()  # reading never creates the file


def test_latest_on_an_empty_database(db: Path) -> None:
    run = make_run()
    save_run(db, run)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("DELETE FROM runs")
    with pytest.raises(InvalidRequest, match="no benchmark runs are stored"):
        load_run(db, "latest")


def test_failure_mid_save_leaves_nothing_behind(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = make_run(name="kept")
    save_run(db, kept)
    real_insert = history._insert_scenario
    calls = []

    def fail_on_second(conn: sqlite3.Connection, run_id: str, idx: int, s: Scenario) -> None:
        calls.append(idx)
        if idx == 1:  # the run row and the first scenario (with its requests) are written
            raise RuntimeError("disk on fire")
        real_insert(conn, run_id, idx, s)

    monkeypatch.setattr(history, "_insert_scenario", fail_on_second)
    doomed = make_run(name="doomed")
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_run(db, doomed)
    assert calls == [0, 1]
    assert doomed.id == ""  # not given an id for a write that did not happen
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM runs").fetchall() == [("kept",)]
        assert conn.execute("SELECT DISTINCT run_id FROM scenarios").fetchall() == [(kept.id,)]
        assert conn.execute("SELECT DISTINCT run_id FROM requests").fetchall() == [(kept.id,)]
    assert load_run(db, "latest").model_dump() == kept.model_dump()


def test_database_uses_wal_and_request_columns_cover_the_model(db: Path) -> None:
    save_run(db, make_run())
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 4 + 5 + 4
        # stored as plain SQL values, so the file is useful with the sqlite3 shell
        ttft = conn.execute("SELECT ttft_s FROM requests WHERE idx = 0 LIMIT 1").fetchone()[0]
        assert isinstance(ttft, float)
    assert set(RequestResult.model_fields) <= columns, "history.SCHEMA misses a RequestResult field"


def test_newer_schema_is_refused(db: Path) -> None:
    save_run(db, make_run())
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {history.SCHEMA_VERSION + 1}")
    with pytest.raises(InvalidRequest, match="newer edgelm"):
        load_run(db, "latest")


# ---------------------------------------------------------------------- list


def test_list_runs_newest_first_with_headlines(db: Path) -> None:
    for i in range(3):
        run = make_run(name=f"run {i}")
        run.created_at = 1_000_000.0 + i
        save_run(db, run)
    rows = list_runs(db)
    assert [r["name"] for r in rows] == ["run 2", "run 1", "run 0"]
    assert [r["name"] for r in list_runs(db, limit=2)] == ["run 2", "run 1"]
    top = rows[0]
    assert set(top) >= {"id", "created_at", "name", "targets", "concurrency"}
    assert top["targets"] == ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    assert top["concurrency"] == [1, 4]
    assert (top["scenarios"], top["requests"], top["errors"]) == (3, 13, 1)
    assert top["best_decode_tps_p50"] == pytest.approx(40.0)
    assert top["best_ttft_p50_s"] == pytest.approx(0.175)  # p50 of 0.1, 0.15, 0.2, 0.25
    # SLM c=4: 4 ok x 32 tokens over 3 s
    assert top["best_throughput_tokens_per_s"] == pytest.approx(128 / 3.0)


def test_list_runs_works_for_runs_saved_without_stats(db: Path) -> None:
    run = make_run()
    for s in run.scenarios:
        s.stats = {}
    save_run(db, run)
    assert list_runs(db)[0]["best_decode_tps_p50"] == pytest.approx(40.0)


# ---------------------------------------------------------------------- diff


def _rows(rows: list[dict], target: str, concurrency: int) -> dict[str, dict]:
    return {
        r["metric"]: r for r in rows if r["target"] == target and r["concurrency"] == concurrency
    }


def test_diff_slower_run_is_a_regression() -> None:
    base, slow = make_run(), make_run(name="slow", scale=1.5, rss=900_000_000)
    rows = _rows(diff_runs(base, slow), "qwen2.5-0.5b", 1)
    assert set(rows) == {m for m, _ in history.DIFF_METRICS}
    for metric in (
        "ttft_p50",
        "ttft_p90",
        "e2e_p50",
        "e2e_p90",
        "decode_tps_p50",
        "peak_rss_bytes",
    ):
        assert rows[metric]["regression"], metric
        assert not rows[metric]["improvement"], metric
    assert rows["ttft_p50"]["ratio"] == pytest.approx(1.5)
    assert rows["decode_tps_p50"]["ratio"] == pytest.approx(1 / 1.5)
    # tokens / wall time: both scale by 1.5, so throughput drops
    assert rows["throughput_tokens_per_s"]["regression"]
    assert rows["error_rate"]["ratio"] == 1.0 and not rows["error_rate"]["regression"]


def test_diff_faster_run_is_an_improvement_not_a_regression() -> None:
    base, fast = make_run(), make_run(name="fast", scale=0.8)
    rows = diff_runs(base, fast)
    assert not any(r["regression"] for r in rows)
    ttft = _rows(rows, "qwen2.5-1.5b", 1)["ttft_p50"]
    assert ttft["improvement"] and ttft["ratio"] == pytest.approx(0.8)
    assert (ttft["a"], ttft["b"]) == (pytest.approx(0.4375), pytest.approx(0.35))


def test_diff_threshold_and_zero_baselines() -> None:
    base, near = make_run(), make_run(scale=1.03)
    assert not any(r["regression"] for r in diff_runs(base, near))  # within 5 %
    assert any(r["regression"] for r in diff_runs(base, near, threshold=0.01))
    worse = make_run()
    worse.scenarios[0].requests[0] = RequestResult(ok=False, error="timeout")
    error_rate = _rows(diff_runs(base, worse), "qwen2.5-0.5b", 1)["error_rate"]
    assert (error_rate["a"], error_rate["b"]) == (0.0, 0.25)
    assert error_rate["regression"] and error_rate["ratio"] is None


def test_diff_unmatched_and_unmeasured_scenarios() -> None:
    base, other = make_run(), make_run(rss=None)
    base.id, other.id = "A1", "B1"
    other.scenarios[1].concurrency = 8  # c=4 only in A, c=8 only in B
    rows = diff_runs(base, other)
    only = [r for r in rows if r["metric"] is None]
    assert [(r["concurrency"], r["note"].split(";")[0]) for r in only] == [
        (4, "only in run A"),
        (8, "only in run B"),
    ]
    rss = _rows(rows, "qwen2.5-0.5b", 1)["peak_rss_bytes"]
    assert rss["b"] is None and rss["ratio"] is None and not rss["regression"]
    assert rss["note"] == "not measured in run B"
    llm = _rows(rows, "qwen2.5-1.5b", 1)
    assert llm["ttft_p50"]["rate"] == 0.5  # matched on rate too
    assert llm["ttft_p50"]["scenario"] == "qwen2.5-1.5b c=1 @ 0.5/s"


def test_a_file_that_is_not_a_database_is_a_clear_error(db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_text("this is not sqlite, just text that is long enough to have a header" * 10)
    with pytest.raises(InvalidRequest, match="not a usable results database"):
        list_runs(db)
