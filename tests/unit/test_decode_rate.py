"""One definition of decode tokens/s, whoever measures it: the engine's timing, the bench's
per-request figures and the client's results must give the same number for the same times."""

from __future__ import annotations

import pytest

from edgelm.bench.results import RequestResult
from edgelm.bench.targets import _derive
from edgelm.client import ChatResult
from edgelm.engines.base import timing_from
from edgelm.types import Chunk, decode_rate, prompt_rate


def test_decode_rate_leaves_the_first_token_out() -> None:
    # 11 tokens, the first at 0.5 s, the last at 2.5 s: 10 tokens in 2 s.
    assert decode_rate(11, 0.5, 2.5) == pytest.approx(5.0)
    assert decode_rate(2, 1.0, 1.25) == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("tokens", "first", "end"),
    [
        (1, 0.5, 2.0),  # one token: nothing after the first
        (0, None, 2.0),  # no token at all
        (5, None, 2.0),  # no first-token time
        (5, 2.0, 2.0),  # no time after the first token
        (5, 2.5, 2.0),  # a clock that went backwards
    ],
)
def test_decode_rate_is_none_when_not_measurable(tokens, first, end) -> None:
    assert decode_rate(tokens, first, end) is None


def test_prompt_rate() -> None:
    assert prompt_rate(100, 0.5) == pytest.approx(200.0)
    assert prompt_rate(0, 0.5) is None
    assert prompt_rate(100, None) is None
    assert prompt_rate(100, 0.0) is None


@pytest.mark.parametrize(
    ("tokens", "first", "end"), [(11, 0.5, 2.5), (1, 0.5, 2.0), (3, 0.2, 0.2), (40, 0.31, 1.7)]
)
def test_engine_bench_and_client_agree(tokens, first, end) -> None:
    expected = decode_rate(tokens, first, end)
    timing = timing_from(first, Chunk(text="", t=end, prompt_tokens=64, completion_tokens=tokens))
    bench = _derive(
        RequestResult(ttft_s=first, e2e_s=end, prompt_tokens=64, completion_tokens=tokens)
    )
    client = ChatResult(ttft_s=first, total_s=end, prompt_tokens=64, completion_tokens=tokens)
    assert timing.decode_tokens_per_s == bench.decode_tokens_per_s == expected
    assert client.decode_tokens_per_s == expected
    assert timing.prompt_tokens_per_s == bench.prompt_tokens_per_s == prompt_rate(64, first)
    if expected is None:
        assert timing.decode_s is None and bench.tpot_s is None
    else:
        assert timing.decode_s == pytest.approx(end - first)
        assert bench.tpot_s == pytest.approx((end - first) / (tokens - 1))
