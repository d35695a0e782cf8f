"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Field names and shapes follow OpenAI's, so the official client, LangChain and curl work as
they do against OpenAI. edgelm adds one field, ``timings`` (in the style of llama.cpp's server),
which OpenAI clients ignore and edgelm's own tools read.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgelm import __version__
from edgelm.engines.base import Fold
from edgelm.errors import EdgelmError, InvalidRequest
from edgelm.server.errors import error_body
from edgelm.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from edgelm.server.state import ServiceState
from edgelm.server.virtual import VirtualAnswer
from edgelm.types import Chunk, GenerationRequest

FINGERPRINT = f"edgelm-{__version__}"
ChunkRenderer = Callable[[Chunk, bool], dict[str, Any] | None]
Renderers = tuple[
    ChunkRenderer,
    Callable[[Fold, dict[str, Any]], dict[str, Any]],  # the whole answer
    Callable[[Fold], dict[str, Any]],  # the last stream event
]


def _finish(reason: str | None) -> str | None:
    # OpenAI knows "stop" and "length"; a cancelled or failed stream ends like a stop.
    if reason in (None, "stop", "length"):
        return reason
    return "stop"


def timings_payload(fold: Fold, queue_s: float) -> dict[str, Any]:
    timing = fold.timing()
    usage = fold.usage()

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "queue_ms": round(queue_s * 1000, 2),
        "ttft_ms": ms(timing.ttft_s),
        "prompt_n": usage.prompt_tokens,
        "prompt_ms": ms(timing.prompt_s),
        "prompt_per_second": timing.prompt_tokens_per_s,
        "predicted_n": usage.completion_tokens,
        "predicted_ms": ms(timing.decode_s),
        "predicted_per_second": timing.decode_tokens_per_s,
        "total_ms": ms(timing.total_s),
    }


def _chat_logprobs(chunk_lps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp["token"],
                "logprob": lp["logprob"],
                "bytes": lp.get("bytes"),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp["top"]
                ],
            }
            for lp in chunk_lps
        ]
    }


def _completion_logprobs(chunk_lps: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    offsets = []
    for lp in chunk_lps:
        offsets.append(offset)
        offset += len(lp["token"])
    return {
        "tokens": [lp["token"] for lp in chunk_lps],
        "token_logprobs": [lp["logprob"] for lp in chunk_lps],
        "top_logprobs": [dict(lp["top"]) for lp in chunk_lps],
        "text_offset": offsets,
    }


async def _open(
    state: ServiceState, model: str, gen: GenerationRequest
) -> tuple[AsyncIterator[Chunk], Chunk | None, float, VirtualAnswer | None]:
    """Start a generation and wait for its first chunk, so that load failures, context
    overflows and unsupported parameters become a proper 4xx/5xx before any SSE is sent."""
    started = time.perf_counter()
    virtual = state.find_virtual(model)
    answer = await virtual.answer(state, model, gen) if virtual else None
    stream = answer.chunks if answer else state.pool.stream(model, gen)
    first, queue_s = await _first_chunk(stream, started)
    return stream, first, queue_s, answer


async def _first_chunk(stream: AsyncIterator[Chunk], started: float) -> tuple[Chunk | None, float]:
    """The first chunk (errors before it propagate as statuses) and the time queued for it."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()
        raise
    return first, max(0.0, time.perf_counter() - started - (first.t if first else 0.0))


def model_name(state: ServiceState, name: str) -> str:
    """The canonical name a response reports: the alias, or the virtual name as sent."""
    return name if state.find_virtual(name) else state.catalog.resolve(name).alias


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _respond(
    state: ServiceState,
    body: ChatCompletionRequest | CompletionRequest,
    gen: GenerationRequest,
    render_chunk: ChunkRenderer,
    render_whole: Callable[[Fold, dict[str, Any]], dict[str, Any]],
    final_extra: Callable[[Fold], dict[str, Any]],
) -> JSONResponse | StreamingResponse:
    model = model_name(state, body.model)
    stream, first, queue_s, virtual = await _open(state, model, gen)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _serve(
        state,
        model,
        (stream, first, queue_s, virtual),
        body.stream,
        include_usage,
        (render_chunk, render_whole, final_extra),
    )


async def respond_with_answer(
    state: ServiceState, model: str, answer: VirtualAnswer, stream: bool
) -> JSONResponse | StreamingResponse:
    """Serve a virtual answer started by another route (e.g. ``/v1/rag/answer``) exactly as
    ``/v1/chat/completions`` serves one: same JSON, same SSE, usage in the last chunk."""
    started = time.perf_counter()
    first, queue_s = await _first_chunk(answer.chunks, started)
    renderers = _chat_renderers(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model)
    opened = (answer.chunks, first, queue_s, answer)
    return await _serve(state, model, opened, stream, True, renderers)


async def _serve(
    state: ServiceState,
    model: str,
    opened: tuple[AsyncIterator[Chunk], Chunk | None, float, VirtualAnswer | None],
    streaming: bool,
    include_usage: bool,
    renderers: Renderers,
) -> JSONResponse | StreamingResponse:
    stream, first, queue_s, virtual = opened
    render_chunk, render_whole, final_extra = renderers
    extension = virtual.extension if virtual else None
    headers = dict(virtual.headers) if virtual else {}
    fold = Fold()

    if not streaming:
        try:
            if first is not None:
                fold.add(first)
            async for chunk in stream:
                fold.add(chunk)
        finally:
            await stream.aclose()
        state.metrics.observe(model, fold, queue_s)
        body_out = render_whole(fold, timings_payload(fold, queue_s))
        if extension is not None:
            body_out["edgelm"] = extension
        return JSONResponse(body_out, headers=headers)

    async def events() -> AsyncIterator[bytes]:
        completed = False
        try:
            # The opening event (the role) leaves in one write with the first token's, and the
            # last one with [DONE]: each write is a trip through the middleware and the kernel,
            # taken from cores on which the model is already computing the next token.
            opening = render_chunk(Chunk(text=""), True)
            head = _sse(opening) if opening is not None else b""
            # A client that leaves is noticed by StreamingResponse, which cancels this
            # generator (the finally block records the cancellation). Asking
            # request.is_disconnected() per chunk cost ~15% of the event loop's time per token.
            pending = [first] if first is not None else []
            async for chunk in _chain(pending, stream):
                fold.add(chunk)
                payload = render_chunk(chunk, False)
                if payload is not None:
                    yield head + _sse(payload)
                    head = b""
            tail = final_extra(fold)
            tail["timings"] = timings_payload(fold, queue_s)
            if extension is not None:
                tail["edgelm"] = extension
            if include_usage:
                tail["usage"] = fold.usage().model_dump()
            yield head + _sse(tail) + _sse("[DONE]")
            completed = True
        except EdgelmError as exc:
            yield _sse(exc.to_dict())
            yield _sse("[DONE]")
        except Exception as exc:  # the stream is open: report in-band, never a traceback
            yield _sse(error_body(f"generation failed: {type(exc).__name__}", "server_error"))
            yield _sse("[DONE]")
        finally:
            await stream.aclose()
            if not completed:
                fold.finish = "cancelled"  # the client left, or the generation failed
            state.metrics.observe(model, fold, queue_s)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )


async def _chain(first: list[Chunk], rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


def _chat_renderers(rid: str, created: int, model: str, logprobs: bool = False) -> Renderers:
    """How a chat completion renders its chunks, its whole answer and its last event."""

    def base(obj: str) -> dict[str, Any]:
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
        }

    def render_chunk(chunk: Chunk, opening: bool) -> dict[str, Any] | None:
        if opening:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        elif chunk.text or chunk.finish_reason:
            delta = {"content": chunk.text} if chunk.text else {}
        else:
            return None
        lps = [_lp_dict(lp) for lp in chunk.logprobs]
        return {
            **base("chat.completion.chunk"),
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": _chat_logprobs(lps) if logprobs and lps else None,
                    "finish_reason": _finish(chunk.finish_reason),
                }
            ],
        }

    def render_whole(fold: Fold, timings: dict[str, Any]) -> dict[str, Any]:
        return {
            **base("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": fold.text},
                    "logprobs": _chat_logprobs(fold.logprobs) if logprobs else None,
                    "finish_reason": _finish(fold.finish),
                }
            ],
            "usage": fold.usage().model_dump(),
            "timings": timings,
        }

    def final_extra(_fold: Fold) -> dict[str, Any]:
        return {**base("chat.completion.chunk"), "choices": []}

    return render_chunk, render_whole, final_extra


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        state: ServiceState = request.app.state.edgelm
        return {"object": "list", "data": state.model_cards()}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        state: ServiceState = request.app.state.edgelm
        family = state.find_virtual(model_id)
        if family is not None:
            cards = [c for c in family.cards(state) if c["id"] == model_id]
            return cards[0] if cards else family.card(state, model_id)
        return state.model_card(state.catalog.resolve(model_id))

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):  # type: ignore[no-untyped-def]
        state: ServiceState = request.app.state.edgelm
        limit = state.settings.service.max_messages
        if len(body.messages) > limit:
            raise InvalidRequest(
                f"{len(body.messages)} messages is more than the {limit} allowed "
                "(setting service.max_messages)",
                param="messages",
            )
        gen = body.to_generation()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = model_name(state, body.model)

        renderers = _chat_renderers(rid, created, model, gen.logprobs)
        return await _respond(state, body, gen, *renderers)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
        state: ServiceState = request.app.state.edgelm
        gen = body.to_generation()
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = model_name(state, body.model)
        offset = {"n": 0}

        def base() -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
            }

        def render_chunk(chunk: Chunk, opening: bool) -> dict[str, Any] | None:
            if opening or not (chunk.text or chunk.finish_reason):
                return None
            lps = [_lp_dict(lp) for lp in chunk.logprobs]
            payload = {
                **base(),
                "choices": [
                    {
                        "index": 0,
                        "text": chunk.text,
                        "logprobs": _completion_logprobs(lps, offset["n"])
                        if gen.logprobs
                        else None,
                        "finish_reason": _finish(chunk.finish_reason),
                    }
                ],
            }
            offset["n"] += len(chunk.text)
            return payload

        def render_whole(fold: Fold, timings: dict[str, Any]) -> dict[str, Any]:
            return {
                **base(),
                "choices": [
                    {
                        "index": 0,
                        "text": fold.text,
                        "logprobs": _completion_logprobs(fold.logprobs, 0)
                        if gen.logprobs
                        else None,
                        "finish_reason": _finish(fold.finish),
                    }
                ],
                "usage": fold.usage().model_dump(),
                "timings": timings,
            }

        def final_extra(_fold: Fold) -> dict[str, Any]:
            return {**base(), "choices": []}

        return await _respond(state, body, gen, render_chunk, render_whole, final_extra)

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        state: ServiceState = request.app.state.edgelm
        entry = state.catalog.resolve(body.model)
        texts = body.texts()
        vectors, used = await state.pool.embed(entry.alias, texts)
        if body.dimensions:
            vectors = [v[: body.dimensions] for v in vectors]
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": entry.alias,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }

    return router


def _lp_dict(lp: Any) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes, "top": lp.top}


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
