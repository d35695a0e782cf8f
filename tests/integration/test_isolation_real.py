"""Crash isolation with the real tiny model: its llama.cpp runner killed mid-stream, and a
truncated model file, through the service's real HTTP stack."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil
from fastapi.testclient import TestClient

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.server.app import create_app
from tests.integration.conftest import TINY, settings_for

ASK = [{"role": "user", "content": "Count from one to fifty in words, separated by commas."}]


def runner_pid(http: TestClient, alias: str) -> int:
    loaded = http.get("/openai/status").json()["loaded"]
    return next(m["runtime"]["runner_pid"] for m in loaded if m["id"] == alias)


def test_a_killed_llama_cpp_runner_ends_its_stream_and_the_next_request_restarts_it(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "home", **{"compute.n_ctx": 1024})
    assert settings.compute.isolation == "process"  # the default
    app = create_app(settings, catalog=Catalog.load(settings.home))
    with TestClient(app) as http:
        assert http.get(f"/openai/load/{TINY}").status_code == 200
        pid = runner_pid(http, TINY)
        runner = psutil.Process(pid)
        assert runner.ppid() == os.getpid()
        # The model's memory is in the runner, and the pool's figure covers it.
        status = http.get("/openai/status").json()
        assert status["memory_used_bytes"] >= tiny_model_path.stat().st_size
        assert runner.memory_info().rss > tiny_model_path.stat().st_size // 4
        assert status["loaded"][0]["runtime"]["threads"] >= 1  # live_info crosses over

        events: list[Any] = []
        body = {"model": TINY, "messages": ASK, "stream": True, "max_tokens": 200, "temperature": 0}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: ") and '"content":"' in line:
                    seen += 1
                    if seen == 3:
                        os.kill(pid, signal.SIGKILL)
                        break
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        errors = [e["error"] for e in events if "error" in e]
        assert errors, events[-3:]
        assert errors[0]["code"] == "engine_crashed"
        assert f"model '{TINY}' stopped: its runner was killed by SIGKILL" in errors[0]["message"]

        again = http.post(
            "/v1/chat/completions",
            json={"model": TINY, "messages": ASK, "max_tokens": 8, "temperature": 0},
        )
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"]
        assert runner_pid(http, TINY) != pid
        assert http.get("/openai/status").json()["pool"]["runner_crashes"] == 1
        embedded = http.post("/v1/embeddings", json={"model": TINY, "input": ["a cat", "a dog"]})
        assert embedded.status_code == 200 and len(embedded.json()["data"]) == 2


def test_a_truncated_model_file_is_a_clear_error(tiny_model_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    size = tiny_model_path.stat().st_size
    with tiny_model_path.open("rb") as source:
        truncated.write_bytes(source.read(size // 2))
    settings = settings_for(tmp_path / "home")
    entry = CatalogEntry(alias="cut", engine="llamacpp", path=truncated)
    with TestClient(create_app(settings, catalog=Catalog([entry]))) as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": "cut", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "model_load_failed"
        assert "'cut'" in error["message"] and "is truncated" in error["message"]
        assert f"it has {size // 2:,} bytes of the {size:,} its tensors need" in error["message"]
        assert http.get("/health").status_code == 200
