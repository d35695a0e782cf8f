"""The shared fixture keeps the developer's shell and running service away from every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgelm.settings import load_settings
from tests.conftest import _clean_environment


def test_the_shell_s_variables_do_not_reach_a_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaked = {
        "EDGELM_ENDPOINT": "http://127.0.0.1:5273",
        "EDGELM_API_KEY": "sekret",
        "EDGELM_SERVICE__PORT": "5273",
        "BENCH_MODELS": "qwen2.5-0.5b",
        "SLM_ALIAS": "qwen2.5-0.5b",
        "FOUNDRY_LOCAL_ENDPOINT": "http://127.0.0.1:5273/v1",
        "FORCE_COLOR": "1",
        "COLUMNS": "40",
        "NO_PROXY": "example.org",
        "EDGELM_TEST_MODELS": "/models",
    }
    for name, value in leaked.items():
        monkeypatch.setenv(name, value)
    _clean_environment(monkeypatch, tmp_path / "home")
    for name in ("EDGELM_ENDPOINT", "EDGELM_API_KEY", "BENCH_MODELS", "SLM_ALIAS"):
        assert name not in os.environ
    for name in ("FOUNDRY_LOCAL_ENDPOINT", "FORCE_COLOR", "COLUMNS"):
        assert name not in os.environ
    assert os.environ["EDGELM_TEST_MODELS"] == "/models"  # the suite's own knob passes
    assert os.environ["NO_PROXY"].split(",")[:2] == ["example.org", "127.0.0.1"]
    settings = load_settings()
    assert settings.home == tmp_path / "home" and settings.client.endpoint is None
    assert settings.service.port != 5273 and settings.service.api_key is None

