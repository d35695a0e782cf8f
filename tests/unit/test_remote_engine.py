"""The remote engine, fronting a real upstream (another edgelm service on the fake engine)."""

from __future__ import annotations

import itertools
import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.engines.base import collect
from edgelm.engines.remote import RemoteEngine
from edgelm.errors import ConfigError, UpstreamError
from edgelm.server.app import create_app
from edgelm.types import GenerationRequest, Message, ResponseFormat
from tests.unit.conftest import free_port


def chat(text: str, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[Message(role="user", content=text)], **kw)


@pytest.fixture
def upstream(settings, catalog, serve_app) -> str:
    return serve_app(create_app(settings, catalog=catalog)) + "/v1"


def test_stream_and_usage_from_upstream(upstream: str) -> None:
    engine = RemoteEngine(upstream, "fake-a")
    chunks = list(engine.stream(chat("hello")))
    result = collect(iter(chunks))
    assert result.text == "Fake answer to: hello"
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == 4 and result.usage.prompt_tokens > 0
    assert all(a.t <= b.t for a, b in itertools.pairwise(chunks))


def test_completions_stop_and_length(upstream: str) -> None:
    engine = RemoteEngine(upstream, "fake-a")
    result = collect(engine.stream(GenerationRequest(prompt="Once", max_tokens=3)))
    assert result.text == " fake continuation " and result.finish_reason == "length"
    stopped = collect(engine.stream(chat("hello", stop=["to:"])))
    assert stopped.text == "Fake answer "


def test_logprobs_json_and_embeddings(upstream: str) -> None:
    engine = RemoteEngine(upstream, "fake-a")
    result = collect(engine.stream(chat("x", logprobs=True, top_logprobs=2)))
    assert len(result.logprobs) == 4 and all(len(lp["top"]) == 2 for lp in result.logprobs)
    comp = collect(engine.stream(GenerationRequest(prompt="x", logprobs=True, top_logprobs=1)))
    assert comp.logprobs and comp.logprobs[0]["logprob"] <= 0
    js = collect(engine.stream(chat("x", response_format=ResponseFormat(type="json_object"))))
    assert json.loads(js.text) == {"answer": "fake"}
    vectors, used = engine.embed(["a b", "c"])
    assert len(vectors) == 2 and len(vectors[0]) == 64 and used == 3


def test_errors_keep_their_meaning(upstream: str) -> None:
    with pytest.raises(UpstreamError) as info:
        collect(RemoteEngine(upstream, "no-such").stream(chat("x")))
    assert info.value.status == 404 and "no-such" in info.value.message
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UpstreamError) as info:
        collect(RemoteEngine(dead, "m").stream(chat("x")))
    assert info.value.status == 502 and dead in info.value.message


def test_bearer_key_and_stream_options_retry() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append({"auth": request.headers.get("authorization"), **body})
        if "stream_options" in body:
            return httpx.Response(400, json={"error": {"message": "unknown field stream_options"}})
        events = [
            {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
        ]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    engine = RemoteEngine("http://up/v1", "m", api_key="k", transport=httpx.MockTransport(handler))
    result = collect(engine.stream(chat("x")))
    assert result.text == "hi there" and result.usage.completion_tokens == 2
    assert [s["auth"] for s in seen] == ["Bearer k", "Bearer k"]
    assert "stream_options" in seen[0] and "stream_options" not in seen[1]


def test_cancel_stops_reading(upstream: str, catalog) -> None:
    engine = RemoteEngine(upstream, "fake-slow")
    cancel = threading.Event()
    chunks = []
    for chunk in engine.stream(chat("x"), cancel):
        chunks.append(chunk)
        cancel.set()
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) == 2


def test_remote_model_served_by_the_service(upstream: str, settings, isolated_home) -> None:
    """A remote catalog entry makes edgelm a front for the upstream, same API."""
    front = Catalog(
        [
            CatalogEntry(
                alias="big",
                engine="remote",
                upstream_model="fake-b",
                options={"base_url": upstream},
            )
        ],
        user_file=isolated_home / "models.toml",
    )
    with TestClient(create_app(settings, catalog=front)) as client:
        body = client.post(
            "/v1/chat/completions",
            json={"model": "big", "messages": [{"role": "user", "content": "q"}]},
        ).json()
        assert body["choices"][0]["message"]["content"] == "Fake answer to: q"
        assert body["model"] == "big"
    missing = Catalog([CatalogEntry(alias="nowhere", engine="remote")])
    with TestClient(create_app(settings, catalog=missing)) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "nowhere", "messages": [{"role": "user", "content": "q"}]},
        )
        assert (
            response.status_code == 400 and "remote.base_url" in response.json()["error"]["message"]
        )


# -- the same engine against scripted upstreams (httpx.MockTransport) ----------------------
# These pin the wire format: what is sent, and how each upstream dialect is read back.


def _sse(*events: dict, done: bool = True) -> bytes:
    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return (text + ("data: [DONE]\n\n" if done else "")).encode()


def _delta(text: str | None = None, finish: str | None = None, **extra) -> dict:
    delta = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}


def _mock(handler, model: str = "m", **kw) -> RemoteEngine:
    return RemoteEngine("http://up/v1", model, transport=httpx.MockTransport(handler), **kw)


def _event_stream(body: bytes) -> httpx.Response:
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


def test_mock_chat_sends_openai_body_and_reads_usage_chunk() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _event_stream(
            _sse(
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                _delta("Hel"),
                _delta("lo"),
                _delta(finish="stop"),
                {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}},
            )
        )

    engine = _mock(handler, api_key="sk-test")
    request = chat(
        "hi",
        max_tokens=9,
        temperature=0.2,
        top_p=0.5,
        seed=3,
        stop=["\n\n"],
        presence_penalty=0.1,
        frequency_penalty=0.2,
        response_format=ResponseFormat(type="json_object"),
    )
    chunks = list(engine.stream(request))
    result = collect(iter(chunks))
    assert result.text == "Hello" and result.finish_reason == "stop"
    # the upstream's own count wins over the two content chunks seen
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, 3)
    assert all(a.t <= b.t for a, b in itertools.pairwise(chunks))
    assert result.timing.ttft_s is not None

    (sent,) = seen
    assert sent.method == "POST" and str(sent.url) == "http://up/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    body = json.loads(sent.content)
    assert body["model"] == "m" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["max_tokens"] == 9 and body["temperature"] == 0.2 and body["top_p"] == 0.5
    assert body["seed"] == 3 and body["stop"] == ["\n\n"]
    assert body["presence_penalty"] == 0.1 and body["frequency_penalty"] == 0.2
    assert body["response_format"] == {"type": "json_object"}
    assert "top_k" not in body and "repeat_penalty" not in body  # strict upstreams reject them
    assert "logprobs" not in body


def test_mock_stream_without_usage_counts_content_chunks() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return _event_stream(_sse(_delta("a"), _delta(" b"), _delta(" c", finish="length")))

    result = collect(_mock(handler).stream(chat("one two three four five six seven eight")))
    assert result.text == "a b c" and result.finish_reason == "length"
    assert result.usage.completion_tokens == 3
    assert result.usage.prompt_tokens > 0  # estimated from the prompt text


def test_mock_completions_and_their_logprobs_shape() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        seen.append(json.loads(request.content))
        lp = {
            "tokens": [" once"],
            "token_logprobs": [-0.25],
            "top_logprobs": [{" once": -0.25, " twice": -1.5}],
            "text_offset": [0],
        }
        return _event_stream(
            _sse(
                {"choices": [{"index": 0, "text": " once", "logprobs": lp, "finish_reason": None}]},
                {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
                {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}},
            )
        )

    result = collect(
        _mock(handler).stream(GenerationRequest(prompt="Upon", logprobs=True, top_logprobs=2))
    )
    assert seen[0]["prompt"] == "Upon" and "messages" not in seen[0]
    assert seen[0]["logprobs"] == 2  # the completions API takes a count
    assert result.text == " once" and result.usage.completion_tokens == 1
    (lp,) = result.logprobs
    assert lp["token"] == " once" and lp["logprob"] == -0.25
    assert lp["top"] == [(" once", -0.25), (" twice", -1.5)]


def test_ignore_eos_is_sent_only_when_asked() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return _event_stream(_sse(_delta("Hi"), _delta(finish="length")))

    list(_mock(handler).stream(chat("x", ignore_eos=True)))
    list(_mock(handler).stream(chat("x")))
    assert seen[0]["ignore_eos"] is True and "ignore_eos" not in seen[1]


def test_mock_chat_logprobs_map_to_token_logprobs() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        content = [
            {
                "token": "Hi",
                "logprob": -0.5,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                    {"token": "Hey", "logprob": -1.25, "bytes": [72, 101, 121]},
                ],
            }
        ]
        return _event_stream(
            _sse(_delta("Hi", logprobs={"content": content}), _delta(finish="stop"))
        )

    chunks = list(_mock(handler).stream(chat("x", logprobs=True, top_logprobs=2)))
    assert seen[0]["logprobs"] is True and seen[0]["top_logprobs"] == 2
    (lp,) = chunks[0].logprobs
    assert (lp.token, lp.logprob, lp.bytes) == ("Hi", -0.5, [72, 105])
    assert lp.top == [("Hi", -0.5), ("Hey", -1.25)]


@pytest.mark.parametrize(
    ("status", "payload", "expected_status", "words"),
    [
        (401, {"error": {"message": "Incorrect API key provided"}}, 502, ["401", "API key"]),
        (403, {"error": "forbidden"}, 502, ["403", "forbidden"]),
        (404, {"error": {"message": "model 'm' not found", "code": "model_not_found"}}, 404, []),
        (404, {"error": "model 'm' not found, try pulling it first"}, 404, ["pulling"]),
        (400, {"object": "error", "message": "max_tokens is too large", "code": 400}, 400, []),
        (429, {"error": {"message": "slow down"}}, 429, ["slow down"]),
        (500, {"detail": "CUDA out of memory"}, 502, ["500", "CUDA out of memory"]),
        (503, None, 502, ["503", "overloaded"]),
    ],
)
def test_mock_upstream_errors_keep_status_and_message(
    status: int, payload: dict | None, expected_status: int, words: list[str]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if payload is None:
            return httpx.Response(status, text="overloaded")
        return httpx.Response(status, json=payload)

    with pytest.raises(UpstreamError) as info:
        collect(_mock(handler).stream(chat("x")))
    err = info.value
    assert err.status == expected_status and err.upstream_status == status
    assert "http://up/v1/chat/completions" in err.message
    for word in words:
        assert word in err.message
    if status == 404:
        assert "not found" in err.message and err.to_dict()["error"]["type"] != "upstream_error"
    if status == 404 and isinstance(payload["error"], dict):
        assert err.code == "model_not_found"


def test_mock_transport_failures() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(UpstreamError) as info:
        collect(_mock(refused).stream(chat("x")))
    assert info.value.status == 502 and "http://up/v1" in info.value.message
    assert "Connection refused" in info.value.message

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(UpstreamError) as info:
        collect(_mock(slow).stream(chat("x")))
    assert info.value.status == 504 and "timed out" in info.value.message


def test_mock_closed_local_port_is_connection_error() -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    engine = RemoteEngine(dead, "m")
    with pytest.raises(UpstreamError) as info:
        collect(engine.stream(chat("x")))
    assert info.value.status == 502 and dead in info.value.message
    with pytest.raises(UpstreamError):
        engine.embed(["x"])


def test_mock_in_band_error_and_truncated_stream() -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        return _event_stream(_sse(_delta("a"), {"error": {"message": "engine crashed"}}))

    with pytest.raises(UpstreamError, match="engine crashed"):
        collect(_mock(failing).stream(chat("x")))

    def cut(request: httpx.Request) -> httpx.Response:
        return _event_stream(_sse(_delta("a"), done=False))

    with pytest.raises(UpstreamError, match="closed the stream"):
        collect(_mock(cut).stream(chat("x")))

    def garbage(request: httpx.Request) -> httpx.Response:
        return _event_stream(b"data: {not json\n\n")

    with pytest.raises(UpstreamError, match="malformed"):
        collect(_mock(garbage).stream(chat("x")))


def test_mock_stop_is_enforced_even_if_the_upstream_ignores_it() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return _event_stream(_sse(_delta("one "), _delta("two EN"), _delta("D three")))

    result = collect(_mock(handler).stream(chat("x", stop=["END"])))
    assert result.text == "one two " and result.finish_reason == "stop"

    # a held-back prefix of a stop string is released when the stream just ends
    def tail(request: httpx.Request) -> httpx.Response:
        return _event_stream(_sse(_delta("ends with E"), _delta(finish="stop")))

    assert collect(_mock(tail).stream(chat("x", stop=["END"]))).text == "ends with E"


class _TrackedStream(httpx.SyncByteStream):
    """An endless upstream stream that records whether edgelm closed it."""

    def __init__(self) -> None:
        self.closed = False
        self.sent = 0

    def __iter__(self):
        while not self.closed and self.sent < 1000:
            self.sent += 1
            yield _sse(_delta(f"t{self.sent} "), done=False)

    def close(self) -> None:
        self.closed = True


def test_mock_cancel_closes_the_upstream_response() -> None:
    upstream = _TrackedStream()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=upstream, headers={"content-type": "text/event-stream"})

    cancel = threading.Event()
    chunks = []
    for chunk in _mock(handler).stream(chat("x"), cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert [c.text for c in chunks[:3]] == ["t1 ", "t2 ", "t3 "]
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) == 4
    assert upstream.closed and upstream.sent < 10

    # a consumer that simply stops iterating closes it too
    upstream2 = _TrackedStream()
    engine = _mock(lambda r: httpx.Response(200, stream=upstream2))
    stream = engine.stream(chat("x"))
    next(stream)
    stream.close()
    assert upstream2.closed


def test_mock_embeddings() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if json.loads(request.content)["model"] == "missing":
            return httpx.Response(404, json={"error": {"message": "no such model"}})
        return httpx.Response(
            200,
            json={
                "object": "list",
                "data": [
                    {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
                    {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]},
                ],
                "usage": {"prompt_tokens": 5, "total_tokens": 5},
            },
        )

    vectors, used = _mock(handler, api_key="k").embed(["first", "second"])
    assert vectors == [[1.0, 0.0], [0.0, 1.0]] and used == 5  # ordered by index
    assert str(seen[0].url) == "http://up/v1/embeddings"
    assert json.loads(seen[0].content) == {"model": "m", "input": ["first", "second"]}
    assert seen[0].headers["authorization"] == "Bearer k"
    with pytest.raises(UpstreamError) as info:
        _mock(handler, model="missing").embed(["x"])
    assert info.value.status == 404 and "no such model" in info.value.message


def test_from_entry_prefers_entry_options_over_settings(settings) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _event_stream(_sse(_delta("ok", finish="stop")))

    transport = httpx.MockTransport(handler)
    settings.remote.base_url = "http://settings-host/v1"
    settings.remote.api_key = "settings-key"
    own = CatalogEntry(
        alias="cloud",
        engine="remote",
        upstream_model="gpt-x",
        context_length=32768,
        options={"base_url": "http://entry-host/v1/", "api_key": "entry-key"},
    )
    engine = RemoteEngine.from_entry(own, settings, None, transport=transport)
    assert (engine.model_id, engine.model, engine.n_ctx) == ("cloud", "gpt-x", 32768)
    collect(engine.stream(chat("x")))
    assert str(seen[-1].url) == "http://entry-host/v1/chat/completions"
    assert seen[-1].headers["authorization"] == "Bearer entry-key"
    assert json.loads(seen[-1].content)["model"] == "gpt-x"

    fallback = CatalogEntry(alias="local-vllm", engine="remote")
    engine = RemoteEngine.from_entry(fallback, settings, None, transport=transport)
    collect(engine.stream(chat("x")))
    assert str(seen[-1].url) == "http://settings-host/v1/chat/completions"
    assert seen[-1].headers["authorization"] == "Bearer settings-key"
    assert json.loads(seen[-1].content)["model"] == "local-vllm"  # the alias by default

    settings.remote.base_url = None
    with pytest.raises(ConfigError, match=r"remote\.base_url"):
        RemoteEngine.from_entry(fallback, settings, None)


def test_capabilities_are_declared() -> None:
    engine = RemoteEngine("http://up/v1", "m")
    assert engine.supports_logprobs and engine.supports_embeddings and engine.supports_grammar
    assert engine.supports_seed and engine.concurrent_streams and engine.memory_bytes == 0
