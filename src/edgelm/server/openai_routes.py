"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Field names and shapes follow OpenAI's, so the official client, LangChain and curl work as
they do against OpenAI. edgelm adds one field, ``timings`` (in the style of llama.cpp's server),
which OpenAI clients ignore and edgelm's own tools read.

A chat request may ask for ``n`` answers (choices, each its own generation sharing the
prompt's KV cache) and offer ``tools``: calls the model writes come back as
``message.tool_calls`` or streamed tool-call deltas, parsed by :mod:`edgelm.tools`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgelm import __version__
from edgelm.engines.base import Fold, check_text_only
from edgelm.errors import EdgelmError, InvalidRequest
from edgelm.server.errors import error_body
from edgelm.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from edgelm.server.state import ServiceState
from edgelm.server.virtual import VirtualAnswer, VirtualModel
from edgelm.tools import parse_tool_calls
from edgelm.types import Chunk, GenerationRequest

FINGERPRINT = f"edgelm-{__version__}"
ChunkRenderer = Callable[[Chunk, bool, int], dict[str, Any] | None]  # chunk, opening, choice
Renderers = tuple[
    ChunkRenderer,
    Callable[[list[Fold], dict[str, Any]], dict[str, Any]],  # the whole answer, every choice
    Callable[[list[Fold]], dict[str, Any]],  # the last stream event
]


def _finish(reason: str | None) -> str | None:
    # OpenAI knows "stop", "length" and "tool_calls"; a cancelled or failed stream ends like a
    # stop.
    if reason in (None, "stop", "length", "tool_calls"):
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


@dataclass
class OpenedAnswer:
    """A started answer: one chunk stream per choice, the first chunk of choice 0 (read before
    anything is sent, so that errors become statuses), the time it queued, and the virtual
    model's side information, if it came from one."""

    streams: list[AsyncIterator[Chunk]]
    first: Chunk | None
    queue_s: float
    virtual: VirtualAnswer | None = None


def _choice_requests(gen: GenerationRequest, n: int) -> list[GenerationRequest]:
    """One request per choice; with a seed each choice gets its own (seed + index), so that
    n answers sampled with a seed differ from one another and are each reproducible."""
    if n == 1:
        return [gen]
    return [
        gen if gen.seed is None else gen.model_copy(update={"seed": gen.seed + i})
        for i in range(n)
    ]


async def open_answer(state: ServiceState, model: str, gen: GenerationRequest, n: int = 1) -> OpenedAnswer:
    """Start a generation and wait for its first chunk, so that load failures, context
    overflows and unsupported parameters become a proper 4xx/5xx before any SSE is sent.

    With ``n`` > 1 the other choices start only once the first has read the prompt: the
    llama.cpp engine then copies the prompt's KV cache to their sequences instead of reading
    it n times. Tool calls in the model's text are parsed here (see :mod:`edgelm.tools`).
    """
    started = time.perf_counter()
    virtual = state.find_virtual(model)
    if virtual is not None:
        _check_virtual(model, virtual, gen, n)
    answer = await virtual.answer(state, model, gen) if virtual else None
    streams = [answer.chunks] if answer else []
    if answer is None:
        streams = [state.pool.stream(model, req) for req in _choice_requests(gen, n)]
    if gen.offers_tools:
        streams = [parse_tool_calls(s, gen) for s in streams]
    try:
        first, queue_s = await _first_chunk(streams[0], started)
    except BaseException:
        for stream in streams[1:]:
            await stream.aclose()
        raise
    return OpenedAnswer(streams, first, queue_s, answer)


def check_message_count(state: ServiceState, count: int, param: str) -> None:
    """At most ``service.max_messages`` in one conversation, however it arrives (a chat
    request's messages, or a Responses chain grown through ``previous_response_id``)."""
    limit = state.settings.service.max_messages
    if count > limit:
        raise InvalidRequest(
            f"{count} messages is more than the {limit} allowed (setting service.max_messages)",
            param=param,
        )


def _check_virtual(model: str, virtual: VirtualModel, gen: GenerationRequest, n: int) -> None:
    """What a virtual model cannot honour, refused by name before it starts."""
    if gen.tools and not virtual.supports_tools:
        raise InvalidRequest(
            f"the virtual model '{model}' does not take tools: it answers from its own "
            "prompts; call a model directly for tool calling",
            param="tools",
        )
    if n > 1:
        raise InvalidRequest(
            f"the virtual model '{model}' gives one answer per request (n=1)", param="n"
        )
    check_text_only(model, gen, virtual.content_parts)
    for name in virtual.ignores:
        if getattr(gen, name) != GenerationRequest.model_fields[name].get_default(
            call_default_factory=True
        ):
            raise InvalidRequest(
                f"the virtual model '{model}' does not take '{name}': it answers with settings "
                "of its own; call a model directly to set it",
                param=name,
            )


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


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _respond(
    state: ServiceState,
    body: ChatCompletionRequest | CompletionRequest,
    gen: GenerationRequest,
    renderers: Renderers,
) -> JSONResponse | StreamingResponse:
    model = state.model_name(body.model)
    opened = await open_answer(state, model, gen, body.n)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _serve(state, model, opened, body.stream, include_usage, renderers)


async def respond_with_answer(
    state: ServiceState, model: str, answer: VirtualAnswer, stream: bool
) -> JSONResponse | StreamingResponse:
    """Serve a virtual answer started by another route (e.g. ``/v1/rag/answer``) exactly as
    ``/v1/chat/completions`` serves one: same JSON, same SSE, usage in the last chunk."""
    started = time.perf_counter()
    first, queue_s = await _first_chunk(answer.chunks, started)
    renderers = _chat_renderers(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model)
    opened = OpenedAnswer([answer.chunks], first, queue_s, answer)
    return await _serve(state, model, opened, stream, True, renderers)


def total_usage(folds: list[Fold]) -> dict[str, int]:
    """Usage of n choices: the prompt once (it is read once), every choice's completion."""
    prompt = folds[0].usage().prompt_tokens
    completion = sum(f.usage().completion_tokens for f in folds)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def choice_chunks(opened: OpenedAnswer) -> AsyncIterator[tuple[int, Chunk]]:
    """Every choice's chunks as (index, chunk), in the order they are generated. Choice 0
    goes first; the others start once it has produced its first chunk (see :func:`open_answer`).

    Closing this iterator (``aclose``, or it ending or raising) closes every choice's stream,
    so a request that is cancelled or fails midway stops its engine: callers close only this."""
    streams = opened.streams
    tasks: list[asyncio.Task[None]] = []
    try:
        if opened.first is not None:
            yield 0, opened.first
        if len(streams) == 1:
            async for chunk in streams[0]:
                yield 0, chunk
            return
        queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for chunk in streams[index]:
                    queue.put_nowait((index, chunk))
            except Exception as exc:  # handed to the consumer and raised there
                queue.put_nowait((index, exc))
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def _serve(
    state: ServiceState,
    model: str,
    opened: OpenedAnswer,
    streaming: bool,
    include_usage: bool,
    renderers: Renderers,
) -> JSONResponse | StreamingResponse:
    render_chunk, render_whole, final_extra = renderers
    virtual = opened.virtual
    extension = virtual.extension if virtual else None
    headers = dict(virtual.headers) if virtual else {}
    folds = [Fold() for _ in opened.streams]
    queue_s = opened.queue_s

    def observe() -> None:
        for fold in folds:
            state.metrics.observe(model, fold, queue_s)

    if not streaming:
        merged = choice_chunks(opened)
        try:
            async for index, chunk in merged:
                folds[index].add(chunk)
        finally:
            await merged.aclose()
        observe()
        body_out = render_whole(folds, timings_payload(folds[0], queue_s))
        if extension is not None:
            body_out["edgelm"] = extension
        return JSONResponse(body_out, headers=headers)

    async def events() -> AsyncIterator[bytes]:
        completed = False
        merged = choice_chunks(opened)
        try:
            # The opening events (the role) leave in one write with the first token's, and the
            # last one with [DONE]: each write is a trip through the middleware and the kernel,
            # taken from cores on which the model is already computing the next token.
            head = b""
            for index in range(len(folds)):
                opening = render_chunk(Chunk(text=""), True, index)
                head += _sse(opening) if opening is not None else b""
            # A client that leaves is noticed by StreamingResponse, which cancels this
            # generator (the finally block records the cancellation). Asking
            # request.is_disconnected() per chunk cost ~15% of the event loop's time per token.
            async for index, chunk in merged:
                folds[index].add(chunk)
                payload = render_chunk(chunk, False, index)
                if payload is not None:
                    yield head + _sse(payload)
                    head = b""
            tail = final_extra(folds)
            tail["timings"] = timings_payload(folds[0], queue_s)
            if extension is not None:
                tail["edgelm"] = extension
            if include_usage:
                tail["usage"] = total_usage(folds)
            yield head + _sse(tail) + _sse("[DONE]")
            completed = True
        except EdgelmError as exc:
            yield _sse(exc.to_dict())
            yield _sse("[DONE]")
        except Exception as exc:  # the stream is open: report in-band, never a traceback
            yield _sse(error_body(f"generation failed: {type(exc).__name__}", "server_error"))
            yield _sse("[DONE]")
        finally:
            await merged.aclose()
            if not completed:
                for fold in folds:
                    fold.finish = "cancelled"  # the client left, or the generation failed
            observe()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )


def _tool_call_deltas(chunk: Chunk) -> list[dict[str, Any]]:
    """A chunk's tool-call deltas as OpenAI streams them: the first of a call with its
    ``id``, ``type`` and ``name`` (and empty arguments), the rest with arguments only."""
    out = []
    for delta in chunk.tool_calls:
        item: dict[str, Any] = {"index": delta.index}
        if delta.id is not None:
            item["id"] = delta.id
            item["type"] = "function"
            item["function"] = {"name": delta.name or "", "arguments": delta.arguments}
        else:
            item["function"] = {"arguments": delta.arguments}
        out.append(item)
    return out


def _message(fold: Fold) -> dict[str, Any]:
    """The assistant message of a whole answer: its text, and its tool calls if it made any
    (content is then null unless the model also wrote text, as in OpenAI's answers)."""
    if not fold.tool_calls:
        return {"role": "assistant", "content": fold.text}
    return {
        "role": "assistant",
        "content": fold.text or None,
        "tool_calls": [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for call in fold.tool_calls
        ],
    }


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

    def render_chunk(chunk: Chunk, opening: bool, index: int) -> dict[str, Any] | None:
        if opening:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        elif chunk.text or chunk.finish_reason or chunk.tool_calls:
            delta = {"content": chunk.text} if chunk.text else {}
            if chunk.tool_calls:
                delta["tool_calls"] = _tool_call_deltas(chunk)
        else:
            return None
        lps = [_lp_dict(lp) for lp in chunk.logprobs]
        return {
            **base("chat.completion.chunk"),
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": _chat_logprobs(lps) if logprobs and lps else None,
                    "finish_reason": _finish(chunk.finish_reason),
                }
            ],
        }

    def render_whole(folds: list[Fold], timings: dict[str, Any]) -> dict[str, Any]:
        return {
            **base("chat.completion"),
            "choices": [
                {
                    "index": index,
                    "message": _message(fold),
                    "logprobs": _chat_logprobs(fold.logprobs) if logprobs else None,
                    "finish_reason": _finish(fold.finish),
                }
                for index, fold in enumerate(folds)
            ],
            "usage": total_usage(folds),
            "timings": timings,
        }

    def final_extra(_folds: list[Fold]) -> dict[str, Any]:
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
        check_message_count(state, len(body.messages), "messages")
        gen = body.to_generation()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = state.model_name(body.model)

        renderers = _chat_renderers(rid, created, model, gen.logprobs)
        return await _respond(state, body, gen, renderers)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
        state: ServiceState = request.app.state.edgelm
        gen = body.to_generation()
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = state.model_name(body.model)
        offsets = [0] * body.n  # characters each choice has streamed (logprob offsets)

        def base() -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
            }

        def render_chunk(chunk: Chunk, opening: bool, index: int) -> dict[str, Any] | None:
            if opening or not (chunk.text or chunk.finish_reason):
                return None
            lps = [_lp_dict(lp) for lp in chunk.logprobs]
            payload = {
                **base(),
                "choices": [
                    {
                        "index": index,
                        "text": chunk.text,
                        "logprobs": _completion_logprobs(lps, offsets[index])
                        if gen.logprobs
                        else None,
                        "finish_reason": _finish(chunk.finish_reason),
                    }
                ],
            }
            offsets[index] += len(chunk.text)
            return payload

        def render_whole(folds: list[Fold], timings: dict[str, Any]) -> dict[str, Any]:
            return {
                **base(),
                "choices": [
                    {
                        "index": index,
                        "text": fold.text,
                        "logprobs": _completion_logprobs(fold.logprobs, 0)
                        if gen.logprobs
                        else None,
                        "finish_reason": _finish(fold.finish),
                    }
                    for index, fold in enumerate(folds)
                ],
                "usage": total_usage(folds),
                "timings": timings,
            }

        def final_extra(_folds: list[Fold]) -> dict[str, Any]:
            return {**base(), "choices": []}

        return await _respond(state, body, gen, (render_chunk, render_whole, final_extra))

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
