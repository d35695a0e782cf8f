"""One SQLite file per collection: sources, chunks with positions, an FTS5 index, vectors.

Layout of ``$EDGELM_HOME/rag/<collection>.db``:

- ``sources``: one row per ingested file with its content hash, so re-ingest can skip it;
- ``chunks``: text plus position (heading path, character span, PDF page), deleted with
  their source (``ON DELETE CASCADE``);
- ``chunks_fts``: FTS5 over the *normalised terms* of each chunk and its heading (see
  :mod:`edgelm.rag.terms`), ranked with BM25; ``chunks_vocab`` exposes document frequencies;
- ``chunk_vectors``: a sqlite-vec ``vec0`` table (cosine distance, keyed by chunk id), made
  when the first vector arrives, so its size is the embedding model's.

sqlite-vec is a loadable extension, and many CPython builds (this environment's included)
are compiled without ``enable_load_extension``. So the connection comes from ``sqlean``
(sqlean-py: the same ``sqlite3`` module built with extension loading and FTS5) when the
``rag`` extra is installed, and from the standard library otherwise — where everything but
vectors works and a dense operation says which extra to install. Every write runs in one
transaction, so a crash never leaves a source half-replaced.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from edgelm.errors import DiskFull, InvalidRequest, MissingExtra, ModelNotFound, is_disk_full
from edgelm.rag.terms import terms
from edgelm.rag.types import ChunkSpec, StoredChunk

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

SCHEMA = """
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL,
    title TEXT,
    n_chunks INTEGER NOT NULL,
    ingested_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    source_id INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    heading TEXT NOT NULL,
    page INTEGER,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(terms, heading, tokenize='unicode61');
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vocab USING fts5vocab(chunks_fts, 'row');
"""

VECTOR_TABLE = "chunk_vectors"
MMAP_BYTES = 1 << 30

Connection: TypeAlias = Any
"""A DB-API connection: ``sqlite3.Connection`` or sqlean's API-identical one."""


def connect(path: Path | str) -> tuple[Connection, bool]:
    """Open ``path`` in autocommit mode; the flag says whether sqlite-vec is loaded."""
    try:
        import sqlean
        import sqlite_vec
    except ImportError:
        return sqlite3.connect(str(path), check_same_thread=False, isolation_level=None), False
    db = sqlean.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        db.enable_load_extension(True)
        sqlite_vec.load(db)
        db.enable_load_extension(False)
    except Exception:  # an unusual platform: keep the connection, lose vectors only
        return db, False
    return db, True


def check_name(name: str) -> str:
    """Collection names become file names: keep them to a safe alphabet."""
    if not _NAME.match(name):
        raise InvalidRequest(
            f"invalid collection name '{name}': use letters, digits, '.', '_' or '-' "
            "(at most 64 characters)",
            param="collection",
        )
    return name


def collections_dir(home: Path) -> Path:
    return home / "rag"


def list_collections(home: Path) -> list[str]:
    folder = collections_dir(home)
    return sorted(p.stem for p in folder.glob("*.db")) if folder.exists() else []


def describe_collections(home: Path) -> list[dict[str, Any]]:
    """One summary per collection (sources, chunks, vectors, embedding model), by name: what
    ``edgelm rag list`` shows and prints as JSON."""
    rows = []
    for name in list_collections(home):
        with RagStore.open(home, name) as store:
            rows.append(
                {
                    "name": name,
                    "sources": len(store.sources()),
                    "chunks": store.count_chunks(),
                    "vectors": store.count_vectors(),
                    "embedding_model": store.embedding_model,
                }
            )
    return rows


def remove_collection(home: Path, name: str) -> bool:
    path = collections_dir(home) / f"{check_name(name)}.db"
    existed = path.exists()
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return existed


@dataclass(frozen=True, slots=True)
class SourceInfo:
    source: str
    path: str
    kind: str
    hash: str
    title: str | None
    n_chunks: int
    ingested_at: float


class RagStore:
    """One collection. Open with :meth:`open`; safe to use from one thread at a time."""

    def __init__(self, path: Path, name: str | None = None):
        self.path = path
        self.name = name or path.stem
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self.db, self.vectors_supported = connect(path)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        # A dense query scans every vector (vec0 is exact); reading them through a memory map
        # instead of SQLite's small page cache keeps a 100k-chunk scan in RAM.
        self.db.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        self.db.executescript(SCHEMA)

    @classmethod
    def open(cls, home: Path, name: str, create: bool = True) -> RagStore:
        path = collections_dir(home) / f"{check_name(name)}.db"
        if not create and not path.exists():
            have = ", ".join(list_collections(home)) or "none yet"
            raise ModelNotFound(
                f"no RAG collection '{name}' (collections: {have}); create it with: "
                f"edgelm rag ingest PATH --collection {name}",
                param="collection",
                code="collection_not_found",
            )
        return cls(path, name)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> RagStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """All-or-nothing writes; also bumps the collection's generation (a change counter)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES('generation', '1') ON CONFLICT(key) "
                "DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )
        except BaseException as exc:
            # SQLite undoes a transaction itself on some errors (a full disk among them).
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if is_disk_full(exc):
                raise DiskFull(
                    f"no space left to write collection '{self.name}' ({self.path}): "
                    "the write was undone"
                ) from exc
            raise
        try:
            self.db.execute("COMMIT")
        except Exception as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if is_disk_full(exc):
                raise DiskFull(
                    f"no space left to write collection '{self.name}' ({self.path}): "
                    "the write was undone"
                ) from exc
            raise

    # -- meta -----------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, db: Connection, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=?",
            (key, value, value),
        )

    @property
    def generation(self) -> int:
        return int(self.meta("generation") or 0)

    @property
    def embedding_model(self) -> str | None:
        return self.meta("embedding_model")

    def set_embedding_model(self, name: str) -> None:
        """Record the model; switching models drops old vectors (they are not comparable)."""
        current = self.embedding_model
        if current == name:
            return
        if current is not None and self.has_vector_table():
            self._require_vectors()
        with self.transaction() as db:
            if current is not None:
                db.execute(f"DROP TABLE IF EXISTS {VECTOR_TABLE}")
                db.execute("DELETE FROM meta WHERE key = 'dim'")
            self._set_meta(db, "embedding_model", name)

    def has_vector_table(self) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = ?", (VECTOR_TABLE,)
        ).fetchone()
        return row is not None

    def _require_vectors(self) -> None:
        if not self.vectors_supported:
            raise MissingExtra("sqlite-vec (with sqlean-py)", "rag")

    def _vector_table(self, db: Connection, dim: int) -> None:
        """Create the vec0 table for ``dim``-sized vectors, or check the size against it."""
        known = self.meta("dim")
        if known is None:
            self._require_vectors()
            db.execute(
                f"CREATE VIRTUAL TABLE IF NOT EXISTS {VECTOR_TABLE} USING "
                f"vec0(embedding float[{dim}] distance_metric=cosine)"
            )
            self._set_meta(db, "dim", str(dim))
        elif int(known) != dim:
            raise InvalidRequest(f"embedding size {dim} differs from the collection's {known}")

    # -- writes ---------------------------------------------------------------------------------
    def replace_source(
        self,
        source: str,
        path: str,
        kind: str,
        digest: str,
        title: str | None,
        chunks: Sequence[ChunkSpec],
        vectors: Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Swap a source's chunks (and vectors) for new ones in a single transaction."""
        if vectors is not None and len(vectors) != len(chunks):
            raise ValueError("one vector per chunk expected")
        with self.transaction() as db:
            self._delete_source(db, source)
            cur = db.execute(
                "INSERT INTO sources(source, path, kind, hash, title, n_chunks, ingested_at) "
                "VALUES(?, ?, ?, ?, ?, ?, ?)",
                (source, path, kind, digest, title, len(chunks), time.time()),
            )
            source_id = cur.lastrowid
            self._insert_chunks(db, source_id, chunks, vectors)

    def _insert_chunks(
        self,
        db: Connection,
        source_id: int | None,
        chunks: Sequence[ChunkSpec],
        vectors: Sequence[Sequence[float]] | None,
    ) -> None:
        for i, chunk in enumerate(chunks):
            cur = db.execute(
                'INSERT INTO chunks(source_id, ordinal, heading, page, start, "end", text) '
                "VALUES(?, ?, ?, ?, ?, ?, ?)",
                (
                    source_id,
                    chunk.ordinal,
                    chunk.heading_path,
                    chunk.page,
                    chunk.start,
                    chunk.end,
                    chunk.text,
                ),
            )
            db.execute(
                "INSERT INTO chunks_fts(rowid, terms, heading) VALUES(?, ?, ?)",
                (cur.lastrowid, " ".join(terms(chunk.text)), " ".join(terms(chunk.heading_path))),
            )
            if vectors is not None:
                vec = np.asarray(vectors[i], dtype=np.float32)
                if i == 0:
                    self._vector_table(db, vec.size)
                elif vec.size != int(self.meta("dim") or 0):
                    raise InvalidRequest("embeddings of one batch differ in size")
                db.execute(
                    f"INSERT INTO {VECTOR_TABLE}(rowid, embedding) VALUES(?, ?)",
                    (cur.lastrowid, vec.tobytes()),
                )

    def bulk_insert(
        self,
        source: str,
        chunks: Iterable[ChunkSpec],
        vectors: Iterable[Sequence[float]] | None = None,
        batch: int = 5000,
    ) -> int:
        """Append many chunks under one synthetic source, a transaction per batch (benchmarks)."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO sources(source, path, kind, hash, title, n_chunks, ingested_at) "
                "VALUES(?, '', 'synthetic', '', NULL, 0, ?)",
                (source, time.time()),
            )
            source_id = cur.lastrowid
        total = 0
        vec_iter = iter(vectors) if vectors is not None else None
        pending: list[ChunkSpec] = []
        for chunk in chunks:
            pending.append(chunk)
            if len(pending) >= batch:
                total += self._flush_bulk(source_id, pending, vec_iter)
                pending = []
        if pending:
            total += self._flush_bulk(source_id, pending, vec_iter)
        with self.transaction() as db:
            db.execute("UPDATE sources SET n_chunks = ? WHERE id = ?", (total, source_id))
        return total

    def _flush_bulk(self, source_id: int | None, chunks: list[ChunkSpec], vec_iter) -> int:  # type: ignore[no-untyped-def]
        vectors = [next(vec_iter) for _ in chunks] if vec_iter is not None else None
        with self.transaction() as db:
            self._insert_chunks(db, source_id, chunks, vectors)
        return len(chunks)

    def _delete_source(self, db: Connection, source: str) -> bool:
        row = db.execute("SELECT id FROM sources WHERE source = ?", (source,)).fetchone()
        if row is None:
            return False
        if self.has_vector_table():  # virtual tables know nothing of ON DELETE CASCADE
            self._require_vectors()
            db.execute(
                f"DELETE FROM {VECTOR_TABLE} WHERE rowid IN "
                "(SELECT id FROM chunks WHERE source_id = ?)",
                (row[0],),
            )
        db.execute(
            "DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE source_id = ?)",
            (row[0],),
        )
        db.execute("DELETE FROM sources WHERE id = ?", (row[0],))
        return True

    def remove_source(self, source: str) -> bool:
        with self.transaction() as db:
            return self._delete_source(db, source)

    # -- reads ----------------------------------------------------------------------------------
    def sources(self) -> dict[str, SourceInfo]:
        rows = self.db.execute(
            "SELECT source, path, kind, hash, title, n_chunks, ingested_at FROM sources"
        )
        return {r[0]: SourceInfo(*r) for r in rows}

    def has_vectors(self, source: str) -> bool:
        """Whether every chunk of ``source`` has a vector (else re-ingest must embed it)."""
        if not self.has_vector_table() or not self.vectors_supported:
            return False
        row = self.db.execute(
            "SELECT count(*) FROM chunks c JOIN sources s ON s.id = c.source_id "
            f"WHERE s.source = ? AND c.id NOT IN (SELECT rowid FROM {VECTOR_TABLE})",
            (source,),
        ).fetchone()
        return row[0] == 0

    def count_chunks(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def count_vectors(self) -> int:
        if not self.has_vector_table():
            return 0
        self._require_vectors()
        return int(self.db.execute(f"SELECT count(*) FROM {VECTOR_TABLE}").fetchone()[0])

    def chunks_by_id(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            'SELECT c.id, s.source, c.ordinal, c.heading, c.page, c.start, c."end", c.text '
            f"FROM chunks c JOIN sources s ON s.id = c.source_id WHERE c.id IN ({marks})",
            list(ids),
        )
        return {r[0]: StoredChunk(*r) for r in rows}

    def document_frequencies(self, words: Iterable[str]) -> dict[str, int]:
        out = {}
        for word in words:
            row = self.db.execute("SELECT doc FROM chunks_vocab WHERE term = ?", (word,)).fetchone()
            out[word] = int(row[0]) if row else 0
        return out

    def idf(self, words: Sequence[str]) -> dict[str, float]:
        """BM25's IDF, computed on the same terms FTS5 indexed."""
        n = self.count_chunks()
        dfs = self.document_frequencies(words)
        return {w: math.log(1 + (n - df + 0.5) / (df + 0.5)) for w, df in dfs.items()}

    def bm25(self, words: Sequence[str], limit: int) -> list[tuple[int, float]]:
        """Chunk ids by BM25 (best first) for any of ``words``; the heading counts double."""
        if not words:
            return []
        query = " OR ".join(f'"{w}"' for w in words)
        rows = self.db.execute(
            "SELECT rowid, bm25(chunks_fts, 1.0, 2.0) AS s FROM chunks_fts "
            "WHERE chunks_fts MATCH ? ORDER BY s LIMIT ?",
            (query, limit),
        )
        return [(int(r[0]), -float(r[1])) for r in rows]

    def nearest(self, vector: Sequence[float], limit: int) -> list[tuple[int, float]]:
        """Chunk ids by cosine similarity to ``vector`` (best first), from the vec0 index."""
        if not self.has_vector_table():
            return []
        self._require_vectors()
        query = np.asarray(vector, dtype=np.float32)
        dim = int(self.meta("dim") or 0)
        if query.size != dim:
            raise InvalidRequest(
                f"query embedding has {query.size} dimensions, the collection {dim}"
            )
        rows = self.db.execute(
            f"SELECT rowid, distance FROM {VECTOR_TABLE} WHERE embedding MATCH ? AND k = ? "
            "ORDER BY distance",
            (query.tobytes(), max(1, min(limit, 4096))),
        )
        return [(int(r[0]), 1.0 - float(r[1])) for r in rows]
