"""Limits, overload, timeouts, cancellation, CORS and /metrics, over real HTTP where it matters."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from edgelm.catalog import Catalog
from edgelm.server.app import create_app
from tests.unit.conftest import fake_entry

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def slow_catalog(isolated_home) -> Catalog:
    return Catalog(
        [
            fake_entry("single", single_stream=True, reply="w " * 10, token_delay_s=0.03),
            fake_entry("crawl", reply="w " * 40, token_delay_s=0.05),
            fake_entry("crawl-on-loop", reply="w " * 40, token_delay_s=0.05, on_loop=True),
            fake_entry("fake-a"),
        ],
        user_file=isolated_home / "models.toml",
    )


def test_body_limit(settings, catalog) -> None:
    settings.service.max_body_bytes = 2048
    with TestClient(create_app(settings, catalog=catalog)) as client:
        big = {"model": "fake-a", "messages": [{"role": "user", "content": "x" * 5000}]}
        response = client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield b'{"model": "fake-a", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        response = client.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert client.post(
            "/v1/chat/completions", json={"model": "fake-a", "messages": MSG}
        ).is_success


def test_message_count_limit(settings, catalog) -> None:
    settings.service.max_messages = 3
    with TestClient(create_app(settings, catalog=catalog)) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "fake-a", "messages": MSG * 4}
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("model", ["crawl", "crawl-on-loop"])
def test_generation_timeout(settings, slow_catalog, model: str) -> None:
    settings.service.request_timeout_s = 0.3
    with TestClient(create_app(settings, catalog=slow_catalog)) as client:
        response = client.post("/v1/chat/completions", json={"model": model, "messages": MSG})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "generation_timeout"
        payload = {"model": model, "messages": MSG, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=payload) as stream:
            text = stream.read().decode()
        assert "generation_timeout" in text and text.rstrip().endswith("data: [DONE]")
        loaded = client.get("/openai/loadedmodels").json()
        assert loaded[0]["cancelled"] == 2
        assert client.post(
            "/v1/chat/completions", json={"model": "fake-a", "messages": MSG}
        ).is_success


def test_overload_answers_503_with_retry_after(settings, slow_catalog, serve_app) -> None:
    settings.service.max_queue = 1
    base = serve_app(create_app(settings, catalog=slow_catalog))

    def call(_: int) -> httpx.Response:
        return httpx.post(
            f"{base}/v1/chat/completions", json={"model": "single", "messages": MSG}, timeout=30
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        responses = list(pool.map(call, range(5)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 503 in codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    # the openai client honours Retry-After and gets through once the queue drains
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=5)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(
            pool.map(
                lambda _: client.chat.completions.create(model="single", messages=MSG), range(4)
            )
        )
    assert all(a.choices[0].message.content for a in answers)


@pytest.mark.parametrize("model", ["crawl", "crawl-on-loop"])
def test_client_disconnect_stops_generation(settings, slow_catalog, serve_app, model) -> None:
    base = serve_app(create_app(settings, catalog=slow_catalog))
    payload = {"model": model, "messages": MSG, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=30) as response:
        for line in response.iter_lines():
            if '"content":"w ' in line:
                break  # leave after the first token
    deadline = time.monotonic() + 5
    info = {}
    while time.monotonic() < deadline:
        info = next(m for m in httpx.get(f"{base}/openai/loadedmodels").json() if m["id"] == model)
        if info["active"] == 0 and info["cancelled"] == 1:
            break
        time.sleep(0.05)
    assert info["active"] == 0 and info["cancelled"] == 1
    metrics = httpx.get(f"{base}/metrics").text
    assert f'edgelm_generations_total{{finish="cancelled",model="{model}"}} 1.0' in metrics


def test_metrics_exposition(settings, catalog) -> None:
    with TestClient(create_app(settings, catalog=catalog)) as client:
        client.post("/v1/chat/completions", json={"model": "fake-a", "messages": MSG})
        client.post("/v1/chat/completions", json={"model": "nope", "messages": MSG})
        client.get("/v1/no/such/route")
        text = client.get("/metrics").text
    assert 'edgelm_http_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'edgelm_http_requests_total{route="/v1/chat/completions",status="404"} 1.0' in text
    assert 'route="unmatched"' in text
    assert 'edgelm_ttft_seconds_bucket{le="0.01",model="fake-a"}' in text
    assert 'edgelm_completion_tokens_total{model="fake-a"} 4.0' in text
    assert "edgelm_loaded_models 1.0" in text
    assert 'edgelm_queue_depth{model="fake-a"} 0.0' in text
    assert "edgelm_process_resident_memory_bytes" in text


def test_metrics_need_the_key_when_one_is_set(settings, catalog) -> None:
    settings.service.api_key = "k"
    with TestClient(create_app(settings, catalog=catalog)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_cors_allow_list(settings, catalog) -> None:
    with TestClient(create_app(settings, catalog=catalog)) as client:
        headers = {"Origin": "http://localhost:5273", "Access-Control-Request-Method": "POST"}
        ok = client.options("/v1/chat/completions", headers=headers)
        assert ok.headers["access-control-allow-origin"] == "http://localhost:5273"
        evil = client.options(
            "/v1/chat/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in evil.headers
        simple = client.get("/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in simple.headers
