"""The hybrid router over the real tiny model (SmolLM2-135M as both SLM and LLM) through a real
uvicorn service and the ``openai`` client: real logprobs drive the decision, and both routes
stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from openai import OpenAI

from edgelm.server.app import create_app
from edgelm.server.hybrid_model import HybridModels
from tests.integration.conftest import TINY, settings_for
from tests.service_process import free_port

PAIR = f"hybrid:{TINY}+{TINY}"


@pytest.fixture(scope="module")
def hybrid_service(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    settings = settings_for(tmp_path_factory.mktemp("hybrid-home"), **{"compute.n_ctx": 2048})
    app = create_app(settings, virtual=[HybridModels()])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{base}/health", timeout=0.5)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(timeout=30)


def ask(base: str, policy: str, stream: bool = False):  # type: ignore[no-untyped-def]
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model=f"{PAIR}@{policy}",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        seed=0,
    )


def test_real_draft_carries_logprobs_and_refine_runs(hybrid_service: str) -> None:
    kept = ask(hybrid_service, "never")
    ext = kept.parse().model_extra["edgelm"]
    assert kept.headers["x-edgelm-route"] == "draft"
    mean, low = ext["draft_logprob"]["mean"], ext["draft_logprob"]["min"]
    assert mean is not None and low <= mean <= 0  # the llama.cpp engine's cheap logprobs
    assert ext["draft"]["completion_tokens"] > 0 and ext["draft"]["total_ms"] > 0

    # a threshold just above the measured mean must refine; just below must not
    refined = ask(hybrid_service, f"confidence={mean + 0.01}")
    assert refined.headers["x-edgelm-route"] == "refine"
    rext = refined.parse().model_extra["edgelm"]
    assert rext["refine"]["completion_tokens"] > 0
    assert rext["draft_logprob"]["mean"] == pytest.approx(mean, abs=1e-3)  # same draft
    assert refined.parse().choices[0].message.content.strip()
    assert ask(hybrid_service, f"confidence={mean - 0.01}").headers["x-edgelm-route"] == "draft"


def test_real_streaming_refine(hybrid_service: str) -> None:
    client = OpenAI(base_url=f"{hybrid_service}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=f"{PAIR}@always",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    ext = chunks[-1].model_extra["edgelm"]
    assert ext["route"] == "refine" and ext["complete"]
    assert ext["ttft_ms"] >= ext["draft"]["total_ms"]  # the draft came first
