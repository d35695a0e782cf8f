"""Batched groups in the ONNX engine, on the real tiny model (SmolLM2-135M, int4 ONNX):
requests that arrive together decode as the rows of one batched generator (one weight pass a
step for all of them), with our own per-request sampling, and answer as they do alone.

The scheduler's counters show that a group formed (batched_steps, largest_batch); the texts
that batching changed no greedy or seeded answer. No timings are asserted.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgelm.catalog import Catalog
from edgelm.engines.base import collect
from edgelm.types import GenerationRequest, Message

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

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


@pytest.fixture(scope="module")
def alone_engine(model_dir: Path):
    """One slot: every request alone, never batched (the reference answers)."""
    eng = make(model_dir, parallel=1)
    yield eng
    eng.close()


def ask(question: str, **kw) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message(role="user", content=question)],
        **{"temperature": 0, "max_tokens": 24, **kw},
    )


def together(engine, requests: list[GenerationRequest]):
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: collect(engine.stream(r)), requests))


def test_concurrent_greedy_and_seeded_requests_share_passes_and_answer_as_alone(
    engine, alone_engine
) -> None:
    requests = [ask(q, ignore_eos=True) for q in QUESTIONS[:2]] + [
        ask(q, temperature=0.8, seed=7 + i, logprobs=True, top_logprobs=3)
        for i, q in enumerate(QUESTIONS[2:])
    ]
    alone = [collect(alone_engine.stream(r)) for r in requests]
    before = engine.batch_stats()
    results = together(engine, requests)
    after = engine.batch_stats()
    assert [r.text for r in results] == [a.text for a in alone] and all(a.text for a in alone)
    assert [r.finish_reason for r in results] == [a.finish_reason for a in alone]
    # They arrived together, so they decoded as one group: one pass a step for all four.
    assert after["batch_groups"] - before["batch_groups"] == 1
    assert after["largest_batch"] == 4
    assert after["batched_steps"] - before["batched_steps"] >= 20
    assert after["batched_tokens"] - before["batched_tokens"] == sum(
        r.usage.completion_tokens for r in results
    )
    assert after["running"] == 0 and after["batch_groups_running"] == 0
    # Logprobs of a batched row are rows of the real distribution, as alone.
    for got, ref in zip(results[2:], alone[2:], strict=True):
        assert got.logprobs is not None and ref.logprobs is not None
        assert len(got.logprobs) == got.usage.completion_tokens
        for a, b in zip(got.logprobs, ref.logprobs, strict=True):
            assert a["token"] == b["token"] and a["logprob"] <= 0
            assert abs(a["logprob"] - b["logprob"]) < 0.05
            top = [value for _, value in a["top"]]
            assert len(top) == 3 and 0 < sum(math.exp(v) for v in top) <= 1.0 + 1e-4


def test_a_request_arriving_mid_group_is_served_beside_it(engine, alone_engine) -> None:
    group = [ask(q, max_tokens=60, ignore_eos=True) for q in QUESTIONS[:3]]
    late = ask("Say hello.", max_tokens=12)
    ref_late = collect(alone_engine.stream(late)).text
    ref_group = [collect(alone_engine.stream(r)).text for r in group]
    started = threading.Event()
    ends: list[float] = []
    lock = threading.Lock()

    def run(request: GenerationRequest) -> str:
        chunks = []
        for chunk in engine.stream(request):
            chunks.append(chunk)
            if len(chunks) == 3:
                started.set()
        with lock:
            ends.append(time.perf_counter())
        return collect(iter(chunks)).text

    before = engine.batch_stats()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run, r) for r in group]
        assert started.wait(300)
        running = engine.batch_stats()
        assert running["batch_groups_running"] == 1 and running["batched_streams_running"] == 3
        late_text = collect(engine.stream(late)).text
        late_end = time.perf_counter()
        texts = [f.result() for f in futures]
    assert late_text == ref_late and texts == ref_group
    # The late request finished while the group was still decoding: it took turns with it
    # rather than waiting for the group's end.
    assert late_end < max(ends)
    after = engine.batch_stats()
    assert after["batch_groups"] - before["batch_groups"] == 1 and after["running"] == 0


def test_cancelling_one_member_leaves_the_others_intact(engine, alone_engine) -> None:
    requests = [ask(q) for q in QUESTIONS]
    alone = [collect(alone_engine.stream(r)).text for r in requests]
    cancel = threading.Event()
    barrier = threading.Barrier(len(requests))
    results: dict[int, object] = {}

    def run(i: int) -> None:
        barrier.wait()
        chunks = []
        for chunk in engine.stream(requests[i], cancel if i == 0 else None):
            chunks.append(chunk)
            if i == 0 and len(chunks) == 2:
                cancel.set()
        results[i] = collect(iter(chunks))

    before = engine.batch_stats()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = engine.batch_stats()
    cancelled = results[0]
    assert cancelled.finish_reason == "cancelled" and cancelled.usage.completion_tokens <= 3
    assert [results[i].text for i in range(1, len(requests))] == alone[1:]
    assert after["batch_groups"] - before["batch_groups"] == 1 and after["largest_batch"] == 4
    assert after["batch_rows_wasted"] > before["batch_rows_wasted"]  # the cancelled row's
    assert after["running"] == 0 and after["batch_groups_running"] == 0


def test_stop_sequences_and_limits_hold_in_a_group(engine, alone_engine) -> None:
    counting = GenerationRequest(prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=30)
    free = collect(alone_engine.stream(counting)).text
    assert " 8" in free
    requests = [
        counting.model_copy(update={"stop": [" 8"]}),
        ask("Write a long poem.", max_tokens=7),
        counting.model_copy(update={"stop": [" 7", " 9"]}),
        ask("Write a long story.", max_tokens=20, ignore_eos=True),
    ]
    before = engine.batch_stats()["batch_groups"]
    results = together(engine, requests)
    assert engine.batch_stats()["batch_groups"] > before
    assert results[0].finish_reason == "stop" and results[0].text == free[: free.index(" 8")]
    assert results[1].finish_reason == "length" and results[1].usage.completion_tokens == 7
    assert results[2].finish_reason == "stop" and results[2].text == free[: free.index(" 7")]
    assert results[3].finish_reason == "length" and results[3].usage.completion_tokens == 20


def test_a_half_finished_group_hands_its_sampled_survivor_to_a_single_stream(engine) -> None:
    """Sampled requests (no seed) of very different lengths: once three of four have finished,
    the group ends and the survivor goes on alone, re-reading its prompt and answer so far."""
    requests = [ask(q, temperature=0.7, max_tokens=3, ignore_eos=True) for q in QUESTIONS[:3]]
    requests.append(ask(QUESTIONS[3], temperature=0.7, max_tokens=40, ignore_eos=True))
    before = engine.batch_stats()
    results = together(engine, requests)
    after = engine.batch_stats()
    assert [r.usage.completion_tokens for r in results] == [3, 3, 3, 40]
    assert all(r.finish_reason == "length" and r.text for r in results)
    assert after["batch_groups"] - before["batch_groups"] == 1
    # The group ran only while most of it was alive: ~3 batched steps, not 40.
    assert after["batched_steps"] - before["batched_steps"] <= 4
    # The survivor re-read its prompt and the tokens it had (KV from a slot's generator).
    assert after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"] > sum(
        r.usage.prompt_tokens for r in results
    )
    assert after["running"] == 0 and after["batch_groups_running"] == 0


def test_a_group_out_of_room_goes_on_as_single_streams(engine, monkeypatch) -> None:
    """A group is made for GROUP_SPAN new tokens (its KV cache is zeroed up front); longer
    answers go on as single streams after re-reading their prompt and answer so far."""
    from edgelm.engines import onnx_scheduler

    monkeypatch.setattr(onnx_scheduler, "GROUP_SPAN", 8)
    requests = [ask(q, max_tokens=20, ignore_eos=True) for q in QUESTIONS[:2]]
    before = engine.batch_stats()
    results = together(engine, requests)
    after = engine.batch_stats()
    assert [r.usage.completion_tokens for r in results] == [20, 20]
    assert all(r.finish_reason == "length" and r.text for r in results)
    assert after["batch_groups"] - before["batch_groups"] == 1
    assert after["batched_steps"] - before["batched_steps"] == 9  # 8 fed, then the 9th sampled
    # The group's prompts, then each survivor's prompt and 9 tokens again (evaluated, or found
    # in a slot's cache).
    reread = sum(after[k] - before[k] for k in ("prompt_tokens_evaluated", "reused_prompt_tokens"))
    assert reread == 2 * sum(r.usage.prompt_tokens for r in results) + 2 * 9
    assert after["running"] == 0 and after["batch_groups_running"] == 0
