"""Chunked prefill: the step plans the batch scheduler makes from scripted queues, on a fake
engine whose step time follows a cost model (no model loaded)."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field

import pytest

from edgelm.engines.batching import PrefillPacer, take_prompts


def step_seconds(decoding: int, prompt_rows: int) -> float:
    """A CPU-like cost model: a weight pass, a little per decode row, and prompt rows that
    cost more per token in small chunks than in big batches."""
    per_row = 0.0045 if prompt_rows >= 256 else 0.007
    return 0.030 + 0.006 * decoding + per_row * prompt_rows


@dataclass
class FakeJob:
    todo: int  # prompt tokens still to read
    tokens_left: int  # tokens still to generate
    gaps: list[int] = field(default_factory=list)  # step index of each token


def run_steps(pacer: PrefillPacer, jobs: list[FakeJob], arrivals: dict[int, FakeJob], steps: int):
    """Drive the pacer as BatchScheduler._mixed_step does; return (decoding, prompt rows,
    seconds) per step and each job's token times."""
    plan = []
    clock = 0.0
    times: dict[int, list[float]] = {}
    for step in range(steps):
        if step in arrivals:
            jobs.append(arrivals[step])
        running = [j for j in jobs if j.todo or j.tokens_left]
        decoding = [j for j in running if not j.todo]
        waiting = [j for j in running if j.todo]
        taken = take_prompts([j.todo for j in waiting], pacer.budget(len(decoding)))
        if not decoding and not taken:
            break
        seconds = step_seconds(len(decoding), sum(taken))
        clock += seconds
        pacer.observe(len(decoding), sum(taken), seconds)
        plan.append((len(decoding), sum(taken), seconds))
        for job in decoding:
            job.tokens_left -= 1
            times.setdefault(id(job), []).append(clock)
        for job, take in zip(waiting, taken, strict=False):
            job.todo -= take
            if not job.todo:  # the first token comes with the prompt's last row
                job.tokens_left -= 1
                times.setdefault(id(job), []).append(clock)
    return plan, times


def test_take_prompts_fills_the_budget_oldest_first() -> None:
    assert take_prompts([100, 50, 30], 120) == [100, 20]
    assert take_prompts([10, 10], 100) == [10, 10]
    assert take_prompts([100], 0) == []
    assert take_prompts([], 64) == []


def test_a_prompt_alone_is_read_in_full_batches() -> None:
    pacer = PrefillPacer(n_batch=2048)
    plan, _ = run_steps(pacer, [FakeJob(todo=5000, tokens_left=3)], {}, 10)
    assert [rows for _, rows, _ in plan[:3]] == [2048, 2048, 904]
    assert all(decoding == 0 for decoding, _, _ in plan[:3])


def test_a_long_prompt_joining_four_streams_never_doubles_their_token_gaps() -> None:
    pacer = PrefillPacer(n_batch=2048, stall=2.0)
    # Four streams start together (one 2048-token step reads all their prompts), decode a
    # while, then a 1024-token prompt arrives.
    jobs = [FakeJob(todo=200, tokens_left=400) for _ in range(4)]
    newcomer = FakeJob(todo=1024, tokens_left=20)
    plan, times = run_steps(pacer, jobs, {20: newcomer}, 400)
    assert plan[0] == (0, 800, pytest.approx(step_seconds(0, 800)))
    mixed = [seconds for decoding, rows, seconds in plan if decoding and rows]
    plain = [seconds for decoding, rows, seconds in plan if decoding == 4 and not rows]
    assert mixed, "the newcomer's prompt rode along in decode steps"
    assert max(mixed) <= 2.0 * statistics.median(plain) * 1.02
    # The budget adapts: steps are not needlessly tiny either (the model allows ~8 rows).
    assert max(rows for decoding, rows, _ in plan if decoding) >= 6
    assert newcomer.todo == 0 and newcomer.tokens_left == 0
    for job in jobs:
        stamps = times[id(job)]
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert max(gaps) <= 2.0 * statistics.median(gaps) * 1.02


def test_without_pacing_the_same_queue_stalls_the_streams() -> None:
    """The check above can fail: with the whole n_batch per step (llama.cpp server's way),
    the same newcomer stalls the running streams for its whole prefill."""
    pacer = PrefillPacer(n_batch=2048, stall=100.0)
    jobs = [FakeJob(todo=200, tokens_left=400) for _ in range(4)]
    _plan, times = run_steps(pacer, jobs, {20: FakeJob(todo=1024, tokens_left=20)}, 400)
    stamps = times[id(jobs[0])]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) > 5 * statistics.median(gaps)


def test_budget_follows_measured_costs() -> None:
    pacer = PrefillPacer(n_batch=512, stall=2.0, first=32)
    assert pacer.budget(0) == 512
    assert pacer.budget(2) == 0  # no decode step measured: the next step measures one
    pacer.observe(2, 0, 0.040)
    assert pacer.budget(2) == 32  # no prompt cost measured yet
    pacer.observe(0, 512, 0.512)  # 1 ms a token in a big batch: seeded as 2 ms in chunks
    assert pacer.budget(2) == 20
    pacer.observe(2, 10, 0.040 + 10 * 0.004)  # measured: 4 ms a row when mixed
    assert pacer.budget(2) == 10
    for _ in range(20):  # the machine gets twice as slow: decode steps and prompt rows alike
        pacer.observe(2, 0, 0.080)
        pacer.observe(2, 10, 0.080 + 10 * 0.008)
    assert pacer.budget(2) in (9, 10)  # the moving averages have (nearly) caught up
    pacer.observe(0, 1, 5.0)  # a lone token's step says nothing about batch cost
    assert pacer.batch_row_s == pytest.approx(0.001)


def test_a_burst_of_long_prompts_is_read_in_full_batches_once_one_decodes() -> None:
    """Four 1k-token prompts arrive at once. When the first starts decoding, no plain decode
    step has been measured (none runs while prompts wait); the pacer measures one instead of
    guessing, and unpaced (the default) the other prompts go on in n_batch steps."""
    pacer = PrefillPacer(n_batch=512, stall=100.0)
    jobs = [FakeJob(todo=1024, tokens_left=64) for _ in range(4)]
    plan, _ = run_steps(pacer, jobs, {}, 400)
    while_decoding = [rows for decoding, rows, _ in plan[:12] if decoding]
    assert while_decoding[0] == 0  # the one measuring step
    # 99 decode steps' worth of prompt rows, a few hundred: big batches, not 32-token chunks
    assert min(while_decoding[1:6]) >= 256
    assert sum(rows for _, rows, _ in plan) == 4 * 1024
