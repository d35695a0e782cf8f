"""Where dense vectors come from: the service's ``/v1/embeddings`` or an engine in-process.

Both sit behind one small protocol so ingest, the CLI and tests do not care which; the
collection records the embedding model's name, and queries must be embedded by the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from edgelm.client import EdgelmClient, ServiceError, ServiceUnavailable
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


def service_embedder(
    model: str | None, explicit: bool, client: Callable[[], EdgelmClient]
) -> tuple[ServiceEmbedder | None, str]:
    """The embedder for an ingest: ``(embedder or None, note)``.

    A model the user named (flag, or the collection's own) is used as it is, and any failure
    is theirs to see. The *default* embedder (``rag.embed_model``) is tried first with one
    short text: when the service is down or the model is not downloaded, the ingest goes on
    lexical-only and the note says why and how to get dense retrieval, instead of failing.
    """
    if not model:
        return None, ""
    embedder = ServiceEmbedder(model, client())
    if explicit:
        return embedder, ""
    try:
        embedder.embed(["probe"])
    except (ServiceUnavailable, ServiceError) as exc:
        embedder.close()
        # Only "no service" and "no such model" mean "not set up yet"; a refused key or a
        # model that cannot embed is the user's to see, not a silent lexical-only ingest.
        if isinstance(exc, ServiceError) and exc.status != 404:
            raise
        return None, (
            f"lexical only: the default embedder '{model}' is not available ({exc.message}); "
            f"for dense and hybrid retrieval run: edgelm model download {model}"
        )
    return embedder, ""
