"""The context-scaling scenario on a scripted target: calibration, unique prompts of the asked
lengths, the report's rows and plot."""

from __future__ import annotations

from typing import Any

import pytest

from edgelm.bench.context import (
    ContextConfig,
    context_rows,
    gap_ratio,
    plot_context_scaling,
    run_context_scaling,
    scenario_length,
    synthetic_text,
)
from edgelm.bench.report import render_html
from edgelm.bench.results import ColdStart, RequestResult
from edgelm.bench.targets import Target
from edgelm.bench.workloads import Prompt


class ScriptedTarget(Target):
    """Counts 1.25 tokens a word plus 20 for the template; prefill at 1000 tok/s, decode at
    50 tok/s, one slow gap in the answers to long prompts."""

    kind = "openai"

    def __init__(self, name: str = "scripted"):
        self.name = self.model = name
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def open(self) -> ColdStart:
        return ColdStart(load_s=0.0)

    def request(self, prompt: Prompt, params: dict[str, Any]) -> RequestResult:
        text = prompt.messages[0]["content"]
        self.sent.append((prompt.id, text, params))
        tokens = round(len(text.split("\n", 1)[1].split()) * 1.25) + 20
        n = params["max_tokens"]
        ttft = tokens / 1000
        itl = [0.02] * (n - 1)
        if tokens > 1000 and itl:
            itl[0] = 0.05
        return RequestResult(
            prompt_id=prompt.id,
            ttft_s=ttft,
            itl_s=itl,
            e2e_s=ttft + sum(itl),
            prompt_tokens=tokens,
            completion_tokens=n,
            prompt_tokens_per_s=tokens / ttft,
            decode_tokens_per_s=50.0,
        )


def test_synthetic_prompts_are_unique_from_their_first_words() -> None:
    a, b = synthetic_text(100, "512-0", 0), synthetic_text(100, "512-1", 0)
    assert a.split()[:2] != b.split()[:2]
    assert synthetic_text(100, "512-0", 0) == a  # seeded: the same run sends the same prompts
    assert len(a.split("\n", 1)[1].split()) == 100


def test_context_scaling_calibrates_and_hits_the_lengths() -> None:
    target = ScriptedTarget()
    run = run_context_scaling([target], ContextConfig(lengths=[2048, 512], rounds=2, max_tokens=8))
    probes = [p for p in target.sent if p[0].startswith("probe")]
    assert [p[2]["max_tokens"] for p in probes] == [1, 1]
    calib = run.config["calibration"]["scripted"]
    assert calib["per_word"] == pytest.approx(1.25, abs=0.01)
    assert calib["overhead"] == pytest.approx(20, abs=2)
    measured = [p for p in target.sent if p[0].startswith("ctx")]
    assert len({text for _, text, _ in measured}) == len(measured) == 4  # all unique
    assert all(p[2]["ignore_eos"] and p[2]["temperature"] == 0 for p in measured)
    rows = context_rows(run)
    assert [r["length"] for r in rows] == [512, 2048]  # shortest first
    for row in rows:
        assert row["prompt_tokens"] == pytest.approx(row["length"], abs=3)
        assert row["ok"] == row["total"] == 2
        assert row["ttft_s"] == pytest.approx(row["length"] / 1000, rel=0.01)
        assert row["decode_tps"] == 50.0
    assert rows[0]["gap_ratio_max"] == pytest.approx(1.0)
    assert rows[1]["gap_ratio_max"] == pytest.approx(2.5)
    assert [scenario_length(s) for s in run.scenarios] == [512, 2048]
    assert plot_context_scaling(run).startswith("data:image/png;base64,")
    html = render_html(run)
    assert "Context scaling" in html and "<td>2048</td>" in html


def test_several_streams_get_answers_of_varying_length() -> None:
    target = ScriptedTarget()
    config = ContextConfig(lengths=[256], rounds=8, max_tokens=20, concurrency=4)
    run = run_context_scaling([target], config)
    lengths = [p[2]["max_tokens"] for p in target.sent if p[0].startswith("ctx")]
    assert len(lengths) == 8 and len(set(lengths)) > 1
    assert all(10 <= n <= 30 for n in lengths)
    assert run.scenarios[0].concurrency == 4


def test_gap_ratio() -> None:
    assert gap_ratio([0.1, 0.1, 0.3]) == pytest.approx(3.0)
    assert gap_ratio([0.1, 0.1]) is None
    assert gap_ratio([]) is None
