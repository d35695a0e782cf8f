"""The bench's client for streamed chat answers: the standard library's ``http.client``, with
kept-alive connections shared by the bench's threads.

The bench measures servers, so its own share of each figure should be as small as it can be.
httpx, which the rest of edgelm uses, builds each request and parses each response in pure
Python (httpcore and h11). Against the service on Qwen2.5-0.5B, with both clients timed against
the server's own clock, a request reached the server 0.45 ms later and the first token's event
was read 0.35 ms later through httpx than through ``http.client``: 0.8 ms of each TTFT that was
the client's, not the server's. Only the transport is its own: requests are built and answers
read into the same :class:`ChatResult` as :class:`~edgelm.client.EdgelmClient` reads them, by
the same code (:mod:`edgelm.openai_stream`).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from edgelm.openai_stream import (
    ChatResult,
    Messages,
    ServiceUnavailable,
    chat_body,
    error_from_body,
    read_stream,
)

# What a kept-alive connection the server has closed in the meantime looks like. It is sent
# again once, on a new connection; a new connection that fails is not retried, so a request
# the server may have received is never sent twice.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class WireClient:
    """Streams chat answers from one OpenAI-compatible server; safe to share between the
    bench's worker threads. Idle connections are kept for whichever thread asks next, so a
    concurrency level's new workers do not pay a connect in their first timed request."""

    def __init__(self, root: str, api_key: str | None = None, timeout: float = 600.0):
        url = urlsplit(root)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {root}")
        self.root = root.rstrip("/")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port
        self._prefix = url.path.rstrip("/")
        self._timeout = timeout
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def chat_once(self, model: str, prompt: Messages, **params: Any) -> ChatResult:
        """One streamed answer, timed as :meth:`EdgelmClient.chat_once` times it."""
        start = time.perf_counter()
        body = json.dumps(chat_body(model, prompt, params)).encode()
        result = ChatResult(model=model, prepare_s=time.perf_counter() - start)
        conn, response = self._post("/v1/chat/completions", body)
        clean = False
        try:
            result.ttfb_s = time.perf_counter() - start
            result.send_s = result.ttfb_s - result.prepare_s
            if response.status >= 400:
                text = response.read().decode("utf-8", "replace")
                clean = True
                raise error_from_body(response.status, text)
            result.headers = {
                k.lower(): v for k, v in response.getheaders() if k.lower().startswith("x-edgelm-")
            }
            for _event in read_stream(_lines(response), result, start):
                pass
            # The stream ends at [DONE]; the rest of the body (the chunked encoding's last,
            # empty chunk) must be read too, or the next response on this connection starts
            # with it.
            response.read()
            clean = True
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(f"the connection to {self.root} failed: {exc!r}") from None
        finally:
            response.close()
            # Only a connection whose answer was read to its end can carry another; one left
            # mid-answer (an in-band error, a malformed event) is closed.
            if clean and not response.will_close:
                with self._lock:
                    self._idle.append(conn)
            else:
                conn.close()
        return result

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()

    def _post(
        self, path: str, body: bytes
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                conn = kind(self._host, self._port, timeout=self._timeout)
            try:
                conn.request("POST", self._prefix + path, body, self._headers)
                return conn, conn.getresponse()
            except _STALE as exc:
                conn.close()
                if not reused:
                    raise ServiceUnavailable(
                        f"{self.root} closed the connection: {exc!r}"
                    ) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise ServiceUnavailable(f"could not reach {self.root}: {exc!r}") from None


def _lines(response: http.client.HTTPResponse) -> Iterator[str]:
    """The response body's lines, as they arrive (chunked transfer included)."""
    for raw in iter(response.readline, b""):
        yield raw.decode("utf-8").rstrip("\r\n")
