"""The one decoder of the OpenAI wire format: lines into events, events into deltas, error
bodies into errors; and the client's async stream and embeddings that RAG adapts."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from edgelm.client import EdgelmClient, ServiceError, ServiceUnavailable, is_up
from edgelm.openai_stream import (
    ChatResult,
    MalformedEvent,
    error_fields,
    error_from_body,
    first_choice,
    in_band_error,
    read_stream,
    sse_data,
    sse_events,
    tool_call_deltas,
)
from edgelm.rag.embed import ServiceEmbedder
from edgelm.rag.local import HttpGenerator
from tests.unit.conftest import free_port


def test_sse_lines() -> None:
    assert sse_data('data: {"a": 1}') == {"a": 1}
    assert sse_data("data:[DONE]") is True
    for skipped in (": keep-alive", "event: message", "id: 3", "", "data:", "data: [1, 2]"):
        assert sse_data(skipped) is None
    with pytest.raises(MalformedEvent, match=r"malformed event: \{oops"):
        sse_data("data: {oops")
    lines = ['data: {"n": 1}', ": ping", 'data: {"n": 2}', "data: [DONE]", 'data: {"n": 3}']
    assert list(sse_events(lines)) == [{"n": 1}, {"n": 2}, None]  # nothing after [DONE]
    assert list(sse_events(lines[:3])) == [{"n": 1}, {"n": 2}]  # cut short: no None


def test_first_choice_of_chat_and_completions_events() -> None:
    chat = {
        "choices": [
            {"index": 1, "delta": {"content": "other choice"}},
            {
                "index": 0,
                "delta": {"content": "Hi"},
                "finish_reason": "length",
                "logprobs": {
                    "content": [
                        {
                            "token": "Hi",
                            "logprob": -0.5,
                            "top_logprobs": [{"token": "Hi", "logprob": -0.5}],
                        },
                        {"token": "?", "logprob": None},
                    ]
                },
            },
        ]
    }
    delta = first_choice(chat)
    assert (delta.text, delta.finish_reason) == ("Hi", "length")
    assert [(lp.token, lp.logprob, lp.top) for lp in delta.logprobs] == [
        ("Hi", -0.5, [("Hi", -0.5)])
    ]
    completion = {
        "choices": [
            {
                "text": " once",
                "logprobs": {
                    "tokens": [" once"],
                    "token_logprobs": [-1.0],
                    "top_logprobs": [{" once": -1.0}],
                },
            }
        ]
    }
    delta = first_choice(completion)
    assert delta.text == " once" and delta.logprobs[0].bytes == list(b" once")
    assert first_choice({"choices": []}).text == "" and first_choice({}).finish_reason is None


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        ({"error": {"message": "m", "type": "invalid_request_error", "code": "c"}}, "m", "c"),
        ({"error": "ollama says no"}, "ollama says no", None),
        (
            {"message": "vllm says no", "code": 400},
            "vllm says no",
            None,
        ),  # a non-str code is dropped
        ({"detail": [{"loc": ["body"], "msg": "bad"}]}, '[{"loc": ["body"], "msg": "bad"}]', None),
        (["not", "an", "object"], None, None),
    ],
)
def test_error_body_shapes(body: object, message: str | None, code: str | None) -> None:
    fields = error_fields(body)
    assert (fields.message, fields.code) == (message, code)


def test_errors_from_bodies_and_streams() -> None:
    err = error_from_body(404, json.dumps({"error": {"message": "no model", "param": "model"}}))
    assert (err.status, err.message, err.param, err.type) == (
        404,
        "no model",
        "model",
        "server_error",
    )
    assert (
        error_from_body(502, "<html>bad gateway</html>").message
        == "HTTP 502: <html>bad gateway</html>"
    )
    assert error_from_body(500, '{"error": {"code": "x"}}').message.startswith("HTTP 500")
    assert in_band_error({"message": "slow", "type": "rate_limit_error"}).status == 429
    assert in_band_error({"type": "upstream_error"}).message == "the stream failed"
    assert (in_band_error("plain").status, in_band_error("plain").message) == (500, "plain")
    assert in_band_error(42).message == "42"


def test_read_stream_maps_a_malformed_event_to_a_502() -> None:
    events = read_stream(
        ['data: {"choices": [{"delta": {"content": "a"}}]}', "data: {x"],
        ChatResult(),
        time.perf_counter(),
    )
    assert next(events).text == "a"
    with pytest.raises(ServiceError) as info:
        next(events)
    assert info.value.status == 502 and "malformed event: {x" in info.value.message


# -- the client's async stream and embeddings, and the RAG adapters over them ---------------


def _sse(*events: object) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events
    )


def _delta(text: str, **extra: object) -> dict:
    return {"model": "fake-slm", "choices": [{"index": 0, "delta": {"content": text}, **extra}]}


def test_async_stream_and_the_rag_generator_over_it() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        lp = {"content": [{"token": "A", "logprob": -0.25}]}
        body = _sse(
            _delta("A", logprobs=lp),
            _delta("B", finish_reason="length"),
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
            "[DONE]",
        )
        return httpx.Response(200, content=body, headers={"x-edgelm-route": "draft"})

    client = EdgelmClient("http://svc", api_key="k", async_transport=httpx.MockTransport(handler))

    async def collect() -> list:
        return [e async for e in client.astream_chat("slm", "hi", max_tokens=3)]

    events = asyncio.run(collect())
    assert [e.text for e in events[:-1]] == ["A", "B"]
    assert [lp.logprob for lp in events[0].logprobs] == [-0.25]
    result = events[-1].result
    assert result is not None and result.text == "AB" and result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens, result.model) == (7, 2, "fake-slm")
    assert result.headers == {"x-edgelm-route": "draft"} and result.ttft_s is not None
    assert seen[0].headers["authorization"] == "Bearer k"
    assert json.loads(seen[0].content)["stream_options"] == {"include_usage": True}

    generator = HttpGenerator(client)
    messages = [{"role": "user", "content": "q"}]

    async def chunks() -> list:
        return [c async for c in generator.stream("slm", messages, 5, 0.0, logprobs=True)]

    out = asyncio.run(chunks())
    assert [c.text for c in out] == ["A", "B", ""]
    assert out[0].logprobs[0].logprob == -0.25 and out[-1].finish_reason == "length"
    assert (out[-1].prompt_tokens, out[-1].completion_tokens) == (7, 2)
    assert generator.canonical("slm") == "fake-slm"  # the name the service answered with
    body = json.loads(seen[-1].content)
    assert (body["max_tokens"], body["temperature"], body["logprobs"]) == (5, 0.0, True)


def test_async_stream_errors() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["model"] == "missing":
            return httpx.Response(
                404, json={"error": {"message": "no such model", "code": "model_not_found"}}
            )
        return httpx.Response(
            200, content=_sse(_delta("x"), {"error": {"message": "died", "type": "upstream_error"}})
        )

    client = EdgelmClient("http://svc", async_transport=httpx.MockTransport(handler))

    async def drain(model: str) -> list[str]:
        got: list[str] = []
        async for event in client.astream_chat(model, "hi"):
            got.append(event.text)
        return got

    with pytest.raises(ServiceError) as info:
        asyncio.run(drain("missing"))
    assert (info.value.status, info.value.code) == (404, "model_not_found")
    with pytest.raises(ServiceError) as info:
        asyncio.run(drain("m"))
    assert info.value.status == 502 and info.value.message == "died"
    down = EdgelmClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServiceUnavailable, match="edgelm service start"):
        asyncio.run(_drain(down))


async def _drain(client: EdgelmClient) -> None:
    async for _ in client.astream_chat("m", "hi"):
        pass


def test_embeddings_in_batches_and_the_rag_embedder() -> None:
    batches: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        body = json.loads(request.content)
        if body["model"] == "nope":
            return httpx.Response(
                404, json={"error": {"message": "no embedding model", "param": "model"}}
            )
        batches.append(body["input"])
        rows = [{"index": i, "embedding": [float(len(t))]} for i, t in enumerate(body["input"])]
        return httpx.Response(200, json={"data": rows[::-1]})  # out of order on purpose

    client = EdgelmClient("http://svc", transport=httpx.MockTransport(handler))
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    assert client.embed("e", texts, batch=2) == [[1.0], [2.0], [3.0], [4.0], [5.0]]
    assert batches == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]
    embedder = ServiceEmbedder("e", client, batch=4)
    assert embedder.name == "e" and embedder.embed(texts) == [[1.0], [2.0], [3.0], [4.0], [5.0]]
    with pytest.raises(ServiceError) as info:
        client.embed("nope", ["x"])
    assert (info.value.status, info.value.param) == (404, "model")
    assert client.is_up()
    embedder.close()
    assert client.http.is_closed


def test_one_health_check() -> None:
    assert not is_up(f"http://127.0.0.1:{free_port()}", timeout=0.5)
    sick = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503)))
    assert not is_up("http://svc", http=sick)
    fine = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    assert is_up("http://svc/", http=fine)


@pytest.mark.parametrize(
    "item",
    [{"index": None}, {"index": "x"}, {"index": -1}, {"index": 10**9}, {"index": 0, "function": "f"}],
)
def test_a_malformed_tool_call_fragment_is_the_senders_fault(item: dict) -> None:
    """A bad index or function from an upstream is a malformed event (a 502 at the readers),
    never an IndexError or a list of a billion calls."""
    with pytest.raises(MalformedEvent):
        tool_call_deltas([item])
    ok = tool_call_deltas([{"index": 1, "id": "c", "function": {"name": "f", "arguments": "{"}}])
    assert (ok[0].index, ok[0].id, ok[0].name, ok[0].arguments) == (1, "c", "f", "{")


class _ProbeClient:
    """An EdgelmClient stand-in whose embed() fails as a service would."""

    def __init__(self, error: Exception):
        self.error = error
        self.closed = False

    def embed(self, *_args: object) -> list[list[float]]:
        raise self.error

    def close(self) -> None:
        self.closed = True


def test_the_default_embedders_probe_falls_back_only_when_it_is_not_set_up() -> None:
    """No service or no such model: lexical only, with a note. A refused key or a model that
    cannot embed: the user sees the error instead of a silently lexical-only collection."""
    from edgelm.rag.embed import service_embedder

    for error in (ServiceUnavailable("down"), ServiceError(404, "not downloaded")):
        probe = _ProbeClient(error)
        embedder, note = service_embedder("minilm", False, lambda p=probe: p)  # type: ignore[misc]
        assert embedder is None and "lexical only" in note and probe.closed
    for error in (ServiceError(401, "missing or invalid API key"), ServiceError(400, "no")):
        probe = _ProbeClient(error)
        with pytest.raises(ServiceError):
            service_embedder("minilm", False, lambda p=probe: p)  # type: ignore[misc]
        assert probe.closed
