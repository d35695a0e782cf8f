"""A real looping answer, cut early and escalated: SmolLM2-135M at temperature 0 repeats
"A B" for as long as it may when asked to continue the pattern; the loop monitor stops it
after a few repeats and the default policies hand the question to the fallback model (a fake
engine here, so the test times only the tiny model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.server.app import create_app
from edgelm.server.hybrid_model import HybridModels
from edgelm.server.rag_model import RagModels
from tests.integration.conftest import TINY, settings_for

PATTERN = "Continue this pattern: A B A B A B A B A B A B"
FALLBACK = "The pattern continues with A and B."
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def client(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    home = tmp_path_factory.mktemp("checks-home")
    settings = settings_for(
        home, **{"compute.n_ctx": 2048, "rag.model": TINY, "rag.fallback_model": "fallback"}
    )
    catalog = Catalog.load(home)
    catalog.add_user_entry(
        CatalogEntry(alias="fallback", engine="fake", tier="custom", options={"reply": FALLBACK})
    )
    app = create_app(settings, catalog=catalog, virtual=[HybridModels(), RagModels()])
    with TestClient(app) as http:
        yield OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http)


def test_the_tiny_model_loops_without_the_check(client: OpenAI) -> None:
    """The premise: with ``never`` (no checks) the draft runs to max_tokens."""
    body = client.chat.completions.create(
        model=f"hybrid:{TINY}+fallback@never",
        messages=[{"role": "user", "content": PATTERN}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    ext = body.model_extra["edgelm"]  # type: ignore[index]
    assert ext["route"] == "draft" and ext["draft"]["finish_reason"] == "length"
    assert ext["tokens"]["slm"]["completion"] == MAX_TOKENS


def test_hybrid_cuts_the_loop_and_escalates(client: OpenAI) -> None:
    body = client.chat.completions.create(
        model=f"hybrid:{TINY}+fallback@degenerate,insufficient",  # the loop check alone
        messages=[{"role": "user", "content": PATTERN}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert body.choices[0].message.content == FALLBACK
    ext = body.model_extra["edgelm"]  # type: ignore[index]
    assert ext["route"] == "direct" and ext["fired"] == "degenerate"
    assert ext["draft_cut"].startswith("loop") and ext["draft"]["finish_reason"] == "cancelled"
    assert ext["tokens"]["slm"]["completion"] < MAX_TOKENS // 4  # cut early, not at the cap


def test_rag_cuts_the_loop_and_escalates(client: OpenAI) -> None:
    document = {
        "type": "document",
        "id": "pattern.txt",
        "text": "The letters follow a pattern: A B A B A B. Continue the pattern with A and B.",
    }
    stream = client.chat.completions.create(
        model="rag:inline",
        messages=[{"role": "user", "content": [document, {"type": "text", "text": PATTERN}]}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ext = chunks[-1].model_extra["edgelm"]  # type: ignore[index]
    assert ext["contexts"], "the inline document was retrieved"
    assert text == FALLBACK and ext["escalated"] is True
    [check] = ext["checks"]
    assert check["policy"] == "degenerate" and check["cut"].startswith("loop")


def test_the_engine_default_repeat_penalty_applies_only_when_unset(tiny_model_path: Path) -> None:
    from edgelm.engines.llamacpp import LlamaCppEngine
    from edgelm.types import GenerationRequest, Message

    engine = LlamaCppEngine(tiny_model_path, TINY, n_ctx=512, threads=1, repeat_penalty=1.3)
    try:
        messages = [Message(role="user", content="Hi")]
        unset = engine._answer(GenerationRequest(messages=messages, max_tokens=1), None)
        explicit = engine._answer(
            GenerationRequest(messages=messages, max_tokens=1, repeat_penalty=1.0), None
        )
        assert unset.job.sampling.repeat_penalty == 1.3
        assert explicit.job.sampling.repeat_penalty == 1.0
    finally:
        engine.close()


def test_hybrid_token_budget_cuts_the_real_draft(client: OpenAI) -> None:
    """'tokens=8' on the real model: the draft is stopped at its 8th token and the LLM answers."""
    body = client.chat.completions.create(
        model=f"hybrid:{TINY}+fallback@tokens=8",
        messages=[{"role": "user", "content": PATTERN}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert body.choices[0].message.content == FALLBACK
    ext = body.model_extra["edgelm"]  # type: ignore[index]
    assert ext["route"] == "direct" and ext["fired"] == "tokens"
    assert ext["tokens"]["slm"]["completion"] == 8
    assert len(ext["draft_logprob"]["tokens"]) == 8
