"""Long prompts read in the flash-attention prefill context, on the real tiny model.

The engine runs without flash attention (it decodes faster without it on CPUs) and reads
prompts of PREFILL_MIN_TOKENS or more in a second context with it, then moves the KV entries
into the prompt's slot, V transposed. These tests compare the slot's entries with what the
prefill context computed, byte for byte, so a wrong layout, a wrong stream or an entry
overwritten afterwards fails them; no timings are asserted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgelm.engines.base import collect
from edgelm.engines.batching import evaluate
from edgelm.engines.prefill_context import PREFILL_MIN_TOKENS, convert_seq_state, save_seq
from edgelm.types import GenerationRequest, Message

pytestmark = pytest.mark.integration


def numbers(n: int, start: int = 1, **kw) -> GenerationRequest:
    text = "Continue this list: " + ", ".join(str(i) for i in range(start, start + n)) + ","
    return GenerationRequest(
        messages=[Message(role="user", content=text)], temperature=0, **kw
    )


@contextmanager
def streaming(engine, request: GenerationRequest) -> Iterator[None]:
    """A stream running (its first token out) for the duration of the block, then cancelled
    and its thread joined."""
    started, stop = threading.Event(), threading.Event()

    def run() -> None:
        for _chunk in engine.stream(request, cancel=stop):
            started.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(60)
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture
def engine(tiny_model_path: Path):
    from edgelm.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_model_path, "smollm2-135m", n_ctx=2048, threads=2, parallel=2)
    yield eng
    eng.close()


def slot_matches_prefill_context(engine, seq_id: int, n_tokens: int) -> bool:
    """Whether the first ``n_tokens`` KV entries of ``seq_id`` are those the prefill context
    holds (it holds exactly the last prompt it read), compared in its layout."""
    scheduler = engine._scheduler
    lib, ctx, mem = scheduler._lib, scheduler._ctx, scheduler._mem

    def read() -> bytes:
        lib.llama_memory_seq_rm(mem, seq_id, n_tokens, -1)
        scheduler.slots[seq_id].tokens = scheduler.slots[seq_id].tokens[:n_tokens]
        return convert_seq_state(save_seq(lib, ctx, seq_id), v_trans=False, n_stream=1)

    moved = evaluate(read)
    prefill = scheduler._prefill
    assert prefill is not None and len(prefill.tokens) == n_tokens
    return moved[8:] == prefill.state()[8:]  # past the header, which names the sequence


def test_a_long_prompt_is_read_with_flash_attention_and_its_kv_moved_intact(
    engine, tiny_model_path: Path
) -> None:
    from edgelm.engines.llamacpp import LlamaCppEngine

    request = numbers(150, max_tokens=1)
    n_prompt = engine.count_tokens(engine.render(request))
    assert n_prompt >= PREFILL_MIN_TOKENS
    info = engine.live_info()
    assert info["flash_prefill"] and not info["flash_attn"]

    assert collect(engine.stream(request)).usage.prompt_tokens == n_prompt
    assert engine.batch_stats()["flash_prefill_prompts"] == 1
    slot = next(s for s in engine._scheduler.slots if s.tokens)
    assert slot_matches_prefill_context(engine, slot.seq_id, n_prompt)

    # The answer decodes from the moved entries as from a prompt read here.
    longer = request.model_copy(update={"max_tokens": 8})
    plain = LlamaCppEngine(
        tiny_model_path, "smollm2-135m", n_ctx=2048, threads=2, parallel=2, flash_prefill=False
    )
    try:
        expected = collect(plain.stream(longer)).text
        assert plain.batch_stats()["flash_prefill_prompts"] == 0
    finally:
        plain.close()
    assert collect(engine.stream(longer)).text == expected
    # A short prompt is read in the engine's own context.
    collect(engine.stream(numbers(5, max_tokens=2)))
    assert engine.batch_stats()["flash_prefill_prompts"] == 1


def test_a_prompt_moved_into_a_slot_with_a_queued_stream_copy_is_not_overwritten(
    engine,
) -> None:
    """llama.cpp copies a KV stream (a prefix handed to another slot) only at the next
    llama_decode. A prompt read entirely in the prefill context within the same turn lands
    in its slot before that: unless the copy is done first, it overwrites the prompt."""
    runner = GenerationRequest(
        messages=[Message(role="user", content="Count from one to a hundred.")],
        temperature=0,
        max_tokens=1500,
        ignore_eos=True,
    )
    with streaming(engine, runner):  # the runner holds slot 0
        collect(engine.stream(numbers(100, max_tokens=4)))  # read in the prefill context, slot 1
        assert engine.batch_stats()["running"] == 1
    # the runner has left; slot 0 is free
    while engine.batch_stats()["running"]:  # its stream ends before the scheduler frees it
        time.sleep(0.01)
    before = engine.batch_stats()
    # Shares its start with the prompt slot 1 holds; slot 0 is the lowest free: that prefix is
    # copied over, and the rest (over PREFILL_MIN_TOKENS) read in the prefill context.
    request = numbers(200, max_tokens=2)
    n_prompt = engine.count_tokens(engine.render(request))
    collect(engine.stream(request))
    after = engine.batch_stats()
    assert after["prefix_copies"] == before["prefix_copies"] + 1
    assert after["flash_prefill_prompts"] == before["flash_prefill_prompts"] + 1
    # The second token was decoded in slot 0: llama.cpp did any queued copy by then.
    assert engine._scheduler.slots[0].tokens[:n_prompt] == engine._scheduler._prefill.tokens
    assert slot_matches_prefill_context(engine, 0, n_prompt)


def test_a_prompt_waiting_when_another_finishes_in_the_prefill_context_is_paced(
    tiny_model_path: Path,
) -> None:
    """Two long prompts arrive together with pacing on (prefill_stall 2). The first is read in
    the prefill context while nothing decodes, then sends its first token and decodes: the
    second must then be read in paced chunks between its decode steps, not whole in the step
    that sent that first token (which held the first stream's second token for the whole
    of the other prompt)."""
    from edgelm.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(
        tiny_model_path, "smollm2-135m", n_ctx=2048, threads=2, parallel=2, prefill_stall=2.0
    )
    scheduler = eng._scheduler
    firsts: dict[int, int] = {}

    def run(i: int) -> None:
        request = numbers(120, start=1000 * (i + 1), max_tokens=40, ignore_eos=True)
        for chunk in eng.stream(request):
            if chunk.completion_tokens and i not in firsts:
                firsts[i] = scheduler.steps

    try:
        admitted_together(eng, run, 2)
        assert scheduler.stats()["flash_prefill_prompts"] == 2
    finally:
        eng.close()
    early, late = sorted(firsts.values())
    assert late - early >= 2  # the later prompt was read across the earlier one's decode steps


def plain_answer(tiny_model_path: Path, request: GenerationRequest) -> str:
    """The answer of an engine that reads every prompt in its own context."""
    from edgelm.engines.llamacpp import LlamaCppEngine

    plain = LlamaCppEngine(
        tiny_model_path, "smollm2-135m", n_ctx=2048, threads=2, parallel=2, flash_prefill=False
    )
    try:
        return collect(plain.stream(request)).text
    finally:
        plain.close()


def test_a_prefix_the_prefill_context_refuses_to_take_is_read_from_the_start(
    engine, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot holds more of a long prompt than the prefill context, so its prefix is moved
    over; llama.cpp refuses the state (and empties the sequence). The prompt must then be read
    from its first token, not from where the prefill context's old prefix ended."""
    from edgelm.engines import prefill_context

    collect(engine.stream(numbers(150, max_tokens=1)))  # the prefill context holds it whole
    scheduler = engine._scheduler
    prefill = scheduler._prefill
    assert prefill is not None
    evaluate(lambda: prefill.start(prefill.tokens[:40]))  # now only its first 39 tokens
    assert len(prefill.tokens) == 39

    def refused(lib, ctx, seq_id: int, _state: bytes) -> bool:
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), seq_id, -1, -1)
        return False

    monkeypatch.setattr(prefill_context, "load_seq", refused)
    longer = numbers(250, max_tokens=8)  # shares ~400 tokens with what slot 0 holds
    assert collect(engine.stream(longer)).text == plain_answer(tiny_model_path, longer)
    assert engine.batch_stats()["flash_prefill_prompts"] == 2


def test_a_prefill_context_that_fails_is_closed_and_prompts_are_read_here(
    engine, tiny_model_path: Path
) -> None:
    """A llama_decode failure in the prefill context (no memory for its compute buffer, say)
    is not retried: the prompt is read in the decoding context, then every later one, and
    the context's cache is freed. Retrying chose the same prompt every step and never read it."""
    scheduler = engine._scheduler
    opened: list[object] = []
    open_prefill = scheduler._open_prefill

    def failing_prefill():
        context = open_prefill()
        context.read = lambda chunk, threads: -3
        opened.append(context)
        return context

    scheduler._open_prefill = failing_prefill
    requests = [numbers(150, max_tokens=6), numbers(160, start=7, max_tokens=6)]
    answers: list[str] = []

    def run() -> None:
        answers.extend(collect(engine.stream(request)).text for request in requests)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the long prompt was never read"
    assert len(opened) == 1 and scheduler._prefill is None
    assert engine.batch_stats()["flash_prefill_prompts"] == 0
    assert answers == [plain_answer(tiny_model_path, r) for r in requests]


def test_a_step_in_which_a_prompt_finishes_in_the_prefill_context_stays_within_its_budget(
    tiny_model_path: Path,
) -> None:
    """With pacing on, the prompt rows of one step (those read in the prefill context and
    those read here) stay within the budget of that step, also in the step in which the
    prefill context's prompt sends its first token while another prompt waits and a stream
    decodes. Before, the waiting prompt got a fresh budget on top of what the prefill context
    had just read."""
    from edgelm.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_model_path, "smollm2-135m", n_ctx=2048, threads=2, parallel=3)
    scheduler = eng._scheduler
    # Budgets fixed rather than learned from timings: 400 prompt rows a step while anything
    # decodes, so the first long prompt (~330 tokens) is read whole in the prefill context in
    # one step and leaves the rest of that step's 400 to the second.
    scheduler.pacer.budget = lambda decoding: scheduler.n_batch if decoding == 0 else 400
    steps: list[tuple[int, int, int, int]] = []  # decoding, budget, side rows, rows here
    record: dict[str, int] = {}
    mixed, side, fill = scheduler._mixed_step, scheduler._side_step, scheduler._fill

    def mixed_step() -> None:
        decoding = sum(1 for j in scheduler._running if not j.todo and j.last >= 0)
        record.clear()
        record.update(decoding=decoding, budget=scheduler.pacer.budget(decoding))
        mixed()
        if "side" in record or "prompt" in record:
            steps.append(
                (decoding, record["budget"], record.get("side", 0), record.get("prompt", 0))
            )

    def side_step(job, take: int) -> None:
        record["side"] = take
        side(job, take)

    def counted_fill(rows) -> None:
        record["prompt"] = record.get("prompt", 0) + len(rows) - record["decoding"]
        fill(rows)

    scheduler._mixed_step, scheduler._side_step = mixed_step, side_step
    scheduler._fill = counted_fill
    try:
        with streaming(eng, numbers(5, max_tokens=300, ignore_eos=True)):
            admitted_together(
                eng, lambda i: collect(eng.stream(numbers(110, start=100 * i, max_tokens=2))), 2
            )
        assert scheduler.stats()["flash_prefill_prompts"] >= 1
    finally:
        eng.close()
    paced = [s for s in steps if s[0] > 0]
    assert paced, "no prompt was read while a stream decoded"
    over = [s for s in paced if s[2] + s[3] > s[1]]
    assert not over, f"steps over their budget (decoding, budget, side rows, rows here): {over}"


def admitted_together(eng, run: Callable[[int], object], n: int) -> None:
    """``run(0..n-1)`` on threads, their requests admitted in one turn: the compute loop is
    held (between turns, running streams or not) until all n wait. Returns when all are done."""
    scheduler = eng._scheduler
    holding, queued = threading.Event(), threading.Event()

    def hold_loop() -> None:
        holding.set()
        queued.wait(30)

    hold = threading.Thread(target=evaluate, args=(hold_loop,))
    hold.start()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    try:
        assert holding.wait(30)
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while scheduler.stats()["waiting"] < n:
            assert time.monotonic() < deadline, "the requests did not all queue"
            time.sleep(0.01)
    finally:
        queued.set()
        for t in [hold, *threads]:
            if t.ident is not None:  # started
                t.join()
