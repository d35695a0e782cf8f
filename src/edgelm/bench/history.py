"""Every benchmark run, kept in one SQLite file so runs can be listed, reloaded and diffed.

The caller passes the path (``settings.home / "results.db"``); nothing here reads settings.
A run is written in a single transaction: a crash or an exception half-way leaves the file as
it was before, never a scenario without its requests. A run being measured is stored as
``running`` after each scenario it finishes (see :func:`save_run`), so a run killed half-way
keeps its finished scenarios and is listed as ``interrupted`` with the command to run again. Requests are stored raw, one row each, so
statistics can be recomputed from the database alone, and the columns are plain SQL values
(JSON text only for lists and free-form dicts) so the file can be queried with ``sqlite3``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from edgelm import rundb
from edgelm.bench.results import BenchRun, ColdStart, RequestResult, ResourceSample, Scenario
from edgelm.bench.stats import percentile, scenario_stats
from edgelm.errors import InvalidRequest

SCHEMA_VERSION = 2

MIGRATIONS = {2: "ALTER TABLE runs ADD COLUMN status TEXT NOT NULL DEFAULT 'done'"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    system TEXT NOT NULL,
    micro TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'done'
);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_at);
CREATE TABLE IF NOT EXISTS scenarios (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    target TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    concurrency INTEGER NOT NULL,
    rate REAL,
    warmup INTEGER NOT NULL,
    wall_s REAL NOT NULL,
    resources TEXT NOT NULL,
    cold TEXT,
    stats TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS requests (
    run_id TEXT NOT NULL,
    scenario_idx INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    prompt_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    prepare_s REAL NOT NULL,
    send_s REAL,
    ttft_s REAL,
    itl_s TEXT NOT NULL,
    tpot_s REAL,
    e2e_s REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    prompt_tokens_per_s REAL,
    decode_tokens_per_s REAL,
    text TEXT NOT NULL,
    server_timings TEXT,
    PRIMARY KEY (run_id, scenario_idx, idx),
    FOREIGN KEY (run_id, scenario_idx) REFERENCES scenarios (run_id, idx) ON DELETE CASCADE
);
"""

REQUEST_JSON_FIELDS = frozenset({"itl_s", "server_timings"})
"""RequestResult fields stored as JSON text; every other field is a plain SQL value."""

DIFF_METRICS: tuple[tuple[str, bool], ...] = (
    ("ttft_p50", False),
    ("ttft_p90", False),
    ("e2e_p50", False),
    ("e2e_p90", False),
    ("decode_tps_p50", True),
    ("throughput_tokens_per_s", True),
    ("peak_rss_bytes", False),
    ("error_rate", False),
)
"""(metric, higher is better) for :func:`diff_runs`."""


# ---------------------------------------------------------------------- connection


def _connect(db_path: Path) -> AbstractContextManager[sqlite3.Connection]:
    """The results database, schema in place (see :func:`edgelm.rundb.connect`)."""
    return rundb.connect(db_path, SCHEMA, SCHEMA_VERSION, "results", MIGRATIONS)


# ---------------------------------------------------------------------- saving


def save_run(db_path: Path, run: BenchRun, rerun: str | None = None) -> str:
    """Store ``run`` and return its id, assigning ``run.id`` (and ``created_at``) when unset.

    Saving a run whose id is already stored replaces it, so a run can be re-saved after its
    statistics were recomputed, or after each scenario while it is measured: with
    ``run.status`` "running" this process is recorded as its owner and ``rerun`` as the
    command that measures it again should the process die; "done" releases it. The id is
    only set on ``run`` once the write has committed.
    """
    if not run.created_at:
        run.created_at = time.time()
    with _connect(db_path) as conn, rundb.transaction(conn):
        run_id = run.id or rundb.unused_run_id(conn, run.created_at)
        conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        _insert_run(conn, run_id, run)
        for idx, scenario in enumerate(run.scenarios):
            _insert_scenario(conn, run_id, idx, scenario)
        if run.status == "running":
            rundb.claim(conn, run_id, rerun or "edgelm bench run")
        elif run.status == "done":
            rundb.release(conn, run_id)
    run.id = run_id
    return run_id


def mark_interrupted(db_path: Path, run_id: str) -> None:
    """The owner stopped measuring (Ctrl-C): the stored scenarios stay, the run is listed
    as interrupted with its command."""
    with _connect(db_path) as conn, rundb.transaction(conn):
        conn.execute(
            "UPDATE runs SET status = 'interrupted' WHERE id = ? AND status = 'running'",
            (run_id,),
        )


def _insert_run(conn: sqlite3.Connection, run_id: str, run: BenchRun) -> None:
    conn.execute(
        "INSERT INTO runs (id, created_at, name, config, system, micro, status)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            run.created_at,
            run.name,
            json.dumps(run.config),
            json.dumps(run.system),
            json.dumps(run.micro),
            run.status,
        ),
    )


def _insert_scenario(conn: sqlite3.Connection, run_id: str, idx: int, s: Scenario) -> None:
    conn.execute(
        "INSERT INTO scenarios (run_id, idx, target, kind, model, concurrency, rate, warmup,"
        " wall_s, resources, cold, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            idx,
            s.target,
            s.kind,
            s.model,
            s.concurrency,
            s.rate,
            s.warmup,
            s.wall_s,
            s.resources.model_dump_json(),
            s.cold.model_dump_json() if s.cold is not None else None,
            json.dumps(s.stats),
        ),
    )
    _insert_requests(conn, run_id, idx, s.requests)


def _request_fields() -> tuple[str, ...]:
    return tuple(RequestResult.model_fields)


def _insert_requests(
    conn: sqlite3.Connection, run_id: str, scenario_idx: int, requests: list[RequestResult]
) -> None:
    fields = _request_fields()
    columns = ", ".join(("run_id", "scenario_idx", "idx", *fields))
    marks = ", ".join("?" * (len(fields) + 3))
    rows = (
        (run_id, scenario_idx, idx, *_request_values(req, fields))
        for idx, req in enumerate(requests)
    )
    conn.executemany(f"INSERT INTO requests ({columns}) VALUES ({marks})", rows)


def _request_values(req: RequestResult, fields: tuple[str, ...]) -> list[Any]:
    values = []
    for name in fields:
        value = getattr(req, name)
        if name in REQUEST_JSON_FIELDS:
            value = None if value is None else json.dumps(value)
        values.append(value)
    return values


# ---------------------------------------------------------------------- loading


def load_run(db_path: Path, run_id: str) -> BenchRun:
    """Read a stored run back: ``run_id`` is a full id, a unique prefix of one, or ``latest``.

    Raises :class:`InvalidRequest` (one clear line for the CLI) when nothing or more than one
    run matches, or when there is no database yet.
    """
    db_path = Path(db_path)
    if not db_path.exists():
        raise InvalidRequest(f"no benchmark runs are stored yet ({db_path} does not exist)")
    with _connect(db_path) as conn:
        rundb.reap(conn)
        resolved = rundb.resolve_run_id(conn, run_id, db_path, "benchmark")
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (resolved,)).fetchone()
        requests = _load_requests(conn, resolved)
        scenarios = [
            _scenario_from_row(s, requests.get(s["idx"], []))
            for s in conn.execute(
                "SELECT * FROM scenarios WHERE run_id = ? ORDER BY idx", (resolved,)
            )
        ]
    return BenchRun(
        id=row["id"],
        created_at=row["created_at"],
        name=row["name"],
        config=json.loads(row["config"]),
        system=json.loads(row["system"]),
        micro=json.loads(row["micro"]),
        scenarios=scenarios,
        status=row["status"],
    )


def _load_requests(conn: sqlite3.Connection, run_id: str) -> dict[int, list[RequestResult]]:
    by_scenario: dict[int, list[RequestResult]] = defaultdict(list)
    fields = _request_fields()
    query = (
        f"SELECT scenario_idx, {', '.join(fields)} FROM requests WHERE run_id = ?"
        " ORDER BY scenario_idx, idx"
    )
    for row in conn.execute(query, (run_id,)):
        values = {name: row[name] for name in fields}
        for name in REQUEST_JSON_FIELDS:
            if values[name] is not None:
                values[name] = json.loads(values[name])
        by_scenario[row["scenario_idx"]].append(RequestResult.model_validate(values))
    return by_scenario


def _scenario_from_row(row: sqlite3.Row, requests: list[RequestResult]) -> Scenario:
    return Scenario(
        target=row["target"],
        kind=row["kind"],
        model=row["model"],
        concurrency=row["concurrency"],
        rate=row["rate"],
        warmup=row["warmup"],
        wall_s=row["wall_s"],
        resources=ResourceSample.model_validate_json(row["resources"]),
        cold=ColdStart.model_validate_json(row["cold"]) if row["cold"] else None,
        stats=json.loads(row["stats"]),
        requests=requests,
    )


# ---------------------------------------------------------------------- listing


def list_runs(db_path: Path, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` runs with headline figures, newest first (empty without a db).

    Headlines are computed from the stored requests, not from ``Scenario.stats``, so they are
    there even for runs saved without statistics: best decode tok/s (highest per-scenario p50),
    best TTFT p50 (lowest), best aggregate throughput (tokens/s).
    """
    db_path = Path(db_path)
    if not db_path.exists():
        return []
    with _connect(db_path) as conn:
        rerun = rundb.reap(conn)
        runs = conn.execute(
            "SELECT id, created_at, name, status FROM runs ORDER BY created_at DESC, id DESC"
            " LIMIT ?",
            (limit,),
        ).fetchall()
        rows = [_run_summary(conn, dict(run)) for run in runs]
    for row in rows:
        if row["id"] in rerun:
            row["rerun"] = rerun[row["id"]]
    return rows


def _run_summary(conn: sqlite3.Connection, run: dict[str, Any]) -> dict[str, Any]:
    scenarios = conn.execute(
        "SELECT idx, target, concurrency, wall_s FROM scenarios WHERE run_id = ? ORDER BY idx",
        (run["id"],),
    ).fetchall()
    ttft: dict[int, list[float | None]] = defaultdict(list)
    decode: dict[int, list[float | None]] = defaultdict(list)
    tokens: dict[int, int] = defaultdict(int)
    requests = errors = 0
    for row in conn.execute(
        "SELECT scenario_idx, ok, ttft_s, decode_tokens_per_s, completion_tokens"
        " FROM requests WHERE run_id = ?",
        (run["id"],),
    ):
        requests += 1
        if not row["ok"]:
            errors += 1
            continue
        idx = row["scenario_idx"]
        ttft[idx].append(row["ttft_s"])
        decode[idx].append(row["decode_tokens_per_s"])
        tokens[idx] += row["completion_tokens"]
    throughput = [tokens[s["idx"]] / s["wall_s"] for s in scenarios if s["wall_s"] > 0]
    return {
        **run,
        "targets": list(dict.fromkeys(s["target"] for s in scenarios)),
        "concurrency": sorted({s["concurrency"] for s in scenarios}),
        "scenarios": len(scenarios),
        "requests": requests,
        "errors": errors,
        "best_decode_tps_p50": _best([percentile(decode[s["idx"]], 50) for s in scenarios], max),
        "best_ttft_p50_s": _best([percentile(ttft[s["idx"]], 50) for s in scenarios], min),
        "best_throughput_tokens_per_s": _best(throughput, max),
    }


def _best(values: Sequence[float | None], pick: Callable[[list[float]], float]) -> float | None:
    present = [v for v in values if v is not None]
    return pick(present) if present else None


# ---------------------------------------------------------------------- diffing


def _scenario_key(s: Scenario) -> tuple[str, int, float | None]:
    return (s.target, s.concurrency, s.rate)


def _keyed(run: BenchRun) -> dict[tuple[Any, ...], Scenario]:
    """Scenarios by (target, concurrency, rate, n-th occurrence): repeats pair up in order."""
    seen: dict[tuple[str, int, float | None], int] = defaultdict(int)
    out = {}
    for s in run.scenarios:
        key = _scenario_key(s)
        out[(*key, seen[key])] = s
        seen[key] += 1
    return out


def _metrics(s: Scenario) -> dict[str, float | None]:
    """The diffed figures, recomputed from raw requests so both runs use the same code."""
    stats = scenario_stats(s)
    return {
        "ttft_p50": stats["ttft"]["p50"],
        "ttft_p90": stats["ttft"]["p90"],
        "e2e_p50": stats["e2e"]["p50"],
        "e2e_p90": stats["e2e"]["p90"],
        "decode_tps_p50": stats["decode_tps"]["p50"],
        "throughput_tokens_per_s": stats["throughput_tokens_per_s"],
        "peak_rss_bytes": s.resources.peak_rss_bytes,
        "error_rate": stats["error_rate"],
    }


def _compare(
    a: float | None, b: float | None, higher_is_better: bool, threshold: float
) -> dict[str, Any]:
    """Ratio b/a and whether the change is a regression / improvement beyond ``threshold``.

    From a zero baseline the ratio is undefined (None); any rise then counts as a change,
    because going from no errors to some errors is a regression whatever the threshold.
    """
    if a is None or b is None:
        missing = "A" if a is None else "B"
        return _change(None, note=f"not measured in run {missing}")
    if a == 0:
        ratio = 1.0 if b == 0 else None
        worse = b > 0 and not higher_is_better
        better = b > 0 and higher_is_better
        return _change(ratio, worse=worse, better=better)
    ratio = b / a
    worse = ratio < 1 - threshold if higher_is_better else ratio > 1 + threshold
    better = ratio > 1 + threshold if higher_is_better else ratio < 1 - threshold
    return _change(ratio, worse=worse, better=better)


def _change(
    ratio: float | None, *, worse: bool = False, better: bool = False, note: str | None = None
) -> dict[str, Any]:
    return {"ratio": ratio, "regression": worse, "improvement": better, "note": note}


def diff_runs(a: BenchRun, b: BenchRun, threshold: float = 0.05) -> list[dict[str, Any]]:
    """Compare run ``b`` against baseline ``a``, scenario by scenario, metric by metric.

    Scenarios pair up by (target, concurrency, rate). Each row has scenario (a display label),
    target, concurrency, rate, metric, a, b, ratio (b/a), ``regression`` and ``improvement`` (direction aware: more
    latency, memory or errors is worse, fewer tokens/s is worse; only changes beyond
    ``threshold`` as a fraction count) and ``note``. A scenario found in one run only gives a
    single row with ``metric`` None and a note saying which run has it.
    """
    left, right = _keyed(a), _keyed(b)
    rows: list[dict[str, Any]] = []
    for key in [*left, *(k for k in right if k not in left)]:
        target, concurrency, rate, _ = key
        scenario = f"{target} c={concurrency}" + (f" @ {rate:g}/s" if rate is not None else "")
        base = {"scenario": scenario, "target": target, "concurrency": concurrency, "rate": rate}
        if key not in right or key not in left:
            which, other = ("A", b) if key in left else ("B", a)
            note = f"only in run {which}; run {other.id or '(unsaved)'} has no such scenario"
            rows.append({**base, "metric": None, "a": None, "b": None, **_change(None, note=note)})
            continue
        ma, mb = _metrics(left[key]), _metrics(right[key])
        for metric, higher_is_better in DIFF_METRICS:
            change = _compare(ma[metric], mb[metric], higher_is_better, threshold)
            rows.append({**base, "metric": metric, "a": ma[metric], "b": mb[metric], **change})
    return rows
