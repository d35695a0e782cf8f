"""bench statistics: percentiles like numpy's default, summaries, SLOs and goodput."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm.bench.results import RequestResult, Scenario
from edgelm.bench.stats import (
    SLO,
    meets,
    percentile,
    scenario_stats,
    stats_for,
    summarise,
    summarise_scenario,
)

# ---------------------------------------------------------------------- percentile


def test_percentile_hand_computed() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)  # between the two middle values
    assert percentile(values, 90) == pytest.approx(3.7)  # position 2.7 → 3 + 0.7 * (4 - 3)
    assert percentile(values, 25) == pytest.approx(1.75)
    assert percentile([7.0], 99) == 7.0


def test_percentile_empty_and_missing_values() -> None:
    assert percentile([], 50) is None
    assert percentile([None, None], 50) is None
    assert percentile([None, 1.0, 3.0, float("nan")], 50) == pytest.approx(2.0)


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_q_outside_0_100(q: float) -> None:
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0, 2.0], q)


@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=60),
    st.floats(min_value=0, max_value=100),
)
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-6)


# ---------------------------------------------------------------------- summarise


def test_summarise_known_numbers() -> None:
    values = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    s = summarise([*values, None])
    assert s["n"] == 10
    assert s["mean"] == pytest.approx(0.55)
    assert s["std"] == pytest.approx(statistics.stdev(values))
    assert s["min"] == pytest.approx(0.1) and s["max"] == pytest.approx(1.0)
    assert s["p50"] == pytest.approx(0.55)
    assert s["p90"] == pytest.approx(float(np.percentile(values, 90)))
    assert s["p99"] == pytest.approx(float(np.percentile(values, 99)))
    assert set(s) == {"n", "mean", "std", "min", "p50", "p90", "p99", "max"}


def test_summarise_one_value_has_zero_std_and_empty_has_nones() -> None:
    assert summarise([2.0])["std"] == 0.0
    empty = summarise([None])
    assert empty["n"] == 0
    assert all(v is None for k, v in empty.items() if k != "n")


# ---------------------------------------------------------------------- SLO


def _req(**kw: object) -> RequestResult:
    base: dict[str, object] = {"ttft_s": 0.2, "e2e_s": 2.0, "tpot_s": 0.05, "completion_tokens": 10}
    return RequestResult(**{**base, **kw})


def test_meets_checks_every_set_bound() -> None:
    slo = SLO(ttft_s=0.5, itl_s=0.1, e2e_s=3.0)
    assert meets(_req(), slo)
    assert not meets(_req(ttft_s=0.6), slo)
    assert not meets(_req(tpot_s=0.2), slo)
    assert not meets(_req(e2e_s=3.5), slo)
    assert not meets(_req(ok=False, error="boom"), slo)
    assert meets(_req(ttft_s=9.0), SLO(e2e_s=3.0))  # unset bounds do not apply
    assert meets(_req(ok=True), SLO())


def test_meets_itl_falls_back_to_mean_chunk_gap() -> None:
    slo = SLO(itl_s=0.1)
    assert meets(_req(tpot_s=None, itl_s=[0.05, 0.1, 0.12]), slo)  # mean 0.09
    assert not meets(_req(tpot_s=None, itl_s=[0.05, 0.3]), slo)  # mean 0.175
    # tpot wins over the chunk gaps when both exist
    assert meets(_req(tpot_s=0.05, itl_s=[0.5]), slo)


def test_meets_missing_measurements() -> None:
    assert not meets(_req(ttft_s=None), SLO(ttft_s=1.0))  # cannot show it was fast
    assert not meets(_req(tpot_s=None, itl_s=[]), SLO(itl_s=0.1))
    # a one-token answer has no gaps between tokens to be slow
    assert meets(_req(tpot_s=None, itl_s=[], completion_tokens=1), SLO(itl_s=0.1))


# ---------------------------------------------------------------------- scenarios


def _scenario() -> Scenario:
    """5 requests over 2 s: 4 ok (one too slow for the SLO below), 1 failed."""
    reqs = [
        RequestResult(
            ttft_s=ttft,
            itl_s=[0.02, 0.04],
            tpot_s=0.03,
            e2e_s=e2e,
            prompt_tokens=10 * (i + 1),
            completion_tokens=20,
            prompt_tokens_per_s=100.0 + i,
            decode_tokens_per_s=30.0 + i,
        )
        for i, (ttft, e2e) in enumerate([(0.1, 1.0), (0.2, 1.2), (0.3, 1.4), (0.9, 1.6)])
    ]
    reqs.append(RequestResult(ok=False, error="HTTP 503", e2e_s=0.01, ttft_s=0.005))
    return Scenario(
        target="slm", kind="service", model="qwen", concurrency=2, requests=reqs, wall_s=2.0
    )


def test_summarise_scenario_counts_and_rates() -> None:
    s = _scenario()
    stats = summarise_scenario(s)
    assert s.stats is stats
    assert (stats["requests"], stats["ok"], stats["errors"]) == (5, 4, 1)
    assert stats["error_rate"] == pytest.approx(0.2)
    assert stats["wall_s"] == 2.0
    # latency summaries leave the failed request out
    assert stats["ttft"]["n"] == 4 and stats["ttft"]["min"] == pytest.approx(0.1)
    assert stats["ttft"]["p50"] == pytest.approx(0.25)
    assert stats["e2e"]["max"] == pytest.approx(1.6)
    assert stats["itl"]["n"] == 8  # flattened over requests
    assert stats["itl"]["mean"] == pytest.approx(0.03)
    assert stats["tpot"]["p50"] == pytest.approx(0.03)
    assert stats["decode_tps"]["p50"] == pytest.approx(31.5)
    assert stats["prompt_tps"]["max"] == pytest.approx(103.0)
    assert stats["prompt_tokens_mean"] == pytest.approx(25.0)
    assert stats["completion_tokens_mean"] == pytest.approx(20.0)
    assert stats["throughput_tokens_per_s"] == pytest.approx(80 / 2.0)
    assert stats["requests_per_s"] == pytest.approx(2.0)
    assert "goodput_share" not in stats and "slo" not in stats


def test_goodput_with_slo() -> None:
    s = _scenario()
    stats = summarise_scenario(s, SLO(ttft_s=0.5, e2e_s=1.5))
    # meets: requests 0, 1, 2; request 3 has TTFT 0.9 and e2e 1.6; request 4 failed
    assert stats["goodput_requests_per_s"] == pytest.approx(3 / 2.0)
    assert stats["goodput_share"] == pytest.approx(3 / 5)
    assert stats["slo"] == {"ttft_s": 0.5, "itl_s": None, "e2e_s": 1.5}


def test_empty_scenario_gives_nones_not_zero_division() -> None:
    s = Scenario(target="t", kind="service", model="m")
    stats = summarise_scenario(s, SLO(ttft_s=1.0))
    assert stats["requests"] == 0 and stats["error_rate"] is None
    assert stats["throughput_tokens_per_s"] is None and stats["requests_per_s"] is None
    assert stats["goodput_share"] is None and stats["goodput_requests_per_s"] is None
    assert stats["ttft"]["n"] == 0 and stats["prompt_tokens_mean"] is None


def test_scenario_stats_is_pure_and_stats_for_keeps_the_slo() -> None:
    s = _scenario()
    scenario_stats(s, SLO(ttft_s=0.5))
    assert s.stats == {}
    summarise_scenario(s, SLO(ttft_s=0.5))
    s.requests.pop()  # raw data changed after summarising: stats_for recomputes
    fresh = stats_for(s)
    assert fresh["requests"] == 4 and fresh["goodput_share"] == pytest.approx(3 / 4)
    assert s.stats["requests"] == 5
    assert not any(isinstance(v, float) and math.isnan(v) for v in fresh.values())
