"""The SQLite plumbing shared by the stores of runs under EDGELM_HOME (bench history, evals).

Both keep "runs" with short sortable ids that users type back (a prefix, or ``latest``), both
must never leave half a run behind, and both must refuse a file written by a newer edgelm
rather than misread it. The rules live here once; each store keeps only its own schema.

A run in progress is *owned*: ``run_owners`` holds the process writing it (pid and that
process's start time, so a reused pid is told apart) and the command that re-runs or resumes
it. A process killed outright (SIGKILL, a power cut) cannot mark its run finished; the next
reader finds the owner gone, marks the run ``interrupted`` (:func:`reap`) and keeps the command
to show.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import psutil

from edgelm.errors import InvalidRequest

OWNERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_owners (
    run_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    pid_started REAL NOT NULL,
    host TEXT NOT NULL,
    rerun TEXT NOT NULL
);
"""
"""Which process is writing which run (see the module docstring); no foreign key, so a store
whose ``runs`` table predates it needs no migration."""


@contextmanager
def connect(
    db_path: Path,
    schema: str,
    version: int,
    what: str,
    migrations: Mapping[int, str] | None = None,
) -> Iterator[sqlite3.Connection]:
    """Open (creating if needed) a run database with ``schema`` in place.

    Autocommit mode, so transactions are exactly the ``BEGIN``/``COMMIT`` of
    :func:`transaction`; WAL so a report can read while a run writes; foreign keys on so
    deleting a run cascades. ``what`` names the database in errors ("results", "evals").
    ``migrations`` maps a schema version to the SQL that brings a file of the version before
    it up to it; a new file gets ``schema`` as it is and needs none.
    """
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > version:
                raise InvalidRequest(
                    f"{db_path} was written by a newer edgelm (schema {found}, this one reads "
                    f"{version}); upgrade edgelm to read it"
                )
            if 0 < found < version:
                with transaction(conn):
                    # Read again under the write lock: another process may have migrated it.
                    found = conn.execute("PRAGMA user_version").fetchone()[0]
                    for step in range(found + 1, version + 1):
                        for statement in (migrations or {}).get(step, "").split(";"):
                            if statement.strip():
                                conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version}")
            conn.executescript(schema + OWNERS_SCHEMA)
            if found < version:
                conn.execute(f"PRAGMA user_version = {version}")
        except sqlite3.DatabaseError as exc:
            raise InvalidRequest(f"{db_path} is not a usable {what} database: {exc}") from exc
        yield conn
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """All or nothing: roll back on any exception (KeyboardInterrupt included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite undoes some failures (a full disk) itself
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def new_run_id(created_at: float) -> str:
    """``YYYYMMDD-HHMM-xxxx`` in UTC: sorts by time as text, short enough to type a prefix.

    UTC keeps ids sortable across time-zone and daylight-saving changes; the 4 random hex
    digits separate runs started in the same minute.
    """
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(created_at))
    return f"{stamp}-{secrets.token_hex(2)}"


def unused_run_id(conn: sqlite3.Connection, created_at: float) -> str:
    """A new id not yet in the ``runs`` table."""
    while True:
        run_id = new_run_id(created_at)
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
            return run_id


def resolve_run_id(conn: sqlite3.Connection, wanted: str, db_path: Path, what: str) -> str:
    """The one stored id that ``wanted`` names: exact, ``latest``, or a unique prefix.

    ``what`` names the kind of run in errors ("benchmark", "evaluation").
    """
    wanted = wanted.strip()
    if wanted == "latest":
        row = conn.execute("SELECT id FROM runs ORDER BY created_at DESC, id DESC LIMIT 1")
        found = row.fetchone()
        if found is None:
            raise InvalidRequest(f"no {what} runs are stored in {db_path} yet")
        return str(found["id"])
    if not wanted:
        raise InvalidRequest("a run id is required (an id, a unique prefix of one, or 'latest')")
    if conn.execute("SELECT 1 FROM runs WHERE id = ?", (wanted,)).fetchone() is not None:
        return wanted
    matches = [
        str(row["id"])
        for row in conn.execute(
            "SELECT id FROM runs WHERE substr(id, 1, ?) = ? ORDER BY created_at DESC",
            (len(wanted), wanted),
        )
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise InvalidRequest(
            f"run id '{wanted}' is ambiguous: it starts {len(matches)} runs ({shown}); "
            "give more characters"
        )
    recent = [r["id"] for r in conn.execute("SELECT id FROM runs ORDER BY created_at DESC LIMIT 3")]
    hint = f"; recent runs: {', '.join(recent)}" if recent else "; no runs are stored yet"
    raise InvalidRequest(f"no {what} run '{wanted}' in {db_path}{hint}")


# ---------------------------------------------------------------------- owned runs


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid: int, started: float) -> bool:
    """Whether the process that claimed a run still runs (not another one under its pid)."""
    if pid <= 0:
        return False
    now = _process_start(pid)
    return now is not None and (started == 0.0 or abs(now - started) < 1.0)


def claim(conn: sqlite3.Connection, run_id: str, rerun: str) -> None:
    """Record this process as the one writing ``run_id``; ``rerun`` is the command that
    finishes it should this process die."""
    pid = os.getpid()
    conn.execute(
        "INSERT OR REPLACE INTO run_owners (run_id, pid, pid_started, host, rerun)"
        " VALUES (?, ?, ?, ?, ?)",
        (run_id, pid, _process_start(pid) or 0.0, socket.gethostname(), rerun),
    )


def release(conn: sqlite3.Connection, run_id: str) -> None:
    """The run is finished: nothing to resume."""
    conn.execute("DELETE FROM run_owners WHERE run_id = ?", (run_id,))


def reap(conn: sqlite3.Connection) -> dict[str, str]:
    """Mark ``interrupted`` every ``running`` run whose owner process on this machine is
    gone; return ``{run id: command that finishes it}`` for every interrupted run.

    A run owned on another host (a home on a shared disk) is left alone: its process cannot
    be checked from here. The owner row stays (with pid 0) so the command can be shown.
    """
    host = socket.gethostname()
    owners = conn.execute(
        "SELECT o.run_id, o.pid, o.pid_started, o.host FROM run_owners o"
        " JOIN runs r ON r.id = o.run_id WHERE r.status = 'running' AND o.pid > 0"
    ).fetchall()
    dead = [r["run_id"] for r in owners if r["host"] == host and not _alive(r["pid"], r["pid_started"])]
    if dead:
        with transaction(conn):
            for run_id in dead:
                conn.execute(
                    "UPDATE runs SET status = 'interrupted' WHERE id = ? AND status = 'running'",
                    (run_id,),
                )
                conn.execute("UPDATE run_owners SET pid = 0 WHERE run_id = ?", (run_id,))
    return {
        r["run_id"]: r["rerun"]
        for r in conn.execute(
            "SELECT o.run_id, o.rerun FROM run_owners o JOIN runs r ON r.id = o.run_id"
            " WHERE r.status = 'interrupted'"
        )
    }
