"""``POST /v1/rag/answer``: RAG with its own JSON body, for callers that are not chat clients.

The body names a ``collection`` or carries ``documents`` inline, plus retrieval knobs a chat
request has no field for (``top_k`` of retrieval, ``mode``). The response has the shape of a
chat completion (and, with ``"stream": true``, of its SSE chunks), with the ``edgelm``
extension on the whole answer or the final chunk — so one parser serves this route and the
``rag:<collection>`` virtual model alike.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from edgelm.engines.base import Fold
from edgelm.errors import EdgelmError, InvalidRequest
from edgelm.rag.answer import AnswerOptions
from edgelm.rag.config import RetrievalMode, rag_settings
from edgelm.rag.service import INLINE, PREFIX, RagModels
from edgelm.server.errors import error_body
from edgelm.server.openai_routes import timings_payload
from edgelm.server.state import ServiceState
from edgelm.types import Chunk, Message


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


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def build_router() -> APIRouter:
    router = APIRouter()
    fallback_family = RagModels()  # used when the service does not register rag:* itself

    @router.post("/v1/rag/answer")
    async def rag_answer(body: RagAnswerRequest, request: Request):  # type: ignore[no-untyped-def]
        state: ServiceState = request.app.state.edgelm
        family = state.find_virtual(f"{PREFIX}x")
        rag = family if isinstance(family, RagModels) else fallback_family
        settings = rag_settings(state.settings)
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
        rid = f"chatcmpl-rag-{uuid.uuid4().hex[:20]}"
        created = int(time.time())
        base = {"id": rid, "created": created, "model": name}
        fold = Fold()
        # Wait for the first chunk before answering, so an unknown model or a failed load is a
        # proper 4xx/5xx status instead of an error inside an already-started stream.
        try:
            first = [await anext(chunks)]
        except StopAsyncIteration:
            first = []
        except BaseException:
            await chunks.aclose()
            raise

        async def all_chunks() -> AsyncIterator[Chunk]:
            for chunk in first:
                yield chunk
            async for chunk in chunks:
                yield chunk

        if not body.stream:
            try:
                async for chunk in all_chunks():
                    fold.add(chunk)
            finally:
                await chunks.aclose()
            return JSONResponse(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": fold.text},
                            "finish_reason": fold.finish if fold.finish == "length" else "stop",
                        }
                    ],
                    "usage": fold.usage().model_dump(),
                    "timings": timings_payload(fold, 0.0),
                    "edgelm": extension,
                }
            )

        def delta(content: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": content, "finish_reason": finish}],
            }

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _sse(delta({"role": "assistant", "content": ""}))
                async for chunk in all_chunks():
                    fold.add(chunk)
                    if await request.is_disconnected():
                        break
                    if chunk.text:
                        yield _sse(delta({"content": chunk.text}))
                finish = "length" if fold.finish == "length" else "stop"
                yield _sse(delta({}, finish))
                yield _sse(
                    {
                        **base,
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": fold.usage().model_dump(),
                        "timings": timings_payload(fold, 0.0),
                        "edgelm": extension,
                    }
                )
                yield _sse("[DONE]")
            except EdgelmError as exc:
                yield _sse(exc.to_dict())
                yield _sse("[DONE]")
            except Exception as exc:  # the stream is open: report in-band, never a traceback
                yield _sse(error_body(f"generation failed: {type(exc).__name__}", "server_error"))
                yield _sse("[DONE]")
            finally:
                await chunks.aclose()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
