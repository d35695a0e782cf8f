"""Per-request context as plain ASGI: the request id, the API key check, one JSON access-log
line and the response counter.

Why not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hands every message of a
streamed answer from the app's task to the client's through a memory stream, an extra task
switch per token on a 2-core machine where the scheduler thread wants the CPU back.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgelm.server.errors import error_body
from edgelm.server.metrics import Metrics
from edgelm.settings import Settings

access = logging.getLogger("edgelm.access")


class RequestContext:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex[:16]
        key = self.settings.service.api_key
        method, path = scope["method"], scope["path"]
        needs_key = key and method != "OPTIONS" and not is_open(path)
        if needs_key and not authorised(headers.get("authorization", ""), key):
            refusal = JSONResponse(
                error_body(
                    "missing or invalid API key; send 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                ),
                status_code=401,
                headers={"x-request-id": request_id},
            )
            await refusal(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before it starts a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = (b"x-request-id", request_id.encode("latin-1"))
                message["headers"] = [*message.get("headers", []), extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            self.metrics.count_response(getattr(route, "path", None) or "unmatched", status)
            access.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": method,
                        "path": path,
                        "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 1),
                    }
                )
            )


def is_open(path: str) -> bool:
    """Paths served without a key: the health probe and the playground's own files."""
    return path in ("/", "/health", "/favicon.ico") or path.startswith("/static/")


def authorised(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())
