"""Scale check: ingest N synthetic chunks, then time queries. Prints figures; asserts nothing.

Synthetic text is drawn from a fixed vocabulary with a Zipf-like skew (a few words common,
most rare), like real prose, so BM25 posting lists have realistic lengths. Vectors (when
asked for) are random unit vectors of the given size: the point is the cost of storing and
scanning them, not their meaning.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgelm.rag.collection_db import RagStore
from edgelm.rag.retrieve import retrieve
from edgelm.rag.types import ChunkSpec


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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _vocabulary(rng: np.random.Generator, size: int = 20000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, rng.integers(4, 10))) for _ in range(size)]


def _chunks(n: int, words: list[str], rng: np.random.Generator) -> list[ChunkSpec]:
    """Made before the clock starts, so the figure is the store's speed, not the generator's."""
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    lengths = rng.integers(80, 140, size=n)
    picks = rng.choice(len(words), size=int(lengths.sum()), p=weights)
    out = []
    pos = 0
    for i, length in enumerate(lengths):
        text = " ".join(words[j] for j in picks[pos : pos + length]) + "."
        pos += length
        out.append(
            ChunkSpec(text=text, start=0, end=len(text), heading=(f"section {i % 97}",), ordinal=i)
        )
    return out


def _vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def run_benchmark(
    n_chunks: int = 100_000, dim: int = 0, queries: int = 50, folder: Path | None = None
) -> BenchResult:
    """Ingest ``n_chunks`` (with ``dim``-sized vectors if ``dim``) and time ``queries`` queries."""
    rng = np.random.default_rng(7)
    words = _vocabulary(rng)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        store = RagStore(Path(tmp) / "bench.db", "bench")
        if dim:
            store.set_embedding_model("random")
        chunks = _chunks(n_chunks, words, rng)
        vectors = _vectors(n_chunks, dim, rng) if dim else None
        start = time.perf_counter()
        store.bulk_insert("synthetic", chunks, vectors)
        ingest_s = time.perf_counter() - start
        db_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
        questions = [
            " ".join(words[int(j)] for j in rng.integers(0, 3000, size=5)) for _ in range(queries)
        ]
        lex = _time(lambda q: retrieve(store, q, mode="lexical", top_k=5), questions)
        dense_p50 = hybrid_p50 = None
        if dim:
            qvec = _vectors(1, dim, rng)[0]
            retrieve(store, questions[0], mode="dense", top_k=5, query_vector=qvec)  # warm cache
            dense_p50 = statistics.median(
                _time(
                    lambda q: retrieve(store, q, mode="dense", top_k=5, query_vector=qvec),
                    questions,
                )
            )
            hybrid_p50 = statistics.median(
                _time(
                    lambda q: retrieve(store, q, mode="hybrid", top_k=5, query_vector=qvec),
                    questions,
                )
            )
        store.close()
    return BenchResult(
        chunks=n_chunks,
        dim=dim,
        ingest_s=round(ingest_s, 2),
        chunks_per_s=round(n_chunks / ingest_s, 1),
        db_mb=round(db_mb, 1),
        lexical_p50_ms=round(statistics.median(lex), 2),
        lexical_p95_ms=round(sorted(lex)[int(0.95 * (len(lex) - 1))], 2),
        dense_p50_ms=None if dense_p50 is None else round(dense_p50, 2),
        hybrid_p50_ms=None if hybrid_p50 is None else round(hybrid_p50, 2),
        queries=queries,
    )


def _time(fn, questions: list[str]) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for q in questions:
        start = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - start) * 1000)
    return out


if __name__ == "__main__":  # python -m edgelm.rag.benchmark [N] [DIM]
    import json
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    d = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    print("[RAG BENCHMARK RESULTS]")
    print(json.dumps(run_benchmark(n, d).to_dict(), indent=2))
