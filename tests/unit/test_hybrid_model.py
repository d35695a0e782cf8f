"""``model="hybrid..."`` through the service with the ``openai`` client, on fake engines whose
SLM and LLM give different scripted answers, so every route is visible in the text."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.server.app import create_app
from edgelm.server.hybrid_model import HybridModels, HybridName, name_for
from edgelm.settings import Settings

SURE = "Paris is the capital of France."
BIG = "The capital of France is Paris, on the Seine."
LOOP = "The capital of France is a city in France. "


@pytest.fixture
def hybrid_catalog(isolated_home: Path) -> Catalog:
    def fake(alias: str, tier: str, **options: object) -> CatalogEntry:
        return CatalogEntry(alias=alias, engine="fake", tier=tier, options=options)  # type: ignore[arg-type]

    entries = [
        fake("small", "slm", reply=SURE, logprobs=[-0.1, -0.2]),
        fake("small-unsure", "custom", reply="Lyon, probably.", logprobs=[-2.5, -3.0]),
        fake("small-idk", "custom", reply="I don't know."),
        fake("small-slow", "custom", reply=SURE, logprobs=[-0.1], token_delay_s=0.02),
        fake("small-loop", "custom", reply=LOOP * 50, logprobs=[-0.05]),
        fake("small-markers", "custom", reply="[1]", logprobs=[-0.05]),
        fake("big", "llm", reply=BIG),
        fake(
            "big-slow",
            "custom",
            reply=" ".join(f"w{i}" for i in range(200)),
            token_delay_s=0.02,
        ),
    ]
    return Catalog(entries, user_file=isolated_home / "models.toml")


@pytest.fixture
def app(settings: Settings, hybrid_catalog: Catalog):  # type: ignore[no-untyped-def]
    return create_app(settings, catalog=hybrid_catalog, virtual=[HybridModels()])


@pytest.fixture
def base(app, serve_app) -> str:  # type: ignore[no-untyped-def]
    return serve_app(app)


def oai(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_names_parse_and_build() -> None:
    assert HybridName.parse("hybrid") == HybridName()
    assert HybridName.parse("hybrid:a+b@length=5") == HybridName("a", "b", "length=5")
    assert HybridName.parse("hybrid@never") == HybridName(None, None, "never")
    assert (
        name_for("a", "b", "insufficient,confidence=-1") == "hybrid:a+b@insufficient,confidence=-1"
    )


def test_draft_route_non_streaming(base: str) -> None:
    raw = oai(base).chat.completions.with_raw_response.create(model="hybrid", messages=MSG)
    assert raw.headers["x-edgelm-route"] == "draft"
    assert "confidence" in raw.headers["x-edgelm-reason"]
    completion = raw.parse()
    assert completion.model == "hybrid"
    assert completion.choices[0].message.content == SURE
    ext = completion.model_extra["edgelm"]
    assert ext["route"] == "draft" and ext["slm"] == "small" and ext["llm"] == "big"
    assert ext["draft"]["completion_tokens"] == 6 and ext["direct"] is None
    assert ext["draft_logprob"]["mean"] == pytest.approx(-0.15, abs=0.01)
    assert ext["tokens"]["llm"] == {"prompt": 0, "completion": 0}
    assert ext["cost"]["local"] > 0 and ext["cost"]["cloud_equivalent"]
    assert ext["complete"] is True
    # usage is the visible answer's
    assert completion.usage.completion_tokens == 6


def test_draft_route_timings_are_the_slms_not_the_replays(base: str) -> None:
    """The draft reaches the client in one burst; ``timings`` must still show how fast the SLM
    produced it (a replay-time decode rate read in the tens of thousands of tokens/s)."""
    completion = oai(base).chat.completions.create(
        model="hybrid:small-slow+big@never", messages=MSG
    )
    timings = completion.model_extra["timings"]
    ext = completion.model_extra["edgelm"]
    assert ext["route"] == "draft"
    # 6 tokens, 20 ms apart: at most 50 tokens/s after the first, whatever the machine.
    assert 5 < timings["predicted_per_second"] <= 51
    assert timings["ttft_ms"] <= ext["draft"]["total_ms"] + ext["draft"]["started_ms"]


def test_refine_calls_the_llm_with_question_and_draft(app, base: str) -> None:  # type: ignore[no-untyped-def]
    raw = oai(base).chat.completions.with_raw_response.create(
        model="hybrid:small-unsure+big@confidence=-1.0",
        messages=[{"role": "system", "content": "Be brief."}, *MSG],
    )
    completion = raw.parse()
    assert raw.headers["x-edgelm-route"] == "refine"
    assert completion.choices[0].message.content == BIG
    ext = completion.model_extra["edgelm"]
    assert ext["fired"] == "confidence"
    assert (
        ext["signals"][0]["value"] == pytest.approx(-2.75)
        and ext["signals"][0]["threshold"] == -1.0
    )
    assert ext["draft"]["text"] == "Lyon, probably."
    assert ext["refine"]["model"] == "big" and ext["refine"]["completion_tokens"] == 9
    assert ext["tokens"]["slm"]["completion"] == 2 and ext["tokens"]["llm"]["completion"] == 9
    # the LLM really got the question and the draft, after the original system prompt
    sent = app.state.edgelm.pool.models["big"].engine.requests[-1]
    assert sent.messages[0].text() == "Be brief."
    prompt = sent.messages[-1].text()
    assert "What is the capital of France?" in prompt and "Lyon, probably." in prompt
    assert len(sent.messages) == 2


def test_insufficient_goes_direct_with_original_question(app, base: str) -> None:  # type: ignore[no-untyped-def]
    raw = oai(base).chat.completions.with_raw_response.create(
        model="hybrid:small-idk+big@insufficient", messages=MSG
    )
    assert raw.headers["x-edgelm-route"] == "direct"
    ext = raw.parse().model_extra["edgelm"]
    assert ext["direct"]["model"] == "big" and ext["draft"]["text"] == "I don't know."
    sent = app.state.edgelm.pool.models["big"].engine.requests[-1]
    assert sent.messages[-1].text() == MSG[0]["content"]


def test_keywords_skip_the_draft(app, base: str) -> None:  # type: ignore[no-untyped-def]
    raw = oai(base).chat.completions.with_raw_response.create(
        model="hybrid@keywords=capital", messages=MSG
    )
    assert raw.headers["x-edgelm-route"] == "direct"
    ext = raw.parse().model_extra["edgelm"]
    assert ext["draft"] is None and ext["tokens"]["slm"] == {"prompt": 0, "completion": 0}
    assert "small" not in app.state.edgelm.pool.models  # the SLM was never even loaded


def test_streaming_refine(base: str) -> None:
    client = oai(base)
    with client.chat.completions.with_streaming_response.create(
        model="hybrid:small-unsure+big@insufficient,confidence=-0.5",
        messages=MSG,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-edgelm-route"] == "refine"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == BIG
    tail = chunks[-1].model_extra
    assert tail["edgelm"]["route"] == "refine" and tail["edgelm"]["complete"]
    assert tail["edgelm"]["refine"]["total_ms"] is not None
    assert chunks[-1].usage.completion_tokens == 9


def test_default_policy_sends_an_unsure_draft_straight_to_the_llm(base: str) -> None:
    stream = oai(base).chat.completions.create(
        model="hybrid:small-unsure+big", messages=MSG, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == BIG
    assert chunks[-1].model_extra["edgelm"]["route"] == "direct"


def test_streaming_draft(base: str) -> None:
    stream = oai(base).chat.completions.create(model="hybrid", messages=MSG, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SURE
    assert chunks[-1].model_extra["edgelm"]["route"] == "draft"


def test_errors_are_openai_shaped(base: str) -> None:
    client = httpx.Client(base_url=base)
    bad_model = client.post(
        "/v1/chat/completions", json={"model": "hybrid:nope+big", "messages": MSG}
    )
    assert bad_model.status_code == 404 and "nope" in bad_model.json()["error"]["message"]
    bad_policy = client.post(
        "/v1/chat/completions", json={"model": "hybrid@maybe", "messages": MSG}
    )
    assert bad_policy.status_code == 400 and bad_policy.json()["error"]["param"] == "policy"
    bad_pair = client.post("/v1/chat/completions", json={"model": "hybrid:small", "messages": MSG})
    assert bad_pair.status_code == 400
    completions = client.post("/v1/completions", json={"model": "hybrid", "prompt": "hi"})
    assert completions.status_code == 400


def test_listed_in_models(settings: Settings, hybrid_catalog: Catalog) -> None:
    with TestClient(create_app(settings, catalog=hybrid_catalog, virtual=[HybridModels()])) as c:
        card = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "hybrid")
        assert card["slm"] == "small" and card["llm"] == "big" and card["tier"] == "virtual"
        assert c.get("/v1/models/hybrid:small+big").json()["tier"] == "virtual"


def test_client_cancel_stops_the_llm(app, base: str) -> None:  # type: ignore[no-untyped-def]
    """The LLM refines 200 tokens at 20 ms each (4 s); leaving after 3 must stop it at once."""
    body = {"model": "hybrid:small+big-slow@always", "messages": MSG, "stream": True}
    started = time.monotonic()
    with (
        httpx.Client(base_url=base, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.headers["x-edgelm-route"] == "refine"
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data:") and '"content":"w' in line
            if seen >= 3:
                break
    pool = app.state.edgelm.pool
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        loaded = pool.models["big-slow"]
        if loaded.cancelled and loaded.active == 0:
            break
        time.sleep(0.02)
    loaded = pool.models["big-slow"]
    assert loaded.cancelled == 1 and loaded.active == 0
    assert time.monotonic() - started < 3.0
    assert pool.models["small"].active == 0


def test_a_looping_draft_is_cut_early_and_goes_to_the_llm(app, base: str) -> None:  # type: ignore[no-untyped-def]
    """The SLM would repeat one sentence 50 times (450 tokens); a 'degenerate' policy stops it
    once the loop is certain and the LLM answers the question afresh, by default too; a
    'tokens=24' budget cuts it sooner still."""
    per_copy = len(LOOP.split())
    default = oai(base).chat.completions.create(
        model="hybrid:small-loop+big", messages=MSG, max_tokens=600
    ).model_extra["edgelm"]
    assert default["route"] == "direct" and default["fired"] == "degenerate"
    assert default["tokens"]["slm"]["completion"] <= 3 * per_copy + 2
    budget = oai(base).chat.completions.create(
        model="hybrid:small-loop+big@degenerate,tokens=24", messages=MSG, max_tokens=600
    ).model_extra["edgelm"]
    assert budget["route"] == "direct" and budget["tokens"]["slm"]["completion"] == 24
    raw = oai(base).chat.completions.with_raw_response.create(
        model="hybrid:small-loop+big@degenerate,insufficient", messages=MSG, max_tokens=600
    )
    assert raw.headers["x-edgelm-route"] == "direct"
    assert raw.headers["x-edgelm-reason"].startswith("degenerate: loop")
    body = raw.parse()
    assert body.choices[0].message.content == BIG
    ext = body.model_extra["edgelm"]
    assert ext["fired"] == "degenerate" and ext["draft_cut"].startswith("loop")
    assert ext["draft"]["finish_reason"] == "cancelled"
    assert ext["tokens"]["slm"]["completion"] <= 3 * per_copy + 2  # not 450 tokens
    degenerate = next(s for s in ext["signals"] if s["policy"] == "degenerate")
    assert degenerate["fired"] and degenerate["value"] == "loop"
    assert app.state.edgelm.pool.models["small-loop"].cancelled == 3


def test_never_keeps_a_looping_draft_uncut(base: str) -> None:
    """``never`` is the SLM-only baseline: no check, no cut."""
    body = oai(base).chat.completions.create(
        model="hybrid:small-loop+big@never", messages=MSG, max_tokens=600
    )
    ext = body.model_extra["edgelm"]
    assert ext["route"] == "draft" and ext["draft_cut"] is None
    assert ext["tokens"]["slm"]["completion"] == 50 * len(LOOP.split())


def test_a_marker_only_draft_escalates(base: str) -> None:
    raw = oai(base).chat.completions.with_raw_response.create(
        model="hybrid:small-markers+big@degenerate", messages=MSG
    )
    assert raw.headers["x-edgelm-route"] == "direct"
    assert "marker-only" in raw.headers["x-edgelm-reason"]
    assert raw.parse().choices[0].message.content == BIG


def test_a_cut_draft_never_reaches_the_user_even_when_the_policy_would_keep_it(base: str) -> None:
    """``degenerate&length=100000`` watches loops, but its AllOf verdict alone would keep the
    draft (length never fires): the cut, looping draft must still go to the LLM, never to the
    client with ``finish_reason="stop"``."""
    stream = oai(base).chat.completions.create(
        model="hybrid:small-loop+big@degenerate&length=100000",
        messages=MSG,
        stream=True,
        max_tokens=600,
    )
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == BIG
    ext = chunks[-1].model_extra["edgelm"]
    assert ext["draft_cut"].startswith("loop")
    assert ext["route"] == "direct" and ext["fired"] == "degenerate"
    assert "draft cut" in ext["reason"]
