"""Graceful SIGTERM, the wildcard-bind warning, no path traversal, corrupt-file detection."""

from __future__ import annotations

import hashlib
import signal
import subprocess
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.daemon import read_pid
from edgelm.server.app import create_app
from edgelm.settings import load_settings
from tests.service_process import spawn_service
from tests.unit.test_cli import run


def start_service(home: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    return spawn_service(home, *extra)


def test_sigterm_drains_open_streams(isolated_home: Path) -> None:
    Catalog.load(isolated_home).add_user_entry(
        CatalogEntry(
            alias="slow", engine="fake", options={"reply": "w " * 30, "token_delay_s": 0.05}
        )
    )
    proc, base = start_service(isolated_home)
    payload = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": True}
    received = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=30) as response:
        for line in response.iter_lines():
            if not line:
                continue
            received.append(line)
            if len(received) == 3:
                proc.send_signal(signal.SIGTERM)  # mid-stream
    assert received[-1] == "data: [DONE]"
    assert sum('"content":"w ' in line for line in received) == 30
    # uvicorn drains, then re-raises the signal so the exit status says SIGTERM
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    assert read_pid(settings) is None  # no live service is claimed afterwards


def test_wildcard_bind_without_key_warns(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    proc, _ = start_service(isolated_home, "--host", "0.0.0.0")
    proc.terminate()
    proc.wait(timeout=30)
    log = (isolated_home / "service.out").read_text()
    assert "without an API key" in log


def test_names_cannot_escape_home(settings, catalog) -> None:
    with TestClient(create_app(settings, catalog=catalog)) as client:
        for name in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "fake-a/../../x"):
            response = client.get(f"/openai/load/{name}")
            assert response.status_code == 404, name
            response = client.post("/openai/download", json={"model": name})
            assert response.status_code == 404, name
    bad = run("model", "add", "../evil", "--engine", "fake")
    assert bad.exit_code != 0


def test_cache_verify_detects_corruption(isolated_home: Path) -> None:
    data = b"GGUF" + b"\1" * 1000
    Catalog.load(isolated_home).add_user_entry(
        CatalogEntry(
            alias="tiny-file",
            filename="t.gguf",
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            source=[{"kind": "hub", "repo": "o/r", "file": "t.gguf"}],
        )
    )
    target = isolated_home / "models" / "tiny-file" / "t.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    assert "ok" in run("cache", "verify").output
    target.write_bytes(data[:-1] + b"\2")
    result = run("cache", "verify", "tiny-file")
    assert result.exit_code == 1 and "CORRUPT" in result.output
    assert "edgelm model download tiny-file --force" in result.output
