"""Start ``edgelm service start --foreground`` as a real child process, for tests that need one.

Shared by the integration fixtures (real model) and the unit tests of process behaviour
(SIGTERM draining, pid files), so both wait for readiness and report start failures alike.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_service(
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    port: int | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the service on a free loopback port (or ``port``, to start one again where it
    was) and wait for ``/health``; return it and its URL.

    Output goes to ``home/service.out``; it is the error message when the process exits or
    never answers.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    full_env = {**os.environ, "EDGELM_HOME": str(home), **(env or {})}
    out = home / "service.out"
    with out.open("wb") as log:
        command = [sys.executable, "-m", "edgelm.cli.main", "service", "start", "--foreground"]
        proc = subprocess.Popen(
            [*command, "--port", str(port), *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("service exited: " + out.read_text())
        try:
            httpx.get(f"{base}/health", timeout=1)
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("service did not start: " + out.read_text())


def stop_service(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not drained in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
