"""The browser playground: the page at ``/`` and its files under ``/static/``.

Everything the page needs ships in the package (``server/static/``), including the vendored
transformers.js and ONNX Runtime Web files, so it works offline and never touches a CDN.

Two response details matter for in-browser inference and are set here rather than left to the
platform's MIME table:

- ``.mjs`` must be served as JavaScript and ``.wasm`` as ``application/wasm``: ONNX Runtime Web
  imports the first as a module (browsers refuse other types) and compiles the second with
  streaming instantiation (which insists on the type);
- the page and its scripts carry ``Cross-Origin-Opener-Policy: same-origin`` and
  ``Cross-Origin-Embedder-Policy: require-corp``: that makes the page cross-origin isolated,
  which is what lets the WASM runtime use more than one thread (SharedArrayBuffer).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

MEDIA_TYPES: Mapping[str, str] = MappingProxyType(
    {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}
)
ISOLATION_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Embedder-Policy": "require-corp",
    }
)


class PlaygroundFiles(StaticFiles):
    """Static files with the media types and isolation headers the playground relies on."""

    def file_response(self, full_path: Any, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(full_path, *args, **kwargs)
        suffix = str(full_path)[str(full_path).rfind(".") :].lower()
        if suffix in MEDIA_TYPES:
            response.media_type = MEDIA_TYPES[suffix]
            response.headers["content-type"] = MEDIA_TYPES[suffix]
        response.headers.update(ISOLATION_HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files at ``/static/``."""
    static = resources.files("edgelm").joinpath("server/static")
    index = static.joinpath("index.html")

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return FileResponse(str(index), media_type="text/html", headers=dict(ISOLATION_HEADERS))

    app.mount("/static", PlaygroundFiles(directory=str(static)), name="static")
