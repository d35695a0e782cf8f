"""The SQLite plumbing shared by the stores of runs under EDGELM_HOME (bench history, evals).

Both keep "runs" with short sortable ids that users type back (a prefix, or ``latest``), both
must never leave half a run behind, and both must refuse a file written by a newer edgelm
rather than misread it. The rules live here once; each store keeps only its own schema.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgelm.errors import InvalidRequest


@contextmanager
def connect(db_path: Path, schema: str, version: int, what: str) -> Iterator[sqlite3.Connection]:
    """Open (creating if needed) a run database with ``schema`` in place.

    Autocommit mode, so transactions are exactly the ``BEGIN``/``COMMIT`` of
    :func:`transaction`; WAL so a report can read while a run writes; foreign keys on so
    deleting a run cascades. ``what`` names the database in errors ("results", "evals").
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
            conn.executescript(schema)
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
