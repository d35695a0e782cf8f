"""Crash isolation: a model's engine runs in a runner process (the fake engine, made
isolated and scripted to segfault, abort or be killed), and its crash ends only that
model's requests, with a clear error, while the service stays up and restarts the runner.

Each runner costs an interpreter start, so each test reuses its runner across the
assertions that belong together.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from edgelm.bench.resources import ProcessTree, tree_rss
from edgelm.catalog import Catalog, CatalogEntry
from edgelm.engines.isolated import IsolatedEngine
from edgelm.engines.runner_protocol import describe_exit, pack_error, unpack_error
from edgelm.errors import ContextLengthExceeded, EngineCrashed, ModelLoadError
from edgelm.pool import LoadedModel, ModelPool
from edgelm.server.app import create_app
from edgelm.settings import Settings, load_settings
from edgelm.types import GenerationRequest, Message

LONG_REPLY = " ".join(f"word{i}" for i in range(60))


def isolated(alias: str, **options: Any) -> CatalogEntry:
    return CatalogEntry(alias=alias, engine="fake", options={"isolated": True, **options})


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def runner_pid(http: TestClient | httpx.Client, alias: str) -> int:
    loaded = http.get("/openai/status").json()["loaded"]
    return next(m["runtime"]["runner_pid"] for m in loaded if m["id"] == alias)


def sse_events(lines: list[str]) -> list[Any]:
    return [
        line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
        for line in lines
        if line.startswith("data: ")
    ]


def runners() -> list[psutil.Process]:
    """Runner processes this test process started (its direct children): a service that
    another test module keeps running may have runners of its own."""
    found = []
    for p in psutil.Process().children():
        try:
            if "edgelm.engines.runner" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_segfault_ends_that_models_requests_only_and_the_next_request_restarts_it(
    settings: Settings, isolated_home: Path
) -> None:
    catalog = Catalog(
        [
            isolated("crashy", crash="segfault", crash_when="CRASH", crash_after_tokens=2),
            CatalogEntry(alias="bystander", engine="fake"),
        ]
    )
    app = create_app(settings, catalog=catalog)
    with TestClient(app) as http:
        ok = http.post("/v1/chat/completions", json={"model": "crashy", **chat("hello")})
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] == "Fake answer to: hello"
        first = runner_pid(http, "crashy")
        assert first != os.getpid() and psutil.pid_exists(first)

        # A stream that crashes the runner ends with an error event naming model and cause.
        with http.stream(
            "POST", "/v1/chat/completions", json={"model": "crashy", "stream": True, **chat("CRASH")}
        ) as response:
            assert response.status_code == 200
            events = sse_events(list(response.iter_lines()))
        text = "".join(
            e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict)
            and e.get("choices")
        )
        assert text == "Fake answer "  # the two tokens sent before the crash
        error = next(e["error"] for e in events if isinstance(e, dict) and "error" in e)
        assert error["code"] == "engine_crashed" and error["type"] == "server_error"
        assert "model 'crashy' stopped" in error["message"]
        assert "SIGSEGV (segmentation fault)" in error["message"]
        assert "the next request restarts it" in error["message"]
        assert events[-1] == "[DONE]"

        # The service is up, other models unaffected, and the next request gets a new runner.
        assert http.get("/health").status_code == 200
        other = http.post("/v1/chat/completions", json={"model": "bystander", **chat("hi")})
        assert other.status_code == 200
        again = http.post("/v1/chat/completions", json={"model": "crashy", **chat("again")})
        assert again.status_code == 200
        assert again.json()["choices"][0]["message"]["content"] == "Fake answer to: again"
        second = runner_pid(http, "crashy")
        assert second != first and not psutil.pid_exists(first)  # the dead one was reaped

        # A non-streaming request the runner dies under is a 5xx OpenAI-style body.
        crashed = http.post("/v1/chat/completions", json={"model": "crashy", **chat("CRASH")})
        assert crashed.status_code == 500
        body = crashed.json()["error"]
        assert body["code"] == "engine_crashed" and "'crashy'" in body["message"]
        assert set(body) == {"message", "type", "param", "code"}
        status = http.get("/openai/status").json()
        assert status["pool"]["runner_crashes"] == 2
        assert http.post(
            "/v1/chat/completions", json={"model": "crashy", **chat("fine")}
        ).status_code == 200
    assert runners() == []  # the service's shutdown closed its runner


def test_sigkill_mid_stream_on_the_runners_event_loop(
    settings: Settings, isolated_home: Path, serve_app: Any
) -> None:
    """A runner killed from outside (as the OOM killer does), through the real HTTP stack,
    with the engine streaming on the runner's event loop (as llama.cpp does)."""
    catalog = Catalog([isolated("victim", on_loop=True, token_delay_s=0.05, reply=LONG_REPLY)])
    base = serve_app(create_app(settings, catalog=catalog))
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/openai/load/victim").status_code == 200
        pid = runner_pid(http, "victim")
        events: list[Any] = []
        with http.stream(
            "POST", "/v1/chat/completions", json={"model": "victim", "stream": True, **chat("x")}
        ) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: ") and "word1" in line:
                    os.kill(pid, signal.SIGKILL)
                    break
            events = sse_events(list(lines))
        error = next(e["error"] for e in events if isinstance(e, dict) and "error" in e)
        assert error["code"] == "engine_crashed"
        assert "model 'victim' stopped: its runner was killed by SIGKILL" in error["message"]
        assert "out-of-memory" in error["message"]
        assert events[-1] == "[DONE]"
        after = http.post("/v1/chat/completions", json={"model": "victim", **chat("y")})
        assert after.status_code == 200
        assert after.json()["choices"][0]["message"]["content"] == LONG_REPLY
        assert runner_pid(http, "victim") != pid


def test_a_crash_while_loading_is_a_clear_error_and_the_service_stays_up(
    settings: Settings, isolated_home: Path
) -> None:
    catalog = Catalog(
        [
            isolated("corrupt", crash="abort", crash_on_load=True),
            isolated("refused", fail_load="weights are corrupt"),
        ]
    )
    with TestClient(create_app(settings, catalog=catalog)) as http:
        # A load the engine refuses keeps the engine's own error, class and status.
        refused = http.post("/v1/chat/completions", json={"model": "refused", **chat("hi")})
        assert refused.status_code == 503
        assert refused.json()["error"] == {
            "message": "could not load 'refused': weights are corrupt",
            "type": "server_error",
            "param": None,
            "code": "model_load_failed",
        }
        response = http.post("/v1/chat/completions", json={"model": "corrupt", **chat("hi")})
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "model_load_failed"
        assert "could not load 'corrupt'" in error["message"]
        assert "SIGABRT" in error["message"] and "while loading" in error["message"]
        assert http.get("/v1/models").status_code == 200
        assert http.get("/openai/status").json()["pool"]["load_failures"] == 2
    assert runners() == []


async def idle(loaded: LoadedModel) -> None:
    """Until the model's slots are all free (a stream's slot comes back when its producer
    has finished, just after the consumer saw its end)."""
    for _ in range(200):
        if loaded.active == 0:
            return
        await asyncio.sleep(0.01)


def test_one_runner_serves_streams_at_once_cancels_them_and_leaves_nothing_behind(
    isolated_home: Path,
) -> None:
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    catalog = Catalog([isolated("shared", streams=4, token_delay_s=0.02, reply=LONG_REPLY)])
    pool = ModelPool(settings, catalog)

    async def drain(content: str) -> str:
        request = GenerationRequest(messages=[Message(role="user", content=content)])
        return "".join([c.text async for c in pool.stream("shared", request)])

    async def main() -> None:
        loaded = await pool.get("shared")
        engine = loaded.engine
        assert isinstance(engine, IsolatedEngine)
        assert engine.concurrent_streams == 4 and engine.supports_logprobs
        assert engine.memory_bytes > 10 * 2**20  # the script's 10 MB plus the runner itself
        assert tree_rss() > psutil.Process().memory_info().rss + 10 * 2**20
        tree = ProcessTree(os.getpid())
        assert tree.sample()[0] >= tree_rss() // 2

        # Concurrent streams through one runner, each its own answer.
        started = time.perf_counter()
        answers = await asyncio.gather(*(drain(f"q{i}") for i in range(3)))
        assert answers == [LONG_REPLY] * 3
        assert time.perf_counter() - started < 3 * 60 * 0.02  # they ran together

        # A consumer that leaves stops the generation in the runner.
        request = GenerationRequest(messages=[Message(role="user", content="go")])
        stream = pool.stream("shared", request)
        assert (await anext(stream)).text
        assert engine.live_info()["open_streams"] == 1
        await stream.aclose()
        # The slot comes back once the runner has said the stream stopped, long before the
        # 60-token answer would have ended.
        await idle(loaded)
        assert loaded.cancelled == 1 and loaded.active == 0
        assert engine.live_info()["open_streams"] == 0  # stopped, not still decoding

        # The same stream for a caller in a thread (stream() rather than astream()).
        in_thread = await asyncio.to_thread(
            lambda: "".join(c.text for c in engine.stream(request))
        )
        assert in_thread == LONG_REPLY

        # Calls and errors cross the process boundary with their class and fields.
        vectors, used = engine.embed(["a b", "c"])
        assert len(vectors) == 2 and used == 3
        assert engine.count_tokens("one two three") == 3
        too_long = GenerationRequest(
            messages=[Message(role="user", content="hi")], max_tokens=10_000
        )
        with pytest.raises(ContextLengthExceeded) as caught:
            [c async for c in pool.stream("shared", too_long)]
        assert caught.value.status == 400 and caught.value.param == "messages"

        pid = engine.pid
        await idle(loaded)
        await pool.unload("shared")
        assert not psutil.pid_exists(pid)  # exited and reaped: no zombie
        assert runners() == []
        with pytest.raises(EngineCrashed, match="unloaded"):
            engine.count_tokens("x")
        await pool.close()

    asyncio.run(main())


def test_isolation_off_runs_the_engine_in_this_process(isolated_home: Path) -> None:
    settings = load_settings({"compute.isolation": "off"}, env={"EDGELM_HOME": str(isolated_home)})
    pool = ModelPool(settings, Catalog([isolated("here")]))

    async def main() -> None:
        loaded = await pool.get("here")
        assert not isinstance(loaded.engine, IsolatedEngine)
        assert runners() == []
        await pool.close()

    asyncio.run(main())


def test_a_crash_script_is_refused_outside_a_runner(isolated_home: Path) -> None:
    settings = load_settings({"compute.isolation": "off"}, env={"EDGELM_HOME": str(isolated_home)})
    pool = ModelPool(settings, Catalog([isolated("boom", crash="segfault")]))
    with pytest.raises(ModelLoadError, match="only in a runner"):
        asyncio.run(pool.get("boom"))


def test_how_a_runner_ended_is_said_plainly() -> None:
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV (segmentation fault)"
    assert describe_exit(-signal.SIGABRT).startswith("was killed by SIGABRT (aborted")
    killed = describe_exit(-signal.SIGKILL)
    assert killed.startswith("was killed by SIGKILL") and "out-of-memory killer" in killed
    assert describe_exit(3) == "exited with status 3"


def test_errors_keep_their_class_status_and_fields_across_the_boundary() -> None:
    from edgelm.errors import MissingExtra

    error = unpack_error(pack_error(ContextLengthExceeded("too long", param="messages")))
    assert isinstance(error, ContextLengthExceeded)
    assert (error.status, error.code, error.param, error.message) == (
        400,
        "context_length_exceeded",
        "messages",
        "too long",
    )
    extra = unpack_error(pack_error(MissingExtra("llama-cpp-python", "llamacpp")))
    assert isinstance(extra, MissingExtra) and extra.status == 501 and "llamacpp" in extra.message
    other = unpack_error(pack_error(KeyError("x")))
    assert isinstance(other, RuntimeError) and str(other) == "KeyError: 'x'"
