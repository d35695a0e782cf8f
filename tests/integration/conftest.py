"""Fixtures for integration tests: the real SmolLM2-135M model and a real running service.

The model is downloaded (and verified) once into ``EDGELM_TEST_MODELS`` (default
``~/.edgelm/models``), so reruns reuse it; each test session gets its own EDGELM_HOME.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgelm.catalog import Catalog
from edgelm.settings import Settings, load_settings

TINY = "smollm2-135m"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def models_dir() -> Path:
    return Path(os.environ.get("EDGELM_TEST_MODELS") or "~/.edgelm/models").expanduser()


def settings_for(home: Path, **overrides: object) -> Settings:
    env = {"EDGELM_HOME": str(home), "EDGELM_MODELS__DIR": str(models_dir())}
    return load_settings(overrides, env=env)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgelm.store import ModelStore

    home = tmp_path_factory.mktemp("tiny-home")
    settings = settings_for(home)
    entry = Catalog.load(home).resolve(TINY)
    return ModelStore(settings).download(entry)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def live_service(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``edgelm service start --foreground`` process on a free loopback port."""
    home = tmp_path_factory.mktemp("service-home")
    port = free_port()
    env = {
        **os.environ,
        "EDGELM_HOME": str(home),
        "EDGELM_MODELS__DIR": str(models_dir()),
        "EDGELM_COMPUTE__N_CTX": "2048",
    }
    log = (home / "service.out").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgelm.cli.main",
            "service",
            "start",
            "--foreground",
            "--port",
            str(port),
            "--model",
            TINY,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((home / "service.out").read_text())
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("service did not start: " + (home / "service.out").read_text())
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
