"""Scale check: ingest N synthetic chunks, then time queries and measure the vector index's
recall against exact search. Prints figures; asserts nothing.

Synthetic text is drawn from a fixed vocabulary with a Zipf-like skew (a few words common,
most rare), like real prose, so BM25 posting lists have realistic lengths. Vectors (when
asked for) have *topics*, as real embeddings do: each chunk is its topic's direction plus
noise plus a direction all chunks share (sentence embedders' vectors have one), ~200 chunks
a topic; a query is a stored chunk's vector plus noise (a question near its answer). Its
best match then has cosine ~0.86 and its 10th ~0.53, with ~200 close competitors: what the
index must tell apart. Isotropic random vectors would be a poor stand-in: no chunk is near
any query there (best cosine ~0.2), which real retrieval never sees; ``isotropic=True``
(``rag bench --isotropic``) measures that worst case anyway, with random unit queries.

Chunks and vectors are generated batch by batch while they are stored (a 1M-chunk run never
holds them all), and the generator's own time is left out of the ingest rate.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgelm.errors import InvalidRequest
from edgelm.rag.collection_db import RagStore
from edgelm.rag.retrieve import CANDIDATES, hybrid_from, retrieve
from edgelm.rag.types import ChunkSpec

Progress = Callable[[str, int, int], None]
"""``(phase, done, total)``: ingest progress for a progress bar."""

TOPIC_SIZE = 200
RECALL_K = 10
BATCH = 5000


@dataclass
class BenchResult:
    chunks: int
    dim: int
    ingest_s: float
    chunks_per_s: float
    db_mb: float
    lexical_p50_ms: float
    lexical_p95_ms: float
    dense_p50_ms: float | None
    hybrid_p50_ms: float | None
    queries: int
    lexical_p99_ms: float = 0.0
    dense_p95_ms: float | None = None
    dense_p99_ms: float | None = None
    hybrid_p95_ms: float | None = None
    hybrid_p99_ms: float | None = None
    dense_recall_at_10: float | None = None
    """Share of the exact top 10 (a full float32 scan) that the index's top 10 holds."""
    hybrid_recall_at_10: float | None = None
    """The same for hybrid answers: fused with the index's dense list vs with the exact one."""
    index_build_s: float | None = None
    """Time of the first dense query, which loads the in-memory index from SQLite."""
    index_mb: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _vocabulary(rng: np.random.Generator, size: int = 20000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, rng.integers(4, 10))) for _ in range(size)]


class _Synthetic:
    """Chunks and vectors in batches, with the time spent making them."""

    def __init__(
        self,
        n: int,
        dim: int,
        words: list[str],
        rng: np.random.Generator,
        isotropic: bool = False,
    ):
        self.n, self.dim, self.words, self.rng = n, dim, words, rng
        weights = 1.0 / np.arange(1, len(words) + 1)
        self.cdf = np.cumsum(weights / weights.sum())
        self.seconds = 0.0
        self.topics = max(1, n // TOPIC_SIZE)
        if dim:
            shared = _unit_rows(rng.standard_normal((1, dim)))[0]
            self.centres = _unit_rows(rng.standard_normal((self.topics, dim))) + 0.5 * shared
            if isotropic:
                self.centres[:] = 0.0
        self.kept: dict[int, np.ndarray] = {}
        """Vectors of the chunks (by position) that queries start from."""

    def batches(self, keep: set[int]) -> Iterator[tuple[list[ChunkSpec], np.ndarray | None]]:
        for start in range(0, self.n, BATCH):
            began = time.perf_counter()
            size = min(BATCH, self.n - start)
            chunks = self._chunks(start, size)
            vectors = None
            if self.dim:
                topic = self.rng.integers(0, self.topics, size)
                noise = self.rng.standard_normal((size, self.dim)) / math.sqrt(self.dim)
                vectors = _unit_rows(self.centres[topic] + noise).astype(np.float32)
                for i in keep.intersection(range(start, start + size)):
                    self.kept[i] = vectors[i - start]
            self.seconds += time.perf_counter() - began
            yield chunks, vectors

    def _chunks(self, start: int, size: int) -> list[ChunkSpec]:
        lengths = self.rng.integers(80, 140, size=size)
        picks = np.searchsorted(self.cdf, self.rng.random(int(lengths.sum()))).tolist()
        words = self.words
        out = []
        pos = 0
        for i, length in enumerate(lengths.tolist()):
            text = " ".join([words[j] for j in picks[pos : pos + length]]) + "."
            pos += length
            n = start + i
            out.append(ChunkSpec(text, 0, len(text), heading=(f"section {n % 97}",), ordinal=n))
        return out


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def run_benchmark(
    n_chunks: int = 100_000,
    dim: int = 0,
    queries: int = 50,
    folder: Path | None = None,
    progress: Progress | None = None,
    isotropic: bool = False,
) -> BenchResult:
    """Ingest ``n_chunks`` (with ``dim``-sized vectors if ``dim``) and time ``queries`` queries
    per mode; with vectors, measure recall@10 of dense and hybrid against exact search."""
    rng = np.random.default_rng(7)
    words = _vocabulary(rng)
    data = _Synthetic(n_chunks, dim, words, rng, isotropic)
    starts = set(rng.choice(n_chunks, size=min(queries, n_chunks), replace=False).tolist())
    if folder is not None:  # a place to put a big temporary collection, made if it is new
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidRequest(
                f"cannot use {folder} for the benchmark's collection: {exc}"
            ) from None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        store = RagStore(Path(tmp) / "bench.db", "bench")
        if dim:
            store.set_embedding_model("random")
        began = time.perf_counter()
        done = 0
        for chunks, vectors in data.batches(starts):
            store.append_chunks("synthetic", chunks, vectors)
            done += len(chunks)
            if progress:
                progress("ingest", done, n_chunks)
        ingest_s = time.perf_counter() - began - data.seconds
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
        questions = [
            " ".join(words[int(j)] for j in rng.integers(0, 3000, size=5)) for _ in range(queries)
        ]
        lex = _time(lambda i: retrieve(store, questions[i], mode="lexical", top_k=5), queries)
        result = BenchResult(
            chunks=n_chunks,
            dim=dim,
            ingest_s=round(ingest_s, 2),
            chunks_per_s=round(n_chunks / max(ingest_s, 1e-9), 1),
            db_mb=round(db_mb, 1),
            lexical_p50_ms=_pct(lex, 50),
            lexical_p95_ms=_pct(lex, 95),
            lexical_p99_ms=_pct(lex, 99),
            dense_p50_ms=None,
            hybrid_p50_ms=None,
            queries=queries,
        )
        if dim:
            _dense_figures(store, result, data, sorted(starts), questions, rng, progress, isotropic)
        store.close()
    return result


def _dense_figures(
    store: RagStore,
    result: BenchResult,
    data: _Synthetic,
    starts: Sequence[int],
    questions: list[str],
    rng: np.random.Generator,
    progress: Progress | None,
    isotropic: bool,
) -> None:
    dim = data.dim
    picked = np.stack([data.kept[i] for i in starts])
    if isotropic:  # queries as unrelated to the chunks as the chunks are to each other
        qvecs = _unit_rows(rng.standard_normal(picked.shape)).astype(np.float32)
    else:  # a question near its chunk
        noise = 0.6 * rng.standard_normal(picked.shape) / math.sqrt(dim)
        qvecs = _unit_rows(picked + noise).astype(np.float32)
    began = time.perf_counter()
    index = store.vector_index()
    result.index_build_s = round(time.perf_counter() - began, 2)
    result.index_mb = round(index.nbytes / 1e6, 1)
    n = len(questions)
    den = _time(lambda i: retrieve(store, "", mode="dense", top_k=5, query_vector=qvecs[i]), n)
    hyb = _time(
        lambda i: retrieve(store, questions[i], mode="hybrid", top_k=5, query_vector=qvecs[i]), n
    )
    result.dense_p50_ms, result.dense_p95_ms, result.dense_p99_ms = (
        _pct(den, p) for p in (50, 95, 99)
    )
    result.hybrid_p50_ms, result.hybrid_p95_ms, result.hybrid_p99_ms = (
        _pct(hyb, p) for p in (50, 95, 99)
    )
    if progress:
        progress("exact search (recall reference)", 0, 1)
    exact = store.nearest_exact(qvecs, max(CANDIDATES, RECALL_K))
    if progress:
        progress("exact search (recall reference)", 1, 1)
    dense_recall = []
    hybrid_recall = []
    for i, question in enumerate(questions):
        truth = {c for c, _ in exact[i][:RECALL_K]}
        got = {c for c, _ in store.nearest(qvecs[i], RECALL_K)}
        dense_recall.append(len(truth & got) / max(1, len(truth)))
        fused = retrieve(store, question, mode="hybrid", top_k=RECALL_K, query_vector=qvecs[i])
        reference = hybrid_from(store, question, exact[i], RECALL_K)
        truth = {h.chunk.id for h in reference}
        hybrid_recall.append(len(truth & {h.chunk.id for h in fused}) / max(1, len(truth)))
    result.dense_recall_at_10 = round(statistics.mean(dense_recall), 4)
    result.hybrid_recall_at_10 = round(statistics.mean(hybrid_recall), 4)


def _pct(values: list[float], p: float) -> float:
    """The nearest-rank percentile, in milliseconds to 0.01."""
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 2)


def _time(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


if __name__ == "__main__":  # python -m edgelm.rag.benchmark [N] [DIM]
    import json
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    d = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    print("[RAG BENCHMARK RESULTS]")
    print(json.dumps(run_benchmark(n, d).to_dict(), indent=2))
