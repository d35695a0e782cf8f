"""Routes that serve in-browser models to the playground: ``/browser-models/...``.

The page runs a small ONNX model with transformers.js; it must fetch the weights from this
service (never from a hub or CDN), so the page works offline. Models are exported once with
:func:`edgelm.web_export.export_web_model` into ``$EDGELM_HOME/browser-models/<alias>/``;
these routes only read that directory.

- ``GET /browser-models`` lists exported models, so the page can offer what is there (and say
  how to export one when nothing is);
- ``GET /browser-models/<alias>/<file>`` serves one file (transformers.js asks for
  ``config.json``, ``tokenizer*.json``, ``generation_config.json`` and ``onnx/model.onnx``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from edgelm.errors import ModelNotFound
from edgelm.server.state import ServiceState
from edgelm.web_export import MARKER, browser_models_dir


def build_router() -> APIRouter:
    """The ``/browser-models`` routes; mounted by ``create_app``."""
    router = APIRouter()

    @router.get("/browser-models")
    async def list_browser_models(request: Request) -> dict[str, Any]:
        state: ServiceState = request.app.state.edgelm
        root = browser_models_dir(state.settings)
        data = [_card(d) for d in sorted(root.iterdir())] if root.is_dir() else []
        return {
            "object": "list",
            "data": [card for card in data if card is not None],
            "hint": "export one with: edgelm model export-web smollm2-135m",
        }

    @router.get("/browser-models/{alias}/{file_path:path}", include_in_schema=False)
    async def browser_model_file(alias: str, file_path: str, request: Request) -> FileResponse:
        state: ServiceState = request.app.state.edgelm
        path = _safe_file(browser_models_dir(state.settings), alias, file_path)
        # The weights are immutable for a given export, but a re-export reuses the names:
        # let the browser revalidate (ETag / Last-Modified) rather than cache blindly.
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    return router


def _card(directory: Path) -> dict[str, Any] | None:
    """A listing entry for one exported model; half-built or foreign directories are skipped."""
    if directory.name.startswith(".") or not (directory / MARKER).is_file():
        return None
    try:
        meta = json.loads((directory / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    weights = directory / "onnx" / "model.onnx"
    if not weights.is_file():
        return None
    size = sum(p.stat().st_size for p in (directory / "onnx").glob("model.onnx*"))
    return {
        "id": directory.name,
        "object": "browser_model",
        "dtype": meta.get("dtype", "fp32"),
        "bytes": size,
        "source": meta.get("source"),
    }


def _safe_file(root: Path, alias: str, file_path: str) -> Path:
    """Resolve a requested file strictly inside ``root/alias``; anything else is a 404.

    ``..``, absolute paths and symlinks out of the directory all resolve outside it, so one
    containment check on the resolved path covers them.
    """
    base = (root / alias).resolve()
    try:
        path = (base / file_path).resolve()
    except (OSError, RuntimeError):
        path = base
    inside = path.is_relative_to(base) and path != base and base.parent == root.resolve()
    if alias.startswith(".") or not inside or not path.is_file():
        raise ModelNotFound(
            f"no browser model file '{alias}/{file_path}'; "
            f"export it with: edgelm model export-web {alias}",
            param="model",
            code="browser_model_not_found",
        )
    return path
