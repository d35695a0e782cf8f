"""Continuous batching and prefix caching in the llama.cpp engine, on the real tiny model.

No timings are asserted: the scheduler's counters show that streams were batched and that
prefixes were reused, and the texts show that neither changed an answer. Most tests run with
``batch_invariant`` on, where answers must not depend on what else runs or is cached; the
default engine (longest-prefix reuse) has tests of its own at the end.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgelm.engines.base import collect
from edgelm.types import GenerationRequest, Message

pytestmark = pytest.mark.integration

SYSTEM = "You are a helpful assistant who answers in one short sentence. " * 8
QUESTIONS = [
    "Name a colour.",
    "Write a poem about the sea.",
    "What is 2+2?",
    "Tell me about cats.",
]


@pytest.fixture(scope="module")
def engine(tiny_model_path: Path):
    from edgelm.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(
        tiny_model_path, "smollm2-135m", n_ctx=1024, threads=2, parallel=4, batch_invariant=True
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module", params=[False, True], ids=["kv-per-sequence", "kv-unified"])
def fast_engine(tiny_model_path: Path, request: pytest.FixtureRequest):
    """The default engine (a KV stream per sequence), and the same with one shared pool."""
    from edgelm.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(
        tiny_model_path, "smollm2-135m", n_ctx=1024, threads=2, parallel=4, kv_unified=request.param
    )
    yield eng
    eng.close()


def ask(question: str, system: str | None = SYSTEM, **kw) -> GenerationRequest:
    messages = [Message(role="system", content=system)] if system else []
    messages.append(Message(role="user", content=question))
    return GenerationRequest(messages=messages, temperature=0, max_tokens=24, **kw)


def together(engine, requests: list[GenerationRequest]) -> list[str]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: collect(engine.stream(r)).text, requests))


def test_concurrent_streams_answer_exactly_as_sequential_ones(engine) -> None:
    requests = [ask(q, system=None) for q in QUESTIONS]
    alone = [collect(engine.stream(r)).text for r in requests]
    steps = engine.batch_stats()["decode_steps"]
    batched = together(engine, requests)
    assert batched == alone
    assert all(alone)
    # 4 streams of up to 24 tokens took fewer decode steps than tokens: they shared steps.
    assert engine.batch_stats()["decode_steps"] - steps < 4 * 24 - 24


def test_shared_system_prompt_is_reused_and_answers_do_not_change(engine) -> None:
    fresh = [collect(engine.stream(ask(q))).text for q in QUESTIONS]
    before = engine.batch_stats()
    again = [collect(engine.stream(ask(q))).text for q in QUESTIONS]
    concurrent = together(engine, [ask(q) for q in QUESTIONS])
    after = engine.batch_stats()
    assert again == fresh and concurrent == fresh
    # Each of the 8 requests found the system prompt (~100 tokens) already in a slot.
    assert after["reused_prompt_tokens"] - before["reused_prompt_tokens"] >= 8 * 64


def test_next_turn_of_a_conversation_reuses_the_previous_one(engine) -> None:
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
    # Greedy: the first turn's prompt is reused in whole aligned blocks (not its answer, whose
    # KV was filled a token at a time and would change the logits slightly).
    assert reused >= done.usage.prompt_tokens // 32 * 32 > 0
    # Sampling: the previous answer's KV is reused too.
    collect(engine.stream(first))
    before = engine.batch_stats()["reused_prompt_tokens"]
    collect(engine.stream(second.model_copy(update={"temperature": 0.7})))
    assert engine.batch_stats()["reused_prompt_tokens"] - before > done.usage.prompt_tokens
    # The greedy turn on an engine that never saw the first one answers the same.
    from edgelm.engines.llamacpp import LlamaCppEngine

    cold_engine = LlamaCppEngine(
        engine.model_path, "cold", n_ctx=1024, threads=2, batch_invariant=True
    )
    try:
        assert collect(cold_engine.stream(second)).text == warm.text
    finally:
        cold_engine.close()


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


def test_more_requests_than_slots_all_finish_in_order_of_their_answers(engine) -> None:
    requests = [ask(q, system=None) for q in QUESTIONS * 2]  # 8 requests, 4 slots
    alone = [collect(engine.stream(r)).text for r in requests[:4]] * 2
    assert together(engine, requests) == alone
    assert engine.batch_stats()["waiting"] == 0


def test_raw_speed_measures_prompt_and_decode_and_leaves_the_cache_usable(engine) -> None:
    pp_s, tg_s = engine.raw_speed(64, 8, seed=1)
    assert pp_s > 0 and tg_s > 0
    assert collect(engine.stream(ask("Name a colour.", system=None))).text


def test_a_finished_stream_leaves_no_gap_between_running_sequence_ids(engine) -> None:
    """llama.cpp runs separate KV streams in one micro-batch only on consecutive sequence ids;
    when the stream on id 0 finishes, the one on the highest id moves down, and the move
    (a copy of its KV stream) must not change its answer."""
    long_ones = [ask(q, system=None) for q in QUESTIONS[1:3]]
    alone = [collect(engine.stream(r)).text for r in long_ones]
    short = engine.stream(ask(QUESTIONS[0], system=None).model_copy(update={"max_tokens": 10}))
    next(short)  # running on the lowest id
    moves = engine.batch_stats()["moves"]
    with ThreadPoolExecutor(2) as pool:  # admitted on the next ids while it runs
        texts = [pool.submit(lambda r=r: collect(engine.stream(r)).text) for r in long_ones]
        assert list(short)[-1].finish_reason == "length"  # its id is free 14+ tokens early
        assert [t.result() for t in texts] == alone
    assert engine.batch_stats()["moves"] > moves


def test_default_engine_keeps_its_streams_on_consecutive_ids(fast_engine) -> None:
    """With a KV stream per sequence the fast mode compacts too (a gap would cost a weight
    pass a step); in a shared pool ids do not matter and nothing moves. Either way the moved
    or unmoved streams finish their answers."""
    long_ones = [ask(q, system=None, ignore_eos=True) for q in QUESTIONS[1:3]]
    short = fast_engine.stream(
        ask(QUESTIONS[0], system=None).model_copy(update={"max_tokens": 10})
    )
    next(short)
    moves = fast_engine.batch_stats()["moves"]
    with ThreadPoolExecutor(2) as pool:
        texts = [pool.submit(lambda r=r: collect(fast_engine.stream(r))) for r in long_ones]
        assert list(short)[-1].finish_reason == "length"
        results = [t.result() for t in texts]
    assert [r.finish_reason for r in results] == ["length", "length"]
    moved = fast_engine.batch_stats()["moves"] - moves
    assert moved == 0 if fast_engine.kv_unified else moved > 0


def test_default_engine_reuses_the_longest_cached_prefix(fast_engine) -> None:
    """Without batch invariance every cached token of a shared prefix is reused, not just
    whole 32-token blocks: short chats sharing only the chat template's system prompt (shorter
    than a block) get it for free, as with llama.cpp's server."""
    first, second = (ask(q, system="Be brief.") for q in ("Name a colour.", "What is 2+2?"))
    a, b = (fast_engine.tokenize_prompt(fast_engine.render(r)) for r in (first, second))
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert collect(fast_engine.stream(first)).text
    before = fast_engine.batch_stats()["reused_prompt_tokens"]
    assert collect(fast_engine.stream(second)).text
    reused = fast_engine.batch_stats()["reused_prompt_tokens"] - before
    assert reused == common and common % 32  # every shared token, not whole blocks only


def test_the_same_prompt_again_is_answered_from_the_kept_logits(tiny_model_path: Path) -> None:
    """An identical request evaluates nothing: its first token comes from the logits the first
    one ended its prompt with. Re-reading even the prompt's last token alone takes another
    kernel path, with flash attention most of all, and a greedy answer could change (CI saw it
    with flash attention on); the default engine and one with flash attention both keep it."""
    from edgelm.engines.llamacpp import LlamaCppEngine

    greedy = ask("Tell me about dogs.", system="Answer warmly.", logprobs=True, top_logprobs=2)
    for flash in (False, True):
        eng = LlamaCppEngine(
            tiny_model_path, "smollm2-135m", n_ctx=1024, threads=2, parallel=2, flash_attn=flash
        )
        try:
            first = collect(eng.stream(greedy))
            before = eng.batch_stats()
            again = collect(eng.stream(greedy))
            after = eng.batch_stats()
            assert again.text == first.text and again.logprobs == first.logprobs
            assert after["first_token_reuses"] - before["first_token_reuses"] == 1
            assert (
                after["reused_prompt_tokens"] - before["reused_prompt_tokens"]
                == first.usage.prompt_tokens
            )
            # A prompt that differs only in its question is read again from where they differ.
            collect(eng.stream(ask("Tell me about cows.", system="Answer warmly.")))
            assert eng.batch_stats()["first_token_reuses"] == after["first_token_reuses"]
        finally:
            eng.close()


def test_kept_logits_are_sampled_as_llama_cpp_samples_them(engine) -> None:
    """Batch-invariant mode: a seeded request's first token drawn from the kept row (our
    candidates array through the sampler chain) is the one llama.cpp drew from its own logits
    the first time; a row kept from a non-reproducible request never serves an exact one."""
    seeded = ask("Write a poem about rain.").model_copy(update={"temperature": 0.8, "seed": 11})
    first = collect(engine.stream(seeded)).text
    reuses = engine.batch_stats()["first_token_reuses"]
    assert collect(engine.stream(seeded)).text == first
    assert engine.batch_stats()["first_token_reuses"] == reuses + 1

    loose = ask("Name a river.").model_copy(update={"temperature": 0.7})  # no seed: not exact
    greedy = ask("Name a river.")
    collect(engine.stream(loose))
    reuses = engine.batch_stats()["first_token_reuses"]
    warm = collect(engine.stream(greedy)).text
    assert engine.batch_stats()["first_token_reuses"] == reuses
    assert collect(engine.stream(greedy)).text == warm  # this one's own row is exact
    assert engine.batch_stats()["first_token_reuses"] == reuses + 1


def test_default_engine_batches_concurrent_streams(fast_engine) -> None:
    requests = [ask(q, system=None) for q in QUESTIONS]
    steps = fast_engine.batch_stats()["decode_steps"]
    answers = together(fast_engine, requests)
    assert all(answers)
    assert fast_engine.batch_stats()["decode_steps"] - steps < 4 * 24 - 24


def test_a_second_model_adds_no_native_compute_threads(tiny_model_path: Path) -> None:
    """Every evaluation runs on one process-wide thread, so OpenMP keeps one team of workers
    whatever is loaded. A second team (one per evaluating thread) outnumbered the cores, and
    libgomp then all but stopped spinning at barriers: the 1.5B model decoded 25% slower while
    an idle 0.5B model sat in the same service."""
    import os

    from edgelm.engines.llamacpp import LlamaCppEngine

    def native_threads() -> int:  # OS threads that Python did not start (OpenMP's workers)
        return len(os.listdir("/proc/self/task")) - threading.active_count()

    first = LlamaCppEngine(tiny_model_path, "a", n_ctx=512, threads=2)
    second = LlamaCppEngine(tiny_model_path, "b", n_ctx=512, threads=2)
    try:
        assert collect(first.stream(ask("Name a colour.", system=None))).text
        before = native_threads()
        assert collect(second.stream(ask("Name a colour.", system=None))).text
        assert second.embed(["a sentence to embed"])[0]
        assert native_threads() == before
    finally:
        first.close()
        second.close()


def test_schedulers_take_turns_on_the_one_compute_thread(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread per model: every scheduler's turns (sampling, admission) and every
    llama_decode run on the compute loop's thread, so no token waits for thread hand-offs; a
    closed model leaves the loop."""
    from edgelm.engines import batching
    from edgelm.engines.llamacpp import LlamaCppEngine

    ran_on: set[str] = set()
    turn = batching.BatchScheduler.turn

    def noted_turn(self: batching.BatchScheduler) -> None:
        ran_on.add(threading.current_thread().name)
        turn(self)

    monkeypatch.setattr(batching.BatchScheduler, "turn", noted_turn)
    threads_before = threading.active_count()
    first = LlamaCppEngine(tiny_model_path, "a", n_ctx=512, threads=2, parallel=2)
    second = LlamaCppEngine(tiny_model_path, "b", n_ctx=512, threads=2, parallel=2)
    schedulers = [first._scheduler, second._scheduler]
    try:
        assert collect(first.stream(ask("Name a colour.", system=None))).text
        assert collect(second.stream(ask("Name a fruit.", system=None))).text
        assert ran_on == {"edgelm-compute"}
        # at most the compute loop itself, if no earlier test had started it
        assert threading.active_count() <= threads_before + 1
    finally:
        first.close()
        second.close()
    loop = batching.compute_loop()
    assert not [s for s in schedulers if s in loop._schedulers]


def test_a_long_prompt_joining_a_running_stream_is_read_in_paced_chunks(fast_engine) -> None:
    """Chunked prefill: while a stream decodes, a newcomer's long prompt rides along in
    chunks within the pacer's budget, so the running stream keeps getting tokens meanwhile
    (decode steps go on) instead of waiting for the whole prompt."""
    scheduler = fast_engine._scheduler
    runner = GenerationRequest(
        messages=[Message(role="user", content="Count from one to a hundred.")],
        temperature=0,
        max_tokens=400,
        ignore_eos=True,
    )
    started = threading.Event()
    produced: list[int] = []

    def run() -> None:
        for chunk in fast_engine.stream(runner):
            produced.append(chunk.completion_tokens)
            if len(produced) >= 10:
                started.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(120)
        newcomer = GenerationRequest(
            messages=[Message(role="user", content=" ".join(f"item{i}" for i in range(150)))],
            temperature=0,
            max_tokens=2,
        )
        n_prompt = fast_engine.count_tokens(fast_engine.render(newcomer))
        before = scheduler.steps
        budget = scheduler.pacer.budget(1)
        stream = fast_engine.stream(newcomer)
        next(stream)  # its first token: the whole prompt is in
        during = scheduler.steps - before
        list(stream)
    finally:
        thread.join()
    assert budget < n_prompt  # not one n_batch step: a stream was decoding
    # The prompt took several steps, each of which also advanced the running stream (unless
    # it had finished meanwhile, after which the rest is read at once).
    assert during >= 2
    assert scheduler.pacer.row_s is not None and 1 in scheduler.pacer.decode_s
    assert produced[-1] == 400
