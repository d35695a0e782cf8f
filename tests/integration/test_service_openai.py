"""The real service with the real tiny model, driven by the official ``openai`` client."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

TINY = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def client(live_service: str) -> OpenAI:
    return OpenAI(base_url=f"{live_service}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture(scope="module")
def vocab(tiny_model_path: Path):
    """The model's own tokenizer, loaded independently of edgelm, to check usage counts."""
    from llama_cpp import Llama

    return Llama(model_path=str(tiny_model_path), vocab_only=True, verbose=False)


def render_chat(vocab, messages: list[dict[str, str]]) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = vocab.metadata["tokenizer.chat_template"]
    eos = vocab._model.token_get_text(vocab.token_eos())
    bos = vocab._model.token_get_text(vocab.token_bos())
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    return formatter(messages=messages).prompt


def test_models_listed(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"} <= set(ids)


def test_chat_non_streaming_usage_matches_tokenizer(client: OpenAI, vocab) -> None:
    response = client.chat.completions.create(
        model=TINY, messages=QUESTION, temperature=0, max_tokens=24
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    prompt = render_chat(vocab, QUESTION)
    add_bos = vocab._model.add_bos_token() and not prompt.startswith(
        vocab._model.token_get_text(vocab.token_bos())
    )
    expected = len(vocab.tokenize(prompt.encode(), add_bos=add_bos, special=True))
    assert response.usage.prompt_tokens == expected
    answer_tokens = len(vocab.tokenize(choice.message.content.encode(), add_bos=False))
    assert abs(response.usage.completion_tokens - answer_tokens) <= 2
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_chat_streaming_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TINY,
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
        model=TINY, messages=QUESTION, temperature=0, max_tokens=24
    )
    assert whole.choices[0].message.content == text  # streaming and folding agree


def test_completions(client: OpenAI, vocab) -> None:
    prompt = "The three primary colours are"
    response = client.completions.create(model=TINY, prompt=prompt, max_tokens=8, temperature=0)
    assert response.choices[0].text
    assert response.usage.completion_tokens == 8
    assert response.choices[0].finish_reason == "length"
    bos = vocab._model.add_bos_token()
    expected = len(vocab.tokenize(prompt.encode(), add_bos=bos, special=True))
    assert response.usage.prompt_tokens == expected
    streamed = client.completions.create(
        model=TINY, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == response.choices[0].text


def test_embeddings(client: OpenAI) -> None:
    response = client.embeddings.create(
        model=TINY, input=["The cat sat on the mat.", "A cat is sitting on a mat.", "GDP rose 3%."]
    )
    vectors = [d.embedding for d in response.data]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) >= 64
    cosine = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    assert cosine[0] > cosine[1]
    assert response.usage.prompt_tokens > 0


def test_stop_sequence(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    free = (
        client.chat.completions.create(model=TINY, messages=messages, temperature=0, max_tokens=40)
        .choices[0]
        .message.content
    )
    assert "4" in free, free  # the model does count; otherwise the stop test proves nothing
    stopped = client.chat.completions.create(
        model=TINY, messages=messages, temperature=0, max_tokens=40, stop=["4"]
    ).choices[0]
    assert "4" not in stopped.message.content
    assert stopped.finish_reason == "stop"
    assert free.startswith(stopped.message.content)


def test_seed_determinism(client: OpenAI) -> None:
    def ask(**kw) -> str:
        return (
            client.chat.completions.create(
                model=TINY,
                messages=[{"role": "user", "content": "Tell me a short story."}],
                max_tokens=32,
                **kw,
            )
            .choices[0]
            .message.content
        )

    assert ask(temperature=0) == ask(temperature=0)
    assert ask(temperature=0.9, seed=1234) == ask(temperature=0.9, seed=1234)


def test_max_tokens_and_logprobs(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model=TINY, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for token in content:
        assert token.logprob <= 0
        tops = [t.logprob for t in token.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)


def test_two_concurrent_streams_do_not_corrupt_each_other(client: OpenAI) -> None:
    """Batched streams share one context: each must get exactly the text of its own tokens
    (a shared detokenising buffer once mixed them). Whether the words equal the answer given
    alone is compute.batch_invariant's business (tests/integration/test_batching_real.py)."""
    prompts = ["Name three fruits.", "Write one sentence about the sea."] * 2

    def run(prompt: str) -> tuple[str, bytes]:
        stream = client.chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=32,
            stream=True,
            logprobs=True,
        )
        text, tokens = "", b""
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                lps = chunk.choices[0].logprobs
                tokens += b"".join(bytes(t.bytes or []) for t in (lps.content if lps else []))
        return text, tokens

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(run, prompts))
    for text, tokens in answers:
        assert text and text == tokens.decode("utf-8", "replace")
    assert answers[0][0] != answers[1][0]


def test_errors_through_the_client(client: OpenAI, live_service: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert "smollm2-135m" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=TINY, messages=QUESTION, temperature=7)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "hi " * 5000}]
        )
    assert "context" in str(info.value)
    raw = httpx.post(
        f"{live_service}/v1/chat/completions",
        content=b"{oops",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400 and "error" in raw.json()
    # and the service is still serving
    assert (
        client.chat.completions.create(model=TINY, messages=QUESTION, max_tokens=4)
        .choices[0]
        .message.content
        is not None
    )


def test_json_mode(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Give a JSON object with a key 'city'."}],
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=0,
    )
    content = response.choices[0].message.content
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still a JSON prefix
        assert content.lstrip().startswith("{")


def test_a_long_prompt_is_read_with_flash_attention_through_the_service(
    client: OpenAI, live_service: str
) -> None:
    """A prompt of 256 or more tokens goes through the engine's flash-attention prefill
    context (runner process included) and its answer streams as any other; the service's
    status counts it."""

    def read() -> int:  # 0 while the model is not loaded yet
        status = httpx.get(f"{live_service}/openai/status", timeout=30).json()
        loaded = [m for m in status["loaded"] if m["id"] == TINY]
        return loaded[0]["runtime"]["flash_prefill_prompts"] if loaded else 0

    before = read()
    text = "Repeat the last number of this list: " + ", ".join(str(i) for i in range(300))
    stream = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": text}],
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens >= 256
    assert read() == before + 1
