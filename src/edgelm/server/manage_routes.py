"""Model management in the style of Foundry Local's REST API, plus /health.

``/openai/load/{name}`` and ``/openai/unload/{name}`` let a client warm a model before traffic
arrives or free its memory; ``/foundry/list`` is the catalog with download and load status.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from edgelm import __version__
from edgelm.server.state import ServiceState


class DownloadBody(BaseModel):
    model: str
    force: bool = False


def build_router() -> APIRouter:
    router = APIRouter()

    def state_of(request: Request) -> ServiceState:
        return request.app.state.edgelm

    @router.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        state = state_of(request)
        return {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.time() - state.started_at, 1),
            "loaded": sorted(state.pool.models),
        }

    @router.get("/foundry/list")
    async def catalog(request: Request) -> list[dict[str, Any]]:
        state = state_of(request)
        out = []
        for entry in state.catalog:
            card = state.model_card(entry)
            card.update(
                aliases=entry.aliases,
                description=entry.description,
                parameters=entry.parameters,
                quantization=entry.quantization,
                size_bytes=entry.size_bytes,
                license=entry.license,
            )
            out.append(card)
        return out

    @router.get("/openai/models")
    async def cached(request: Request) -> list[str]:
        state = state_of(request)
        # Foundry Local's list of model files on disk: virtual models have none.
        return [c["id"] for c in state.model_cards() if c["cached"] and c["tier"] != "virtual"]

    @router.get("/openai/loadedmodels")
    async def loaded(request: Request) -> list[dict[str, Any]]:
        return state_of(request).pool.loaded_info()

    @router.get("/openai/load/{name:path}")
    async def load(name: str, request: Request) -> dict[str, Any]:
        state = state_of(request)
        model = await state.pool.get(name)
        return {"loaded": True, **model.info()}

    @router.get("/openai/unload/{name:path}")
    async def unload(name: str, request: Request) -> dict[str, Any]:
        state = state_of(request)
        # A loaded model removed from the catalog meanwhile can still be unloaded by alias.
        alias = name if name in state.pool.models else state.catalog.resolve(name).alias
        was_loaded = await state.pool.unload(alias)
        return {"id": alias, "unloaded": was_loaded}

    @router.post("/openai/download")
    async def download(body: DownloadBody, request: Request) -> dict[str, Any]:
        state = state_of(request)
        entry = state.catalog.resolve(body.model)
        path = await asyncio.to_thread(state.store.download, entry, None, body.force)
        return {"id": entry.alias, "path": str(path), "cached": True}

    @router.get("/openai/status")
    async def status(request: Request) -> dict[str, Any]:
        state = state_of(request)
        settings = state.settings
        return {
            "version": __version__,
            "pid": os.getpid(),
            "endpoint": f"http://{settings.service.host}:{settings.service.port}",
            "model_dir": str(settings.models_dir),
            "uptime_s": round(time.time() - state.started_at, 1),
            "loaded": state.pool.loaded_info(),
            "memory_budget_bytes": state.pool.memory_budget,
            "memory_used_bytes": state.pool.used_memory(),
            "pool": vars(state.pool.stats),
            "metrics": state.metrics.snapshot(),
        }

    return router
