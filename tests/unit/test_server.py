"""Every route of the service against the fake engine, including the failure paths."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgelm.engines.fake import fake_tokens


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(
    response, status: int, *, param: str | None = None, code: str | None = None
):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


CHAT = {"model": "fake-a", "messages": [{"role": "user", "content": "hello there"}]}


def test_health_and_models(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["loaded"] == []
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    # Catalog models first, then the virtual families (RAG over inline documents always exists).
    assert ids[:4] == ["fake-a", "fake-slow", "fake-broken", "fake-b"]
    assert "rag:inline" in ids[4:]
    assert all(m["object"] == "model" and m["cached"] for m in models["data"])
    assert client.get("/v1/models/bee").json()["id"] == "fake-b"


def test_chat_completion_non_streaming(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Fake answer to: hello there"}
    assert choice["finish_reason"] == "stop"
    completion_tokens = len(fake_tokens("Fake answer to: hello there"))
    usage = body["usage"]
    assert usage["completion_tokens"] == completion_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + completion_tokens
    assert body["timings"]["predicted_n"] == completion_tokens
    assert body["timings"]["ttft_ms"] is not None


def test_chat_streaming_with_usage(client: TestClient) -> None:
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Fake answer to: hello there"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(fake_tokens(text))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_without_usage_has_no_usage(client: TestClient) -> None:
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        events = sse_events(r.read().decode())
    assert all("usage" not in e for e in events if isinstance(e, dict))


def test_completions_and_stream(client: TestClient) -> None:
    body = client.post(
        "/v1/completions", json={"model": "fake-a", "prompt": "Once upon", "max_tokens": 3}
    ).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " fake continuation "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    with client.stream(
        "POST", "/v1/completions", json={"model": "fake-a", "prompt": "Once upon", "stream": True}
    ) as r:
        events = sse_events(r.read().decode())
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == " fake continuation of: Once upon"


def test_stop_sequences_are_never_emitted(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json={**CHAT, "stop": ["to:"]}).json()
    assert body["choices"][0]["message"]["content"] == "Fake answer "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_logprobs(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}
    ).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == fake_tokens("Fake answer to: hello there")
    assert all(c["logprob"] <= 0 and len(c["top_logprobs"]) == 2 for c in content)
    comp = client.post(
        "/v1/completions", json={"model": "fake-a", "prompt": "x", "logprobs": 1}
    ).json()
    lp = comp["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["text_offset"][0] == 0


def test_embeddings_float_and_base64(client: TestClient) -> None:
    body = client.post(
        "/v1/embeddings", json={"model": "fake-a", "input": ["red apple", "green apple"]}
    ).json()
    assert body["object"] == "list" and len(body["data"]) == 2
    vec = body["data"][0]["embedding"]
    assert len(vec) == 64 and body["usage"]["prompt_tokens"] == 4
    b64 = client.post(
        "/v1/embeddings",
        json={"model": "fake-a", "input": "red apple", "encoding_format": "base64"},
    ).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(vec, abs=1e-6)


def test_json_mode(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions", json={**CHAT, "response_format": {"type": "json_object"}}
    ).json()
    assert json.loads(body["choices"][0]["message"]["content"]) == {"answer": "fake"}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": CHAT["messages"]}, "model"),
        ({"model": "fake-a"}, "messages"),
        ({"model": "fake-a", "messages": []}, "messages"),
        ({"model": "fake-a", "messages": "hi"}, "messages"),
        ({**CHAT, "temperature": 5}, "temperature"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": -3}, "max_tokens"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "n": 17}, "n"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "logit_bias": {"50256": -100}}, "logit_bias"),
        ({**CHAT, "functions": [{"name": "f"}]}, "functions"),
        ({**CHAT, "function_call": "auto"}, "function_call"),
        ({**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({**CHAT, "modalities": ["text", "audio"]}, "modalities"),
        ({**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
        ({**CHAT, "verbosity": "low"}, "verbosity"),
        ({**CHAT, "web_search_options": {}}, "web_search_options"),
        ({**CHAT, "tool_choice": "required"}, "tool_choice"),
        ({**CHAT, "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
        (
            {
                **CHAT,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({**CHAT, "messages": [{"role": "tool", "content": "4"}]}, "messages[0].tool_call_id"),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "video", "v": 1}]}]},
            "messages[0].content[0].type",
        ),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({**CHAT, "top_logprobs": 3}, "top_logprobs"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_bad_chat_requests_are_400(client: TestClient, payload: dict, param: str) -> None:
    response = client.post("/v1/chat/completions", json=payload)
    error = assert_openai_error(response, 400)
    assert error["param"] == param or (error["param"] or "").startswith(param)


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert "JSON" in error["message"]


def test_unknown_model_lists_aliases(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    error = assert_openai_error(response, 404, param="model", code="model_not_found")
    assert "fake-a" in error["message"] and "fake-b" in error["message"]


def test_prompt_longer_than_context(client: TestClient) -> None:
    long = "word " * 3000
    response = client.post(
        "/v1/chat/completions",
        json={"model": "fake-a", "messages": [{"role": "user", "content": long}], "stream": True},
    )
    assert_openai_error(response, 400, code="context_length_exceeded")
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100000})
    assert_openai_error(response, 400, code="context_length_exceeded")


def test_failed_load_leaves_service_up(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "fake-broken"})
    error = assert_openai_error(response, 503, code="model_load_failed")
    assert "weights are corrupt" in error["message"]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_unknown_route_is_openai_error(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nothing"), 404)


def test_load_unload_and_status(client: TestClient) -> None:
    loaded = client.get("/openai/load/fake-b").json()
    assert loaded["loaded"] and loaded["id"] == "fake-b"
    assert [m["id"] for m in client.get("/openai/loadedmodels").json()] == ["fake-b"]
    assert client.get("/v1/models/fake-b").json()["loaded"] is True
    status = client.get("/openai/status").json()
    assert status["loaded"][0]["id"] == "fake-b" and status["pool"]["loads"] == 1
    assert client.get("/openai/unload/bee").json() == {"id": "fake-b", "unloaded": True}
    assert client.get("/openai/loadedmodels").json() == []
    assert client.get("/openai/unload/fake-b").json()["unloaded"] is False
    catalog = client.get("/foundry/list").json()
    assert {c["id"] for c in catalog} >= {"fake-a", "fake-b"}
    assert client.get("/openai/models").json() == ["fake-a", "fake-slow", "fake-broken", "fake-b"]


def test_request_id_header(client: TestClient) -> None:
    response = client.get("/health", headers={"x-request-id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    assert client.get("/health").headers["x-request-id"]


def test_playground_is_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "edgelm playground" in page.text
    assert client.get("/static/playground.js").status_code == 200


def test_api_key(settings, catalog) -> None:
    from edgelm.server.app import create_app

    settings.service.api_key = "s3cret"
    with TestClient(create_app(settings, catalog=catalog)) as c:
        assert_openai_error(c.get("/v1/models"), 401, code="invalid_api_key")
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        ok = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200
