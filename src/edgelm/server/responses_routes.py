"""OpenAI's Responses API (``POST /v1/responses``), as a translation onto the chat path.

A request's ``input`` (a string, or a list of message, ``function_call`` and
``function_call_output`` items), ``instructions`` and function tools become the same
:class:`GenerationRequest` a chat completion makes, and are answered by the same engines, tool
parsing and grammar (see :mod:`edgelm.server.openai_routes`, :mod:`edgelm.tools`). The answer
is shaped as output items (a ``message`` with ``output_text``, one ``function_call`` per call)
and, when streamed, as the API's semantic events (``response.created``,
``response.output_text.delta``, ``response.function_call_arguments.delta``,
``response.completed``, ...). With ``store`` (the default) the conversation is kept in SQLite
under ``EDGELM_HOME`` so that ``previous_response_id`` can continue it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from edgelm.engines.base import Fold
from edgelm.errors import EdgelmError, InvalidRequest, ModelNotFound
from edgelm.server.openai_routes import (
    OpenedAnswer,
    check_message_count,
    choice_chunks,
    open_answer,
)
from edgelm.server.schemas import Temperature, TopP
from edgelm.server.state import ServiceState
from edgelm.types import FunctionTool, GenerationRequest, Message, ResponseFormat

# Responses content part types, as the chat path names them (non-text ones are refused by a
# text-only engine with a 400 naming the part).
_PARTS = {
    "input_text": "text",
    "output_text": "text",
    "text": "text",
    "refusal": "refusal",
    "input_image": "image_url",
    "input_audio": "input_audio",
    "input_file": "file",
}

# Fields that would change the answer if ignored: refused with a 400 naming them unless they
# are unset or hold the value that means "off" (the second element). Fields that cannot change
# the answer are accepted and not acted on: user, metadata, store (honoured), service_tier,
# safety_identifier, prompt_cache_key, prompt_cache_retention, stream_options.
_REFUSED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "conversation": (
        "conversation is not supported; chain turns with previous_response_id",
        (),
    ),
    "prompt": (
        "prompt (a stored prompt template) is not supported; send instructions and input",
        (),
    ),
    "max_tool_calls": ("max_tool_calls is not supported", ()),
    "background": ("background responses are not supported; use stream", (False,)),
    "truncation": (
        "truncation is not supported: edgelm refuses an input longer than the context window",
        ("disabled",),
    ),
    "top_logprobs": ("top_logprobs is not supported by /v1/responses", (0,)),
    "context_management": ("context_management is not supported", ()),
}
# ``include`` values that add nothing edgelm could hold back: its models have no reasoning items.
_INCLUDABLE = {"reasoning.encrypted_content"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    background: Any = None
    truncation: Any = None
    top_logprobs: Any = None
    context_management: Any = None

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field edgelm cannot honour that is set to something that
        would change the answer (unset, null and "off" values pass)."""
        for name, (message, off) in _REFUSED.items():
            value = getattr(self, name)
            if value is not None and value not in off:
                raise InvalidRequest(message, param=name)
        unsupported = [v for v in self.include or [] if v not in _INCLUDABLE]
        if unsupported:
            raise InvalidRequest(
                f"include {unsupported[0]!r} is not supported (edgelm adds nothing to the output)",
                param="include",
            )
        reasoning = {k: v for k, v in (self.reasoning or {}).items() if v is not None}
        if reasoning.get("effort") in (None, "none"):
            reasoning.pop("effort", None)
        if reasoning:
            name = "effort" if "effort" in reasoning else next(iter(reasoning))
            raise InvalidRequest(
                "reasoning is not supported: edgelm's models do not reason in separate tokens",
                param=f"reasoning.{name}",
            )

    def messages(self) -> list[Message]:
        """``input`` as chat messages (``instructions`` are added by the caller)."""
        if isinstance(self.input, str):
            return [Message(role="user", content=self.input)]
        out: list[Message] = []
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "message":
                out.append(_message(item, i))
            elif kind == "function_call":
                call = {
                    "id": item.get("call_id") or item.get("id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")},
                }
                last = out[-1] if out else None
                if last is not None and last.role == "assistant" and last.tool_calls:
                    last.tool_calls.append(call)  # parallel calls: one assistant turn
                else:
                    out.append(Message(role="assistant", content=None, tool_calls=[call]))
            elif kind == "function_call_output":
                output = item.get("output")
                text = output if isinstance(output, str) else json.dumps(output)
                out.append(Message(role="tool", tool_call_id=item.get("call_id"), content=text))
            else:
                raise InvalidRequest(
                    f"input item type {kind!r} is not supported (message, function_call and "
                    "function_call_output are)",
                    param=f"input[{i}].type",
                )
        if not out:
            raise InvalidRequest("input is empty", param="input")
        return out

    def generation(self, conversation: list[Message]) -> GenerationRequest:
        """The chat request for ``conversation`` (earlier turns and this input)."""
        self.refuse_unsupported()
        messages = list(conversation)
        if self.instructions:  # instructions are not carried over to a continuation
            messages.insert(0, Message(role="system", content=self.instructions))
        tools = []
        for i, raw in enumerate(self.tools or []):
            if raw.get("type") != "function":
                raise InvalidRequest(
                    f"tool type {raw.get('type')!r} is not supported; edgelm's models call "
                    "functions (type 'function')",
                    param=f"tools[{i}].type",
                )
            fields = {k: raw[k] for k in ("name", "description", "parameters") if k in raw}
            try:
                tools.append(FunctionTool(**fields))
            except ValueError as exc:
                raise InvalidRequest(f"tools[{i}]: {exc}", param=f"tools[{i}]") from None
        choice = self.tool_choice or "auto"
        if isinstance(choice, dict):
            choice = str(choice.get("name") or "")
            if choice not in {t.name for t in tools}:
                raise InvalidRequest(
                    f"tool_choice names function {choice!r}, which is not among the tools",
                    param="tool_choice",
                )
        params: dict[str, Any] = {"max_tokens": self.max_output_tokens}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        return GenerationRequest(
            messages=messages,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self._format(),
            **params,
        )

    def _format(self) -> ResponseFormat | None:
        fmt = (self.text or {}).get("format")
        if fmt is not None and not isinstance(fmt, dict):
            raise InvalidRequest(
                "text.format must be an object such as {\"type\": \"json_object\"}",
                param="text.format",
            )
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return ResponseFormat(type="json_object")
        if fmt.get("type") == "json_schema":
            return ResponseFormat(type="json_schema", json_schema={"schema": fmt.get("schema")})
        raise InvalidRequest(f"text.format type {fmt.get('type')!r}", param="text.format")


def _message(item: dict[str, Any], index: int) -> Message:
    role = item.get("role", "user")
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise InvalidRequest(
                    f"content part must be an object such as {{\"type\": \"input_text\", "
                    f"\"text\": ...}}, not {type(part).__name__}",
                    param=f"input[{index}].content[{j}]",
                )
            kind = _PARTS.get(part.get("type", ""))
            if kind is None:
                raise InvalidRequest(
                    f"content part type {part.get('type')!r} is not supported",
                    param=f"input[{index}].content[{j}].type",
                )
            parts.append({**part, "type": kind})
        content = parts
    try:
        return Message(role=role, content=content)
    except ValueError:
        raise InvalidRequest(f"input[{index}] is not a message", param=f"input[{index}]") from None


class ResponseStore:
    """Stored responses: each one's whole conversation (input and output as chat messages)
    and its JSON, so ``previous_response_id`` continues it. One SQLite file, opened per call
    (requests are few; a connection is not shared across threads). Responses older than
    ``retention_s`` (setting ``service.responses_retention_days``) are deleted on each save."""

    def __init__(self, path: Path, retention_s: float):
        self.path = path
        self.retention_s = retention_s
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path)
        db.execute(
            "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL, "
            "conversation TEXT, body TEXT)"
        )
        return db

    def save(self, rid: str, conversation: list[Message], body: dict[str, Any]) -> None:
        rows = json.dumps([m.model_dump(exclude_none=True) for m in conversation])
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM responses WHERE created < ?", (time.time() - self.retention_s,))
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                (rid, time.time(), rows, json.dumps(body)),
            )

    def conversation(self, rid: str) -> list[Message]:
        with self._lock, self._connect() as db:
            row = db.execute("SELECT conversation FROM responses WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise ModelNotFound(
                f"no stored response {rid!r} (responses are kept when store is true, for "
                f"{self.retention_s / 86400:g} days: setting service.responses_retention_days)",
                param="previous_response_id",
                code="response_not_found",
            )
        return [Message(**m) for m in json.loads(row[0])]

    def body(self, rid: str) -> dict[str, Any] | None:
        with self._lock, self._connect() as db:
            row = db.execute("SELECT body FROM responses WHERE id = ?", (rid,)).fetchone()
        return None if row is None else json.loads(row[0])


def _store(state: ServiceState) -> ResponseStore:
    days = state.settings.service.responses_retention_days
    return ResponseStore(state.settings.home / "responses.sqlite", days * 86400)


def _output(fold: Fold, msg_id: str, fc_ids: list[str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if fold.text or not fold.tool_calls:
        items.append(
            {
                "type": "message",
                "id": msg_id,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": fold.text, "annotations": []}],
            }
        )
    for call, fc_id in zip(fold.tool_calls, fc_ids, strict=False):
        items.append(
            {
                "type": "function_call",
                "id": fc_id,
                "call_id": call["id"],
                "name": call["name"],
                "arguments": call["arguments"],
                "status": "completed",
            }
        )
    return items


def _assistant(fold: Fold) -> Message:
    calls = [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in fold.tool_calls
    ]
    return Message(role="assistant", content=fold.text or None, tool_calls=calls or None)


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/responses")
    async def create(body: ResponsesRequest, request: Request):  # type: ignore[no-untyped-def]
        state: ServiceState = request.app.state.edgelm
        body.refuse_unsupported()
        store = _store(state)
        history = store.conversation(body.previous_response_id) if body.previous_response_id else []
        conversation = [*history, *body.messages()]
        check_message_count(state, len(conversation), "input")
        gen = body.generation(conversation)
        model = state.model_name(body.model)
        rid = f"resp_{uuid.uuid4().hex}"
        msg_id = f"msg_{uuid.uuid4().hex}"
        created = int(time.time())
        opened = await open_answer(state, model, gen)
        fold = Fold()
        fc_ids: list[str] = []

        def response(status: str) -> dict[str, Any]:
            usage = fold.usage()
            done = status != "in_progress"
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "model": model,
                "output": _output(fold, msg_id, fc_ids) if done else [],
                "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens,
                "temperature": gen.temperature,
                "top_p": gen.top_p,
                "tools": body.tools or [],
                "tool_choice": body.tool_choice or "auto",
                "parallel_tool_calls": body.parallel_tool_calls,
                "previous_response_id": body.previous_response_id,
                "store": body.store,
                "text": body.text or {"format": {"type": "text"}},
                "metadata": body.metadata or {},
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete"
                else None,
                "usage": {
                    "input_tokens": usage.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": usage.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": usage.total_tokens,
                }
                if done
                else None,
            }

        def finished() -> dict[str, Any]:
            status = "incomplete" if fold.finish == "length" else "completed"
            out = response(status)
            if body.store:  # the conversation without instructions: they are not carried over
                store.save(rid, [*conversation, _assistant(fold)], out)
            state.metrics.observe(model, fold, opened.queue_s)
            return out

        if not body.stream:
            merged = choice_chunks(opened)
            try:
                async for _index, chunk in merged:
                    fold.add(chunk)
                    fc_ids.extend(f"fc_{uuid.uuid4().hex}" for d in chunk.tool_calls if d.id)
            finally:
                await merged.aclose()
            return JSONResponse(finished())

        return StreamingResponse(
            _events(opened, fold, fc_ids, msg_id, response, finished),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request) -> dict[str, Any]:
        state: ServiceState = request.app.state.edgelm
        found = _store(state).body(response_id)
        if found is None:
            raise ModelNotFound(
                f"no stored response {response_id!r}", param="response_id", code="not_found"
            )
        return found

    return router


async def _events(
    opened: OpenedAnswer,
    fold: Fold,
    fc_ids: list[str],
    msg_id: str,
    response: Callable[[str], dict[str, Any]],
    finished: Callable[[], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """The Responses API's semantic events for one answer: items open when their first
    text or call arrives and close when the next starts or the answer ends."""
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    out: list[bytes] = [
        event("response.created", response=response("in_progress")),
        event("response.in_progress", response=response("in_progress")),
    ]
    index = -1  # output index of the open item
    open_kind: str | None = None  # "message" or "function_call"
    text = ""
    args = ""
    # the open call's ids, from its opening delta: by the time it closes, ``fold`` may already
    # hold the next call (one chunk can end one call and start the next)
    call_id, call_name, fc_id = "", "", ""

    def close() -> list[bytes]:
        nonlocal open_kind
        if open_kind == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item = {"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
                    "content": [part]}
            done = [
                event("response.output_text.done", item_id=msg_id, output_index=index,
                      content_index=0, text=text),
                event("response.content_part.done", item_id=msg_id, output_index=index,
                      content_index=0, part=part),
                event("response.output_item.done", output_index=index, item=item),
            ]
        elif open_kind == "function_call":
            item = {"type": "function_call", "id": fc_id, "call_id": call_id,
                    "name": call_name, "arguments": args, "status": "completed"}
            done = [
                event("response.function_call_arguments.done", item_id=fc_id,
                      output_index=index, arguments=args),
                event("response.output_item.done", output_index=index, item=item),
            ]
        else:
            done = []
        open_kind = None
        return done

    merged = choice_chunks(opened)
    try:
        async for _i, chunk in merged:
            fold.add(chunk)
            if chunk.text:
                if open_kind != "message":
                    out += close()
                    index += 1
                    open_kind, text = "message", ""
                    item = {"type": "message", "id": msg_id, "status": "in_progress",
                            "role": "assistant", "content": []}
                    out.append(event("response.output_item.added", output_index=index, item=item))
                    out.append(event("response.content_part.added", item_id=msg_id,
                                     output_index=index, content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": []}))
                text += chunk.text
                out.append(event("response.output_text.delta", item_id=msg_id,
                                 output_index=index, content_index=0, delta=chunk.text))
            for delta in chunk.tool_calls:
                if delta.id is not None:
                    out += close()
                    index += 1
                    open_kind, args = "function_call", ""
                    fc_id, call_id, call_name = f"fc_{uuid.uuid4().hex}", delta.id, delta.name or ""
                    fc_ids.append(fc_id)
                    item = {"type": "function_call", "id": fc_id, "call_id": call_id,
                            "name": call_name, "arguments": "", "status": "in_progress"}
                    out.append(event("response.output_item.added", output_index=index, item=item))
                if delta.arguments:
                    args += delta.arguments
                    out.append(event("response.function_call_arguments.delta",
                                     item_id=fc_id, output_index=index, delta=delta.arguments))
            if out:
                yield b"".join(out)
                out = []
        out += close()
        final = finished()
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        out.append(event(kind, response=final))
        yield b"".join(out)
    except EdgelmError as exc:
        yield event("error", **exc.to_dict()["error"])
    except Exception as exc:  # the stream is open: report in-band, never a traceback
        yield event(
            "error", message=f"generation failed: {type(exc).__name__}", type="server_error"
        )
    finally:
        await merged.aclose()  # closes the engine's stream too
