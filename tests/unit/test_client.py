"""The script client against a real service on the fake engine, and its error mapping."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from edgelm.chat import ChatSession, describe
from edgelm.client import EdgelmClient, ServiceError, ServiceUnavailable
from edgelm.server.app import create_app
from tests.unit.conftest import free_port


@pytest.fixture
def service(settings, catalog, serve_app) -> str:
    return serve_app(create_app(settings, catalog=catalog))


def test_chat_once_measures_latency(service: str) -> None:
    client = EdgelmClient(service)
    result = client.chat_once("fake-slow", "hi")
    assert result.text == "one two three four five six"
    assert result.finish_reason == "stop"
    assert result.usage == {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": result.prompt_tokens + 6,
    }
    assert result.prepare_s >= 0 and result.ttfb_s is not None
    assert result.ttft_s >= result.ttfb_s
    # the fake engine sleeps 20 ms between tokens: only lower bounds on time are safe
    assert len(result.itl_s) == 5 and sum(result.itl_s) >= 4 * 0.02
    assert result.total_s >= result.ttft_s + 5 * 0.02 - 0.01
    # the rate is derived from the measured times, not from the engine's nominal 20 ms
    assert result.decode_tokens_per_s == pytest.approx(5 / (result.total_s - result.ttft_s))
    assert result.server_timings["predicted_n"] == 6


def test_stream_chat_yields_text_then_result(service: str) -> None:
    events = list(EdgelmClient(service).stream_chat("fake-a", [{"role": "user", "content": "yo"}]))
    assert "".join(e.text for e in events) == "Fake answer to: yo"
    assert events[-1].result is not None and events[-1].result.text == "Fake answer to: yo"


def test_management_calls(service: str) -> None:
    client = EdgelmClient(service)
    assert client.is_up() and client.health()["status"] == "ok"
    assert "fake-a" in [m["id"] for m in client.models()]
    assert client.load("fake-a")["loaded"] and client.loaded()[0]["id"] == "fake-a"
    assert client.status()["loaded"][0]["id"] == "fake-a"
    assert client.unload("fake-a")["unloaded"]


def test_errors(service: str) -> None:
    client = EdgelmClient(service)
    with pytest.raises(ServiceError) as info:
        client.chat_once("nope", "hi")
    assert info.value.status == 404 and "fake-a" in info.value.message
    with pytest.raises(ServiceError) as info:
        client.chat_once("fake-a", "hi", temperature=9)
    assert info.value.status == 400 and info.value.param == "temperature"
    down = EdgelmClient(f"http://127.0.0.1:{free_port()}")
    assert not down.is_up()
    with pytest.raises(ServiceUnavailable, match="edgelm service start"):
        down.chat_once("fake-a", "hi")


def test_client_reads_endpoint_from_settings(service: str, monkeypatch) -> None:
    monkeypatch.setenv("EDGELM_ENDPOINT", service)
    from edgelm.client import chat_once

    assert chat_once("fake-a", "x").text == "Fake answer to: x"


def test_in_band_stream_error_is_raised() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        text = 'data: {"error": {"message": "boom", "type": "server_error"}}\n\ndata: [DONE]\n\n'
        return httpx.Response(200, text=text)

    client = EdgelmClient("http://x", transport=httpx.MockTransport(handler))
    with pytest.raises(ServiceError, match="boom"):
        client.chat_once("m", "hi")


def test_chat_session_keeps_history(service: str) -> None:
    session = ChatSession(EdgelmClient(service), "fake-a", system="be brief")
    assert "".join(session.ask("first")) == "Fake answer to: first"
    assert "".join(session.ask("second")) == "Fake answer to: second"
    assert [m["role"] for m in session.messages()] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert "TTFT" in describe(session.last)
    session.reset()
    assert session.messages() == [{"role": "system", "content": "be brief"}]
    bad = ChatSession(EdgelmClient(service), "missing")
    with pytest.raises(ServiceError):
        list(bad.ask("x"))
    assert bad.history == []  # a failed turn is not kept


# -- scripted streams (httpx.MockTransport): exact parsing and the latency decomposition ----


class _Scripted(httpx.SyncByteStream):
    """SSE events sent after given delays, like a model producing tokens."""

    def __init__(self, steps: list[tuple[float, object]]) -> None:
        self.steps = steps

    def __iter__(self):
        for delay, event in self.steps:
            time.sleep(delay)
            data = event if isinstance(event, str) else json.dumps(event)
            yield f"data: {data}\n\n".encode()


def _chunk(content: str | None = None, finish: str | None = None, **extra) -> dict:
    delta = {} if content is None else {"content": content}
    return {
        "object": "chat.completion.chunk",
        "model": "served-name",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


TIMINGS = {"ttft_ms": 12.5, "predicted_n": 3, "predicted_per_second": 40.0}


def test_scripted_stream_latency_decomposition() -> None:
    seen: list[httpx.Request] = []
    steps = [
        (0.0, _chunk("")),  # the role-only opening chunk is not a token
        (0.10, _chunk("A")),
        (0.05, _chunk("B")),
        (0.05, _chunk("C")),
        (0.0, _chunk(finish="stop")),
        (
            0.0,
            {
                "choices": [],
                "model": "served-name",
                "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
                "timings": TIMINGS,
            },
        ),
        (0.0, "[DONE]"),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=_Scripted(steps))

    client = EdgelmClient("http://svc/", api_key="key-1", transport=httpx.MockTransport(handler))
    events = list(client.stream_chat("m", "hello", max_tokens=5, temperature=None))
    assert [e.text for e in events[:-1]] == ["A", "B", "C"]
    result = events[-1].result
    assert result is not None and result.text == "ABC"
    assert result.model == "served-name" and result.finish_reason == "stop"
    assert result.usage == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert not result.usage_estimated and result.server_timings == TIMINGS
    # ordering always holds; durations only have safe lower bounds on a busy machine
    assert 0 <= result.prepare_s <= result.ttfb_s <= result.ttft_s <= result.total_s
    assert result.send_s == pytest.approx(result.ttfb_s - result.prepare_s)
    assert result.ttft_s >= 0.10
    assert len(result.itl_s) == 2 and all(gap >= 0.045 for gap in result.itl_s)
    assert result.total_s >= result.ttft_s + 0.09
    assert 0 < result.decode_tokens_per_s <= 2 / 0.09
    report = result.to_dict()
    assert report["usage"]["total_tokens"] == 14 and report["itl_s"] == result.itl_s
    assert report["decode_tokens_per_s"] == result.decode_tokens_per_s

    (sent,) = seen
    assert str(sent.url) == "http://svc/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer key-1"
    body = json.loads(sent.content)
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_stream_without_usage_counts_deltas_and_keeps_caller_options() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        steps = [(0.0, _chunk("x")), (0.0, _chunk("y", finish="length")), (0.0, "[DONE]")]
        return httpx.Response(200, stream=_Scripted(steps))

    client = EdgelmClient("http://svc", transport=httpx.MockTransport(handler))
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    result = client.chat_once("m", messages, stream=False, stream_options={"other": 1})
    assert result.text == "xy" and result.finish_reason == "length"
    assert result.completion_tokens == 2 and result.usage_estimated
    assert result.server_timings is None and result.ttft_s is not None
    assert seen[0]["messages"] == messages and seen[0]["stream"] is True
    assert seen[0]["stream_options"] == {"other": 1, "include_usage": True}


def test_service_errors_are_mapped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            error = {
                "message": "model 'x' is not in the catalog",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
            return httpx.Response(404, json={"error": error})
        if request.url.path == "/openai/status":
            return httpx.Response(502, text="<html>bad gateway</html>")
        return httpx.Response(200, text="not json")

    client = EdgelmClient("http://svc", transport=httpx.MockTransport(handler))
    with pytest.raises(ServiceError) as info:
        client.chat_once("x", "hi")
    err = info.value
    assert (err.status, err.code, err.param, err.type) == (
        404,
        "model_not_found",
        "model",
        "invalid_request_error",
    )
    assert err.to_dict()["error"]["message"] == "model 'x' is not in the catalog"
    with pytest.raises(ServiceError) as info:
        client.status()
    assert info.value.status == 502 and "bad gateway" in info.value.message
    with pytest.raises(ServiceError, match="did not answer JSON"):
        client.health()


def test_in_band_error_keeps_its_kind() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        steps = [
            (0.0, _chunk("par")),
            (0.0, {"error": {"message": "upstream died", "type": "upstream_error", "code": "x"}}),
            (0.0, "[DONE]"),
        ]
        return httpx.Response(200, stream=_Scripted(steps))

    client = EdgelmClient("http://svc", transport=httpx.MockTransport(handler))
    seen: list[str] = []
    with pytest.raises(ServiceError) as info:
        for event in client.stream_chat("m", "hi"):
            seen.append(event.text)
    assert seen == ["par"]  # what arrived before the failure was delivered
    assert info.value.status == 502 and info.value.code == "x"


def test_connection_lost_mid_stream() -> None:
    class Broken(httpx.SyncByteStream):
        def __iter__(self):
            yield f"data: {json.dumps(_chunk('a'))}\n\n".encode()
            raise httpx.ReadError("connection reset by peer")

    client = EdgelmClient(
        "http://svc", transport=httpx.MockTransport(lambda r: httpx.Response(200, stream=Broken()))
    )
    with pytest.raises(ServiceUnavailable, match="connection reset"):
        client.chat_once("m", "hi")


def test_management_paths_and_quoting() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "a"}]})
        if request.url.path == "/openai/loadedmodels":
            return httpx.Response(200, json=[{"id": "a"}])
        return httpx.Response(200, json={"ok": True})

    with EdgelmClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        assert client.models() == [{"id": "a"}] and client.loaded() == [{"id": "a"}]
        client.load("org/model name")
        client.unload("a")
        client.status()
        assert client.is_up()
    assert seen == [
        "/v1/models",
        "/openai/loadedmodels",
        "/openai/load/org/model%20name",
        "/openai/unload/a",
        "/openai/status",
        "/health",
    ]


def test_closed_local_port_says_how_to_start_the_service() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    client = EdgelmClient(endpoint)
    for call in (client.health, client.models, lambda: client.chat_once("m", "hi")):
        with pytest.raises(ServiceUnavailable) as info:
            call()
        assert endpoint in info.value.message and "edgelm service start" in info.value.message
        assert info.value.status == 503


def test_default_client_uses_settings_endpoint_and_key(monkeypatch) -> None:
    monkeypatch.setenv("EDGELM_ENDPOINT", "http://elsewhere:9999/")
    monkeypatch.setenv("EDGELM_CLIENT__API_KEY", "from-env")
    client = EdgelmClient()
    assert client.endpoint == "http://elsewhere:9999"
    assert client.http.headers["authorization"] == "Bearer from-env"
