"""The real service serving the converted ONNX variant of the tiny model, through the official
``openai`` client: the variant is listed, loads with the onnx engine, streams, counts usage,
honours stop sequences and answers bad requests with 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from edgelm.catalog import Catalog
from tests.integration.conftest import models_dir
from tests.service_process import spawn_service, stop_service

# The first test may wait for the one-time conversion (tools install + convert, minutes).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def onnx_service(onnx_tiny: tuple[Path, str]) -> Iterator[tuple[str, str]]:
    home, alias = onnx_tiny
    env = {"EDGELM_MODELS__DIR": str(models_dir()), "EDGELM_COMPUTE__N_CTX": "2048"}
    proc, base = spawn_service(home, "--model", alias, env=env)
    yield base, alias
    stop_service(proc)


@pytest.fixture(scope="module")
def client(onnx_service: tuple[str, str]) -> OpenAI:
    return OpenAI(base_url=f"{onnx_service[0]}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture(scope="module")
def alias(onnx_service: tuple[str, str]) -> str:
    return onnx_service[1]


@pytest.fixture(scope="module")
def reference(onnx_tiny: tuple[Path, str]):
    """The converted model's tokenizer and chat template, read without edgelm or
    onnxruntime-genai (the ``tokenizers`` library and jinja2), to check usage counts."""
    import jinja2
    from tokenizers import Tokenizer

    home, alias = onnx_tiny
    directory = Catalog.load(home).resolve(alias).path.parent
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(config["chat_template"])
    return tokenizer, template


def test_variant_is_listed_and_served_by_the_onnx_engine(
    client: OpenAI, alias: str, onnx_service: tuple[str, str]
) -> None:
    assert alias == "smollm2-135m:onnx-cpu-int4"
    ids = [m.id for m in client.models.list().data]
    assert {alias, "smollm2-135m"} <= set(ids)
    client.chat.completions.create(model=alias, messages=QUESTION, max_tokens=1)
    loaded = httpx.get(f"{onnx_service[0]}/openai/loadedmodels", timeout=10).json()
    assert "onnx" in json.dumps(loaded)


def test_chat_usage_matches_an_independent_tokenizer(client: OpenAI, alias: str, reference) -> None:
    tokenizer, template = reference
    response = client.chat.completions.create(
        model=alias, messages=QUESTION, temperature=0, max_tokens=24
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    prompt = template.render(messages=QUESTION, add_generation_prompt=True)
    expected = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert response.usage.prompt_tokens == expected
    answer = len(tokenizer.encode(choice.message.content, add_special_tokens=False).ids)
    assert abs(response.usage.completion_tokens - answer) <= 2
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_streaming_with_usage_agrees_with_the_whole_answer(client: OpenAI, alias: str) -> None:
    stream = client.chat.completions.create(
        model=alias,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    text = "".join(pieces)
    assert text.strip() and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    whole = client.chat.completions.create(
        model=alias, messages=QUESTION, temperature=0, max_tokens=24
    )
    assert whole.choices[0].message.content == text


def test_completions_max_tokens_and_stop(client: OpenAI, alias: str) -> None:
    prompt = "1, 2, 3, 4, 5,"
    free = client.completions.create(model=alias, prompt=prompt, max_tokens=12, temperature=0)
    assert free.usage.completion_tokens == 12 and free.choices[0].finish_reason == "length"
    text = free.choices[0].text
    assert " 8" in text
    stopped = client.completions.create(
        model=alias, prompt=prompt, max_tokens=12, temperature=0, stop=[" 8"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(" 8")]
    streamed = client.completions.create(
        model=alias, prompt=prompt, max_tokens=12, temperature=0, stop=[" 8"], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stopped.choices[0].text


def test_seed_and_logprobs(client: OpenAI, alias: str) -> None:
    def ask(**kw) -> str:
        messages = [{"role": "user", "content": "Tell me a short story."}]
        response = client.chat.completions.create(
            model=alias, messages=messages, max_tokens=24, **kw
        )
        return response.choices[0].message.content

    assert ask(temperature=0.9, seed=1234) == ask(temperature=0.9, seed=1234)
    response = client.chat.completions.create(
        model=alias, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for token in content:
        tops = [t.logprob for t in token.top_logprobs]
        assert token.logprob <= 0 and len(tops) == 3 and tops == sorted(tops, reverse=True)


def test_bad_requests_are_4xx(client: OpenAI, alias: str) -> None:
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=alias, messages=QUESTION, response_format=bad_schema)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=alias, messages=[{"role": "user", "content": "hi " * 5000}]
        )
    assert "context" in str(info.value)
    # and the model still answers
    ok = client.chat.completions.create(model=alias, messages=QUESTION, max_tokens=2)
    assert ok.usage.completion_tokens > 0


def test_concurrent_streams_are_served_together_and_reuse_prompts(
    client: OpenAI, alias: str, onnx_service: tuple[str, str]
) -> None:
    """Four streaming chats at once: each answers as it does alone, and the loaded model's
    runtime figures show slots (compute.parallel "auto": eight for this small model) and
    reused prompt tokens."""
    from concurrent.futures import ThreadPoolExecutor

    questions = ["Name a colour.", "What is 2+2?", "Name a fruit.", "Tell me about cats."]

    def ask(question: str) -> str:
        stream = client.chat.completions.create(
            model=alias,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=20,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, questions)) == alone
    loaded = httpx.get(f"{onnx_service[0]}/openai/loadedmodels", timeout=10).json()
    runtime = next(m["runtime"] for m in loaded if m["id"] == alias)
    assert runtime["slots"] == 8 and runtime["running"] == 0
    assert "auto" in runtime["parallel_reason"]
    # SmolLM2's template starts every chat with the same system prompt: it was reused.
    assert runtime["reused_prompt_tokens"] > 0

