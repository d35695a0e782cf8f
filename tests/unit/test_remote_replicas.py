"""Replicas of a remote model: balancing, failover before the first chunk, a clear error after
it, the circuit breaker and health checks, and the figures — against real upstreams (edgelm
services on the fake engine: in-process ones, and child processes that are SIGKILLed)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from typer.testing import CliRunner

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.cli.main import app as cli
from edgelm.engines.base import collect
from edgelm.engines.remote import RemoteEngine
from edgelm.engines.replicas import ReplicaPolicy
from edgelm.errors import UpstreamError
from edgelm.server.app import create_app
from edgelm.settings import load_settings
from edgelm.types import GenerationRequest, Message
from tests.service_process import free_port, spawn_service

SLOW_REPLY = " ".join(f"w{i}" for i in range(20))  # 20 tokens, 0.1 s apart: a 2 s stream
UPSTREAM_MODELS = [
    {"alias": "fake-slow", "engine": "fake", "options": {"reply": SLOW_REPLY, "token_delay_s": 0.1}},
    {"alias": "fake-wait", "engine": "fake", "options": {"reply": "waited", "first_token_delay_s": 1.5}},
    {"alias": "fake-a", "engine": "fake"},
]


def chat(text: str = "hello") -> GenerationRequest:
    return GenerationRequest(messages=[Message(role="user", content=text)])


def upstream_requests(base: str, model: str) -> int:
    """How many generations the upstream itself served for ``model`` (its own records)."""
    status = httpx.get(f"{base}/openai/status", timeout=5).json()
    return int(status["metrics"]["models"].get(model, {}).get("requests", 0))


# -- balancing, against in-process upstreams ----------------------------------------------


@pytest.fixture
def two_upstreams(settings, isolated_home, serve_app) -> list[str]:
    entries = [CatalogEntry.model_validate(row) for row in UPSTREAM_MODELS]
    return [serve_app(create_app(settings, catalog=Catalog(entries))) for _ in range(2)]


def test_least_outstanding_balancing_spreads_load(two_upstreams: list[str]) -> None:
    engine = RemoteEngine([f"{b}/v1" for b in two_upstreams], "fake-slow")
    results: list[str] = []

    def one() -> None:
        results.append(collect(engine.stream(chat())).text)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # each sees the in-flight counts of those before it
    for thread in threads:
        thread.join(timeout=30)
    assert results == [SLOW_REPLY] * 6
    # Six concurrent streams over two replicas: three each, as counted by both sides.
    assert [r["requests"] for r in engine.replicas.info()] == [3, 3]
    assert [upstream_requests(b, "fake-slow") for b in two_upstreams] == [3, 3]
    # Sequential requests (nothing in flight) take turns.
    quick = RemoteEngine([f"{b}/v1" for b in two_upstreams], "fake-a")
    for _ in range(4):
        assert collect(quick.stream(chat("q"))).text == "Fake answer to: q"
    assert [r["requests"] for r in quick.replicas.info()] == [2, 2]
    info = quick.live_info()["replicas"]
    assert all(r["healthy"] and r["in_flight"] == 0 and r["first_chunk_count"] == 2 for r in info)
    engine.close()
    quick.close()


def test_a_dead_replica_is_skipped_taken_out_and_the_request_served(
    two_upstreams: list[str],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    clock = [0.0]
    engine = RemoteEngine(
        [dead, f"{two_upstreams[0]}/v1"],
        "fake-a",
        policy=ReplicaPolicy(failure_threshold=2, backoff_s=5.0),
    )
    engine.replicas.clock = lambda: clock[0]
    for _ in range(4):  # every request is answered, by the live replica
        assert collect(engine.stream(chat())).text == "Fake answer to: hello"
    down, up = engine.replicas.info()
    assert not down["healthy"] and down["failures"] == 2 and "cannot connect" in down["last_error"]
    assert down["requests"] == 2  # taken out after two failures: not tried again
    assert up["healthy"] and up["requests"] == 4
    # No health checks here: once the backoff has passed the dead one gets a trial request,
    # fails it, and its backoff doubles.
    clock[0] = 6.0
    assert collect(engine.stream(chat())).text == "Fake answer to: hello"
    down = engine.replicas.info()[0]
    assert down["requests"] == 3 and down["retry_in_s"] == 10.0
    # Embeddings fail over the same way.
    clock[0] = 20.0
    vectors, _ = engine.embed(["a", "b"])
    assert len(vectors) == 2


def test_a_4xx_of_the_request_is_not_retried_elsewhere(two_upstreams: list[str]) -> None:
    engine = RemoteEngine([f"{b}/v1" for b in two_upstreams], "fake-a", n_ctx=8)
    request = GenerationRequest(
        messages=[Message(role="user", content="x " * 5000)], max_tokens=10
    )
    with pytest.raises(UpstreamError) as info:
        collect(engine.stream(request))
    assert info.value.status == 400
    assert sum(r["requests"] for r in engine.replicas.info()) == 1  # one attempt, no failover
    assert all(r["failures"] == 0 for r in engine.replicas.info())


# -- failover when a replica process dies, through a running edgelm front -----------------


@pytest.fixture
def spawn_upstream(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        (home / "models.toml").write_text(tomli_w.dumps({"model": UPSTREAM_MODELS}))
        proc, base = spawn_service(home, port=port)
        procs.append(proc)
        return proc, base

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stream_chat(base: str, model: str, out: dict[str, Any]) -> None:
    """One streamed chat through the front: its text so far, and the error event if any."""
    out.update(text="", error=None)
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
        out["status"] = response.status_code
        if response.status_code != 200:
            response.read()
            out["error"] = response.json()["error"]
            return
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = event["error"]
                continue
            for choice in event.get("choices", []):
                out["text"] += choice["delta"].get("content") or ""


def test_failover_when_a_replica_is_killed(settings, isolated_home, serve_app, spawn_upstream):
    (proc_a, base_a), (proc_b, base_b) = spawn_upstream("a"), spawn_upstream("b")
    url_a, url_b = f"{base_a}/v1", f"{base_b}/v1"
    settings.remote.health_interval_s = 0.2
    settings.remote.health_timeout_s = 1.0
    settings.remote.failure_threshold = 2
    settings.remote.backoff_s = 0.3
    settings.remote.backoff_max_s = 1.0
    runner = CliRunner()
    for name, model in (("big", "fake-slow"), ("patient", "fake-wait")):
        result = runner.invoke(
            cli,
            ["model", "add", name, "--upstream", model, "--upstream", url_a, "--upstream", url_b],
            catch_exceptions=False,
        )
        assert result.exit_code == 0 and "2 replicas" in result.output, result.output
    front = serve_app(create_app(settings, catalog=Catalog.load(isolated_home)))

    # Four streams of 'big' spread two and two and start; two 'patient' requests wait for
    # their first token, one on each replica.
    results: list[dict[str, Any]] = [{} for _ in range(6)]

    def run(i: int, model: str) -> None:
        stream_chat(front, model, results[i])

    threads = [threading.Thread(target=run, args=(i, "big")) for i in range(4)]
    threads += [threading.Thread(target=run, args=(i, "patient")) for i in (4, 5)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and sum(len(r.get("text", "")) > 0 for r in results[:4]) < 4:
        time.sleep(0.05)
    while time.monotonic() < deadline and [
        r["in_flight"] for r in _replicas(front, "patient").values()
    ] != [1, 1]:
        time.sleep(0.05)
    time.sleep(0.3)  # the 'patient' requests are sent and wait for their first token
    assert all(r.get("text") == "" for r in results[4:])
    proc_a.kill()  # SIGKILL mid-run: two streams on it have started, one request has not
    proc_a.wait()

    # Requests sent after the kill are all answered (the first ones may still pick A).
    after = [httpx.post(
        f"{front}/v1/chat/completions",
        json={"model": "big", "messages": [{"role": "user", "content": "go"}]},
        timeout=30,
    ) for _ in range(3)]
    for thread in threads:
        thread.join(timeout=30)
    assert [r.status_code for r in after] == [200, 200, 200]
    assert all(r.json()["choices"][0]["message"]["content"] == SLOW_REPLY for r in after)

    streams = results[:4]
    cut = [r for r in streams if r["error"]]
    whole = [r for r in streams if not r["error"]]
    # The two started on A end with an error event naming A, after a prefix of the answer
    # (never restarted elsewhere, which would repeat text); the two on B finish intact.
    assert len(cut) == 2 and len(whole) == 2
    for r in cut:
        assert url_a in r["error"]["message"] and "started streaming" in r["error"]["message"]
        assert r["text"] and SLOW_REPLY.startswith(r["text"]) and r["text"] != SLOW_REPLY
    assert [r["text"] for r in whole] == [SLOW_REPLY, SLOW_REPLY]
    # The request waiting for its first token on A moved to B: both answered, once.
    assert [(r["text"], r["error"]) for r in results[4:]] == [("waited", None)] * 2

    # A is out of rotation, and /metrics says so per replica.
    replicas = _replicas(front, "big")
    assert not replicas[url_a]["healthy"] and replicas[url_b]["healthy"]
    assert replicas[url_a]["failures"] >= 2 and replicas[url_a]["in_flight"] == 0
    metrics = httpx.get(f"{front}/metrics").text
    assert f'edgelm_replica_healthy{{model="big",replica="{url_a}"}} 0.0' in metrics
    assert f'edgelm_replica_healthy{{model="big",replica="{url_b}"}} 1.0' in metrics
    for name in ("requests_total", "failures_total", "in_flight", "first_chunk_seconds_count"):
        assert f'edgelm_replica_{name}{{model="big",replica="{url_a}"}}' in metrics
    served_by_b = upstream_requests(base_b, "fake-slow")

    # A comes back on the same port: a health check puts it back, and it serves again.
    proc_a, _ = spawn_upstream("a", port=int(base_a.rsplit(":", 1)[1]))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not _replicas(front, "big")[url_a]["healthy"]:
        time.sleep(0.1)
    assert _replicas(front, "big")[url_a]["healthy"]
    for _ in range(2):
        answer = httpx.post(
            f"{front}/v1/chat/completions",
            json={"model": "big", "messages": [{"role": "user", "content": "go"}]},
            timeout=30,
        )
        assert answer.status_code == 200
    assert upstream_requests(base_a, "fake-slow") == 1  # the new A process served one
    assert upstream_requests(base_b, "fake-slow") == served_by_b + 1

    # Every replica down: a clear OpenAI-style error listing each one and why.
    for proc in (proc_a, proc_b):
        proc.kill()
        proc.wait()
    failed = httpx.post(
        f"{front}/v1/chat/completions",
        json={"model": "big", "messages": [{"role": "user", "content": "go"}]},
        timeout=30,
    )
    assert failed.status_code in (502, 503)
    error = failed.json()["error"]
    assert url_a in error["message"] and url_b in error["message"]
    assert error["code"] in ("all_replicas_failed", "no_replica_available")
    assert "cannot connect" in error["message"] or "taken out" in error["message"]


def _replicas(front: str, model: str) -> dict[str, dict[str, Any]]:
    loaded = httpx.get(f"{front}/openai/status", timeout=5).json()["loaded"]
    info = next((m for m in loaded if m["id"] == model), None)  # None: not loaded yet
    return {r["url"]: r for r in info["runtime"]["replicas"]} if info else {}


def test_model_add_forms(isolated_home: Path) -> None:
    runner = CliRunner()

    def add(*args: str):
        return runner.invoke(cli, ["model", "add", *args], catch_exceptions=False)

    assert add("one", "--engine", "remote", "--base-url", "http://h:8000/v1").exit_code == 0
    assert add("two", "--upstream", "http://h:8000/v1", "--upstream", "m7b").exit_code == 0
    assert add("three", "--base-url", "http://a/v1", "--upstream", "http://b/v1#other").exit_code == 0
    catalog = Catalog.load(isolated_home)
    one, two, three = (catalog.resolve(n) for n in ("one", "two", "three"))
    assert one.options == {"base_url": "http://h:8000/v1"} and one.engine == "remote"
    assert two.options == {"base_url": "http://h:8000/v1"} and two.upstream_model == "m7b"
    assert three.options == {"replicas": ["http://a/v1", "http://b/v1#other"]}
    engine = RemoteEngine.from_entry(three, load_settings(), None)
    assert [(r.url, r.model) for r in engine.replicas.replicas] == [
        ("http://a/v1", "three"),
        ("http://b/v1", "other"),
    ]
    engine.close()
    refused = add("four", "--engine", "fake", "--upstream", "http://a/v1")
    assert refused.exit_code != 0 and "remote models" in refused.output
    assert add("five", "--upstream", "a", "--upstream", "b").exit_code != 0
