"""Where dense vectors come from: the service's ``/v1/embeddings`` or an engine in-process.

Both sit behind one small protocol so ingest, the CLI and tests do not care which; the
collection records the embedding model's name, and queries must be embedded by the same one.
"""

from __future__ import annotations

from typing import Protocol

from edgelm.client import EdgelmClient
from edgelm.engines.base import Engine


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order."""
        ...


class ServiceEmbedder:
    """Embeddings from a running edgelm (or any OpenAI-compatible) service, in batches: an
    :class:`Embedder` face on :meth:`EdgelmClient.embed`, whose connection it closes."""

    def __init__(self, model: str, client: EdgelmClient, batch: int = 64):
        self.name = model
        self.client = client
        self.batch = batch

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.client.embed(self.name, texts, self.batch)

    def close(self) -> None:
        self.client.close()


class EngineEmbedder:
    """Embeddings from an engine object in this process (tests, benchmarks, offline tools)."""

    def __init__(self, engine: Engine, name: str | None = None):
        self.engine = engine
        self.name = name or engine.model_id

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors, _ = self.engine.embed(texts)
        return vectors
