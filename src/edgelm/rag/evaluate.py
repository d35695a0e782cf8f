"""Retrieval quality on a labelled question set: recall@k and MRR per retrieval mode.

A retrieved chunk is *relevant* to a question when it comes from an evidence source and its
character span overlaps the evidence quote's span in that source's extracted text — so the
labels are quotes a person can check, not chunk ids that change with chunk sizes. The
unanswerable questions measure the other half of the job: how often retrieval correctly
returns nothing (and so the answer step refuses without calling a model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgelm.rag.collection_db import RagStore
from edgelm.rag.ingest import parse_file
from edgelm.rag.retrieve import Hit, retrieve
from edgelm.settings import RetrievalMode


def corpus_dir() -> Path:
    """The demo corpus shipped with edgelm."""
    return Path(str(resources.files("edgelm.rag").joinpath("corpus")))


def load_questions(path: Path | None = None) -> list[dict[str, Any]]:
    """The labelled question set (default: the one shipped for the demo corpus)."""
    if path is None:
        path = Path(str(resources.files("edgelm.rag").joinpath("data/qa.jsonl")))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def evidence_spans(
    rows: Sequence[dict[str, Any]], corpus: Path
) -> dict[str, list[tuple[str, int, int]]]:
    """Question id → (source, start, end) of every evidence quote in the extracted text."""
    texts: dict[str, str] = {}
    spans: dict[str, list[tuple[str, int, int]]] = {}
    for row in rows:
        for ev in row.get("evidence", []):
            source = ev["source"]
            if source not in texts:
                texts[source] = parse_file(corpus / source, source).text
            start = texts[source].find(ev["quote"])
            if start < 0:
                raise ValueError(f"{row['id']}: quote not found in {source}: {ev['quote']!r}")
            spans.setdefault(row["id"], []).append((source, start, start + len(ev["quote"])))
    return spans


def _relevant(hit: Hit, spans: Sequence[tuple[str, int, int]]) -> bool:
    c = hit.chunk
    return any(c.source == s and c.start < e and st < c.end for s, st, e in spans)


@dataclass
class ModeScore:
    mode: str
    k: int
    recall_at_k: float
    mrr: float
    answerable: int
    no_hit_answerable: float
    """Share of answerable questions where retrieval returned nothing (false refusals)."""
    refused_unanswerable: float
    """Share of unanswerable questions where retrieval returned nothing (correct refusals)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(self).items()}


def evaluate_retrieval(
    store: RagStore,
    rows: Sequence[dict[str, Any]],
    corpus: Path,
    *,
    modes: Sequence[RetrievalMode] = ("lexical", "dense", "hybrid"),
    k: int = 4,
    embed_query: Callable[[str], Sequence[float]] | None = None,
    min_relevance: float = 0.4,
    min_similarity: float = 0.6,
) -> list[ModeScore]:
    """Score each mode; dense and hybrid need ``embed_query`` (they are skipped without it).

    Recall@k is measured without the relevance floor (pure ranking quality); the refusal
    shares use the floors, as answering does.
    """
    spans = evidence_spans(rows, corpus)
    vectors = {}
    if embed_query is not None:
        vectors = {row["id"]: embed_query(row["question"]) for row in rows}
    scores = []
    for mode in modes:
        if mode != "lexical" and embed_query is None:
            continue
        hits_at_k = 0
        rr = 0.0
        answerable = [r for r in rows if r.get("answerable")]
        empty_ok = empty_bad = 0
        for row in rows:
            vector = vectors.get(row["id"])
            if row.get("answerable"):
                ranked = retrieve(store, row["question"], mode=mode, top_k=k, query_vector=vector)
                flags = [_relevant(h, spans[row["id"]]) for h in ranked]
                hits_at_k += any(flags)
                rr += next((1.0 / n for n, f in enumerate(flags, 1) if f), 0.0)
            floored = retrieve(
                store,
                row["question"],
                mode=mode,
                top_k=k,
                query_vector=vector,
                min_relevance=min_relevance,
                min_similarity=min_similarity,
            )
            if not floored:
                if row.get("answerable"):
                    empty_bad += 1
                else:
                    empty_ok += 1
        n_ans = max(1, len(answerable))
        n_un = max(1, len(rows) - len(answerable))
        scores.append(
            ModeScore(
                mode=mode,
                k=k,
                recall_at_k=hits_at_k / n_ans,
                mrr=rr / n_ans,
                answerable=len(answerable),
                no_hit_answerable=empty_bad / n_ans,
                refused_unanswerable=empty_ok / n_un,
            )
        )
    return scores
