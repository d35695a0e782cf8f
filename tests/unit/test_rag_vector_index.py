"""The vector index against exact search: recall, exactness when the shortlist covers all,
staying in step with writes (this process's and another connection's), old collections;
the lexical candidate terms; the scale benchmark on a small run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edgelm.rag.benchmark import run_benchmark
from edgelm.rag.collection_db import RagStore
from edgelm.rag.retrieve import COMMON_MIN_DF, MAX_QUERY_TERMS, retrieve, select_terms
from edgelm.rag.types import ChunkSpec
from edgelm.rag.vector_index import VectorIndex, quantize, shortlist_size


def _unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def _topics(rng: np.random.Generator, n: int, dim: int, per_topic: int = 50) -> np.ndarray:
    """Vectors around topic directions sharing a common one, like an embedder's."""
    centres = _unit(rng.standard_normal((max(1, n // per_topic), dim)))
    shared = _unit(rng.standard_normal((1, dim)))[0]
    topic = rng.integers(0, len(centres), n)
    return _unit(centres[topic] + 0.5 * shared + rng.standard_normal((n, dim)) / np.sqrt(dim))


def _exact(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """Brute force, independent of the store: row positions by cosine, best first."""
    sims = _unit(vectors) @ (query / np.linalg.norm(query))
    return [int(i) for i in np.lexsort((np.arange(len(sims)), -sims))[:k]]


def _fill(store: RagStore, source: str, vectors: np.ndarray) -> list[int]:
    """Store one chunk per vector under ``source``; returns the chunk ids in row order."""
    specs = [ChunkSpec(f"{source} chunk {i}", 0, 10, ordinal=i) for i in range(len(vectors))]
    store.replace_source(source, "", "text", source, None, specs, vectors)
    rows = store.db.execute(
        "SELECT c.id FROM chunks c JOIN sources s ON s.id = c.source_id "
        "WHERE s.source = ? ORDER BY c.ordinal",
        (source,),
    )
    return [r[0] for r in rows]


def test_index_recall_against_exact_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    vectors = _topics(rng, 6000, 384, per_topic=200)  # the exact top 10 among 200 close ones
    noise = 0.6 * rng.standard_normal((40, 384)) / np.sqrt(384)
    queries = _unit(vectors[rng.choice(6000, 40)] + noise)  # a question near its chunk
    with RagStore(tmp_path / "r.db") as store:
        store.set_embedding_model("m")
        ids = _fill(store, "a", vectors)
        # a shortlist of 3% of the chunks from the binary codes, as at 100k chunks
        recalls = []
        for q in queries:
            got = [i for i, _ in store.nearest(q, 10, shortlist=180, rerank=40)]
            truth = [ids[p] for p in _exact(vectors, q, 10)]
            recalls.append(len(set(got) & set(truth)) / 10)
        assert np.mean(recalls) >= 0.95
        # the reference the benchmark uses is the same exact search
        assert [i for i, _ in store.nearest_exact(queries[:1], 10)[0]] == [
            ids[p] for p in _exact(vectors, queries[0], 10)
        ]


def test_binary_codes_carry_the_ranking() -> None:
    """Without its binary stage (a shortlist chosen blindly) recall collapses: the codes,
    not the re-rank, are what finds the neighbours."""
    rng = np.random.default_rng(3)
    vectors = _topics(rng, 4000, 384)
    index = VectorIndex.build(1, 384, iter([(np.arange(4000), quantize(vectors))]))
    q = _unit(vectors[7:8] + 0.03 * rng.standard_normal((1, 384)))[0]
    truth = set(_exact(vectors, q, 10))
    found = set(index.candidates(q, 10, shortlist=200, rerank=200).tolist())
    assert len(truth & found) >= 9
    blind = set(rng.choice(4000, 200, replace=False).tolist())
    assert len(truth & blind) < 5


def test_equal_to_exact_search_when_the_shortlist_covers_everything(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = _unit(rng.standard_normal((500, 24)))  # isotropic: the hardest case
    with RagStore(tmp_path / "e.db") as store:
        store.set_embedding_model("m")
        ids = _fill(store, "a", vectors)
        for q in _unit(rng.standard_normal((10, 24))):
            got = store.nearest(q, 20, shortlist=500, rerank=500)
            assert [i for i, _ in got] == [ids[p] for p in _exact(vectors, q, 20)]
            assert got[0][1] == pytest.approx(float(vectors[ids.index(got[0][0])] @ q), abs=1e-5)
            reference = store.nearest_exact([q], 20)[0]
            assert [i for i, _ in got] == [i for i, _ in reference]
            assert [s for _, s in got] == pytest.approx([s for _, s in reference], abs=1e-5)
        assert shortlist_size(500) == 500  # small collections: the default covers all too


def test_index_follows_deletes_reingest_and_other_connections(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    path = tmp_path / "s.db"
    with RagStore(path) as store, RagStore(path) as other:
        store.set_embedding_model("m")
        a = _fill(store, "a", _unit(rng.standard_normal((30, 8))))
        b_vectors = _unit(rng.standard_normal((20, 8)))
        b = _fill(store, "b", b_vectors)
        q = b_vectors[3]
        assert store.nearest(q, 1)[0][0] == b[3]
        assert len(store.vector_index()) == 50
        store.remove_source("a")
        assert len(store.vector_index()) == 20
        assert not set(a) & {i for i, _ in store.nearest(q, 50)}
        # re-ingest b with new vectors: old ids gone, the new chunk nearest to q found
        new_vectors = _unit(rng.standard_normal((20, 8)))
        new_b = _fill(store, "b", new_vectors)
        got = [i for i, _ in store.nearest(new_vectors[5], 50)]
        assert got[0] == new_b[5] and set(got) == set(new_b)
        # a write from another connection (another process) is seen by the next query
        c_vectors = _unit(rng.standard_normal((5, 8)))
        c = _fill(other, "c", c_vectors)
        assert store.nearest(c_vectors[2], 1)[0][0] == c[2]
        assert len(store.vector_index()) == 25
        other.remove_source("c")
        assert store.nearest(c_vectors[2], 1)[0][0] != c[2]
        # a hit's chunk row and the dense retrieval path agree after all that
        hits = retrieve(store, "", mode="dense", top_k=3, query_vector=new_vectors[5])
        assert hits[0].chunk.id == new_b[5] and hits[0].chunk.source == "b"


def test_an_old_collection_is_migrated_and_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(2)
    vectors = _unit(rng.standard_normal((40, 16)))
    path = tmp_path / "old.db"
    with RagStore(path) as store:
        if not store.vectors_supported:
            pytest.skip("sqlite-vec cannot load here (install edgelm[rag])")
        specs = [ChunkSpec(f"old chunk {i}", 0, 9, ordinal=i) for i in range(40)]
        store.replace_source("old.md", "", "markdown", "h", None, specs)
        # the layout an older edgelm wrote: vectors in a sqlite-vec vec0 table, no new table
        db = store.db
        db.execute("DROP TABLE chunk_embeddings")
        db.execute("DROP TABLE chunk_q8")
        db.execute(
            "CREATE VIRTUAL TABLE chunk_vectors USING vec0(embedding float[16] "
            "distance_metric=cosine)"
        )
        ids = [r[0] for r in db.execute("SELECT id FROM chunks ORDER BY ordinal")]
        for i, v in zip(ids, vectors, strict=True):
            db.execute(
                "INSERT INTO chunk_vectors(rowid, embedding) VALUES(?, ?)", (i, v.tobytes())
            )
        db.execute("INSERT INTO meta(key, value) VALUES('dim', '16'), ('embedding_model', 'm')")
    with caplog.at_level(logging.WARNING), RagStore(path) as store:
        assert "moving 40 vectors" in caplog.text
        assert not store.has_legacy_vectors() and store.count_vectors() == 40
        q = vectors[11]
        assert [i for i, _ in store.nearest(q, 5)] == [ids[p] for p in _exact(vectors, q, 5)]
        assert retrieve(store, "old chunk", mode="lexical", top_k=1)
        store.remove_source("old.md")
        assert store.count_vectors() == 0


def test_candidate_terms_leave_out_very_common_ones_in_large_collections() -> None:
    q = ["system", "battery", "rare", "absent"]
    dfs = {"system": 40_000, "battery": 1_500, "rare": 12, "absent": 0}
    # 100k chunks: "system" (40%) does not pick candidates; an absent term never does
    assert select_terms(q, dfs, 100_000) == ["battery", "rare"]
    # a small collection: every present term counts, as before
    small = {"system": 900, "battery": 30, "rare": 1, "absent": 0}
    assert select_terms(q, small, 1_000) == ["system", "battery", "rare"]
    assert COMMON_MIN_DF >= 1000
    # only common terms: the rarest still picks candidates
    assert select_terms(["system", "data"], {"system": 9e4, "data": 6e4}, 100_000) == ["data"]
    many = [f"t{i}" for i in range(30)]
    chosen = select_terms(many, {t: i + 1 for i, t in enumerate(many)}, 100_000)
    assert chosen == many[:MAX_QUERY_TERMS]
    assert select_terms(many, {t: 1 for t in many}, 500) == many  # small: no cap


def test_lexical_ranking_with_a_very_common_word(tmp_path: Path) -> None:
    """A common word in the question no longer selects candidates, but still counts in the
    relevance score; the chunk with the rare word wins either way."""
    n = COMMON_MIN_DF + 200
    specs = [ChunkSpec(f"the system logs entry {i}", 0, 10, ordinal=i) for i in range(n)]
    specs.append(ChunkSpec("the system heron nests here", 0, 10, ordinal=n))
    with RagStore(tmp_path / "l.db") as store:
        store.replace_source("big", "", "text", "h", None, specs)
        hits = retrieve(store, "system heron", mode="lexical", top_k=3, min_relevance=0.1)
        assert [h.chunk.text for h in hits] == ["the system heron nests here"]
        assert hits[0].relevance == pytest.approx(1.0)


def test_benchmark_reports_every_figure_on_a_small_run(tmp_path: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    result = run_benchmark(
        3000, 32, queries=6, folder=tmp_path, progress=lambda *a: seen.append(a)
    ).to_dict()
    assert result["chunks"] == 3000 and result["db_mb"] > 0 and result["chunks_per_s"] > 0
    for mode in ("lexical", "dense", "hybrid"):
        p50, p95, p99 = (result[f"{mode}_p{p}_ms"] for p in (50, 95, 99))
        assert 0 < p50 <= p95 <= p99  # type: ignore[operator]
    assert result["dense_recall_at_10"] == 1.0  # 3000 < the shortlist: exact
    assert 0.9 <= result["hybrid_recall_at_10"] <= 1.0  # type: ignore[operator]
    assert ("ingest", 3000, 3000) in seen
    assert list(tmp_path.iterdir()) == []  # the temporary collection is gone


def test_document_frequencies_follow_changes(tmp_path: Path) -> None:
    path = tmp_path / "df.db"
    with RagStore(path) as store, RagStore(path) as other:
        store.replace_source("a", "", "text", "h", None, [ChunkSpec("heron and kite", 0, 9)])
        assert store.document_frequencies(["heron", "kite", "owl"]) == {
            "heron": 1,
            "kite": 1,
            "owl": 0,
        }
        other.replace_source("b", "", "text", "h", None, [ChunkSpec("heron owl", 0, 9)])
        assert store.document_frequencies(["heron", "owl"]) == {"heron": 2, "owl": 1}
        store.remove_source("a")
        assert store.document_frequencies(["kite", "heron"]) == {"kite": 0, "heron": 1}
