"""RAG through the service on the fake engine: virtual model, route, openai client, refusal,
citations, escalation, and the local (CLI / Chainlit) path."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.rag.answer import REFUSAL, SYSTEM_RULE, insufficient
from edgelm.rag.collection_db import RagStore
from edgelm.rag.evaluate import corpus_dir
from edgelm.rag.ingest import ingest_paths
from edgelm.rag.local import LocalRag
from edgelm.server import rag_routes as routes
from edgelm.server.app import create_app
from edgelm.server.rag_model import RagModels
from edgelm.settings import Settings

GOOD = "A full battery runs the mast for about 45 days [1]."
LLM_SAYS = "The larger model says about 45 days [1]."
QUESTION = "How long does a full mast battery last without sun?"
EXTENSION_KEYS = {
    "citations",
    "contexts",
    "refused",
    "escalated",
    "escalation_reason",
    "model",
    "checks",
}


def rag_catalog(
    home: Path,
    slm_reply: str = GOOD,
    llm_reply: str = LLM_SAYS,
    slm_logprobs: list[float] | None = None,
    token_delay_s: float = 0.0,
) -> Catalog:
    slm_options: dict = {"reply": slm_reply, "token_delay_s": token_delay_s}
    if slm_logprobs is not None:
        slm_options["logprobs"] = slm_logprobs
    return Catalog(
        [
            CatalogEntry(
                alias="fake-slm",
                aliases=["slm"],
                engine="fake",
                tier="slm",
                options=slm_options,
            ),
            CatalogEntry(
                alias="fake-llm",
                aliases=["llm"],
                engine="fake",
                tier="llm",
                options={"reply": llm_reply},
            ),
            CatalogEntry(alias="fake-embed", engine="fake", tier="tiny"),
        ],
        user_file=home / "models.toml",
    )


def make_app(settings: Settings, catalog: Catalog) -> FastAPI:
    app = create_app(settings, catalog=catalog, virtual=[RagModels()])
    app.include_router(routes.build_router())
    return app


@pytest.fixture
def demo(settings: Settings) -> Settings:
    with RagStore.open(settings.home, "demo") as store:
        ingest_paths(store, [corpus_dir()])
    return settings


def chat(client: TestClient, model: str, content, **extra):  # type: ignore[no-untyped-def]
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body)


def test_virtual_model_answers_with_citations(demo: Settings) -> None:
    catalog = rag_catalog(demo.home)
    with TestClient(make_app(demo, catalog)) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "rag:demo" in ids and "rag:inline" in ids
        body = chat(client, "rag:demo", QUESTION).json()
        assert body["model"] == "rag:demo"
        assert body["choices"][0]["message"]["content"] == GOOD
        ext = body["edgelm"]
        assert set(ext) == EXTENSION_KEYS
        assert ext["refused"] is False and ext["escalated"] is False and ext["model"] == "fake-slm"
        [cite] = ext["citations"]
        assert cite["n"] == 1 and cite["source"] == "power.txt"
        assert "45 days" in cite["text"] and cite["chunk_id"].startswith("power.txt#")
        assert "chars" in cite["location"]
        assert (
            ext["contexts"][0]["chunk_id"] == cite["chunk_id"] and ext["contexts"][0]["score"] > 0
        )
        # the prompt had the system rule and numbered context blocks
        engine = client.app.state.edgelm.pool.models["fake-slm"].engine
        sent = engine.requests[-1]
        assert sent.messages[0].text().startswith(SYSTEM_RULE)
        assert "[1] (source: power.txt" in sent.messages[-1].text()
        assert sent.max_tokens == 300 and sent.temperature == 0.3


def test_out_of_scope_question_is_refused_without_a_model(demo: Settings) -> None:
    with TestClient(make_app(demo, rag_catalog(demo.home))) as client:
        body = chat(client, "rag:demo", "What is the capital of France?").json()
        assert body["choices"][0]["message"]["content"] == REFUSAL
        assert body["edgelm"]["refused"] is True and body["edgelm"]["citations"] == []
        assert body["edgelm"]["model"] is None
        assert client.app.state.edgelm.pool.models == {}  # nothing was loaded


@pytest.mark.parametrize(
    "extra",
    [
        {"stop": ["\n"]},
        {"seed": 7},
        {"top_p": 0.5},
        {"response_format": {"type": "json_object"}},
        {"frequency_penalty": 0.5},
    ],
)
def test_sampling_fields_rag_cannot_honour_are_refused_by_name(demo: Settings, extra) -> None:  # type: ignore[no-untyped-def]
    """RAG writes answers with its own settings: a knob it would not apply is a 400 naming it,
    not an answer that silently ignored it."""
    with TestClient(make_app(demo, rag_catalog(demo.home))) as client:
        response = chat(client, "rag:demo", QUESTION, **extra)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == next(iter(extra)) and "rag:demo" in error["message"]
        # the two it takes still work
        assert chat(client, "rag:demo", QUESTION, temperature=0, max_tokens=50).status_code == 200


def test_insufficient_answer_escalates_to_the_llm(demo: Settings) -> None:
    catalog = rag_catalog(demo.home, slm_reply="The context does not say.")
    with TestClient(make_app(demo, catalog)) as client:
        body = chat(client, "rag:demo", QUESTION).json()
        assert body["choices"][0]["message"]["content"] == LLM_SAYS
        ext = body["edgelm"]
        assert ext["escalated"] is True and ext["model"] == "fake-llm"
        assert [c["source"] for c in ext["citations"]] == ["power.txt"]
        # asking the LLM directly never escalates
        body = chat(client, "rag:demo@llm", QUESTION).json()
        assert body["edgelm"]["escalated"] is False and body["edgelm"]["model"] == "fake-llm"


def test_insufficient_check() -> None:
    assert insufficient("The provided context does not mention the price.")
    assert insufficient("The documents don't say how much it costs.")
    assert insufficient("I don't know.")  # the router's own phrases
    assert insufficient("no")  # next to empty
    assert not insufficient("Yes [1].")
    assert not insufficient(GOOD)


@pytest.mark.parametrize(
    ("spec", "slm_logprobs", "escalated", "reason"),
    [
        ("insufficient", None, False, None),
        ("length=20", None, True, "length"),  # a whole-draft policy: the draft is held
        ("confidence=-1", [-2.5], True, "confidence"),  # needs (and gets) the SLM's logprobs
        ("confidence=-1", [-0.2], False, None),
        ("keywords=battery", None, True, "keywords"),  # question-only: no draft at all
    ],
)
def test_fallback_uses_the_router_policies(
    settings: Settings, spec: str, slm_logprobs, escalated: bool, reason: str | None
) -> None:
    settings.rag.fallback_policy = spec
    with RagStore.open(settings.home, "demo") as store:
        ingest_paths(store, [corpus_dir()])
    catalog = rag_catalog(settings.home, slm_logprobs=slm_logprobs)
    with TestClient(make_app(settings, catalog)) as client:
        ext = chat(client, "rag:demo", QUESTION).json()["edgelm"]
        assert ext["escalated"] is escalated
        assert ext["model"] == ("fake-llm" if escalated else "fake-slm")
        if reason:
            assert ext["escalation_reason"].startswith(reason)
        slm_calls = (
            len(client.app.state.edgelm.pool.models.get("fake-slm").engine.requests)
            if ("fake-slm" in client.app.state.edgelm.pool.models)
            else 0
        )
        assert slm_calls == (0 if spec.startswith("keywords") else 1)


def test_a_bad_fallback_policy_is_a_settings_error(settings: Settings) -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        settings.rag.fallback_policy = "sometimes"


def test_route_streams_and_answers(demo: Settings) -> None:
    with TestClient(make_app(demo, rag_catalog(demo.home))) as client:
        whole = client.post("/v1/rag/answer", json={"question": QUESTION, "collection": "demo"})
        assert whole.status_code == 200 and whole.json()["edgelm"]["citations"][0]["n"] == 1
        payload = {"question": QUESTION, "collection": "demo", "stream": True, "top_k": 2}
        with client.stream("POST", "/v1/rag/answer", json=payload) as response:
            blocks = [b for b in response.read().decode().split("\n\n") if b]
        assert blocks[-1] == "data: [DONE]"
        events = [json.loads(b[6:]) for b in blocks[:-1]]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text == GOOD
        assert len(events[-1]["edgelm"]["contexts"]) <= 2
        missing = client.post("/v1/rag/answer", json={"question": "x", "collection": "nope"})
        assert (
            missing.status_code == 404 and "edgelm rag ingest" in missing.json()["error"]["message"]
        )
        bad = client.post(
            "/v1/rag/answer", json={"question": QUESTION, "collection": "demo", "model": "nope"}
        )
        assert bad.status_code == 404


def test_inline_documents_by_route_and_content_parts(settings: Settings) -> None:
    docs = [
        {"id": "zoo.txt", "text": "The zoo opens at 9 in the morning."},
        {"id": "cafe.txt", "text": "The cafe sells tea."},
    ]
    catalog = rag_catalog(settings.home, slm_reply="It opens at 9 [1].")
    with TestClient(make_app(settings, catalog)) as client:
        body = client.post(
            "/v1/rag/answer", json={"question": "When does the zoo open?", "documents": docs}
        ).json()
        assert body["model"] == "rag:inline"
        assert body["edgelm"]["citations"][0]["source"] == "zoo.txt"
        parts = [{"type": "text", "text": "When does the zoo open?"}] + [
            {"type": "document", **d} for d in docs
        ]
        body = chat(client, "rag:inline", parts).json()
        assert body["edgelm"]["citations"][0]["source"] == "zoo.txt"
        refused = chat(
            client, "rag:inline", [{"type": "text", "text": "Who won the derby?"}, parts[1]]
        )
        assert refused.json()["edgelm"]["refused"] is True
        empty = chat(client, "rag:inline", "no documents")
        assert empty.status_code == 400


def test_openai_client_against_the_virtual_model(demo: Settings, serve_app) -> None:  # type: ignore[no-untyped-def]
    openai = pytest.importorskip("openai")
    base = serve_app(make_app(demo, rag_catalog(demo.home)))
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x")
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="rag:demo", messages=messages)
    assert reply.choices[0].message.content == GOOD
    assert reply.model_extra["edgelm"]["citations"][0]["source"] == "power.txt"
    stream = client.chat.completions.create(model="rag:demo", messages=messages, stream=True)
    events = list(stream)
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == GOOD
    assert events[-1].model_extra["edgelm"]["citations"][0]["n"] == 1


def test_local_rag_retrieves_locally_and_generates_remotely(demo: Settings, serve_app) -> None:  # type: ignore[no-untyped-def]
    catalog = rag_catalog(demo.home, slm_reply="no")  # too short: escalates
    base = serve_app(create_app(demo, catalog=catalog, virtual=[]))
    local = LocalRag(demo, endpoint=base)

    async def run() -> tuple[str, dict]:
        hits, chunks, ext = await local.stream(QUESTION, local.options(), collection="demo")
        assert hits
        return "".join([c.text async for c in chunks]), ext

    text, ext = asyncio.run(run())
    assert text == LLM_SAYS and ext["escalated"] and ext["model"] == "fake-llm"


LOOP = "The battery lasts a long time in the mast. "


def test_a_looping_answer_is_cut_early_and_escalated(demo: Settings) -> None:
    """450 tokens at 10 ms each would take 4.5 s; the loop is certain after 3 copies."""
    catalog = rag_catalog(demo.home, slm_reply=LOOP * 50, token_delay_s=0.01)
    with TestClient(make_app(demo, catalog)) as client:
        started = time.monotonic()
        body = chat(client, "rag:demo", QUESTION, max_tokens=600).json()
        assert time.monotonic() - started < 2.5
        assert body["choices"][0]["message"]["content"] == LLM_SAYS
        ext = body["edgelm"]
        assert ext["escalated"] is True and ext["escalation_reason"].startswith("degenerate: loop")
        [check] = ext["checks"]
        assert check["model"] == "fake-slm" and check["policy"] == "degenerate"
        assert check["cut"].startswith("loop") and check["value"] == "loop"
        slm = client.app.state.edgelm.pool.models["fake-slm"]
        assert slm.cancelled == 1  # the SLM was told to stop, not left running to max_tokens


@pytest.mark.parametrize(
    ("reply", "signal"), [("[1]", "degenerate"), ("[2] [1] " * 30, "degenerate")]
)
def test_marker_only_answers_escalate(demo: Settings, reply: str, signal: str) -> None:
    with TestClient(make_app(demo, rag_catalog(demo.home, slm_reply=reply))) as client:
        body = chat(client, "rag:demo", QUESTION).json()
        assert body["choices"][0]["message"]["content"] == LLM_SAYS
        assert body["edgelm"]["checks"][0]["policy"] == signal


def test_an_invented_figure_escalates(demo: Settings) -> None:
    catalog = rag_catalog(demo.home, slm_reply="It lasts 2000 days [1].")
    with TestClient(make_app(demo, catalog)) as client:
        body = chat(client, "rag:demo", QUESTION).json()
        assert body["choices"][0]["message"]["content"] == LLM_SAYS
        ext = body["edgelm"]
        assert ext["escalated"] and ext["escalation_reason"].startswith("unsupported: '2000'")
        assert ext["checks"][0]["policy"] == "unsupported" and ext["checks"][0]["value"] == 1


def test_an_invented_figure_is_refused_when_there_is_no_fallback(demo: Settings) -> None:
    demo.rag.fallback_model = None
    catalog = rag_catalog(demo.home, slm_reply="It lasts 2000 days [1].")
    with TestClient(make_app(demo, catalog)) as client:
        body = chat(client, "rag:demo", QUESTION).json()
        assert body["choices"][0]["message"]["content"] == REFUSAL
        ext = body["edgelm"]
        assert ext["refused"] is True and ext["escalated"] is False
        assert ext["citations"] == [] and ext["checks"][0]["policy"] == "unsupported"
    # the same with a grounded answer gives it as it is
    good = rag_catalog(demo.home)
    with TestClient(make_app(demo, good)) as client:
        assert chat(client, "rag:demo", QUESTION).json()["choices"][0]["message"]["content"] == GOOD


def test_the_fallbacks_own_invention_is_refused(demo: Settings) -> None:
    catalog = rag_catalog(
        demo.home, slm_reply="It lasts 2000 days [1].", llm_reply="About 3000 days [1]."
    )
    with TestClient(make_app(demo, catalog)) as client:
        body = chat(client, "rag:demo", QUESTION).json()
        assert body["choices"][0]["message"]["content"] == REFUSAL
        ext = body["edgelm"]
        assert ext["escalated"] and ext["refused"]
        assert [(c["model"], c["policy"]) for c in ext["checks"]] == [
            ("fake-slm", "unsupported"),
            ("fake-llm", "unsupported"),
        ]


def test_without_checks_in_the_policy_answers_stream_as_before(demo: Settings) -> None:
    demo.rag.fallback_policy = "insufficient"
    catalog = rag_catalog(demo.home, slm_reply="It lasts 2000 days [1].")
    with TestClient(make_app(demo, catalog)) as client:
        body = chat(client, "rag:demo", QUESTION).json()
        assert body["choices"][0]["message"]["content"] == "It lasts 2000 days [1]."
        assert body["edgelm"]["checks"] == []
