"""One SQLite file per collection: sources, chunks with positions, an FTS5 index, vectors.

Layout of ``$EDGELM_HOME/rag/<collection>.db``:

- ``sources``: one row per ingested file with its content hash, so re-ingest can skip it;
- ``chunks``: text plus position (heading path, character span, PDF page), deleted with
  their source (``ON DELETE CASCADE``);
- ``chunks_fts``: FTS5 over the *normalised terms* of each chunk and its heading (see
  :mod:`edgelm.rag.terms`), ranked with BM25; ``chunks_vocab`` exposes document frequencies;
- ``chunk_embeddings``: one row per chunk with a vector, the float32 vector (exact scores),
  and ``chunk_q8`` its int8 copy (what :mod:`edgelm.rag.vector_index` loads into memory for
  fast search; a table of its own so that loading reads 1/5 of the bytes), both deleted with
  their chunk (``ON DELETE CASCADE``); ``meta.dim`` is set by the first vector.

Collections made before the vector index kept their vectors in a sqlite-vec ``vec0`` table
(``chunk_vectors``), whose scans and lookups were 30x slower than the index (figures in
:mod:`edgelm.rag.vector_index`). Opening such a collection moves its vectors into
``chunk_embeddings`` once, in one transaction, with a log line saying so. Reading the old
table needs sqlite-vec, a loadable extension, and many CPython builds (this environment's
included) are compiled without ``enable_load_extension``; so the connection comes from
``sqlean`` (sqlean-py: the same ``sqlite3`` module built with extension loading and FTS5) when
the ``rag`` extra is installed, and from the standard library otherwise — where an old
collection keeps working lexically and a dense operation on it says which extra to install.
Every write runs in one transaction, so a crash never leaves a source half-replaced.
"""

from __future__ import annotations

import logging
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
from edgelm.rag.vector_index import VectorIndex, quantize, rank_exact, unit

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS chunk_embeddings (
    id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS chunk_q8 (
    id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
    q8 BLOB NOT NULL
);
"""

LEGACY_VECTOR_TABLE = "chunk_vectors"
"""The sqlite-vec table of collections made before the vector index (migrated on open)."""
READ_BLOCK = 50_000
DF_CACHE_SIZE = 100_000
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
        # Reading chunks and vectors through a memory map instead of SQLite's small page
        # cache keeps the re-rank's and the index load's reads in RAM.
        self.db.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        self.db.executescript(SCHEMA)
        self._index: VectorIndex | None = None
        self._dfs: dict[str, int] = {}
        self._dfs_generation = -1
        self._migrate_legacy_vectors()

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
        if current is not None and self.has_legacy_vectors():
            self._require_legacy_support()
        with self.transaction() as db:
            if current is not None:
                db.execute(f"DROP TABLE IF EXISTS {LEGACY_VECTOR_TABLE}")
                db.execute("DELETE FROM chunk_embeddings")
                db.execute("DELETE FROM chunk_q8")
                db.execute("DELETE FROM meta WHERE key = 'dim'")
            self._set_meta(db, "embedding_model", name)

    def has_legacy_vectors(self) -> bool:
        """Whether vectors still sit in the old sqlite-vec table (sqlite-vec could not load)."""
        row = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = ?", (LEGACY_VECTOR_TABLE,)
        ).fetchone()
        return row is not None

    def _require_legacy_support(self) -> None:
        if not self.vectors_supported:
            raise MissingExtra("sqlite-vec (with sqlean-py)", "rag")

    def _migrate_legacy_vectors(self) -> None:
        """Move an old collection's vectors from sqlite-vec's ``vec0`` table into
        ``chunk_embeddings`` (one transaction), then drop the old table. Without sqlite-vec
        the old table stays; lexical retrieval works and dense says what to install."""
        if not self.has_legacy_vectors() or not self.vectors_supported:
            return
        total = int(self.db.execute(f"SELECT count(*) FROM {LEGACY_VECTOR_TABLE}").fetchone()[0])
        log.warning(
            "RAG collection '%s': moving %d vectors from its sqlite-vec table into the vector "
            "index's table (once, for collections made by an older edgelm)",
            self.name,
            total,
        )
        with self.transaction() as db:
            if not self.has_legacy_vectors():  # another process migrated it meanwhile
                return
            rows = db.execute(f"SELECT rowid, embedding FROM {LEGACY_VECTOR_TABLE}")
            while batch := rows.fetchmany(READ_BLOCK):
                ids = [int(r[0]) for r in batch]
                matrix = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in batch])
                self._write_vectors(db, ids, matrix)
            db.execute(f"DROP TABLE {LEGACY_VECTOR_TABLE}")

    def _check_dim(self, db: Connection, dim: int) -> None:
        """Record the collection's vector size on its first vector; later ones must match."""
        known = self.meta("dim")
        if known is None:
            self._set_meta(db, "dim", str(dim))
        elif int(known) != dim:
            raise InvalidRequest(f"embedding size {dim} differs from the collection's {known}")

    def _write_vectors(self, db: Connection, ids: Sequence[int], matrix: np.ndarray) -> None:
        self._check_dim(db, matrix.shape[1])
        q8 = quantize(matrix)
        db.executemany(
            "INSERT OR REPLACE INTO chunk_embeddings(id, vector) VALUES(?, ?)",
            [(i, matrix[n].tobytes()) for n, i in enumerate(ids)],
        )
        db.executemany(
            "INSERT OR REPLACE INTO chunk_q8(id, q8) VALUES(?, ?)",
            [(i, q8[n].tobytes()) for n, i in enumerate(ids)],
        )

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
        vectors: Sequence[Sequence[float]] | np.ndarray | None,
    ) -> None:
        matrix = None
        if vectors is not None and len(chunks):
            try:
                matrix = np.asarray(vectors, dtype=np.float32)
            except ValueError:
                raise InvalidRequest("embeddings of one batch differ in size") from None
            if matrix.ndim != 2 or len(matrix) != len(chunks):
                raise InvalidRequest("one embedding (a list of numbers) per chunk expected")
            if self.has_legacy_vectors():
                self._require_legacy_support()  # not migrated: sqlite-vec could not load
        ids = []
        for chunk in chunks:
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
            ids.append(cur.lastrowid)
        db.executemany(
            "INSERT INTO chunks_fts(rowid, terms, heading) VALUES(?, ?, ?)",
            [
                (i, " ".join(terms(c.text)), " ".join(terms(c.heading_path)))
                for i, c in zip(ids, chunks, strict=True)
            ],
        )
        if matrix is not None:
            self._write_vectors(db, ids, matrix)

    def append_chunks(
        self,
        source: str,
        chunks: Sequence[ChunkSpec],
        vectors: Sequence[Sequence[float]] | np.ndarray | None = None,
    ) -> int:
        """Add chunks (and vectors) to ``source``, made as a synthetic source when new, in one
        transaction: the benchmark's bulk path, called a batch at a time."""
        with self.transaction() as db:
            row = db.execute("SELECT id FROM sources WHERE source = ?", (source,)).fetchone()
            if row is None:
                source_id = db.execute(
                    "INSERT INTO sources(source, path, kind, hash, title, n_chunks, ingested_at) "
                    "VALUES(?, '', 'synthetic', '', NULL, 0, ?)",
                    (source, time.time()),
                ).lastrowid
            else:
                source_id = row[0]
            self._insert_chunks(db, source_id, chunks, vectors)
            db.execute(
                "UPDATE sources SET n_chunks = n_chunks + ? WHERE id = ?", (len(chunks), source_id)
            )
        return len(chunks)

    def _delete_source(self, db: Connection, source: str) -> bool:
        row = db.execute("SELECT id FROM sources WHERE source = ?", (source,)).fetchone()
        if row is None:
            return False
        if self.has_legacy_vectors():  # virtual tables know nothing of ON DELETE CASCADE
            self._require_legacy_support()
            db.execute(
                f"DELETE FROM {LEGACY_VECTOR_TABLE} WHERE rowid IN "
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
        if self.has_legacy_vectors():
            return False  # sqlite-vec could not load to migrate them: embed again
        row = self.db.execute(
            "SELECT count(*) FROM chunks c JOIN sources s ON s.id = c.source_id "
            "LEFT JOIN chunk_embeddings e ON e.id = c.id WHERE s.source = ? AND e.id IS NULL",
            (source,),
        ).fetchone()
        return row[0] == 0

    def count_chunks(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def count_vectors(self) -> int:
        if self.has_legacy_vectors():
            self._require_legacy_support()
        return int(self.db.execute("SELECT count(*) FROM chunk_embeddings").fetchone()[0])

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

    def chunk_terms(self, ids: Sequence[int]) -> dict[int, set[str]]:
        """The indexed terms of each chunk (text and heading), as FTS5 stored them: the same
        terms its document frequencies count, read without re-tokenizing the text."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT rowid, terms, heading FROM chunks_fts WHERE rowid IN ({marks})", list(ids)
        )
        return {int(r[0]): set(r[1].split()) | set(r[2].split()) for r in rows}

    def document_frequencies(self, words: Iterable[str]) -> dict[str, int]:
        """Chunks holding each word. ``fts5vocab`` counts them by walking the word's posting
        list (~1 ms for a word in every chunk of 100k), so answers are kept until the
        collection changes: the common words that cost most are the ones questions repeat."""
        generation = self.generation
        if self._dfs_generation != generation or len(self._dfs) > DF_CACHE_SIZE:
            self._dfs, self._dfs_generation = {}, generation
        out = {w: self._dfs.get(w, -1) for w in words}
        missing = [w for w, df in out.items() if df < 0]
        if missing:
            found = dict.fromkeys(missing, 0)
            marks = ",".join("?" * len(missing))
            rows = self.db.execute(
                f"SELECT term, doc FROM chunks_vocab WHERE term IN ({marks})", missing
            )
            found.update((str(r[0]), int(r[1])) for r in rows)
            self._dfs.update(found)
            out.update(found)
        return out

    def idf(self, words: Sequence[str]) -> dict[str, float]:
        """BM25's IDF, computed on the same terms FTS5 indexed."""
        return idf_of(self.count_chunks(), self.document_frequencies(words))

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

    # -- vectors --------------------------------------------------------------------------------
    def _query(self, vector: Sequence[float] | np.ndarray) -> np.ndarray | None:
        """The unit query vector, checked against the collection (None: no vectors yet)."""
        if self.has_legacy_vectors():
            self._require_legacy_support()
        known = self.meta("dim")
        if known is None:
            return None
        query = np.asarray(vector, dtype=np.float32).ravel()
        if query.size != int(known):
            raise InvalidRequest(
                f"query embedding has {query.size} dimensions, the collection {known}"
            )
        return unit(query)

    def vector_index(self) -> VectorIndex:
        """The in-memory index, (re)built when the collection changed since it was loaded."""
        self.db.execute("BEGIN")  # generation and rows from one snapshot
        try:
            generation = self.generation
            index = self._index
            if index is None or index.generation != generation:
                self._index = index = None  # free the old one before building the new one
                dim = int(self.meta("dim") or 0)
                rows = self.db.execute("SELECT id, q8 FROM chunk_q8 ORDER BY id")

                def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                    while batch := rows.fetchmany(READ_BLOCK):
                        ids = np.fromiter((r[0] for r in batch), np.int64, len(batch))
                        q8 = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.int8)
                        yield ids, q8

                index = self._index = VectorIndex.build(generation, dim, blocks())
        finally:
            self.db.execute("COMMIT")
        return index

    def vectors_by_id(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, float32 rows)`` of the chunks among ``ids`` that have a vector."""
        out_ids: list[int] = []
        blobs: list[bytes] = []
        for start in range(0, len(ids), 30000):  # under SQLite's limit on host parameters
            part = [int(i) for i in ids[start : start + 30000]]
            marks = ",".join("?" * len(part))
            for r in self.db.execute(
                f"SELECT id, vector FROM chunk_embeddings WHERE id IN ({marks})", part
            ):
                out_ids.append(int(r[0]))
                blobs.append(r[1])
        dim = int(self.meta("dim") or 0)
        matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)
        return np.asarray(out_ids, dtype=np.int64), matrix

    def nearest(
        self,
        vector: Sequence[float] | np.ndarray,
        limit: int,
        shortlist: int | None = None,
        rerank: int | None = None,
    ) -> list[tuple[int, float]]:
        """Chunk ids by cosine similarity to ``vector`` (best first, exact scores): candidates
        from the in-memory index, re-ranked by their float32 vectors. ``shortlist`` and
        ``rerank`` override the index's stage sizes (tests, benchmarks)."""
        query = self._query(vector)
        if query is None:
            return []
        candidates = self.vector_index().candidates(query, limit, shortlist, rerank)
        ids, matrix = self.vectors_by_id(candidates.tolist())
        return rank_exact(query, ids, matrix, limit)

    def nearest_exact(
        self, vectors: Sequence[Sequence[float]] | np.ndarray, limit: int
    ) -> list[list[tuple[int, float]]]:
        """Exact nearest chunks for each of ``vectors``, scanning every stored float32 vector
        once (the reference for the index's recall; seconds at 100k, not for serving)."""
        queries = [self._query(v) for v in vectors]
        if not queries or queries[0] is None:
            return [[] for _ in queries]
        matrix_q = np.stack(queries)  # type: ignore[arg-type]
        best_ids = np.zeros((len(queries), 0), np.int64)
        best_sims = np.zeros((len(queries), 0), np.float32)
        dim = matrix_q.shape[1]
        rows = self.db.execute("SELECT id, vector FROM chunk_embeddings")
        while batch := rows.fetchmany(READ_BLOCK):
            ids = np.fromiter((r[0] for r in batch), np.int64, len(batch))
            block = np.frombuffer(b"".join(r[1] for r in batch), np.float32).reshape(-1, dim)
            norms = np.linalg.norm(block, axis=1)
            norms[norms == 0] = 1.0
            sims = (matrix_q @ block.T) / norms
            best_ids = np.concatenate([best_ids, np.broadcast_to(ids, sims.shape)], axis=1)
            best_sims = np.concatenate([best_sims, sims], axis=1)
            if best_ids.shape[1] > limit:
                keep = np.argpartition(-best_sims, limit - 1, axis=1)[:, :limit]
                best_ids = np.take_along_axis(best_ids, keep, axis=1)
                best_sims = np.take_along_axis(best_sims, keep, axis=1)
        out = []
        for ids, sims in zip(best_ids, best_sims, strict=True):
            order = np.lexsort((ids, -sims))[:limit]
            out.append([(int(ids[i]), float(sims[i])) for i in order])
        return out


def idf_of(n: int, dfs: dict[str, int]) -> dict[str, float]:
    """BM25's IDF (the always-positive form) for document frequencies out of ``n`` chunks."""
    return {w: math.log(1 + (n - df + 0.5) / (df + 0.5)) for w, df in dfs.items()}
