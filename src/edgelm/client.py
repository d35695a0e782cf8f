"""A small client for a running edgelm service (local, or ``EDGELM_ENDPOINT``).

Used by the CLI and by scripts. Chat calls always stream under the hood, so every result
carries the latency decomposition measured on the client side (request preparation, time to
response headers, TTFT, inter-token gaps, total) next to the server's own ``timings``: the
client's figures include the HTTP hop a user really waits for, the server's do not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from edgelm.errors import EdgelmError
from edgelm.types import decode_rate

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
    """A text delta while streaming; the last event has ``result`` set."""

    text: str = ""
    result: ChatResult | None = None


Messages = str | list[dict[str, Any]]


def _messages(prompt: Messages) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class EdgelmClient:
    """Talks to one edgelm service. With no endpoint, the settings say which (and its key)."""

    def __init__(
        self,
        endpoint: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ):
        if endpoint is None:
            from edgelm.settings import load_settings

            settings = load_settings()
            endpoint = settings.endpoint
            api_key = api_key or settings.client.api_key or settings.service.api_key
        self.endpoint = endpoint.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=self.endpoint,
            headers=headers,
            # A short connect timeout: "is the service there?" should not take 10 minutes.
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EdgelmClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        if response.status_code >= 400:
            raise _error_from(response)
        try:
            return response.json()
        except ValueError:
            raise ServiceError(
                response.status_code,
                f"{self.endpoint}{path} did not answer JSON; is this an edgelm service?",
            ) from None

    def _transport_error(self, exc: httpx.TransportError) -> ServiceUnavailable:
        if isinstance(exc, httpx.ConnectError):
            return ServiceUnavailable(
                f"the edgelm service at {self.endpoint} is not running; start it with: "
                "edgelm service start"
            )
        if isinstance(exc, httpx.TimeoutException):
            return ServiceUnavailable(f"the service at {self.endpoint} timed out: {exc}")
        return ServiceUnavailable(
            f"the connection to the service at {self.endpoint} failed: {exc or type(exc).__name__}"
        )

    # -- management -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def is_up(self) -> bool:
        try:
            self.health()
        except EdgelmError:
            return False
        return True

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models")["data"]

    def loaded(self) -> list[dict[str, Any]]:
        return self._request("GET", "/openai/loadedmodels")

    def load(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/openai/load/{quote(name, safe='/:')}")

    def unload(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/openai/unload/{quote(name, safe='/:')}")

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/openai/status")

    # -- chat -----------------------------------------------------------------------------
    def stream_chat(self, model: str, prompt: Messages, **params: Any) -> Iterator[StreamEvent]:
        """Stream an answer: text deltas as they arrive, then one event with the result.

        ``params`` are OpenAI chat parameters (``max_tokens``, ``temperature``, ...); ``None``
        values are left out. Usage is always requested so the token counts are the server's.
        """
        start = time.perf_counter()
        request = self.http.build_request(
            "POST", "/v1/chat/completions", json=chat_body(model, prompt, params)
        )
        result = ChatResult(model=model, prepare_s=time.perf_counter() - start)
        try:
            response = self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        try:
            result.ttfb_s = time.perf_counter() - start
            result.send_s = result.ttfb_s - result.prepare_s
            if response.status_code >= 400:
                response.read()
                raise _error_from(response)
            result.headers = {
                k: v for k, v in response.headers.items() if k.lower().startswith("x-edgelm-")
            }
            yield from read_stream(response.iter_lines(), result, start)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        finally:
            response.close()
        yield StreamEvent(result=result)

    def chat_once(self, model: str, prompt: Messages, **params: Any) -> ChatResult:
        """One whole answer, streamed under the hood so that TTFT is always measured."""
        for event in self.stream_chat(model, prompt, **params):
            if event.result is not None:
                return event.result
        raise ServiceError(500, "the stream ended without a result")  # pragma: no cover


def chat_body(model: str, prompt: Messages, params: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat request's body, asking for usage; ``None`` parameters are left out."""
    params = {k: v for k, v in params.items() if v is not None and k != "stream"}
    stream_options = {**(params.pop("stream_options", None) or {}), "include_usage": True}
    return {
        "model": model,
        "messages": _messages(prompt),
        **params,
        "stream": True,
        "stream_options": stream_options,
    }


def read_stream(lines: Iterator[str], result: ChatResult, start: float) -> Iterator[StreamEvent]:
    """Read a chat answer's server-sent events into ``result``, yielding the text deltas as
    they arrive; times are measured from ``start`` (``time.perf_counter()``)."""
    deltas = 0
    last_token_t: float | None = None
    for event in _sse_events(lines):
        if "error" in event:
            raise _in_band_error(event["error"])
        usage = event.get("usage")
        if usage:
            result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            result.completion_tokens = int(usage.get("completion_tokens") or 0)
        if event.get("timings"):
            result.server_timings = event["timings"]
        if isinstance(event.get("edgelm"), dict):
            result.extension = event["edgelm"]
        result.model = event.get("model") or result.model
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                now = time.perf_counter() - start
                if last_token_t is None:
                    result.ttft_s = now
                else:
                    result.itl_s.append(now - last_token_t)
                last_token_t = now
                deltas += 1
                result.text += text
                yield StreamEvent(text=text)
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
    result.total_s = time.perf_counter() - start
    if not result.completion_tokens and deltas:
        # Not an edgelm service, or one that ignores include_usage: one delta ≈ one token.
        result.completion_tokens = deltas
        result.usage_estimated = True


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if not data:
            continue
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise ServiceError(502, f"the service sent a malformed event: {data[:200]}") from None
        if isinstance(event, dict):
            yield event


def _in_band_error(err: Any) -> ServiceError:
    if not isinstance(err, dict):
        return ServiceError(500, str(err))
    kind = err.get("type")
    return ServiceError(
        _STATUS_OF_TYPE.get(str(kind), 500),
        err.get("message") or "the stream failed",
        kind,
        err.get("code"),
        err.get("param"),
    )


def _error_from(response: httpx.Response) -> ServiceError:
    return error_from_body(response.status_code, response.text)


def error_from_body(status: int, text: str) -> ServiceError:
    """The error an HTTP error response describes (an OpenAI-style body, or whatever it is)."""
    try:
        err = json.loads(text)["error"]
        return ServiceError(
            status, err["message"], err.get("type"), err.get("code"), err.get("param")
        )
    except (ValueError, KeyError, TypeError):
        return ServiceError(status, f"HTTP {status}: {text[:200]}")


def chat_once(model: str, prompt: Messages, **params: Any) -> ChatResult:
    """One answer from the configured service, with its latency decomposition."""
    with EdgelmClient() as client:
        return client.chat_once(model, prompt, **params)


def stream_chat(model: str, prompt: Messages, **params: Any) -> Iterator[StreamEvent]:
    """Stream one answer from the configured service."""
    with EdgelmClient() as client:
        yield from client.stream_chat(model, prompt, **params)
