"""Statistics over raw measurements: percentiles, summaries, SLOs and goodput.

Runs keep every request raw (see :mod:`edgelm.bench.results`), so everything here is a pure
function of those numbers and can be recomputed from a stored run at any time. Percentiles use
the same linear interpolation as numpy's default so figures match what users get when they
load a CSV export into their own tools; the code is plain Python so a summary of a handful of
requests does not depend on array conversions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgelm.bench.results import RequestResult, Scenario

SUMMARY_PERCENTILES = (50, 90, 99)
"""The percentiles every summary carries (as ``p50``, ``p90``, ``p99``)."""


def _clean(values: Iterable[float | None]) -> list[float]:
    """The finite numbers among ``values``: a missing (None) or NaN measurement is no data."""
    out = []
    for value in values:
        if value is None:
            continue
        number = float(value)
        if not math.isnan(number):
            out.append(number)
    return out


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks.

    This is numpy's default ("linear", type 7), so the 50th percentile of an even count is the
    mean of the two middle values. None for no data, because 0 would read as a measurement.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    data = sorted(_clean(values))
    if not data:
        return None
    position = (len(data) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(data) - 1)
    fraction = position - lower
    return data[lower] + (data[upper] - data[lower]) * fraction


def summarise(values: Iterable[float | None]) -> dict[str, Any]:
    """n, mean, sample std, min, p50, p90, p99, max of the values that were measured.

    Empty input gives ``n=0`` and None elsewhere, so tables show a gap instead of a fake zero.
    """
    data = _clean(values)
    n = len(data)
    if n == 0:
        keys = ["mean", "std", "min", *(f"p{q}" for q in SUMMARY_PERCENTILES), "max"]
        return {"n": 0, **dict.fromkeys(keys)}
    mean = math.fsum(data) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in data) / (n - 1)) if n > 1 else 0.0
    summary: dict[str, Any] = {"n": n, "mean": mean, "std": std, "min": min(data)}
    for q in SUMMARY_PERCENTILES:
        summary[f"p{q}"] = percentile(data, q)
    summary["max"] = max(data)
    return summary


@dataclass
class SLO:
    """Latency bounds a request must meet to count as good (seconds; None = no bound)."""

    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def request_itl(req: RequestResult) -> float | None:
    """The request's typical inter-token latency: its TPOT, else the mean of its chunk gaps.

    TPOT is preferred because it is per token; chunk gaps can cover several tokens when a
    server batches its stream.
    """
    if req.tpot_s is not None:
        return req.tpot_s
    gaps = _clean(req.itl_s)
    return math.fsum(gaps) / len(gaps) if gaps else None


def meets(req: RequestResult, slo: SLO) -> bool:
    """Whether a request succeeded and held every bound the SLO sets.

    A bound whose measurement is missing counts as missed (an unmeasured TTFT cannot be shown
    to be fast), except inter-token latency for answers of at most one token, which have no
    gaps between tokens to be slow.
    """
    if not req.ok:
        return False
    if slo.ttft_s is not None and (req.ttft_s is None or req.ttft_s > slo.ttft_s):
        return False
    if slo.e2e_s is not None and req.e2e_s > slo.e2e_s:
        return False
    if slo.itl_s is not None:
        itl = request_itl(req)
        if itl is None:
            return req.completion_tokens <= 1
        if itl > slo.itl_s:
            return False
    return True


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _per_second(count: float, wall_s: float) -> float | None:
    """A rate over the scenario's wall time; None when no time was measured."""
    return count / wall_s if wall_s > 0 else None


def scenario_stats(s: Scenario, slo: SLO | None = None) -> dict[str, Any]:
    """The statistics of one scenario, without touching it (see :func:`summarise_scenario`).

    Latency and speed summaries cover successful requests only: a failed request's timings
    measure how fast it failed, not how fast the model answers.
    """
    ok = [r for r in s.requests if r.ok]
    total = len(s.requests)
    errors = total - len(ok)
    completion = sum(r.completion_tokens for r in ok)
    stats: dict[str, Any] = {
        "requests": total,
        "ok": len(ok),
        "errors": errors,
        "error_rate": errors / total if total else None,
        "wall_s": s.wall_s,
        "ttft": summarise(r.ttft_s for r in ok),
        "itl": summarise(gap for r in ok for gap in r.itl_s),
        "tpot": summarise(r.tpot_s for r in ok),
        "e2e": summarise(r.e2e_s for r in ok),
        "decode_tps": summarise(r.decode_tokens_per_s for r in ok),
        "prompt_tps": summarise(r.prompt_tokens_per_s for r in ok),
        "prompt_tokens_mean": _mean([r.prompt_tokens for r in ok]),
        "completion_tokens_mean": _mean([r.completion_tokens for r in ok]),
        "throughput_tokens_per_s": _per_second(completion, s.wall_s),
        "requests_per_s": _per_second(len(ok), s.wall_s),
    }
    if slo is not None:
        good = sum(1 for r in s.requests if meets(r, slo))
        stats["goodput_requests_per_s"] = _per_second(good, s.wall_s)
        stats["goodput_share"] = good / total if total else None
        stats["slo"] = slo.to_dict()
    return stats


def summarise_scenario(s: Scenario, slo: SLO | None = None) -> dict[str, Any]:
    """Compute a scenario's statistics and store them in ``s.stats`` (replacing old ones).

    ``requests_per_s`` and ``throughput_tokens_per_s`` count successful requests only, over the
    scenario's wall time; ``goodput_share`` is the fraction of *all* requests that met the SLO,
    so errors lower it.
    """
    s.stats = scenario_stats(s, slo)
    return s.stats


def stats_for(s: Scenario) -> dict[str, Any]:
    """Fresh statistics for reports and diffs, keeping the SLO ``s.stats`` was made with.

    Recomputing from the raw requests means a run stored by an older edgelm, or edited by
    hand, is still reported with the same definitions as a new one; ``s`` is not modified.
    """
    slo = s.stats.get("slo")
    return scenario_stats(s, SLO(**slo) if isinstance(slo, dict) else None)


def ttft_over(scenario: Scenario, reference: Scenario | None, turns: bool = False) -> float | None:
    """How much later than ``reference`` the first token came, in seconds: the median of the
    per-prompt differences when both answered the same prompts in the same order (pairs: each
    prompt's own length and cache luck cancel out), else the difference of the medians.

    ``turns``: the two answered each prompt one after the other (``--interleave``), and the
    rounds alternated who went first. Whichever goes second reads its prompt more slowly
    (measured on Qwen2.5-1.5B: typically 3-5 ms of ~240 ms, in-process engine or service
    alike), and a plain median of such a two-humped spread lands anywhere between the humps.
    So the pairs are split by who went first, and the two medians averaged: the order effect
    cancels whatever its size or sign.
    """
    if reference is None:
        return None
    mine = [r for r in scenario.requests if r.ok]
    theirs = [r for r in reference.requests if r.ok]
    if mine and [r.prompt_id for r in mine] == [r.prompt_id for r in theirs]:
        pairs = [
            (a.ttft_s - b.ttft_s, a.started_at < b.started_at)
            for a, b in zip(mine, theirs, strict=True)
            if a.ttft_s and b.ttft_s
        ]
        first = [d for d, went_first in pairs if went_first]
        second = [d for d, went_first in pairs if not went_first]
        if turns and first and second:
            return (statistics.median(first) + statistics.median(second)) / 2
        if pairs:
            return statistics.median(d for d, _ in pairs)
    ttft = (scenario.stats.get("ttft") or {}).get("p50")
    base = (reference.stats.get("ttft") or {}).get("p50")
    return ttft - base if ttft is not None and base is not None else None
