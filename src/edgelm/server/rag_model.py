"""RAG inside the service: the ``rag:<collection>`` virtual model family and its machinery.

``rag:<collection>`` answers the last user message from that collection;
``rag:<collection>@<model>`` picks the model that writes the answer (default ``rag.model``);
``rag:inline`` answers from documents sent with the request as content parts
``{"type": "document", "id": "...", "text": "..."}`` in a user message (OpenAI clients pass such
parts through untouched, so no schema change is needed). The answer streams through the normal
chat route; citations and the rest arrive in the ``edgelm`` extension.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidRequest
from edgelm.rag.answer import AnswerOptions, answer_stream
from edgelm.rag.collection_db import RagStore, check_name, collections_dir, list_collections
from edgelm.rag.retrieve import Hit, find_hits
from edgelm.server.virtual import StateView, VirtualAnswer, VirtualModel
from edgelm.types import Chunk, GenerationRequest, Message

PREFIX = "rag:"
INLINE = "inline"


class PoolGenerator:
    """Streams from models the service itself serves (real ones through the pool, virtual
    ones such as ``hybrid`` through their family), so RAG never holds a private model."""

    def __init__(self, state: StateView):
        self.state = state

    async def stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        temperature: float,
        logprobs: bool = False,
    ) -> AsyncIterator[Chunk]:
        request = GenerationRequest(
            messages=[Message.model_validate(m) for m in messages],
            max_tokens=max_tokens,
            temperature=temperature,
        )
        family = self.state.find_virtual(model)
        if family is not None:
            if isinstance(family, RagModels):
                raise InvalidRequest(f"'{model}' cannot write RAG answers itself", param="model")
            answer = await family.answer(self.state, model, request)
            async with aclosing(answer.chunks) as chunks:  # a caller that stops, stops it
                async for chunk in chunks:
                    yield chunk
            return
        if logprobs:  # as the hybrid router does: only when the engine can give them
            loaded = await self.state.pool.get(model)
            if loaded.engine.supports_logprobs:
                request = request.model_copy(update={"logprobs": True, "top_logprobs": 0})
        async with aclosing(self.state.pool.stream(model, request)) as chunks:
            async for chunk in chunks:  # closed at once when the answer is cut (a loop)
                yield chunk

    def canonical(self, model: str) -> str:
        return self.state.model_name(model)


def inline_documents(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Documents sent as ``{"type": "document", "id", "text"}`` content parts."""
    docs = []
    for message in messages:
        if isinstance(message.content, list):
            for part in message.content:
                if part.get("type") == "document":
                    docs.append(
                        {"id": str(part.get("id") or ""), "text": str(part.get("text", ""))}
                    )
    return docs


class RagModels(VirtualModel):
    """``rag:<collection>`` and ``rag:inline``. Holds its open stores per instance (one
    connection per collection, with sqlite-vec loaded once), without module globals."""

    # RAG writes its answers with rag.* settings (temperature and max_tokens from the request);
    # the sampling knobs below would silently not apply.
    ignores = (
        "stop",
        "seed",
        "top_p",
        "top_k",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "repeat_penalty",
        "ignore_eos",
    )

    content_parts = ("text", "refusal", "document")  # documents to answer from

    def __init__(self) -> None:
        self._stores: dict[tuple[str, int], tuple[RagStore, threading.Lock]] = {}
        self._guard = threading.Lock()

    def matches(self, name: str) -> bool:
        return name.startswith(PREFIX)

    def cards(self, state: StateView) -> list[dict[str, Any]]:
        cards = [
            self.card(state, f"{PREFIX}{name}", description=f"RAG over collection '{name}'")
            for name in list_collections(state.settings.home)
        ]
        cards.append(
            self.card(state, f"{PREFIX}{INLINE}", description="RAG over documents in the request")
        )
        return cards

    def _store(self, home: Path, name: str) -> tuple[RagStore, threading.Lock]:
        name = check_name(name)
        path = collections_dir(home) / f"{name}.db"
        if not path.exists():
            RagStore.open(home, name, create=False)  # raises the clear 404
        key = (str(path), path.stat().st_ino)  # a removed and re-created collection reopens
        with self._guard:
            if key not in self._stores:
                self._stores[key] = (RagStore.open(home, name), threading.Lock())
            return self._stores[key]

    async def answer(
        self, state: StateView, name: str, request: GenerationRequest
    ) -> VirtualAnswer:
        target, _, model = name[len(PREFIX) :].partition("@")
        messages = request.messages or []
        question = next((m.text() for m in reversed(messages) if m.role == "user"), "").strip()
        history = [
            {"role": m.role, "content": m.text()}
            for m in messages[:-1]
            if m.role in ("user", "assistant") and m.text()
        ]
        overrides: dict[str, Any] = {"model": model or None, "history": history}
        if request.max_tokens is not None:
            overrides["max_tokens"] = request.max_tokens
        if "temperature" in request.model_fields_set:
            overrides["temperature"] = request.temperature
        options = AnswerOptions.from_settings(state.settings.rag, **overrides)
        documents = inline_documents(messages) if target == INLINE else None
        collection = None if target == INLINE else target
        chunks, extension = await self.start(
            state, question, options, collection=collection, documents=documents
        )
        return VirtualAnswer(chunks=chunks, extension=extension)

    async def start(
        self,
        state: StateView,
        question: str,
        options: AnswerOptions,
        *,
        collection: str | None = None,
        documents: Sequence[dict[str, str]] | None = None,
    ) -> tuple[AsyncIterator[Chunk], dict[str, Any]]:
        """Retrieve (raising a clear error before any streaming), then stream the answer."""
        if not question:
            raise InvalidRequest("the question (last user message) is empty", param="messages")
        hits = await self.retrieve(state, question, options, collection, documents)
        extension: dict[str, Any] = {}
        chunks = answer_stream(question, hits, PoolGenerator(state), options, extension)
        return chunks, extension

    async def retrieve(
        self,
        state: StateView,
        question: str,
        options: AnswerOptions,
        collection: str | None,
        documents: Sequence[dict[str, str]] | None,
    ) -> list[Hit]:
        """:func:`find_hits` in a worker thread; the query is embedded by the service's pool."""
        rag = state.settings.rag
        if documents is None and not collection:
            raise InvalidRequest("name a collection: rag:<collection>", param="model")
        store, lock = (
            (None, threading.Lock())
            if documents is not None
            else self._store(state.settings.home, str(collection))
        )
        loop = asyncio.get_running_loop()

        def embed(model: str, text: str) -> list[float]:
            future = asyncio.run_coroutine_threadsafe(state.pool.embed(model, [text]), loop)
            return future.result()[0][0]

        def run() -> list[Hit]:
            with lock:
                return find_hits(
                    question,
                    options,
                    store=store,
                    documents=documents,
                    embed=embed,
                    chunk_size=rag.chunk_size,
                    overlap=rag.overlap,
                )

        return await asyncio.to_thread(run)
