"""RAG for the CLI and the Chainlit app: retrieval on the local store, generation by the service.

Retrieval is a few SQLite queries, so it runs where the collection lives; the model runs in
the edgelm service (local, or ``EDGELM_ENDPOINT``), so no tool keeps a private copy of a model
and the service's pool, queue and memory budget stay in charge.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from edgelm.client import EdgelmClient, resolve_service
from edgelm.rag.answer import AnswerOptions, answer_stream
from edgelm.rag.collection_db import RagStore
from edgelm.rag.embed import service_embedder
from edgelm.rag.ingest import IngestReport, ingest_paths
from edgelm.rag.retrieve import Hit, find_hits
from edgelm.settings import Settings
from edgelm.types import Chunk


class HttpGenerator:
    """RAG's :class:`~edgelm.rag.answer.Generator` over HTTP: chat answers from an edgelm
    service, through :meth:`EdgelmClient.astream_chat`, as :class:`Chunk` objects."""

    def __init__(self, client: EdgelmClient):
        self.client = client
        self.reported: dict[str, str] = {}

    def canonical(self, model: str) -> str:
        """The name the service reported for ``model`` in its last answer (else as asked)."""
        return self.reported.get(model, model)

    async def stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        temperature: float,
        logprobs: bool = False,
    ) -> AsyncIterator[Chunk]:
        params = {"max_tokens": max_tokens, "temperature": temperature, "logprobs": logprobs or None}
        deltas = 0
        # aclosing: when the answer is closed early (a loop cut), the HTTP stream closes at
        # once and the service stops generating, not whenever the generator is collected.
        async with aclosing(self.client.astream_chat(model, messages, **params)) as events:
            async for event in events:
                result = event.result
                if result is None:
                    deltas += 1
                    yield Chunk(text=event.text, completion_tokens=deltas, logprobs=event.logprobs)
                    continue
                if result.model:
                    self.reported[model] = result.model
                yield Chunk(
                    text="",
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                    finish_reason="length" if result.finish_reason == "length" else "stop",
                )


class LocalRag:
    """Ask questions of a local collection, with answers written by the service's models."""

    def __init__(self, settings: Settings, endpoint: str | None = None):
        self.settings = settings
        self.rag = settings.rag
        self.address = resolve_service(settings, endpoint)

    def client(self) -> EdgelmClient:
        """A new client for the service (each tool call opens and closes its own)."""
        return EdgelmClient(self.address.endpoint, self.address.api_key)

    def options(self, **overrides: Any) -> AnswerOptions:
        return AnswerOptions.from_settings(self.rag, **overrides)

    def ingest(self, paths: Sequence[Path], collection: str | None = None) -> IngestReport:
        """Add files to the collection with the configured chunking; when the collection (or
        the settings) name an embedding model, the service embeds the new chunks with it."""
        name = collection or self.rag.collection
        with RagStore.open(self.settings.home, name) as store:
            model = store.embedding_model or self.rag.embed_model
            explicit = store.embedding_model is not None
            embedder, _note = service_embedder(model, explicit, self.client)
            try:
                return ingest_paths(
                    store,
                    paths,
                    chunk_size=self.rag.chunk_size,
                    overlap=self.rag.overlap,
                    embedder=embedder,
                    prune=False,
                )
            finally:
                if embedder is not None:
                    embedder.close()

    def embed(self, model: str, text: str) -> list[float]:
        """The query's vector, from the service (the model that embedded the collection)."""
        with self.client() as client:
            return client.embed(model, [text])[0]

    def retrieve(
        self,
        question: str,
        options: AnswerOptions,
        collection: str | None = None,
        documents: Sequence[dict[str, str]] | None = None,
    ) -> list[Hit]:
        """Top hits from inline ``documents`` or the collection (default ``rag.collection``)."""
        common = {
            "embed": self.embed,
            "chunk_size": self.rag.chunk_size,
            "overlap": self.rag.overlap,
        }
        if documents is not None:
            return find_hits(question, options, documents=documents, **common)
        name = collection or self.rag.collection
        with RagStore.open(self.settings.home, name, create=False) as store:
            return find_hits(question, options, store=store, **common)

    async def stream(
        self,
        question: str,
        options: AnswerOptions,
        *,
        collection: str | None = None,
        documents: Sequence[dict[str, str]] | None = None,
    ) -> tuple[list[Hit], AsyncIterator[Chunk], dict[str, Any]]:
        """Retrieve, then return the hits, the answer stream, and the extension it fills."""
        hits = await asyncio.to_thread(self.retrieve, question, options, collection, documents)
        extension: dict[str, Any] = {}
        generator = HttpGenerator(self.client())
        return hits, answer_stream(question, hits, generator, options, extension), extension
