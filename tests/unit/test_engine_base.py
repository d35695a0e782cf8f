"""The engine contract: stop handling, the fold, capability checks, and the fake engine."""

from __future__ import annotations

import threading

import pytest

from edgelm.engines.base import Engine, StopBuffer, check_capabilities, collect
from edgelm.engines.fake import FakeEngine, FakeScript, fake_tokens
from edgelm.errors import ContextLengthExceeded, ModelLoadError, Unsupported
from edgelm.types import GenerationRequest, Message, ResponseFormat


def chat(text: str, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[Message(role="user", content=text)], **kw)


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "hit"),
    [
        (["Hello ", "wor", "ld"], [], "Hello world", False),
        (["Hello ", "STO", "P here"], ["STOP"], "Hello ", True),
        (["abc", "<|e", "nd|>tail"], ["<|end|>"], "abc", True),
        (["a<", "b"], ["<|end|>"], "a<b", False),
        (["x", "y"], ["yz", "q"], "xy", False),
        (["one\n\n", "two"], ["\n\n"], "one", True),
    ],
)
def test_stop_buffer(pieces, stops, emitted, hit) -> None:
    buf = StopBuffer(stops)
    out = []
    was_hit = False
    for piece in pieces:
        text, was_hit = buf.push(piece)
        out.append(text)
        if was_hit:
            break
    if not was_hit:
        out.append(buf.flush())
    assert "".join(out) == emitted
    assert was_hit is hit


def test_stop_buffer_releases_text_early() -> None:
    buf = StopBuffer(["STOP"])
    assert buf.push("Hello S") == ("Hello ", False)  # only the possible prefix is held back
    assert buf.push("un") == ("Sun", False)


def test_fold_matches_stream() -> None:
    engine = FakeEngine(script=FakeScript(reply="alpha beta gamma"))
    result = collect(engine.stream(chat("q")))
    assert result.text == "alpha beta gamma"
    assert result.usage.completion_tokens == 3
    assert result.usage.prompt_tokens == engine.count_tokens(engine.prompt_text(chat("q")))
    assert result.finish_reason == "stop"
    assert len(result.token_ids) == 3
    assert result.timing.ttft_s is not None and result.timing.total_s >= result.timing.ttft_s


def test_fake_timing_follows_script() -> None:
    engine = FakeEngine(
        script=FakeScript(reply="a b c d e", first_token_delay_s=0.05, token_delay_s=0.02)
    )
    result = collect(engine.stream(chat("q")))
    assert result.timing.ttft_s >= 0.05
    assert result.timing.decode_s >= 4 * 0.02
    assert result.timing.decode_tokens_per_s <= 4 / (4 * 0.02) + 1e-6


def test_fake_max_tokens_and_scripted_replies() -> None:
    engine = FakeEngine(script=FakeScript(replies=["first reply", "second"], reply="later"))
    assert collect(engine.stream(chat("q"))).text == "first reply"
    assert collect(engine.stream(chat("q"))).text == "second"
    limited = collect(engine.stream(chat("q", max_tokens=1)))
    assert limited.text == "later" and limited.finish_reason == "stop"
    long = FakeEngine(script=FakeScript(reply="w " * 10))
    cut = collect(long.stream(chat("q", max_tokens=4)))
    assert cut.finish_reason == "length" and cut.usage.completion_tokens == 4


def test_fake_cancel() -> None:
    engine = FakeEngine(script=FakeScript(reply="w " * 50))
    cancel = threading.Event()
    seen = []
    for chunk in engine.stream(chat("q"), cancel):
        seen.append(chunk)
        if len(seen) == 3:
            cancel.set()
    assert seen[-1].finish_reason == "cancelled"
    assert seen[-1].completion_tokens == 3


def test_fake_failures() -> None:
    with pytest.raises(ModelLoadError, match="bad weights"):
        FakeEngine(script=FakeScript(fail_load="bad weights"))
    engine = FakeEngine(script=FakeScript(reply="a b c", fail_after_tokens=1))
    with pytest.raises(RuntimeError):
        collect(engine.stream(chat("q")))
    small = FakeEngine(script=FakeScript(n_ctx=300))
    with pytest.raises(ContextLengthExceeded):
        collect(small.stream(chat("word " * 400)))


def test_fake_logprobs_scripted() -> None:
    engine = FakeEngine(script=FakeScript(reply="a b c", logprobs=[-0.5, -2.0]))
    result = collect(engine.stream(chat("q", logprobs=True, top_logprobs=2)))
    assert [lp["logprob"] for lp in result.logprobs] == [-0.5, -2.0, -0.5]
    assert all(len(lp["top"]) == 2 for lp in result.logprobs)


def test_capability_checks() -> None:
    class Plain(Engine):
        name = "plain"

        def stream(self, request, cancel=None):
            yield from ()

    plain = Plain()
    check_capabilities(plain, chat("q"))
    with pytest.raises(Unsupported, match="logprobs"):
        check_capabilities(plain, chat("q", logprobs=True))
    with pytest.raises(Unsupported, match="response_format"):
        check_capabilities(plain, chat("q", response_format=ResponseFormat(type="json_object")))
    with pytest.raises(Unsupported, match="embeddings"):
        plain.embed(["x"])


def test_fake_tokens_are_predictable() -> None:
    assert fake_tokens("Hello, world  again") == ["Hello, ", "world  ", "again"]
    vectors, used = FakeEngine().embed(["red apple", "apple red", "blue sky"])
    same = sum(a * b for a, b in zip(vectors[0], vectors[1], strict=True))
    other = sum(a * b for a, b in zip(vectors[0], vectors[2], strict=True))
    assert same == pytest.approx(1.0) and other < 0.5 and used == 6
