"""The service factory. ``create_app(settings)`` builds a complete app with no globals, so a
test makes one with a fake engine in a line and several can live in one process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from edgelm import __version__
from edgelm.catalog import Catalog
from edgelm.errors import EdgelmError
from edgelm.pool import ModelPool
from edgelm.server import (
    browser_models,
    manage_routes,
    openai_routes,
    playground,
    rag_routes,
    responses_routes,
)
from edgelm.server.access import RequestContext
from edgelm.server.errors import install_error_handlers
from edgelm.server.hybrid_model import HybridModels
from edgelm.server.limits import BodyLimitMiddleware
from edgelm.server.rag_model import RagModels
from edgelm.server.state import ServiceState
from edgelm.server.virtual import VirtualModel
from edgelm.settings import Settings, load_settings

log = logging.getLogger("edgelm.server")


def create_app(
    settings: Settings | None = None,
    *,
    catalog: Catalog | None = None,
    pool: ModelPool | None = None,
    preload: list[str] | None = None,
    virtual: list[VirtualModel] | None = None,
) -> FastAPI:
    """Build the service. ``preload`` names models to load at start-up; one that fails to load
    is logged and the service starts anyway, so a bad model never keeps the others down."""
    settings = settings or load_settings()
    state = ServiceState.build(settings, catalog=catalog, pool=pool)
    state.virtual = default_virtual_models() if virtual is None else virtual

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.pool.start()
        for name in preload or []:
            try:
                await state.pool.get(name)
            except EdgelmError as exc:
                log.error("could not preload %s: %s", name, exc.message)
        try:
            yield
        finally:
            await state.pool.close()

    app = FastAPI(
        title="edgelm",
        version=__version__,
        description="Local OpenAI-compatible model service",
        lifespan=lifespan,
    )
    app.state.edgelm = state
    install_error_handlers(app)
    app.include_router(openai_routes.build_router())
    app.include_router(responses_routes.build_router())
    app.include_router(manage_routes.build_router())
    app.include_router(rag_routes.build_router())
    app.include_router(browser_models.build_router())
    playground.mount(app)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(state.metrics.prometheus(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestContext, settings=settings, metrics=state.metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.service.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.service.cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        allow_credentials="*" not in settings.service.cors_origins,
    )
    return app


def default_virtual_models() -> list[VirtualModel]:
    """The virtual model families every service offers: the hybrid router and RAG."""
    return [HybridModels(), RagModels()]
