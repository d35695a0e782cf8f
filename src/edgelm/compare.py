"""SLM vs LLM: the same prompts to both, with cold and warm latency, tokens, speed, memory,
cost, quality, the answers side by side, and a decision that weighs them together.

It is a small benchmark run (same runner, same measurements) plus the cost model, so the
numbers in a comparison are the numbers ``edgelm bench`` would give. Quality comes from a quick
eval on a shipped question set (each model answers the first few items at temperature 0,
scored as ``edgelm eval`` scores them) or from a stored eval run; memory is each model's own
footprint (what the model pool accounts for it: weights, KV cache, compute scratch), not the
process that hosts both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.answer_checks import degeneration
from edgelm.bench.results import Scenario
from edgelm.bench.runner import BenchConfig, ProgressFn, no_progress, run_scenario
from edgelm.bench.targets import Target
from edgelm.bench.workloads import Prompt
from edgelm.cost import Prices, cost_table
from edgelm.evals.datasets import QAItem, load_dataset

QUALITY_MARGIN = 0.10
"""Quality points a cheaper model may lose and still be recommended (the RAG target of
issue 17: answerable quality within 10 points of the LLM tier)."""


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
    """The process that served the model (for a service, every model it holds)."""
    cost: dict[str, Any]
    answers: list[tuple[str, str]]
    quality: dict[str, float] | None = None
    model_memory_bytes: int | None = None
    """This model's own footprint, as the engine accounts it to the pool."""
    best_use: str = ""

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "answers"}


@dataclass
class Comparison:
    models: list[ModelReport] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)
    decision: str = ""
    """One line that weighs quality, latency, memory and cost together."""


QualityFn = Callable[[Target], dict[str, float] | None]
"""Measures a target's quality while it is open; ``overall`` is the headline (0–1)."""


def quick_quality(items: Sequence[QAItem], max_tokens: int = 128) -> QualityFn:
    """A quick eval: each item asked once at temperature 0 and scored as ``edgelm eval``
    scores it. Also counts degenerate answers (loops, markers only), which the headline alone
    would hide."""
    from edgelm.evals.harness import EvalConfig, build_messages, score_item

    config = EvalConfig(dataset="compare", models=[], max_tokens=max_tokens)

    def measure(target: Target) -> dict[str, float] | None:
        scores: list[float] = []
        degenerate = 0
        for item in items:
            prompt = Prompt(id=item.id, messages=build_messages(item))
            params = {"max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
            result = target.request(prompt, params)
            if not result.ok:
                continue
            scores.append(float(score_item(item, result.text, None, config)["quality"] or 0.0))
            truncated = result.completion_tokens >= max_tokens
            degenerate += degeneration(result.text, truncated) is not None
        if not scores:
            return None
        return {
            "overall": round(sum(scores) / len(scores), 4),
            "items": float(len(scores)),
            "degenerate": round(degenerate / len(scores), 4),
        }

    return measure


def quality_from_set(name: str, limit: int, max_tokens: int = 128) -> QualityFn:
    """:func:`quick_quality` on the first ``limit`` items of a shipped set (or a .jsonl)."""
    items = [i for i in load_dataset(name) if "tests" not in i.extra][:limit]
    return quick_quality(items, max_tokens)


def quality_from_run(db_path: Path, run_id: str) -> QualityFn:
    """Each model's mean ``quality`` in a stored eval run (matched by model name)."""
    from edgelm.evals.runs_db import load_run

    _, rows = load_run(db_path, run_id)
    by_model: dict[str, list[float]] = {}
    degenerate: dict[str, int] = {}
    for row in rows:
        if row.ok and row.metrics.get("quality") is not None:
            by_model.setdefault(row.model, []).append(float(row.metrics["quality"] or 0.0))
            degenerate[row.model] = degenerate.get(row.model, 0) + (
                degeneration(row.answer) is not None
            )

    def measure(target: Target) -> dict[str, float] | None:
        scores = by_model.get(target.model) or by_model.get(target.name)
        if not scores:
            return None
        n = len(scores)
        return {
            "overall": round(sum(scores) / n, 4),
            "items": float(n),
            "degenerate": round(degenerate.get(target.model, 0) / n, 4),
        }

    return measure


def model_memory(target: Target) -> int | None:
    """The model's own footprint: the in-process engine's, or what the service's pool
    reports for it (``/openai/loadedmodels``); unknown for other servers."""
    engine = getattr(target, "engine", None)
    if engine is not None:
        return int(engine.memory_bytes) or None
    client = getattr(target, "client", None)
    if target.kind == "service" and client is not None:
        try:
            loaded = client.loaded()
        except Exception:  # a figure we cannot get is shown as unknown, not a failed compare
            return None
        for entry in loaded:
            if entry.get("id") == target.model and entry.get("memory_bytes"):
                return int(entry["memory_bytes"])
    return None


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
    quality: QualityFn | None = None,
) -> Comparison:
    """``targets`` are (target, tier) pairs, usually the catalog's slm and llm. ``quality``
    measures each model while it is loaded (after its timed requests, so it skews no time);
    ``judge`` scores the compared answers instead, as before."""
    result = Comparison()
    for target, tier in targets:
        measured: dict[str, float] | None = None
        try:
            cold = target.open()
            first = target.request(prompts[0], config.params())
            cold.first_request = first
            scenario = run_scenario(target, prompts, config, 1, None, progress)
            memory = model_memory(target)
            if quality is not None:
                progress(0, 1, f"quality {target.model}")
                measured = quality(target)
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
            model_memory_bytes=memory,
        )
        report.quality = measured
        if judge is not None:
            report.quality = judge(prompts, report.answers)
        result.models.append(report)
    _decide(result.models)
    result.decision = decision_line(result.models)
    return result


def _quality(m: ModelReport) -> float | None:
    return None if not m.quality else m.quality.get("overall")


def _memory(m: ModelReport) -> float:
    value = m.model_memory_bytes or m.peak_rss_bytes
    return float(value) if value else float("inf")


def good_enough(models: list[ModelReport], margin: float = QUALITY_MARGIN) -> list[ModelReport]:
    """Models whose quality is within ``margin`` of the best measured one (all of them when
    no quality was measured: then nothing can be ruled out on it)."""
    scored = [q for m in models if (q := _quality(m)) is not None]
    if not scored:
        return list(models)
    best = max(scored)
    return [m for m in models if (q := _quality(m)) is not None and q >= best - margin]


def _decide(models: list[ModelReport]) -> None:
    """A 'best use' per model from the measured figures, not from its name. Speed, memory and
    cost only recommend a model whose quality is within :data:`QUALITY_MARGIN` of the best:
    the smallest model is no use on a small device if its answers are far worse."""
    if not models:
        return
    eligible = good_enough(models)
    timed = [m for m in eligible if m.warm_e2e_s is not None]
    fastest = min(timed, key=lambda m: m.warm_e2e_s or 0.0) if timed else None
    smallest = min(eligible, key=_memory) if eligible else None
    scored = [m for m in models if _quality(m) is not None]
    best_quality = max(scored, key=lambda m: _quality(m) or 0.0) if scored else None
    for m in models:
        uses = []
        if m is fastest:
            uses.append("interactive answers (lowest warm latency)")
        if m is smallest and len(eligible) > 1:  # smallest of those good enough to use
            uses.append("memory-constrained devices")
        if m is best_quality and len(scored) > 1:
            uses.append("quality-critical answers (best measured quality)")
        if m not in eligible and best_quality is not None:
            gap = ((_quality(best_quality) or 0.0) - (_quality(m) or 0.0)) * 100
            uses.append(
                f"not on its own: quality {gap:.0f} points below {best_quality.model}; only "
                "behind checks that escalate (hybrid, RAG with a fallback)"
            )
        elif not uses and fastest is not None and m is not fastest:
            ratio = (m.warm_e2e_s or 0) / (fastest.warm_e2e_s or 1)
            uses.append(f"harder questions where {ratio:.1f}x the latency is acceptable")
        m.best_use = "; ".join(uses) or "-"


def decision_line(models: list[ModelReport], margin: float = QUALITY_MARGIN) -> str:
    """Which model to use, and the trade it makes: the cheapest-to-run model among those
    within ``margin`` of the best quality, with its latency, memory and cost against the
    best-quality model. Without quality figures it says so instead of guessing."""
    if len(models) < 2:
        return ""
    eligible = good_enough(models, margin)
    scored = [m for m in models if _quality(m) is not None]
    if not scored:
        fastest = min(models, key=lambda m: m.warm_e2e_s or float("inf"))
        return (
            f"no quality measured: {fastest.model} is fastest, but run with a quality set "
            "before choosing on speed, memory or cost alone"
        )
    best = max(scored, key=lambda m: _quality(m) or 0.0)

    def burden(m: ModelReport) -> tuple[float, float, float]:
        return (m.cost.get("local_per_1k") or 0.0, m.warm_e2e_s or float("inf"), _memory(m))

    pick = min(eligible, key=burden)
    q_pick, q_best = _quality(pick) or 0.0, _quality(best) or 0.0
    if pick is best:
        others = [m for m in scored if m is not best]
        if not others:
            return f"use {best.model}: the only model with a measured quality ({q_best:.2f})"
        cheaper = min(others, key=burden)
        q_cheaper = _quality(cheaper) or 0.0
        return (
            f"use {best.model}: {cheaper.model} answers {(q_best - q_cheaper) * 100:.0f} "
            f"quality points worse ({q_cheaper:.2f} vs {q_best:.2f}), beyond the "
            f"{margin * 100:.0f}-point margin, for {_ratio(cheaper, best)}"
        )
    return (
        f"use {pick.model}: quality {q_pick:.2f}, within {margin * 100:.0f} points of "
        f"{best.model} ({q_best:.2f}), at {_ratio(pick, best)}"
    )


def _ratio(m: ModelReport, ref: ModelReport) -> str:
    """``m``'s latency, memory and local cost as shares of ``ref``'s."""
    parts = []
    if m.warm_e2e_s and ref.warm_e2e_s:
        parts.append(f"{m.warm_e2e_s / ref.warm_e2e_s:.2f}x the latency")
    if m.model_memory_bytes and ref.model_memory_bytes:
        parts.append(f"{m.model_memory_bytes / ref.model_memory_bytes:.2f}x the memory")
    cost, ref_cost = m.cost.get("local_per_1k"), ref.cost.get("local_per_1k")
    if cost and ref_cost:
        parts.append(f"{cost / ref_cost:.2f}x the local cost")
    return ", ".join(parts) or "no measured saving"


def comparison_json(result: Comparison) -> list[dict[str, Any]]:
    """Workshop-style rows for the ``[COMPARISON RESULTS]`` block."""
    return [
        {
            **m.row(),
            "answer": m.answers[0][1] if m.answers else "",
            "decision": result.decision,
        }
        for m in result.models
    ]
