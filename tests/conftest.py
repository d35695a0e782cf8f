"""Shared fixtures: tests do not depend on what runs on the machine or on the user's shell.

A developer runs ``bash scripts/serve.sh`` in one terminal and the tests in another, with
their own ``EDGELM_*`` variables, the workshop's ``BENCH_*`` ones and perhaps a proxy set.
None of that may reach a test: every test gets its own ``EDGELM_HOME``, a service port that
nothing listens on (so "is the service up?" is always "no" unless the test starts one), and
none of the variables below.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgelm.bench.workshop import VARIABLES as WORKSHOP_VARIABLES
from tests.service_process import free_port

# Knobs of the test suite itself, not settings of edgelm: they pass through.
TEST_KNOBS = ("EDGELM_TEST_", "EDGELM_PLAYGROUND_")
# Outside variables that change what edgelm or rich does: colours and widths in rich's
# output, OpenAI clients' defaults.
OUTSIDE = ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES", "OPENAI_BASE_URL", "OPENAI_API_KEY")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _clean_environment(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Remove the user's edgelm, workshop and rich variables; point edgelm at ``home`` and at
    a free port; keep a configured HTTP proxy away from loopback requests."""
    for name in list(os.environ):
        if name.startswith("EDGELM_") and not name.startswith(TEST_KNOBS):
            monkeypatch.delenv(name, raising=False)
    for name in (*WORKSHOP_VARIABLES, *OUTSIDE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGELM_HOME", str(home))
    # Not the default 5273, where a developer's own service may be running.
    monkeypatch.setenv("EDGELM_SERVICE__PORT", str(free_port()))
    for name in ("NO_PROXY", "no_proxy"):
        kept = [h for h in os.environ.get(name, "").split(",") if h.strip()]
        monkeypatch.setenv(name, ",".join([*kept, *(h for h in LOOPBACK if h not in kept)]))


@pytest.fixture(scope="session", autouse=True)
def clean_session_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same cleaning for session fixtures (services started once for many tests)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clean_environment(monkeypatch, tmp_path_factory.mktemp("session-home"))
        yield


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own ``EDGELM_HOME`` (and service port), whatever the user's shell holds."""
    home = tmp_path / "edgelm-home"
    _clean_environment(monkeypatch, home)
    return home
