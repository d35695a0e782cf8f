"""A download killed outright (SIGKILL) leaves no model file, and the next run resumes it."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

PAYLOAD = os.urandom(4 * 1024 * 1024)


class SlowHub(http.server.BaseHTTPRequestHandler):
    """Serves one file in 64 KiB pieces with a pause between them; honours Range."""

    ranges: list[str] = []  # noqa: RUF012 - per-test record, reset by the fixture

    def do_GET(self) -> None:
        start = 0
        header = self.headers.get("Range")
        if header:
            SlowHub.ranges.append(header)
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        try:
            for offset in range(start, len(PAYLOAD), 65536):
                self.wfile.write(PAYLOAD[offset : offset + 65536])
                self.wfile.flush()
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    SlowHub.ranges = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_kill_during_download_then_resume(isolated_home: Path, hub: str) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        tomli_w.dumps({"models": {"hub_endpoint": hub, "sources": ["hub"]}})
    )
    (isolated_home / "models.toml").write_text(
        tomli_w.dumps(
            {
                "model": [
                    {
                        "alias": "blob",
                        "filename": "blob.gguf",
                        "size_bytes": len(PAYLOAD),
                        "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
                        "source": [{"kind": "hub", "repo": "org/blob", "file": "blob.gguf"}],
                    }
                ]
            }
        )
    )
    env = {**os.environ, "EDGELM_HOME": str(isolated_home)}
    command = [sys.executable, "-m", "edgelm.cli.main", "model", "download", "blob"]
    final = isolated_home / "models" / "blob" / "blob.gguf"
    part = final.with_name("blob.gguf.part")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not part.exists() or part.stat().st_size < 1 << 20):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not final.exists()
    assert part.exists() and 0 < part.stat().st_size < len(PAYLOAD)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert final.read_bytes() == PAYLOAD and not part.exists()
    assert SlowHub.ranges and SlowHub.ranges[0].startswith("bytes=")  # it resumed
