"""Concurrent streams and prompt reuse in the ONNX engine, on the real tiny model (SmolLM2-135M
converted to int4 ONNX): the checks the llama.cpp engine's batching passes.

No timings are asserted: event order shows that streams ran together, the scheduler's counters
that prefixes were reused, and the texts that neither changed a greedy answer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgelm.catalog import Catalog
from edgelm.engines.base import collect
from edgelm.types import GenerationRequest, Message, ResponseFormat

# The first test may wait for the one-time conversion (tools install + convert, minutes).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

SYSTEM = "You are a helpful assistant who answers in one short sentence. " * 8
QUESTIONS = [
    "Name a colour.",
    "Write a poem about the sea.",
    "What is 2+2?",
    "Tell me about cats.",
]


@pytest.fixture(scope="module")
def model_dir(onnx_tiny: tuple[Path, str]) -> Path:
    home, alias = onnx_tiny
    entry = Catalog.load(home).resolve(alias)
    assert entry.engine == "onnx" and entry.path is not None
    return entry.path.parent


def make(model_dir: Path, parallel: int = 4):
    from edgelm.engines.onnx import OnnxEngine

    return OnnxEngine(model_dir, "smollm2-135m:onnx-cpu-int4", n_ctx=1024, threads=2, parallel=parallel)


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    eng = make(model_dir)
    yield eng
    eng.close()


def ask(question: str, system: str | None = SYSTEM, **kw) -> GenerationRequest:
    messages = [Message(role="system", content=system)] if system else []
    messages.append(Message(role="user", content=question))
    return GenerationRequest(messages=messages, **{"temperature": 0, "max_tokens": 24, **kw})


def together(engine, requests: list[GenerationRequest]) -> list[str]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: collect(engine.stream(r)).text, requests))


def test_concurrent_streams_run_together_and_answer_as_alone(engine) -> None:
    requests = [ask(q, system=None, ignore_eos=True) for q in QUESTIONS]
    alone = [collect(engine.stream(r)).text for r in requests]
    firsts: list[float] = []
    ends: list[float] = []
    lock = threading.Lock()

    def run(request: GenerationRequest) -> str:
        chunks = []
        for chunk in engine.stream(request):
            if not chunks:
                with lock:
                    firsts.append(time.perf_counter())
            chunks.append(chunk)
        with lock:
            ends.append(time.perf_counter())
        return collect(iter(chunks)).text

    with ThreadPoolExecutor(len(requests)) as pool:
        texts = list(pool.map(run, requests))
    assert texts == alone and all(alone)
    # Every stream had its first token before any stream had its 24th: they took turns,
    # instead of each waiting for the answers in front of it.
    assert max(firsts) < min(ends)
    stats = engine.batch_stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_shared_system_prompt_is_reused_and_answers_do_not_change(engine, model_dir) -> None:
    cold = make(model_dir, parallel=1)
    try:  # answers of an engine that never cached anything between requests
        fresh = []
        for q in QUESTIONS:
            fresh.append(collect(cold.stream(ask(q))).text)
            cold.close()
            cold = make(model_dir, parallel=1)
    finally:
        cold.close()
    before = engine.batch_stats()
    again = [collect(engine.stream(ask(q))).text for q in QUESTIONS]
    concurrent = together(engine, [ask(q) for q in QUESTIONS])
    after = engine.batch_stats()
    assert again == fresh and concurrent == fresh
    # The sequential requests but the first found the system prompt (~100 tokens) in a slot,
    # and so did one of the concurrent ones (the others, finding no other slot holding it,
    # share a batched generator instead).
    assert after["reused_prompt_tokens"] - before["reused_prompt_tokens"] >= 4 * 64


def test_next_turn_of_a_conversation_reuses_the_previous_one(engine, model_dir) -> None:
    first = ask("Name a fruit.")
    done = collect(engine.stream(first))
    turn = [
        *first.messages,
        Message(role="assistant", content=done.text),
        Message(role="user", content="And a vegetable?"),
    ]
    second = GenerationRequest(messages=turn, temperature=0, max_tokens=16)
    before = engine.batch_stats()["reused_prompt_tokens"]
    warm = collect(engine.stream(second))
    reused = engine.batch_stats()["reused_prompt_tokens"] - before
    # Greedy: the first turn's prompt is reused (not its answer, whose rows were evaluated a
    # token at a time and would change the logits slightly).
    assert reused >= done.usage.prompt_tokens - 2 > 0
    # Sampling: the previous answer's KV is reused too.
    collect(engine.stream(first))
    before = engine.batch_stats()["reused_prompt_tokens"]
    collect(engine.stream(second.model_copy(update={"temperature": 0.7})))
    assert engine.batch_stats()["reused_prompt_tokens"] - before > done.usage.prompt_tokens
    # The greedy turn on an engine that never saw the first one answers the same.
    cold = make(model_dir, parallel=1)
    try:
        assert collect(cold.stream(second)).text == warm.text
    finally:
        cold.close()


def test_cancelling_one_stream_leaves_the_others_untouched(engine) -> None:
    requests = [ask(q) for q in QUESTIONS]
    alone = [collect(engine.stream(r)).text for r in requests]
    cancel = threading.Event()
    results: dict[int, object] = {}

    def run(i: int) -> None:
        chunks = []
        for chunk in engine.stream(requests[i], cancel if i == 0 else None):
            chunks.append(chunk)
            if i == 0 and len(chunks) == 2:
                cancel.set()
        results[i] = collect(iter(chunks))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cancelled = results[0]
    assert cancelled.finish_reason == "cancelled" and cancelled.usage.completion_tokens <= 3
    assert [results[i].text for i in range(1, len(requests))] == alone[1:]
    assert engine.batch_stats()["running"] == 0


def test_stop_sequences_and_limits_hold_for_concurrent_streams(engine) -> None:
    counting = GenerationRequest(prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=30)
    free = collect(engine.stream(counting)).text
    assert " 8" in free
    requests = [
        counting.model_copy(update={"stop": [" 8"]}),
        ask("Write a long poem.", max_tokens=7),
        counting.model_copy(update={"stop": [" 7", " 9"]}),
        ask("Write a long story.", max_tokens=20, ignore_eos=True),
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: collect(engine.stream(r)), requests))
    assert results[0].finish_reason == "stop" and results[0].text == free[: free.index(" 8")]
    assert results[1].finish_reason == "length" and results[1].usage.completion_tokens == 7
    assert results[2].finish_reason == "stop" and results[2].text == free[: free.index(" 7")]
    assert results[3].finish_reason == "length" and results[3].usage.completion_tokens == 20


def test_more_requests_than_slots_on_the_event_loop(engine) -> None:
    """The service's path: tokens go from the scheduler thread straight to the event loop;
    8 requests on 4 slots all finish, answered as alone, structured output among them."""
    requests = [ask(q, system=None) for q in QUESTIONS * 2]
    fmt = ResponseFormat(type="json_object")
    requests[3] = ask("Reply with an empty JSON object.", system=None, response_format=fmt)
    alone = [collect(engine.stream(r)).text for r in requests]

    async def on_loop(request: GenerationRequest) -> str:
        return collect([chunk async for chunk in engine.astream(request)]).text

    async def main() -> list[str]:
        return await asyncio.gather(*(on_loop(r) for r in requests))

    assert asyncio.run(main()) == alone
    assert alone[3].strip().startswith("{")
    stats = engine.batch_stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_astream_answers_as_stream_does(engine) -> None:
    requests = [
        ask("Name a colour.", max_tokens=12),
        GenerationRequest(prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=30, stop=[" 8"]),
        ask("Name a fruit.", max_tokens=4, logprobs=True, top_logprobs=2),
        ask("Tell me a story.", temperature=0.9, seed=5),
        ask("Say hi.", max_tokens=0),
    ]

    async def on_loop(request: GenerationRequest) -> list:
        return [chunk async for chunk in engine.astream(request)]

    for request in requests:
        expected = list(engine.stream(request))
        chunks = asyncio.run(on_loop(request))
        fields = ("text", "token_ids", "logprobs", "finish_reason", "completion_tokens")
        assert [[getattr(c, f) for f in fields] for c in chunks] == [
            [getattr(c, f) for f in fields] for c in expected
        ]
    assert chunks[-1].finish_reason == "length" and not chunks[-1].text  # max_tokens=0


def test_astream_left_early_ends_the_stream(engine) -> None:
    long_answer = ask("Write a long story.", max_tokens=600, ignore_eos=True)

    async def main() -> None:
        stream = engine.astream(long_answer)
        async for _chunk in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if engine.batch_stats()["running"] == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    tokens = engine.batch_stats()["generated_tokens"]
    time.sleep(0.3)  # an answer still being written would take several tokens meanwhile
    assert engine.batch_stats()["running"] == 0
    assert engine.batch_stats()["generated_tokens"] == tokens


def test_a_request_that_leaves_while_queued_goes_at_once(model_dir: Path) -> None:
    eng = make(model_dir, parallel=1)
    busy = threading.Event()
    long_answer = ask("Write a long story.", max_tokens=400, ignore_eos=True)

    def occupy() -> None:
        for _chunk in eng.stream(long_answer, busy):
            pass

    async def main() -> list[str | None]:
        waiting = threading.Event()
        finishes = []

        async def queued() -> None:
            async for chunk in eng.astream(ask("Hi"), waiting):
                finishes.append(chunk.finish_reason)

        task = asyncio.create_task(queued())
        for _ in range(200):
            if eng.batch_stats()["waiting"]:
                break
            await asyncio.sleep(0.01)
        assert eng.batch_stats()["waiting"] == 1
        waiting.set()
        await asyncio.wait_for(task, 5)
        assert eng.batch_stats()["waiting"] == 0
        assert eng.batch_stats()["running"] == 1  # the long answer is still being written
        return finishes

    worker = threading.Thread(target=occupy)
    worker.start()
    try:
        for _ in range(200):
            if eng.batch_stats()["running"]:
                break
            time.sleep(0.01)
        assert asyncio.run(main()) == ["cancelled"]
    finally:
        busy.set()
        worker.join()
        eng.close()


def test_raw_speed_is_refused_while_serving_and_leaves_the_slots_usable(engine) -> None:
    from edgelm.errors import InvalidRequest

    stream = engine.stream(ask("Write a long story.", max_tokens=40, ignore_eos=True))
    next(stream)
    with pytest.raises(InvalidRequest, match="bench it idle"):
        engine.raw_speed(16, 4)
    assert list(stream)[-1].finish_reason == "length"
    pp_s, tg_s = engine.raw_speed(64, 8, seed=1)
    assert pp_s > 0 and tg_s > 0
    assert collect(engine.stream(ask("Name a colour.", system=None))).text


def test_unload_fails_what_is_running_and_later_requests(model_dir: Path) -> None:
    eng = make(model_dir, parallel=2)
    stream = eng.stream(ask("Write a long story.", max_tokens=400, ignore_eos=True))
    next(stream)
    eng.close()
    with pytest.raises(RuntimeError, match="unloaded"):
        list(stream)
    eng.close()  # twice is fine
