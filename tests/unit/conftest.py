"""Fixtures for unit tests: an app on the fake engine, driven in-process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.settings import Settings, load_settings
from tests.service_process import free_port


def fake_entry(alias: str, **options: Any) -> CatalogEntry:
    return CatalogEntry(alias=alias, engine="fake", tier="tiny", options=options)


@pytest.fixture
def settings(isolated_home: Path) -> Settings:
    """The test's settings: its own home, and a service port nothing listens on."""
    return load_settings()


@pytest.fixture
def catalog(isolated_home: Path) -> Catalog:
    entries = [
        fake_entry("fake-a"),
        fake_entry("fake-slow", token_delay_s=0.02, reply="one two three four five six"),
        fake_entry("fake-broken", fail_load="weights are corrupt"),
        CatalogEntry(alias="fake-b", engine="fake", tier="llm", aliases=["bee"]),
    ]
    return Catalog(entries, user_file=isolated_home / "models.toml")


@pytest.fixture
def client(settings: Settings, catalog: Catalog) -> Iterator[TestClient]:
    from edgelm.server.app import create_app

    app = create_app(settings, catalog=catalog)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def serve_app() -> Iterator[Callable[[FastAPI], str]]:
    """Serve apps for real with uvicorn in a thread on a loopback port; returns the base URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def serve(app: FastAPI) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(f"{base}/health", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        servers.append((server, thread))
        return base

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
