"""Fixtures for integration tests: the real SmolLM2-135M model and a real running service.

The model is downloaded (and verified) once into ``EDGELM_TEST_MODELS`` (default
``~/.edgelm/models``), so reruns reuse it; each test session gets its own EDGELM_HOME.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgelm.catalog import Catalog
from edgelm.settings import Settings, load_settings
from tests.service_process import spawn_service, stop_service

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
    from edgelm.model_cache import ModelStore

    home = tmp_path_factory.mktemp("tiny-home")
    settings = settings_for(home)
    entry = Catalog.load(home).resolve(TINY)
    return ModelStore(settings).download(entry)


@pytest.fixture(scope="session")
def live_service(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``edgelm service start --foreground`` process on a free loopback port."""
    home = tmp_path_factory.mktemp("service-home")
    env = {"EDGELM_MODELS__DIR": str(models_dir()), "EDGELM_COMPUTE__N_CTX": "2048"}
    proc, base = spawn_service(home, "--model", TINY, env=env)
    yield base
    stop_service(proc)


def tools_dir() -> Path:
    """Where conversion tools are cached between runs (``EDGELM_TEST_TOOLS``)."""
    return Path(os.environ.get("EDGELM_TEST_TOOLS") or "~/.edgelm/tools").expanduser()


@pytest.fixture(scope="session")
def onnx_tiny(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """SmolLM2 converted to ONNX Runtime GenAI (int4, cpu); returns (EDGELM_HOME, alias).

    The conversion is cached beside the GGUF in the shared model directory and its tools
    under ``~/.edgelm/tools``: the first run builds both (a few minutes), later runs only
    register the variant in this session's home (well under a second).
    """
    from edgelm.convert import convert_to_onnx

    home = tmp_path_factory.mktemp("onnx-home")
    env = {
        "EDGELM_HOME": str(home),
        "EDGELM_MODELS__DIR": str(models_dir()),
        "EDGELM_COMPUTE__ONNX__CONVERT_ENV": str(tools_dir() / "onnx-convert"),
    }
    result = convert_to_onnx(TINY, load_settings(env=env))
    return home, result.alias
