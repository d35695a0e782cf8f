"""A small client for a running edgelm service (local, or ``EDGELM_ENDPOINT``).

Used by the CLI, by scripts and by the tools that talk to the service (RAG, evals, the hybrid
router's evaluation). Chat calls always stream under the hood, so every result carries the
latency decomposition measured on the client side (request preparation, time to response
headers, TTFT, inter-token gaps, total) next to the server's own ``timings``: the client's
figures include the HTTP hop a user really waits for, the server's do not. The wire format
itself is read by :mod:`edgelm.openai_stream`.

:func:`resolve_service` is the one place that says which service a command talks to and
with which key, so that every command reaches a service started with ``--api-key`` alike.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from edgelm.openai_stream import (
    ChatResult,
    Messages,
    ServiceError,
    ServiceUnavailable,
    StreamEvent,
    aread_stream,
    chat_body,
    error_from_body,
    read_stream,
)

if TYPE_CHECKING:
    from edgelm.settings import Settings

__all__ = [
    "ChatResult",
    "EdgelmClient",
    "Messages",
    "ServiceAddress",
    "ServiceError",
    "ServiceUnavailable",
    "StreamEvent",
    "chat_once",
    "is_up",
    "resolve_service",
    "stream_chat",
]


@dataclass(frozen=True)
class ServiceAddress:
    """Where a service is and the bearer key to send it (``None``: send none)."""

    endpoint: str
    api_key: str | None


def resolve_service(
    settings: Settings, endpoint: str | None = None, api_key: str | None = None
) -> ServiceAddress:
    """The service every command and tool talks to, and its key.

    Endpoint: ``endpoint`` if given, else the settings' (``client.endpoint`` or
    ``EDGELM_ENDPOINT``, else the local service's host and port). Key: ``api_key`` if given,
    else ``client.api_key``, else — only when the endpoint is this machine's —
    ``service.api_key`` (``EDGELM_API_KEY``), the key a local service requires, so a service
    started with a key is reached with it and that key never leaves the machine.
    """
    target = (endpoint or settings.endpoint).rstrip("/")
    key = api_key or settings.client.api_key
    if not key and (target == settings.local_endpoint or _is_loopback(target)):
        key = settings.service.api_key
    return ServiceAddress(endpoint=target, api_key=key or None)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_up(
    endpoint: str, timeout: float | httpx.Timeout = 1.0, http: httpx.Client | None = None
) -> bool:
    """Whether a service answers ``GET /health`` with 200 within ``timeout``; the health
    probe needs no key. ``http`` sends it through an existing client (and its transport)."""
    url = f"{endpoint.rstrip('/')}/health"
    try:
        response = (http or httpx).get(url, timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


class EdgelmClient:
    """Talks to one edgelm service. With no endpoint, the settings say which (and its key,
    through :func:`resolve_service`).

    ``transport`` and ``async_transport`` let tests swap the network for httpx mock
    transports (the synchronous calls use the first, :meth:`astream_chat` the second).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
    ):
        if endpoint is None:
            from edgelm.settings import load_settings

            address = resolve_service(load_settings(), api_key=api_key)
            endpoint, api_key = address.endpoint, address.api_key
        self.endpoint = endpoint.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A short connect timeout: "is the service there?" should not take 10 minutes.
        self._timeout = httpx.Timeout(timeout, connect=5.0)
        self._async_transport = async_transport
        self.http = httpx.Client(
            base_url=self.endpoint,
            headers=self._headers,
            timeout=self._timeout,
            transport=transport,
        )

    @classmethod
    def for_settings(
        cls, settings: Settings, endpoint: str | None = None, api_key: str | None = None
    ) -> EdgelmClient:
        """A client for the service the settings name (see :func:`resolve_service`)."""
        address = resolve_service(settings, endpoint, api_key)
        return cls(address.endpoint, address.api_key)

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
            raise error_from_body(response.status_code, response.text)
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
        return is_up(self.endpoint, self._timeout, self.http)

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

    # -- embeddings -----------------------------------------------------------------------
    def embed(self, model: str, texts: list[str], batch: int = 64) -> list[list[float]]:
        """One vector per text, in order, asked for ``batch`` texts at a time."""
        out: list[list[float]] = []
        for i in range(0, len(texts), batch):
            body = {"model": model, "input": texts[i : i + batch]}
            data = self._request("POST", "/v1/embeddings", json=body)
            out.extend(row["embedding"] for row in sorted(data["data"], key=lambda d: d["index"]))
        return out

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
            if response.status_code >= 400:
                response.read()
            _opened(response, result, start)
            yield from read_stream(response.iter_lines(), result, start)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        finally:
            response.close()
        yield StreamEvent(result=result)

    async def astream_chat(
        self, model: str, prompt: Messages, **params: Any
    ) -> AsyncIterator[StreamEvent]:
        """:meth:`stream_chat` for asyncio code (the RAG app and CLI). Each call has its own
        connection, so the client can serve several event loops one after another."""
        start = time.perf_counter()
        async with httpx.AsyncClient(
            base_url=self.endpoint,
            headers=self._headers,
            timeout=self._timeout,
            transport=self._async_transport,
        ) as http:
            request = http.build_request(
                "POST", "/v1/chat/completions", json=chat_body(model, prompt, params)
            )
            result = ChatResult(model=model, prepare_s=time.perf_counter() - start)
            try:
                response = await http.send(request, stream=True)
            except httpx.TransportError as exc:
                raise self._transport_error(exc) from None
            try:
                if response.status_code >= 400:
                    await response.aread()
                _opened(response, result, start)
                async for event in aread_stream(response.aiter_lines(), result, start):
                    yield event
            except httpx.TransportError as exc:
                raise self._transport_error(exc) from None
            finally:
                await response.aclose()
        yield StreamEvent(result=result)

    def chat_once(self, model: str, prompt: Messages, **params: Any) -> ChatResult:
        """One whole answer, streamed under the hood so that TTFT is always measured."""
        for event in self.stream_chat(model, prompt, **params):
            if event.result is not None:
                return event.result
        raise ServiceError(500, "the stream ended without a result")  # pragma: no cover


def _opened(response: httpx.Response, result: ChatResult, start: float) -> None:
    """Record the response's arrival and ``x-edgelm-*`` headers; an error status (its body
    read) is raised as the service's error."""
    result.ttfb_s = time.perf_counter() - start
    result.send_s = result.ttfb_s - result.prepare_s
    if response.status_code >= 400:
        raise error_from_body(response.status_code, response.text)
    result.headers = {
        k: v for k, v in response.headers.items() if k.lower().startswith("x-edgelm-")
    }


def chat_once(model: str, prompt: Messages, **params: Any) -> ChatResult:
    """One answer from the configured service, with its latency decomposition."""
    with EdgelmClient() as client:
        return client.chat_once(model, prompt, **params)


def stream_chat(model: str, prompt: Messages, **params: Any) -> Iterator[StreamEvent]:
    """Stream one answer from the configured service."""
    with EdgelmClient() as client:
        yield from client.stream_chat(model, prompt, **params)
