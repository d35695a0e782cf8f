"""The OpenAI wire format, read once: SSE lines into events, events into text deltas, deltas
folded into a timed :class:`ChatResult`, and OpenAI-style error bodies into errors.

Everything in edgelm that reads another server's answers goes through here, whatever carries
the bytes: :class:`~edgelm.client.EdgelmClient` (httpx, sync and async), the bench's
:class:`~edgelm.bench.wire.WireClient` (``http.client``, for its lower overhead) and the remote
engine (:mod:`edgelm.engines.remote`). So a stream is decoded the same way whether it ends up
in a script, a benchmark or behind the service, and a fix to the decoding is made once.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.types import TokenLogprob, ToolCallDelta, decode_rate

# In-band stream errors carry no HTTP status (the 200 was already sent); infer one from type.
_STATUS_OF_TYPE = {"invalid_request_error": 400, "upstream_error": 502, "rate_limit_error": 429}


class ServiceError(EdgelmError):
    """The service answered with an error; carries its status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type_ or "server_error"


class ServiceUnavailable(EdgelmError):
    """The service could not be reached (not running, wrong endpoint, connection lost)."""

    status = 503
    code = "service_unavailable"


class MalformedEvent(ValueError):
    """An SSE ``data:`` line that is not JSON; each reader says whose fault it is."""

    def __init__(self, data: str):
        super().__init__(f"malformed event: {data[:200]}")
        self.data = data[:200]


# -- errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorFields:
    """What an error body says, whichever of the common shapes it came in."""

    message: str | None = None
    type: str | None = None
    code: str | None = None
    param: str | None = None


def error_fields(payload: Any) -> ErrorFields:
    """The fields of OpenAI's ``{"error": {...}}`` and of the shapes other servers use:
    Ollama's ``{"error": "..."}``, vLLM's ``{"message": ...}``, FastAPI's ``{"detail": ...}``."""
    if not isinstance(payload, dict):
        return ErrorFields()
    err = payload.get("error", payload)
    if isinstance(err, str):
        return ErrorFields(message=err)
    if not isinstance(err, dict):
        return ErrorFields()
    message = err.get("message") or err.get("detail")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)

    def text(key: str) -> str | None:
        return err[key] if isinstance(err.get(key), str) else None

    return ErrorFields(message, text("type"), text("code"), text("param"))


def error_from_body(status: int, text: str) -> ServiceError:
    """The error an HTTP error response describes (an error body, or whatever it is)."""
    try:
        fields = error_fields(json.loads(text))
    except ValueError:
        fields = ErrorFields()
    if not fields.message:
        return ServiceError(status, f"HTTP {status}: {text[:200]}")
    return ServiceError(status, fields.message, fields.type, fields.code, fields.param)


def in_band_error(err: Any) -> ServiceError:
    """The error a stream sent as an event after its 200 (``{"error": ...}``)."""
    fields = error_fields({"error": err})
    if not fields.message and not isinstance(err, dict):
        return ServiceError(500, str(err))
    return ServiceError(
        _STATUS_OF_TYPE.get(str(fields.type), 500),
        fields.message or "the stream failed",
        fields.type,
        fields.code,
        fields.param,
    )


# -- server-sent events -------------------------------------------------------------------


def sse_data(line: str) -> dict[str, Any] | bool | None:
    """One SSE line: its event (a JSON object), ``True`` at ``data: [DONE]``, ``None`` for
    anything to skip (comments, ``event:``/``id:`` fields, keep-alives, empty data).

    Raises :class:`MalformedEvent` for data that is not JSON.
    """
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data:
        return None
    if data == "[DONE]":
        return True
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        raise MalformedEvent(data) from None
    return event if isinstance(event, dict) else None


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any] | None]:
    """The events of a stream's lines; ``None`` stands for ``[DONE]`` and comes last, so a
    reader can tell a finished stream from one cut short."""
    for line in lines:
        event = sse_data(line)
        if event is True:
            yield None
            return
        if isinstance(event, dict):
            yield event


# -- events into chunks -------------------------------------------------------------------


@dataclass
class Delta:
    """What one event adds to the first choice: text, its tokens' log-probabilities, tool-call
    fragments, and the finish reason when this is the choice's last event."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def first_choice(event: dict[str, Any]) -> Delta:
    """The first choice's delta (chat ``delta.content`` or completions ``text``)."""
    for choice in event.get("choices") or []:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        text = delta.get("content") or "" if isinstance(delta, dict) else choice.get("text") or ""
        calls = tool_call_deltas(delta.get("tool_calls") if isinstance(delta, dict) else None)
        return Delta(text, logprobs(choice.get("logprobs")), choice.get("finish_reason"), calls)
    return Delta()


MAX_TOOL_CALLS = 128
"""Most tool calls one streamed answer may carry."""


def tool_call_deltas(raw: Any) -> list[ToolCallDelta]:
    """Streamed tool-call fragments in OpenAI's shape (``index``, then ``id`` and
    ``function.name`` once, then ``function.arguments`` pieces)."""
    out = []
    for item in raw if isinstance(raw, list) else []:
        index = item.get("index", 0) if isinstance(item, dict) else None
        function = item.get("function") or {} if isinstance(item, dict) else None
        # An index indexes the answer's list of calls: a bad one from an upstream must be
        # its error (502), not an IndexError here or a list of a billion calls downstream.
        if not isinstance(index, int) or not 0 <= index < MAX_TOOL_CALLS:
            raise MalformedEvent(f"tool call with index {index!r}: {json.dumps(item)[:150]}")
        if not isinstance(function, dict):
            raise MalformedEvent(f"tool call function {json.dumps(function)[:150]}")
        out.append(
            ToolCallDelta(
                index=index,
                id=item.get("id"),
                name=function.get("name"),
                arguments=function.get("arguments") or "",
            )
        )
    return out


def logprobs(raw: Any) -> list[TokenLogprob]:
    """Map either OpenAI logprobs shape onto :class:`TokenLogprob`; entries without a
    log-probability are left out.

    Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
    Completions: ``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{tok: lp}]}``.
    """
    if not isinstance(raw, dict):
        return []
    if isinstance(raw.get("content"), list):
        return [
            TokenLogprob(
                token=str(item.get("token", "")),
                logprob=float(item["logprob"]),
                bytes=item.get("bytes"),
                top=[
                    (str(alt.get("token", "")), float(alt.get("logprob", 0.0)))
                    for alt in item.get("top_logprobs") or []
                ],
            )
            for item in raw["content"]
            if isinstance(item, dict) and item.get("logprob") is not None
        ]
    tokens = raw.get("tokens") or []
    values = raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        value = values[i] if i < len(values) and values[i] is not None else 0.0
        alts = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(
            TokenLogprob(
                token=str(token),
                logprob=float(value),
                bytes=list(str(token).encode()),
                top=[(str(t), float(v)) for t, v in alts.items()],
            )
        )
    return out


# -- chunks folded into a result ----------------------------------------------------------

Messages = str | list[dict[str, Any]]


def chat_body(model: str, prompt: Messages, params: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat request's body, asking for usage; ``None`` parameters are left out."""
    params = {k: v for k, v in params.items() if v is not None and k != "stream"}
    stream_options = {**(params.pop("stream_options", None) or {}), "include_usage": True}
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {
        "model": model,
        "messages": messages,
        **params,
        "stream": True,
        "stream_options": stream_options,
    }


@dataclass
class ChatResult:
    """One answer and how long each part of getting it took, as seen from the client.

    All times are seconds since the call started. ``ttfb_s`` is when the response headers
    arrived (the service sends them once the model produced its first chunk, so it already
    includes queueing and model loading); ``send_s`` is the same wait without ``prepare_s``.
    """

    text: str = ""
    model: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    """True when the stream had no usage chunk and completion tokens are counted deltas."""
    prepare_s: float = 0.0
    send_s: float | None = None
    ttfb_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    total_s: float = 0.0
    server_timings: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None
    """The ``edgelm`` extension of the final chunk (hybrid route record, RAG contexts)."""
    headers: dict[str, str] = field(default_factory=dict)
    """The service's ``x-edgelm-*`` response headers (e.g. the hybrid route)."""

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Completion tokens after the first, over the time after the first token."""
        return decode_rate(self.completion_tokens, self.ttft_s, self.total_s)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON reports, including the derived figures."""
        data = asdict(self)
        data["usage"] = self.usage
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        return data


@dataclass
class StreamEvent:
    """A text delta while streaming (with its tokens' log-probabilities when asked for);
    the last event has ``result`` set."""

    text: str = ""
    result: ChatResult | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class ChatFold:
    """Folds a chat stream's events into a :class:`ChatResult`, timing each text delta from
    ``start`` (``time.perf_counter()``); one fold serves sync and async readers alike."""

    def __init__(self, result: ChatResult, start: float):
        self.result = result
        self.start = start
        self.deltas = 0
        self._last_token_t: float | None = None

    def add(self, event: dict[str, Any] | None) -> StreamEvent | None:
        """Take one event; returns the text delta it carried, if any. An in-band error is
        raised as the :class:`ServiceError` it describes; ``None`` ([DONE]) adds nothing."""
        if event is None:
            return None
        if "error" in event:
            raise in_band_error(event["error"])
        result = self.result
        usage = event.get("usage")
        if usage:
            result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            result.completion_tokens = int(usage.get("completion_tokens") or 0)
        if event.get("timings"):
            result.server_timings = event["timings"]
        if isinstance(event.get("edgelm"), dict):
            result.extension = event["edgelm"]
        result.model = event.get("model") or result.model
        delta = first_choice(event)
        if delta.finish_reason:
            result.finish_reason = delta.finish_reason
        if not delta.text:
            return None
        now = time.perf_counter() - self.start
        if self._last_token_t is None:
            result.ttft_s = now
        else:
            result.itl_s.append(now - self._last_token_t)
        self._last_token_t = now
        self.deltas += 1
        result.text += delta.text
        return StreamEvent(text=delta.text, logprobs=delta.logprobs)

    def finish(self) -> ChatResult:
        """Close the result: total time, and a delta count where the stream had no usage."""
        result = self.result
        result.total_s = time.perf_counter() - self.start
        if not result.completion_tokens and self.deltas:
            # Not an edgelm service, or one that ignores include_usage: one delta ≈ one token.
            result.completion_tokens = self.deltas
            result.usage_estimated = True
        return result


def read_stream(lines: Iterable[str], result: ChatResult, start: float) -> Iterator[StreamEvent]:
    """Read a chat answer's server-sent events into ``result``, yielding the text deltas as
    they arrive; times are measured from ``start`` (``time.perf_counter()``)."""
    fold = ChatFold(result, start)
    with _service_fault():
        for event in sse_events(lines):
            if (delta := fold.add(event)) is not None:
                yield delta
    fold.finish()


async def aread_stream(
    lines: AsyncIterable[str], result: ChatResult, start: float
) -> AsyncIterator[StreamEvent]:
    """:func:`read_stream` for an asynchronous body."""
    fold = ChatFold(result, start)
    with _service_fault():
        async for line in lines:
            event = sse_data(line)
            if event is True:
                break
            if isinstance(event, dict) and (delta := fold.add(event)) is not None:
                yield delta
    fold.finish()


@contextlib.contextmanager
def _service_fault() -> Iterator[None]:
    """A malformed event is the service's fault: a 502."""
    try:
        yield
    except MalformedEvent as exc:
        raise ServiceError(502, f"the service sent a {exc}") from None
