"""Which requests arriving together share a batched ONNX generator (pick_group).

A group's prompts are right-padded to the longest and read in one pass before any member's
first token, so a group is made of prompts of similar length within one n_batch pass; the
others are single streams."""

from __future__ import annotations

import pytest

from edgelm.engines.onnx_scheduler import pick_group
from tests.unit.test_onnx_first_token import job, run


def test_similar_short_prompts_all_share_one_pass() -> None:
    assert pick_group([36, 35, 34, 34], 2048) == [0, 1, 2, 3]
    assert pick_group([40] * 8, 512) == list(range(8))


def test_a_long_prompt_is_not_padded_into_a_group_of_short_ones() -> None:
    # The bench's long set: 4 x 1821 padded tokens before; now the three of similar length.
    assert pick_group([347, 455, 1821, 549], 2048) == [0, 1, 3]
    # Mostly padding whatever the pass: no group at all.
    assert pick_group([30, 300], 2048) == []


def test_the_pass_stays_within_n_batch_and_prefers_the_shortest() -> None:
    assert pick_group([300] * 8, 2048) == [0, 1, 2, 3, 4, 5]  # 6 x 300 <= 2048 < 7 x 300
    # Two groups of two would fit; the shorter prompts get it (first tokens sooner).
    assert pick_group([200, 100, 210, 101], 420) == [1, 3]
    assert pick_group([600, 600], 1000) == []
    assert pick_group([5], 2048) == [] and pick_group([], 2048) == []


def test_padding_may_be_offset_by_more_members_of_the_longest_length() -> None:
    # 80 + 100: 20 of 180 padded (11%); adding 100s only lowers the share.
    assert pick_group([80, 100, 100, 100], 2048, pad_max=0.12) == [0, 1, 2, 3]
    assert pick_group([50, 100], 2048, pad_max=0.25) == []  # 50 of 150 padded


def test_the_scheduler_reads_a_long_newcomer_alone_beside_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log: list[str] = []
    monkeypatch.setattr("edgelm.engines.onnx_scheduler.time.sleep", lambda s: None)
    short_a, short_b, long = job(log, "a"), job(log, "b"), job(log, "c")
    long.prompt = list(range(1, 41))
    run(log, [short_a, short_b, long], batched=True)
    # One pass of 2 x 4 prompt tokens for the group; the 40-token prompt read on its own.
    assert "pass 8" in log and "pass 40" in log
    assert not any(entry == "pass 120" for entry in log)
    assert all(j.produced for j in (short_a, short_b, long))

