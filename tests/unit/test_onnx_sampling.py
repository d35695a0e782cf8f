"""The ONNX engine's own sampler and prefix-reuse plan (pure numpy: no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.engines.batching import Sampling
from edgelm.engines.onnx_scheduler import (
    chunk_size,
    forced_logits,
    plan_keep,
    right_padded,
    sample,
)


def logits(n: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32) * 3


def draw(row: np.ndarray, s: Sampling, seed: int, n: int = 200, **kw) -> list[int]:
    rng = np.random.default_rng(seed)
    return [sample(row, s, rng, [], [], **kw) for _ in range(n)]


def test_greedy_is_the_argmax_and_never_a_banned_token() -> None:
    row = logits()
    best = int(row.argmax())
    assert sample(row, Sampling(temperature=0), None, [], []) == best
    second = int(np.argsort(row)[-2])
    assert sample(row, Sampling(temperature=0), None, [], [], frozenset({best})) == second
    assert row.argmax() == best  # the caller's row is left as it was


def test_a_seed_reproduces_the_draws_and_another_seed_changes_them() -> None:
    row = logits()
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0)
    assert draw(row, s, 7) == draw(row, s, 7)
    assert draw(row, s, 7) != draw(row, s, 8)


def test_top_k_top_p_and_min_p_bound_the_candidates() -> None:
    row = logits()
    order = [int(t) for t in np.argsort(-row)]
    assert set(draw(row, Sampling(temperature=1.0, top_k=3, top_p=1.0, min_p=0), 1)) <= set(
        order[:3]
    )
    assert set(draw(row, Sampling(temperature=1.0, top_k=1, top_p=1.0, min_p=0), 1)) == {
        order[0]
    }
    # A nucleus smaller than the top token's probability leaves only that token.
    assert set(draw(row, Sampling(temperature=1.0, top_k=0, top_p=1e-6, min_p=0), 1)) == {
        order[0]
    }
    # min_p 1.0: only tokens as likely as the best one.
    assert set(draw(row, Sampling(temperature=1.0, top_k=50, top_p=1.0, min_p=1.0), 1)) == {
        order[0]
    }
    # No cut at all: draws spread over many tokens, following the distribution.
    spread = draw(row, Sampling(temperature=1.0, top_k=0, top_p=0.9, min_p=0), 2, n=400)
    assert len(set(spread)) > 5 and spread.count(order[0]) > spread.count(order[20])


def test_penalties_push_repeated_tokens_down() -> None:
    row = np.zeros(10, dtype=np.float32)
    row[3], row[4] = 2.0, 1.9
    greedy = Sampling(temperature=0)
    assert sample(row, greedy, None, [3], [3]) == 3
    assert sample(row, Sampling(temperature=0, repeat_penalty=1.5), None, [3], []) == 4
    assert sample(row, Sampling(temperature=0, presence_penalty=0.5), None, [], [3]) == 4
    assert sample(row, Sampling(temperature=0, frequency_penalty=0.04), None, [], [3, 3, 3]) == 4


@pytest.mark.parametrize(
    ("cached", "clean", "prompt", "exact", "keep"),
    [
        ([1, 2, 3, 4, 5], 5, [1, 2, 3, 4, 5, 6, 7], True, 5),  # a clean prefix, two still to go
        ([1, 2, 3, 4, 5], 5, [1, 2, 3, 4, 5, 6], True, 4),  # at least two tokens evaluated
        ([1, 2, 3, 4, 5], 3, [1, 2, 3, 4, 5, 6, 7], True, 3),  # generated rows are not clean
        ([1, 2, 3, 4, 5], 3, [1, 2, 3, 4, 5, 6, 7], False, 5),  # sampling keeps them
        ([1, 2, 3], 3, [1, 2, 3], False, 2),  # the last token's logits are needed
        ([1, 2, 9], 3, [1, 2, 3, 4], True, 2),
        ([], 0, [1, 2], True, 0),
        ([1], 1, [1], True, 0),
    ],
)
def test_reuse_plan(cached, clean, prompt, exact, keep) -> None:
    assert plan_keep(cached, clean, prompt, exact) == keep


def test_prompt_chunks_never_leave_a_lone_token() -> None:
    assert chunk_size(1, 512) == 1  # a one-token prompt is one token however it is cut
    assert chunk_size(600, 512) == 512
    assert chunk_size(513, 512) == 511  # not 512 then 1
    assert chunk_size(300, 1) == 0  # wait for a turn with room for two
    assert chunk_size(3, 2) == 0  # 2 would leave a lone one, 1 would be one


def test_a_group_s_prompts_are_padded_after_their_end() -> None:
    out = right_padded([[5, 6, 7], [8], [9, 10]], pad=2)
    assert out.dtype == np.int32
    assert out.tolist() == [[5, 6, 7], [8, 2, 2], [9, 10, 2]]


def test_forced_logits_make_the_argmax_each_row_s_choice() -> None:
    tokens = np.array([3, 0, 7])
    forced = forced_logits((3, 1, 8), tokens)
    assert forced.shape == (3, 1, 8) and forced.dtype == np.float32
    assert np.argmax(forced[:, -1, :], axis=-1).tolist() == [3, 0, 7]
    assert (np.sort(forced[:, -1, :], axis=-1)[:, -2] < -1e8).all()  # one candidate a row
