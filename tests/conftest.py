"""Shared fixtures: every test gets its own EDGELM_HOME and no EDGELM_* leaking in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("EDGELM_") and name not in ("EDGELM_TEST_MODELS",):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path / "edgelm-home"
    monkeypatch.setenv("EDGELM_HOME", str(home))
    return home
