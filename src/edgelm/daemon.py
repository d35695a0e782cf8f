"""Running the service: in the foreground, or detached with a pid file and a log file.

The detached service is the same command in a new session (``--foreground`` under the hood),
so there is one code path that serves, and ``stop`` only has to signal a pid. The pid file holds
the port too, so ``status`` can tell a stale file from a live service.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from edgelm.client import is_up
from edgelm.errors import EdgelmError
from edgelm.settings import Settings

log = logging.getLogger("edgelm.daemon")


class ServiceError(EdgelmError):
    code = "service_error"


@dataclass
class ServiceInfo:
    pid: int | None
    endpoint: str
    running: bool
    log_file: Path


def pid_file(settings: Settings) -> Path:
    return settings.home / "service.json"


def log_file(settings: Settings) -> Path:
    return settings.home / "logs" / "service.log"


def read_pid(settings: Settings) -> dict[str, object] | None:
    path = pid_file(settings)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = data.get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        path.unlink(missing_ok=True)  # a stale file from a service that died
        return None
    return data


def info(settings: Settings) -> ServiceInfo:
    data = read_pid(settings)
    endpoint = str(data["endpoint"]) if data else settings.endpoint
    pid = data["pid"] if data else None
    return ServiceInfo(
        pid=pid if isinstance(pid, int) else None,
        endpoint=endpoint,
        running=is_up(endpoint),
        log_file=log_file(settings),
    )


def serve_foreground(settings: Settings, preload: str | None = None) -> None:
    """Serve until interrupted. SIGTERM drains open streams, then exits (uvicorn's default)."""
    import uvicorn

    from edgelm.server.app import create_app

    # One log format for edgelm's own lines; the access log is edgelm's JSON line per request
    # (with the request id the response echoes), so uvicorn's own access log is turned off.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )

    if settings.service.host not in ("127.0.0.1", "localhost", "::1") and not (
        settings.service.api_key
    ):
        log.warning(
            "binding to %s without an API key: anyone who can reach this address can use the "
            "service; set service.api_key or EDGELM_API_KEY",
            settings.service.host,
        )
    app = create_app(settings, preload=[preload] if preload else None)
    settings.home.mkdir(parents=True, exist_ok=True)
    pid_file(settings).write_text(
        json.dumps({"pid": os.getpid(), "endpoint": _own_endpoint(settings)})
    )
    try:
        uvicorn.run(
            app,
            host=settings.service.host,
            port=settings.service.port,
            log_level="info",
            access_log=False,
            timeout_graceful_shutdown=30,
        )
    finally:
        data = read_pid(settings)
        if data and data.get("pid") == os.getpid():
            pid_file(settings).unlink(missing_ok=True)


def _own_endpoint(settings: Settings) -> str:
    host = settings.service.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{settings.service.port}"


def start_detached(
    settings: Settings, preload: str | None = None, wait_s: float = 60.0
) -> ServiceInfo:
    """Start the service in the background and wait until /health answers."""
    current = info(settings)
    if current.running:
        return current
    logs = log_file(settings)
    logs.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "edgelm.cli.main",
        "service",
        "start",
        "--foreground",
        "--host",
        settings.service.host,
        "--port",
        str(settings.service.port),
    ]
    if preload:
        cmd += ["--model", preload]
    env = {**os.environ, "EDGELM_HOME": str(settings.home)}
    if settings.service.api_key:
        # A key given as a flag must reach the detached service too; through the environment,
        # which other users cannot read, not the command line, which they can.
        env.pop("EDGELM_API_KEY", None)
        env["EDGELM_SERVICE__API_KEY"] = settings.service.api_key
    with logs.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    endpoint = _own_endpoint(settings)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"the service exited with code {proc.returncode}; see {logs}:\n" + _tail(logs)
            )
        if is_up(endpoint, timeout=0.5):
            return ServiceInfo(pid=proc.pid, endpoint=endpoint, running=True, log_file=logs)
        time.sleep(0.2)
    proc.terminate()
    raise ServiceError(f"the service did not answer within {wait_s:.0f}s; see {logs}")


def stop(settings: Settings, timeout_s: float = 30.0) -> bool:
    """Stop a detached service gracefully (SIGTERM), then forcefully if it hangs."""
    data = read_pid(settings)
    if not data:
        return False
    pid = int(data["pid"])  # type: ignore[arg-type]
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    except psutil.NoSuchProcess:
        pass
    pid_file(settings).unlink(missing_ok=True)
    return True


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
