"""`edgelm service start` detached, status, restart and stop, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from edgelm.catalog import Catalog, CatalogEntry
from tests.unit.conftest import free_port


def edgelm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgelm.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _echo_home(home: Path) -> tuple[dict[str, str], str]:
    """A home whose catalog has the fake ``echo`` model, the environment to run edgelm in
    with it on a free port, and the service's URL there."""
    Catalog.load(home).add_user_entry(
        CatalogEntry(alias="echo", engine="fake", options={"reply": "pong"})
    )
    port = free_port()
    env = {
        **os.environ,
        "EDGELM_HOME": str(home),
        "EDGELM_SERVICE__PORT": str(port),
        "COLUMNS": "200",
    }
    return env, f"http://127.0.0.1:{port}"


def test_detached_lifecycle(isolated_home: Path) -> None:
    env, base = _echo_home(isolated_home)
    try:
        started = edgelm("service", "start", "--model", "echo", env=env)
        assert started.returncode == 0, started.stderr
        assert base in started.stdout
        record = json.loads((isolated_home / "service.json").read_text())
        assert record["endpoint"] == base and psutil.pid_exists(record["pid"])
        assert httpx.get(f"{base}/health").json()["loaded"] == ["echo"]  # preloaded
        again = edgelm("service", "start", env=env)
        assert "already running" in again.stdout
        status = edgelm("service", "status", env=env)
        assert status.returncode == 0 and "echo" in status.stdout
        answer = edgelm("model", "run", "echo", "--prompt", "ping", env=env)
        assert "pong" in answer.stdout, answer.stderr
        restarted = edgelm("service", "restart", env=env)
        assert restarted.returncode == 0, restarted.stderr
        new_pid = json.loads((isolated_home / "service.json").read_text())["pid"]
        assert new_pid != record["pid"] and not psutil.pid_exists(record["pid"])
        stopped = edgelm("service", "stop", env=env)
        assert "service stopped" in stopped.stdout
        assert not (isolated_home / "service.json").exists()
        assert not psutil.pid_exists(new_pid) or psutil.Process(new_pid).status() == "zombie"
        down = edgelm("service", "status", env=env)
        assert down.returncode == 1 and "not running" in down.stderr
        log = (isolated_home / "logs" / "service.log").read_text()
        assert "Uvicorn running" in log or "Application startup complete" in log
        assert "edgelm.access" in log and '"request_id"' in log  # structured access log
    finally:
        edgelm("service", "stop", env=env)


def test_start_failure_is_reported(isolated_home: Path) -> None:
    port = free_port()
    env = {**os.environ, "EDGELM_HOME": str(isolated_home), "EDGELM_SERVICE__PORT": str(port)}
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text("[service]\nport = 'not a number'\n")
    result = edgelm("service", "start", env=env)
    assert result.returncode == 1
    assert "service.port" in result.stderr and "Traceback" not in result.stderr


def test_a_key_given_at_start_guards_the_detached_service(isolated_home: Path) -> None:
    """``service start --api-key`` reaches the background process (it used to be dropped, and
    the service ran open); every command then reaches it with the global ``--api-key``."""
    env, base = _echo_home(isolated_home)
    try:
        started = edgelm("service", "start", "--api-key", "k-123", env=env)
        assert started.returncode == 0, started.stderr
        assert httpx.get(f"{base}/v1/models").status_code == 401
        keyed = {"Authorization": "Bearer k-123"}
        assert httpx.get(f"{base}/v1/models", headers=keyed).status_code == 200
        refused = edgelm("model", "load", "echo", env=env)
        assert refused.returncode == 1 and "API key" in refused.stderr
        loaded = edgelm("--api-key", "k-123", "model", "load", "echo", env=env)
        assert loaded.returncode == 0 and "loaded echo" in loaded.stdout, loaded.stderr
        status = edgelm("--api-key", "k-123", "service", "status", env=env)
        assert status.returncode == 0 and "echo" in status.stdout, status.stderr
    finally:
        edgelm("service", "stop", env=env)
