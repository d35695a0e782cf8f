"""The Ragas cross-check: samples built from stored rows, both figures side by side, and a clear
install hint where Ragas is absent (as in the default environment)."""

from __future__ import annotations

import importlib.util

import pytest

from edgelm.errors import MissingExtra
from edgelm.evals.datasets import QAItem
from edgelm.evals.ragas_check import compare, ragas_scorer, sample_of
from edgelm.evals.runs_db import ResultRow

ITEM = QAItem(
    "q1",
    "How often does it measure?",
    ["Every 16 seconds.", "16 seconds"],
    extra={"answerable": True, "evidence": [{"source": "a.md", "quote": "every 16 seconds"}]},
)
NOPE = QAItem("q2", "Price?", [], extra={"answerable": False, "evidence": []})
EXT = {"contexts": [{"chunk_id": "a.md#0", "text": "It measures the weather every 16 seconds."}]}


def test_compare_puts_both_figures_side_by_side() -> None:
    rows = [
        ResultRow("q1", "m", True, "It measures every 16 seconds.", extension=EXT),
        ResultRow("q2", "m", True, "I don't know.", extension={"contexts": []}),
        ResultRow("q1", "broken", False, error="boom"),
    ]
    asked: list[tuple[str, dict]] = []

    def scorer(metric: str, sample: dict) -> float:
        asked.append((metric, sample))
        return 0.5

    result = compare([ITEM, NOPE], rows, scorer, limit=5)
    assert [(c.item_id, c.metric) for c in result] == [
        ("q1", "faithfulness"),
        ("q1", "context_recall"),
        ("q1", "context_precision"),
    ]  # unanswerable and failed rows are not Ragas material
    assert {c.metric: c.edgelm for c in result} == {
        "faithfulness": 1.0,
        "context_recall": 1.0,
        "context_precision": 1.0,
    }
    assert all(c.ragas == 0.5 and c.delta == -0.5 for c in result)
    assert asked[0][1] == sample_of(ITEM, rows[0])
    assert asked[0][1]["retrieved_contexts"] == [EXT["contexts"][0]["text"]]
    assert asked[0][1]["reference"] == "Every 16 seconds."


def test_a_ragas_failure_is_a_row_not_a_crash() -> None:
    rows = [ResultRow("q1", "m", True, "Every 16 seconds.", extension=EXT)]

    def scorer(metric: str, sample: dict) -> float:
        if metric == "faithfulness":
            raise ValueError("Failed to parse StringIO from completion {}\nmore")
        return 1.0

    result = {c.metric: c for c in compare([ITEM], rows, scorer)}
    assert result["faithfulness"].ragas is None
    assert result["faithfulness"].error == "ValueError: Failed to parse StringIO from completion {}"
    assert result["context_recall"].ragas == 1.0 and not result["context_recall"].error


@pytest.mark.skipif(importlib.util.find_spec("ragas") is not None, reason="ragas is installed")
def test_missing_ragas_names_the_extra() -> None:
    with pytest.raises(MissingExtra) as info:
        ragas_scorer("http://127.0.0.1:9", "llm")
    assert "edgelm[ragas]" in info.value.message
