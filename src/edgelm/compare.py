"""SLM vs LLM: the same prompts to both, with cold and warm latency, tokens, speed, memory,
cost, the answers side by side, and a decision table.

It is a small benchmark run (same runner, same measurements) plus the cost model, so the
numbers in a comparison are the numbers ``edgelm bench`` would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgelm.bench.results import Scenario
from edgelm.bench.runner import BenchConfig, ProgressFn, no_progress, run_scenario
from edgelm.bench.targets import Target
from edgelm.bench.workloads import Prompt
from edgelm.cost import Prices, cost_table


@dataclass
class ModelReport:
    target: str
    model: str
    kind: str
    tier: str
    cold_s: float | None
    load_s: float | None
    warm_e2e_s: float | None
    warm_ttft_s: float | None
    completion_tokens: float
    prompt_tokens: float
    decode_tokens_per_s: float | None
    peak_rss_bytes: int | None
    cost: dict[str, Any]
    answers: list[tuple[str, str]]
    quality: dict[str, float] | None = None
    best_use: str = ""

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "answers"}


@dataclass
class Comparison:
    models: list[ModelReport] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)


def _median(stats: dict[str, Any], key: str) -> float | None:
    block = stats.get(key) or {}
    return block.get("p50")


def compare(
    targets: list[tuple[Target, str]],
    prompts: list[Prompt],
    config: BenchConfig,
    prices: Prices,
    progress: ProgressFn = no_progress,
    judge: Any = None,
) -> Comparison:
    """``targets`` are (target, tier) pairs, usually the catalog's slm and llm."""
    result = Comparison()
    for target, tier in targets:
        try:
            cold = target.open()
            first = target.request(prompts[0], config.params())
            cold.first_request = first
            scenario = run_scenario(target, prompts, config, 1, None, progress)
        finally:
            target.close()
        scenario.cold = cold
        result.scenarios.append(scenario)
        stats = scenario.stats
        warm = _median(stats, "e2e")
        ok = [r for r in scenario.requests if r.ok]
        prompt_tokens = sum(r.prompt_tokens for r in ok) / max(1, len(ok))
        completion_tokens = sum(r.completion_tokens for r in ok) / max(1, len(ok))
        energy = scenario.resources.energy_joules
        per_request_energy = energy / len(ok) if energy is not None and ok else None
        report = ModelReport(
            target=target.name,
            model=target.model,
            kind=target.kind,
            tier=tier,
            cold_s=(cold.load_s or 0.0) + first.e2e_s if first.ok else None,
            load_s=cold.load_s,
            warm_e2e_s=warm,
            warm_ttft_s=_median(stats, "ttft"),
            completion_tokens=round(completion_tokens, 1),
            prompt_tokens=round(prompt_tokens, 1),
            decode_tokens_per_s=_median(stats, "decode_tps"),
            peak_rss_bytes=scenario.resources.peak_rss_bytes,
            cost=cost_table(
                prices, prompt_tokens, completion_tokens, warm or 0.0, per_request_energy
            ),
            answers=[(r.prompt_id, r.text) for r in ok],
        )
        if judge is not None:
            report.quality = judge(prompts, report.answers)
        result.models.append(report)
    _decide(result.models)
    return result


def _decide(models: list[ModelReport]) -> None:
    """A one-line 'best use' per model from the measured figures, not from its name."""
    if not models:
        return
    timed = [m for m in models if m.warm_e2e_s is not None]
    fastest = min(timed, key=lambda m: m.warm_e2e_s or 0.0) if timed else None
    smallest = min(models, key=lambda m: m.peak_rss_bytes or float("inf"))
    scored = [m for m in models if m.quality]
    best_quality = max(scored, key=lambda m: m.quality.get("overall", 0.0)) if scored else None  # type: ignore[union-attr]
    for m in models:
        uses = []
        if m is fastest:
            uses.append("interactive answers (lowest warm latency)")
        if m is smallest and len(models) > 1:
            uses.append("memory-constrained devices")
        if m is best_quality:
            uses.append("quality-critical answers (best judged quality)")
        if not uses and fastest is not None and m is not fastest:
            ratio = (m.warm_e2e_s or 0) / (fastest.warm_e2e_s or 1)
            uses.append(f"harder questions where {ratio:.1f}x the latency is acceptable")
        m.best_use = "; ".join(uses) or "-"


def comparison_json(result: Comparison) -> list[dict[str, Any]]:
    """Workshop-style rows for the ``[COMPARISON RESULTS]`` block."""
    return [
        {
            **m.row(),
            "answer": m.answers[0][1] if m.answers else "",
        }
        for m in result.models
    ]
