"""RAG ingest and retrieval on known inputs: chunking, fusion, file types, re-ingest, data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from edgelm.engines.fake import FakeEngine
from edgelm.errors import InvalidRequest, ModelNotFound
from edgelm.rag.collection_db import RagStore, list_collections, remove_collection
from edgelm.rag.embed import EngineEmbedder
from edgelm.rag.evaluate import corpus_dir, evaluate_retrieval, load_questions
from edgelm.rag.ingest import (
    chunk_document,
    chunk_text,
    ingest_paths,
    parse_file,
    parse_html,
    parse_markdown,
)
from edgelm.rag.pdfwriter import write_pdf
from edgelm.rag.retrieve import rank_inline, retrieve, rrf
from edgelm.rag.terms import terms
from edgelm.rag.types import ChunkSpec

MD = """# Guide

Intro paragraph one. It has two sentences.

## Setup

First setup paragraph about cables.

Second setup paragraph about power.

```
# not a heading inside a fence
```

## Use

Usage text.
"""


def test_markdown_sections_follow_headings() -> None:
    doc = parse_markdown(MD, "g.md")
    headings = [s.heading for s in doc.sections]
    assert headings == [("Guide",), ("Guide", "Setup"), ("Guide", "Use")]
    assert doc.title == "Guide"
    chunks = chunk_document(doc, chunk_size=500, overlap=0)
    assert [c.heading_path for c in chunks] == ["Guide", "Guide > Setup", "Guide > Use"]
    for c in chunks:  # offsets point at exactly the chunk's text in the file
        assert MD[c.start : c.end] == c.text
    assert "# not a heading" in chunks[1].text


def test_chunks_respect_size_paragraphs_and_overlap() -> None:
    para = " ".join(f"Sentence number {i} is here." for i in range(10))  # ~270 chars
    text = f"{para}\n\n{para}\n\n{para}"
    chunks = chunk_text(text, chunk_size=300, overlap=0, kind="text")
    assert all(len(c.text) <= 300 for c in chunks)
    # a chunk that can end at a paragraph (and stay half full) does
    assert [c.text for c in chunks] == [para, para, para]
    overlapped = chunk_text(text, chunk_size=200, overlap=60, kind="text")
    assert all(len(c.text) <= 200 for c in overlapped)
    for a, b in itertools.pairwise(overlapped):
        if a.end > b.start:  # same paragraph run: the next chunk repeats a's tail sentence(s)
            assert a.end - b.start <= 60 and text[b.start : a.end].strip()
    assert sum(1 for a, b in itertools.pairwise(overlapped) if b.start < a.end) >= 2


def test_long_words_and_bad_parameters() -> None:
    chunks = chunk_text("x" * 250, chunk_size=100, overlap=0, kind="text")
    assert [len(c.text) for c in chunks] == [100, 100, 50]
    with pytest.raises(InvalidRequest):
        chunk_text("abc", chunk_size=100, overlap=100)


def test_html_drops_scripts_and_keeps_headings() -> None:
    doc = parse_html(
        "<html><head><title>T</title><style>x{}</style></head><body><nav>menu</nav>"
        "<h1>Top</h1><p>Alpha &amp; beta.</p><h2>Sub</h2><ul><li>one</li><li>two</li></ul>"
        "<script>evil()</script></body></html>"
    )
    assert doc.title == "T"
    assert "menu" not in doc.text and "evil" not in doc.text and "Alpha & beta." in doc.text
    chunks = chunk_document(doc, 200, 0)
    assert [(c.heading_path, c.text) for c in chunks] == [
        ("Top", "Alpha & beta."),
        ("Top > Sub", "one\n\ntwo"),
    ]


def test_each_file_type_ingests(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\nThe falcon nests on cliffs.\n")
    (tmp_path / "b.txt").write_text("Otters hold hands while sleeping.\n")
    (tmp_path / "c.html").write_text("<h1>C</h1><p>Beavers build dams from branches.</p>")
    write_pdf(tmp_path / "d.pdf", ["Page one talks about lichens.", "Page two: glaciers move."])
    (tmp_path / "skip.bin").write_bytes(b"\0")
    with RagStore(tmp_path / "db" / "t.db") as store:
        report = ingest_paths(store, [tmp_path], chunk_size=200, overlap=0)
        assert sorted(report.added) == ["a.md", "b.txt", "c.html", "d.pdf"]
        for question, source in [
            ("where do falcons nest", "a.md"),
            ("otters sleeping", "b.txt"),
            ("what do beavers build", "c.html"),
            ("glaciers", "d.pdf"),
        ]:
            hits = retrieve(store, question, mode="lexical", top_k=1, min_relevance=0.5)
            assert hits and hits[0].chunk.source == source, question
        glacier = retrieve(store, "glaciers", mode="lexical", top_k=1)[0].chunk
        assert glacier.page == 2 and glacier.location.startswith("page 2")


def test_reingest_skips_unchanged_and_handles_changes(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "keep.md").write_text("Kept text about herons.")
    (docs / "change.md").write_text("Old text about swans.")
    (docs / "gone.md").write_text("Doomed text about geese.")
    with RagStore(tmp_path / "c.db") as store:
        ingest_paths(store, [docs])
        (docs / "change.md").write_text("New text about pelicans.")
        (docs / "gone.md").unlink()
        report = ingest_paths(store, [docs])
        assert report.unchanged == ["keep.md"]
        assert report.updated == ["change.md"] and report.removed == ["gone.md"]
        assert report.chunks == 1
        assert not retrieve(store, "swans", mode="lexical", top_k=3, min_relevance=0.5)
        assert not retrieve(store, "geese", mode="lexical", top_k=3, min_relevance=0.5)
        assert retrieve(store, "pelicans", mode="lexical", top_k=3)[0].chunk.source == "change.md"
        # a different chunking changes the hash: everything is re-chunked
        assert len(ingest_paths(store, [docs], chunk_size=300).updated) == 2
        # another folder adds to the collection instead of pruning the first one
        other = tmp_path / "other"
        other.mkdir()
        (other / "x.txt").write_text("Cranes dance.")
        assert ingest_paths(store, [other]).removed == []
        assert set(store.sources()) == {"keep.md", "change.md", "x.txt"}


def test_store_is_atomic(tmp_path: Path) -> None:
    with RagStore(tmp_path / "a.db") as store:
        store.replace_source("s", "", "text", "h", None, [ChunkSpec("first", 0, 5)])
        with pytest.raises(ValueError):
            store.replace_source("s", "", "text", "h2", None, [ChunkSpec("x", 0, 1)], vectors=[])
        assert store.sources()["s"].hash == "h"
        assert retrieve(store, "first", mode="lexical", top_k=1)[0].chunk.text == "first"


def test_rrf_on_known_rankings() -> None:
    fused = rrf([[1, 2, 3], [3, 1, 4]], k=60)
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert rrf([[5, 6]], k=0)[0] == (5, 1.0)


def test_terms_stem_plurals_and_tenses() -> None:
    assert terms("The batteries are charging") == terms("battery charged")
    assert terms("what is the") == []


def test_dense_and_hybrid_with_fake_embeddings(tmp_path: Path) -> None:
    embedder = EngineEmbedder(FakeEngine("fake-embed"))
    with RagStore(tmp_path / "v.db") as store:
        ingest_paths(store, [corpus_dir()], embedder=embedder)
        assert (
            store.embedding_model == "fake-embed" and store.count_vectors() == store.count_chunks()
        )
        question = "How long does a full mast battery last without sun?"
        vector = embedder.embed([question])[0]
        dense = retrieve(store, question, mode="dense", top_k=3, query_vector=vector)
        assert dense and dense[0].similarity is not None
        hybrid = retrieve(store, question, mode="hybrid", top_k=3, query_vector=vector)
        assert hybrid[0].chunk.source == "power.txt"
        with pytest.raises(InvalidRequest):
            retrieve(store, question, mode="dense", top_k=3)


def test_collections_on_disk(isolated_home: Path) -> None:
    with pytest.raises(ModelNotFound):
        RagStore.open(isolated_home, "nope", create=False)
    with pytest.raises(InvalidRequest):
        RagStore.open(isolated_home, "../evil")
    RagStore.open(isolated_home, "one").close()
    assert list_collections(isolated_home) == ["one"]
    assert remove_collection(isolated_home, "one") and list_collections(isolated_home) == []


def test_inline_documents_rank_lexically() -> None:
    docs = [{"id": "a", "text": "Zebras have stripes."}, {"id": "b", "text": "Owls hunt at night."}]
    hits = rank_inline(docs, "When do owls hunt?", top_k=2, min_relevance=0.4)
    assert [h.chunk.source for h in hits] == ["b"]


# -- the shipped corpus and question set ------------------------------------------------------
def test_every_evidence_quote_occurs_in_its_source() -> None:
    rows = load_questions()
    assert len(rows) >= 25 and len({r["id"] for r in rows}) == len(rows)
    assert sum(not r["answerable"] for r in rows) >= 6
    corpus = corpus_dir()
    for row in rows:
        assert set(row) == {"id", "question", "answer", "answerable", "evidence"}
        assert bool(row["evidence"]) == row["answerable"]
        for ev in row["evidence"]:
            path = corpus / ev["source"]
            raw = path.read_bytes()
            text = parse_file(path).text
            # Markdown and text quotes are in the file itself; HTML and PDF in their text
            if path.suffix in (".md", ".txt"):
                assert ev["quote"] in raw.decode(), (row["id"], ev)
            assert ev["quote"] in text, (row["id"], ev)


def test_corpus_is_small_and_varied() -> None:
    files = [p for p in corpus_dir().iterdir() if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert {".md", ".txt", ".html", ".pdf"} <= suffixes
    assert 6 <= len([p for p in files if p.suffix]) <= 10
    assert (corpus_dir() / "datasheet.pdf").stat().st_size < 50_000


def test_lexical_retrieval_quality_on_the_demo_set(tmp_path: Path) -> None:
    with RagStore(tmp_path / "q.db") as store:
        ingest_paths(store, [corpus_dir()])
        [score] = evaluate_retrieval(store, load_questions(), corpus_dir(), modes=["lexical"])
    assert score.recall_at_k >= 0.9 and score.mrr >= 0.8
    assert score.refused_unanswerable >= 0.8 and score.no_hit_answerable <= 0.1
    assert json.dumps(score.to_dict())


def test_vectors_live_in_their_table_and_go_with_their_chunks(tmp_path: Path) -> None:
    with RagStore(tmp_path / "v.db") as store:
        specs = [ChunkSpec("north", 0, 5), ChunkSpec("east", 0, 4), ChunkSpec("south", 0, 5)]
        store.set_embedding_model("m")
        store.replace_source("a", "", "text", "h", None, specs[:2], [[1, 0, 0], [0, 1, 0]])
        store.replace_source("b", "", "text", "h", None, specs[2:], [[-1, 0, 0]])
        assert store.count_vectors() == 3
        ranked = store.nearest([0.9, 0.1, 0], 3)
        texts = [store.chunks_by_id([i])[i].text for i, _ in ranked]
        assert texts == ["north", "east", "south"]
        assert ranked[0][1] == pytest.approx(0.9939, abs=1e-3)  # cosine similarity
        with pytest.raises(InvalidRequest, match="dimensions"):
            store.nearest([1, 0], 1)
        with pytest.raises(InvalidRequest, match="differs"):
            store.replace_source("c", "", "text", "h", None, specs[:1], [[1, 0]])
        store.remove_source("a")  # vectors go with their chunks
        assert store.count_vectors() == 1 and store.has_vectors("b")
        assert [store.chunks_by_id([i])[i].text for i, _ in store.nearest([1, 0, 0], 3)] == [
            "south"
        ]
        store.set_embedding_model("other")  # vectors of another model are not comparable
        assert store.count_vectors() == 0 and not store.has_vectors("b")
        assert store.nearest([1, 0, 0, 0], 3) == []  # no vectors: any size, nothing found


def test_without_sqlite_vec_everything_works_but_an_old_vector_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from edgelm.errors import MissingExtra
    from edgelm.rag import collection_db as store_module

    embedder = EngineEmbedder(FakeEngine("fake-embed"))
    legacy = tmp_path / "legacy.db"
    with RagStore(legacy) as store:
        if not store.vectors_supported:
            pytest.skip("sqlite-vec cannot load here (install edgelm[rag])")
        store.replace_source("s", "", "text", "h", None, [ChunkSpec("battery", 0, 7)])
        store.db.execute(
            "CREATE VIRTUAL TABLE chunk_vectors USING vec0(embedding float[2] "
            "distance_metric=cosine)"
        )
        store.db.execute("INSERT INTO chunk_vectors(rowid, embedding) VALUES(1, '[1, 0]')")

    def stdlib(path):  # type: ignore[no-untyped-def]
        return sqlite3.connect(str(path), check_same_thread=False, isolation_level=None), False

    monkeypatch.setattr(store_module, "connect", stdlib)
    with RagStore(tmp_path / "plain.db") as store:  # a new collection needs no extension
        ingest_paths(store, [corpus_dir()], embedder=embedder)
        vector = embedder.embed(["battery"])[0]
        assert retrieve(store, "battery", mode="dense", top_k=1, query_vector=vector)
    with RagStore(legacy) as store:  # an old one keeps its vectors, and says what it needs
        assert store.has_legacy_vectors()
        assert retrieve(store, "battery", mode="lexical", top_k=1)
        with pytest.raises(MissingExtra, match=r"edgelm\[rag\]"):
            store.nearest([1, 0], 1)
        with pytest.raises(MissingExtra, match=r"edgelm\[rag\]"):
            ingest_paths(store, [corpus_dir()], embedder=embedder)
