"""RAG for the CLI and the Chainlit app: retrieval on the local store, generation by the service.

Retrieval is a few SQLite queries, so it runs where the collection lives; the model runs in
the edgelm service (local, or ``EDGELM_ENDPOINT``), so no tool keeps a private copy of a model
and the service's pool, queue and memory budget stay in charge.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from edgelm.client import ServiceError, ServiceUnavailable, _error_from, _in_band_error
from edgelm.rag.answer import AnswerOptions, answer_stream
from edgelm.rag.embed import ServiceEmbedder, service_embedder
from edgelm.rag.ingest import IngestReport, ingest_paths
from edgelm.rag.retrieve import Hit, find_hits
from edgelm.rag.store import RagStore
from edgelm.settings import Settings
from edgelm.types import Chunk, TokenLogprob


class HttpGenerator:
    """Streams chat answers from an edgelm service as :class:`Chunk` objects."""

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.endpoint = endpoint.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = transport
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
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if logprobs:
            body["logprobs"] = True
        timeout = httpx.Timeout(600.0, connect=5.0)
        async with httpx.AsyncClient(
            base_url=self.endpoint, headers=self.headers, timeout=timeout, transport=self.transport
        ) as http:
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise _error_from(response)
                    async for chunk in self._chunks(model, response):
                        yield chunk
            except httpx.ConnectError:
                raise ServiceUnavailable(
                    f"the edgelm service at {self.endpoint} is not running; start it with: "
                    "edgelm service start"
                ) from None
            except httpx.TransportError as exc:
                raise ServiceUnavailable(f"the service at {self.endpoint} failed: {exc}") from None

    async def _chunks(self, model: str, response: httpx.Response) -> AsyncIterator[Chunk]:
        prompt_tokens = completion_tokens = 0
        finish = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                raise ServiceError(502, f"malformed event from the service: {data[:200]}") from None
            if "error" in event:
                raise _in_band_error(event["error"])
            if event.get("model"):
                self.reported[model] = event["model"]
            usage = event.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
            completion_tokens = int(usage.get("completion_tokens") or completion_tokens)
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
                lps = [
                    TokenLogprob(str(lp.get("token", "")), float(lp["logprob"]))
                    for lp in ((choice.get("logprobs") or {}).get("content") or [])
                    if isinstance(lp, dict) and lp.get("logprob") is not None
                ]
                if text:
                    completion_tokens += 0 if usage else 1
                    yield Chunk(text=text, completion_tokens=completion_tokens, logprobs=lps)
        yield Chunk(
            text="",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason="length" if finish == "length" else "stop",
        )


class LocalRag:
    """Ask questions of a local collection, with answers written by the service's models."""

    def __init__(self, settings: Settings, endpoint: str | None = None):
        self.settings = settings
        self.rag = settings.rag
        self.endpoint = (endpoint or settings.endpoint).rstrip("/")
        self.api_key = settings.client.api_key or settings.service.api_key

    def options(self, **overrides: Any) -> AnswerOptions:
        return AnswerOptions.from_settings(self.rag, **overrides)

    def ingest(self, paths: Sequence[Path], collection: str | None = None) -> IngestReport:
        """Add files to the collection with the configured chunking; when the collection (or
        the settings) name an embedding model, the service embeds the new chunks with it."""
        name = collection or self.rag.collection
        with RagStore.open(self.settings.home, name) as store:
            model = store.embedding_model or self.rag.embed_model
            explicit = store.embedding_model is not None
            embedder, _note = service_embedder(model, explicit, self.endpoint, self.api_key)
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
        embedder = ServiceEmbedder(model, self.endpoint, self.api_key)
        try:
            return embedder.embed([text])[0]
        finally:
            embedder.close()

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
        generator = HttpGenerator(self.endpoint, self.api_key)
        return hits, answer_stream(question, hits, generator, options, extension), extension
