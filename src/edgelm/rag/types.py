"""The shapes RAG's steps hand each other: a chunk before storing, a stored chunk, a hit.

They live apart from the steps so that ingest, the store, retrieval and the answer step can
all use them without importing one another: ingest writes into the store, retrieval reads it,
and the answer step only looks at hits. This module imports nothing from edgelm but settings'
plain types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edgelm.settings import RetrievalMode


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """One chunk before it is stored: its text and where it came from."""

    text: str
    start: int
    end: int
    heading: tuple[str, ...] = ()
    page: int | None = None
    ordinal: int = 0

    @property
    def heading_path(self) -> str:
        return " > ".join(self.heading)


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk as retrieved: enough to cite it (source, location) and to show it."""

    id: int
    source: str
    ordinal: int
    heading: str
    page: int | None
    start: int
    end: int
    text: str

    @property
    def chunk_id(self) -> str:
        """Stable across re-ingests of an unchanged file (unlike the SQLite row id)."""
        return f"{self.source}#{self.ordinal}"

    @property
    def location(self) -> str:
        """Human-readable position: page (PDF) or heading path, plus the character span."""
        parts = []
        if self.page is not None:
            parts.append(f"page {self.page}")
        if self.heading:
            parts.append(f"§ {self.heading}")
        parts.append(f"chars {self.start}-{self.end}")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved chunk with the score of the mode used and the evidence behind it."""

    chunk: StoredChunk
    score: float
    relevance: float | None = None
    """Lexical coverage in [0, 1] (None when the chunk was only found densely)."""
    similarity: float | None = None
    """Cosine similarity to the question (None without vectors)."""


class RetrievalOptions(Protocol):
    """What retrieval reads from a request's options (the answer step's ``AnswerOptions``
    has these and more)."""

    top_k: int
    mode: RetrievalMode
    min_relevance: float
    min_similarity: float
