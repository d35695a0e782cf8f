"""``POST /v1/rag/answer``: RAG with its own JSON body, for callers that are not chat clients.

The body names a ``collection`` or carries ``documents`` inline, plus retrieval knobs a chat
request has no field for (``top_k`` of retrieval, ``mode``). The answer is served by the very
code that serves ``/v1/chat/completions`` (:func:`respond_with_answer`): the shape of a chat
completion (and, with ``"stream": true``, of its SSE chunks), with the ``edgelm`` extension on
the whole answer or the final chunk — so one parser serves this route and the
``rag:<collection>`` virtual model alike.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from edgelm.errors import InvalidRequest
from edgelm.rag.answer import AnswerOptions
from edgelm.server.openai_routes import respond_with_answer
from edgelm.server.rag_model import INLINE, PREFIX, RagModels
from edgelm.server.state import ServiceState
from edgelm.server.virtual import VirtualAnswer
from edgelm.settings import RetrievalMode
from edgelm.types import Message


class InlineDocument(BaseModel):
    id: str | None = None
    text: str
    title: str | None = None


class RagAnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    collection: str | None = None
    documents: list[InlineDocument] | None = None
    model: str | None = None
    fallback_model: str | None = Field(
        None, description="Model to escalate to; empty string disables escalation."
    )
    top_k: Annotated[int, Field(ge=1, le=50)] | None = None
    mode: RetrievalMode | None = None
    min_relevance: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    history: list[Message] = Field(default_factory=list)
    stream: bool = False


def build_router() -> APIRouter:
    router = APIRouter()
    fallback_family = RagModels()  # used when the service does not register rag:* itself

    @router.post("/v1/rag/answer")
    async def rag_answer(body: RagAnswerRequest, request: Request):  # type: ignore[no-untyped-def]
        state: ServiceState = request.app.state.edgelm
        family = state.find_virtual(f"{PREFIX}x")
        rag = family if isinstance(family, RagModels) else fallback_family
        settings = state.settings.rag
        if body.collection and body.documents is not None:
            raise InvalidRequest("send either collection or documents, not both", param="documents")
        overrides: dict[str, Any] = {
            "model": body.model,
            "top_k": body.top_k,
            "mode": body.mode,
            "min_relevance": body.min_relevance,
            "temperature": body.temperature,
            "max_tokens": body.max_tokens,
            "history": [{"role": m.role, "content": m.text()} for m in body.history],
        }
        options = AnswerOptions.from_settings(settings, **overrides)
        if body.fallback_model is not None:
            options.fallback_model = body.fallback_model or None
        documents = (
            [{"id": d.id or f"doc{i}", "text": d.text} for i, d in enumerate(body.documents, 1)]
            if body.documents is not None
            else None
        )
        collection = None if documents is not None else (body.collection or settings.collection)
        chunks, extension = await rag.start(
            state, body.question, options, collection=collection, documents=documents
        )
        name = f"{PREFIX}{INLINE if documents is not None else collection}"
        answer = VirtualAnswer(chunks=chunks, extension=extension)
        return await respond_with_answer(state, name, answer, body.stream)

    return router
