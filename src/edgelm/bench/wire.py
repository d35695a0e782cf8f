"""The bench's client for streamed chat answers: the standard library's ``http.client``, one
keep-alive connection per thread.

The bench measures servers, so its own share of each figure should be as small as it can be.
httpx, which the rest of edgelm uses, builds each request and parses each response in pure
Python (httpcore and h11). Against the service on Qwen2.5-0.5B, with both clients timed against
the server's own clock, a request reached the server 0.45 ms later and the first token's event
was read 0.35 ms later through httpx than through ``http.client``: 0.8 ms of each TTFT that was
the client's, not the server's. Answers are read into the same :class:`ChatResult` as
:class:`~edgelm.client.EdgelmClient` reads them, by the same code (``read_stream``).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from edgelm.client import (
    ChatResult,
    Messages,
    ServiceUnavailable,
    chat_body,
    error_from_body,
    read_stream,
)

# What a keep-alive connection the server has closed in the meantime looks like; the request
# never reached the server, so it is sent again once on a new connection.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class WireClient:
    """Streams chat answers from one OpenAI-compatible server; safe to share between the
    bench's worker threads (each keeps its own connection)."""

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
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def chat_once(self, model: str, prompt: Messages, **params: Any) -> ChatResult:
        """One streamed answer, timed as :meth:`EdgelmClient.chat_once` times it."""
        start = time.perf_counter()
        body = json.dumps(chat_body(model, prompt, params)).encode()
        result = ChatResult(model=model, prepare_s=time.perf_counter() - start)
        response = self._post("/v1/chat/completions", body)
        try:
            result.ttfb_s = time.perf_counter() - start
            result.send_s = result.ttfb_s - result.prepare_s
            if response.status >= 400:
                raise error_from_body(response.status, response.read().decode("utf-8", "replace"))
            result.headers = {
                k.lower(): v for k, v in response.getheaders() if k.lower().startswith("x-edgelm-")
            }
            for _event in read_stream(_lines(response), result, start):
                pass
            # The stream ends at [DONE]; the rest of the body (the chunked encoding's last,
            # empty chunk) must be read too, or the next response on this connection starts
            # with it.
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise ServiceUnavailable(f"the connection to {self.root} failed: {exc!r}") from None
        finally:
            response.close()
        if response.will_close:
            self._drop()
        return result

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()

    def _post(self, path: str, body: bytes) -> http.client.HTTPResponse:
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("POST", self._prefix + path, body, self._headers)
                return conn.getresponse()
            except _STALE as exc:
                self._drop()
                if attempt == 2:
                    raise ServiceUnavailable(
                        f"{self.root} closed the connection: {exc!r}"
                    ) from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise ServiceUnavailable(f"could not reach {self.root}: {exc!r}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = kind(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _lines(response: http.client.HTTPResponse) -> Iterator[str]:
    """The response body's lines, as they arrive (chunked transfer included)."""
    for raw in iter(response.readline, b""):
        yield raw.decode("utf-8").rstrip("\r\n")
