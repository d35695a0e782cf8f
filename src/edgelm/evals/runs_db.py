"""Evaluation runs in SQLite (``$EDGELM_HOME/evals.db``): one row per item × model, written as
each answer completes.

Every result is its own transaction, so a run that is interrupted (Ctrl-C, a crash, a dead
service) keeps exactly the answers that were finished and none half-written; ``--resume``
reads which (item, model) pairs are done and asks only the rest. The run's questions are
stored with it, so a resumed run and a later report use the very items the run started with,
even if the dataset file changed since. Summaries are never stored: they are computed from the
rows, so they cannot disagree with them. Columns are plain SQL values (JSON text for dicts) so
``sqlite3 evals.db`` answers ad-hoc questions.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelm import rundb
from edgelm.errors import InvalidRequest
from edgelm.evals.datasets import QAItem

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    dataset TEXT NOT NULL,
    models TEXT NOT NULL,
    params TEXT NOT NULL,
    judge_model TEXT,
    status TEXT NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS items (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    question TEXT NOT NULL,
    answers TEXT NOT NULL,
    category TEXT NOT NULL,
    difficulty TEXT NOT NULL,
    extra TEXT NOT NULL,
    PRIMARY KEY (run_id, item_id)
);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    item_id TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at REAL NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    answer TEXT NOT NULL,
    finish_reason TEXT,
    metrics TEXT NOT NULL,
    judge_scores TEXT,
    judge_raw TEXT,
    judge_error TEXT,
    ttft_s REAL,
    e2e_s REAL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    extension TEXT,
    PRIMARY KEY (run_id, item_id, model)
);
"""


@dataclass
class EvalRun:
    """A run's identity and what it was asked to do; results live in :class:`ResultRow`."""

    id: str
    created_at: float
    dataset: str
    models: list[str]
    params: dict[str, Any]
    judge_model: str | None = None
    status: str = "running"
    finished_at: float | None = None
    items: list[QAItem] = field(default_factory=list)


@dataclass
class ResultRow:
    """One answer of one model to one item, with its scores and cost drivers."""

    item_id: str
    model: str
    ok: bool
    answer: str = ""
    error: str | None = None
    finish_reason: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    judge_scores: dict[str, float] | None = None
    judge_raw: str | None = None
    judge_error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extension: dict[str, Any] | None = None
    created_at: float = 0.0


_JSON_FIELDS = ("metrics", "judge_scores", "extension")


def connect(db_path: Path) -> AbstractContextManager[sqlite3.Connection]:
    """The evals database, schema in place (see :func:`edgelm.rundb.connect`)."""
    return rundb.connect(db_path, SCHEMA, SCHEMA_VERSION, "evals")


def create_run(
    db_path: Path,
    dataset: str,
    models: list[str],
    params: dict[str, Any],
    items: list[QAItem],
    judge_model: str | None = None,
) -> EvalRun:
    """Store a new run with its questions (one transaction) and return it with its id."""
    created = time.time()
    with connect(db_path) as conn, rundb.transaction(conn):
        run_id = rundb.unused_run_id(conn, created)
        conn.execute(
            "INSERT INTO runs (id, created_at, dataset, models, params, judge_model, status)"
            " VALUES (?, ?, ?, ?, ?, ?, 'running')",
            (run_id, created, dataset, json.dumps(models), json.dumps(params), judge_model),
        )
        rundb.claim(conn, run_id, resume_command(run_id))
        conn.executemany(
            "INSERT INTO items (run_id, idx, item_id, question, answers, category, difficulty,"
            " extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    idx,
                    it.id,
                    it.question,
                    json.dumps(it.answers),
                    it.category,
                    it.difficulty,
                    json.dumps(it.extra),
                )
                for idx, it in enumerate(items)
            ],
        )
    return EvalRun(run_id, created, dataset, list(models), dict(params), judge_model, items=items)


def save_result(db_path: Path, run_id: str, row: ResultRow) -> None:
    """Write (or replace) one result in its own transaction."""
    row.created_at = row.created_at or time.time()
    data = asdict(row)
    for name in _JSON_FIELDS:
        data[name] = None if data[name] is None else json.dumps(data[name])
    data["ok"] = int(row.ok)
    columns = ["run_id", *data]
    marks = ", ".join("?" * len(columns))
    with connect(db_path) as conn, rundb.transaction(conn):
        conn.execute(
            f"INSERT OR REPLACE INTO results ({', '.join(columns)}) VALUES ({marks})",
            (run_id, *data.values()),
        )


def resume_command(run_id: str) -> str:
    return f"edgelm eval run --resume {run_id}"


def set_status(db_path: Path, run_id: str, status: str) -> None:
    """running (this process owns the run now), interrupted or done (nothing to resume)."""
    finished = time.time() if status == "done" else None
    with connect(db_path) as conn, rundb.transaction(conn):
        conn.execute(
            "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?", (status, finished, run_id)
        )
        if status == "running":
            rundb.claim(conn, run_id, resume_command(run_id))
        elif status == "done":
            rundb.release(conn, run_id)


def load_run(db_path: Path, run_id: str) -> tuple[EvalRun, list[ResultRow]]:
    """A stored run with its items and every result row, by id, prefix or ``latest``."""
    db_path = Path(db_path)
    if not db_path.exists():
        raise InvalidRequest(f"no evaluation runs are stored yet ({db_path} does not exist)")
    with connect(db_path) as conn:
        rundb.reap(conn)
        resolved = rundb.resolve_run_id(conn, run_id, db_path, "evaluation")
        r = conn.execute("SELECT * FROM runs WHERE id = ?", (resolved,)).fetchone()
        items = [
            QAItem(
                id=i["item_id"],
                question=i["question"],
                answers=json.loads(i["answers"]),
                category=i["category"],
                difficulty=i["difficulty"],
                extra=json.loads(i["extra"]),
            )
            for i in conn.execute("SELECT * FROM items WHERE run_id = ? ORDER BY idx", (resolved,))
        ]
        rows = [
            _row(x)
            for x in conn.execute(
                "SELECT * FROM results WHERE run_id = ? ORDER BY created_at", (resolved,)
            )
        ]
    run = EvalRun(
        id=r["id"],
        created_at=r["created_at"],
        dataset=r["dataset"],
        models=json.loads(r["models"]),
        params=json.loads(r["params"]),
        judge_model=r["judge_model"],
        status=r["status"],
        finished_at=r["finished_at"],
        items=items,
    )
    return run, rows


def _row(x: sqlite3.Row) -> ResultRow:
    data = {k: x[k] for k in x.keys() if k != "run_id"}  # noqa: SIM118 - sqlite3.Row
    for name in _JSON_FIELDS:
        data[name] = None if data[name] is None else json.loads(data[name])
    data["ok"] = bool(data["ok"])
    return ResultRow(**data)


def list_runs(db_path: Path, limit: int = 20) -> list[dict[str, Any]]:
    """Newest runs first with their progress (done rows / expected rows)."""
    db_path = Path(db_path)
    if not db_path.exists():
        return []
    with connect(db_path) as conn:
        rerun = rundb.reap(conn)
        out = []
        for r in conn.execute(
            "SELECT * FROM runs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)
        ):
            models = json.loads(r["models"])
            n_items = conn.execute(
                "SELECT COUNT(*) FROM items WHERE run_id = ?", (r["id"],)
            ).fetchone()[0]
            done, errors = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(1 - ok), 0) FROM results WHERE run_id = ?",
                (r["id"],),
            ).fetchone()
            out.append(
                {
                    "id": r["id"],
                    "created_at": r["created_at"],
                    "dataset": r["dataset"],
                    "models": models,
                    "judge": r["judge_model"],
                    "status": r["status"],
                    "results": f"{done}/{n_items * len(models)}",
                    "errors": errors,
                }
            )
            if r["id"] in rerun:
                out[-1]["rerun"] = rerun[r["id"]]
        return out


def delete_run(db_path: Path, run_id: str) -> str:
    with connect(db_path) as conn, rundb.transaction(conn):
        resolved = rundb.resolve_run_id(conn, run_id, db_path, "evaluation")
        conn.execute("DELETE FROM runs WHERE id = ?", (resolved,))
    return resolved
