"""Optional cross-check of edgelm's RAG metrics against Ragas itself, on a sample of a run.

edgelm computes faithfulness, context precision and context recall locally and without an LLM
(:mod:`edgelm.evals.metrics`), so every run gets them. Ragas defines the same metrics with an
LLM judging claims; this module asks Ragas to score stored answers with a model served by the
local edgelm service (through its OpenAI-compatible API, no other network), and puts both
figures side by side so a user can see where the cheap local versions agree.

Ragas is heavy and its import breaks with recent LangChain releases, so it is an extra with
pinned versions (``pip install 'edgelm[ragas]'``). Measured here: Ragas 0.4.3 with
langchain-community < 0.4 runs offline against the service; each metric costs a few LLM calls
per answer (about a minute per answer and metric with Qwen2.5-1.5B on 2 busy cores).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgelm.errors import MissingExtra
from edgelm.evals.datasets import QAItem
from edgelm.evals.metrics import rag_scores
from edgelm.evals.runs_db import ResultRow

COMPARED = ("faithfulness", "context_recall", "context_precision")
"""The metrics both sides define the same way (answer relevancy differs: Ragas regenerates
questions from the answer and embeds them, which needs an embedding model)."""

RagasScorer = Callable[[str, dict[str, Any]], float | None]
"""``scorer(metric, sample) -> score``: one Ragas metric on one sample (see :func:`ragas_scorer`)."""


@dataclass
class Comparison:
    item_id: str
    model: str
    metric: str
    edgelm: float | None
    ragas: float | None
    error: str = ""
    """Why Ragas gave no score (its parser rejected the judge's output), if it did not."""

    @property
    def delta(self) -> float | None:
        if self.edgelm is None or self.ragas is None:
            return None
        return self.ragas - self.edgelm


def sample_of(item: QAItem, row: ResultRow) -> dict[str, Any]:
    """A Ragas single-turn sample from a stored RAG answer and its retrieved contexts."""
    contexts = [str(c.get("text", "")) for c in (row.extension or {}).get("contexts") or []]
    return {
        "user_input": item.question,
        "response": row.answer,
        "retrieved_contexts": contexts,
        "reference": item.answers[0] if item.answers else "",
    }


def ragas_scorer(endpoint: str, model: str, api_key: str | None = None) -> RagasScorer:
    """Score with Ragas, its judge being ``model`` on the edgelm service at ``endpoint``."""
    try:
        from langchain_openai import ChatOpenAI
        from ragas.dataset_schema import SingleTurnSample
        from ragas.llms import LangchainLLMWrapper
        from ragas.metrics import Faithfulness, LLMContextPrecisionWithReference, LLMContextRecall
    except ImportError:
        raise MissingExtra("ragas (with its pinned LangChain)", "ragas") from None
    chat = ChatOpenAI(
        base_url=f"{endpoint.rstrip('/')}/v1",
        api_key=api_key or "unused",
        model=model,
        temperature=0,
        max_tokens=512,
        timeout=600,
    )
    llm = LangchainLLMWrapper(chat)
    metrics = {
        "faithfulness": Faithfulness(llm=llm),
        "context_recall": LLMContextRecall(llm=llm),
        "context_precision": LLMContextPrecisionWithReference(llm=llm),
    }

    def score(metric: str, sample: dict[str, Any]) -> float | None:
        value = asyncio.run(metrics[metric].single_turn_ascore(SingleTurnSample(**sample)))
        return None if value is None or value != value else float(value)  # NaN: no verdict

    return score


def tolerant(scorer: RagasScorer) -> Callable[[str, dict[str, Any]], tuple[float | None, str]]:
    """Turn a Ragas failure into data: Ragas raises when the judge's JSON does not fit its
    schema (small judges often miss a field), and one bad sample must not lose the others."""

    def score(metric: str, sample: dict[str, Any]) -> tuple[float | None, str]:
        try:
            return scorer(metric, sample), ""
        except Exception as exc:  # Ragas' own output parsers raise many kinds
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    return score


def compare(
    items: Sequence[QAItem],
    rows: Sequence[ResultRow],
    scorer: RagasScorer,
    limit: int = 3,
    metrics: Sequence[str] = COMPARED,
) -> list[Comparison]:
    """Both scores of each metric for the first ``limit`` answered, answerable RAG rows."""
    by_id = {it.id: it for it in items}
    out: list[Comparison] = []
    chosen = [
        r
        for r in rows
        if r.ok and r.item_id in by_id and by_id[r.item_id].extra.get("answerable", False)
    ][:limit]
    for row in chosen:
        item = by_id[row.item_id]
        ours = rag_scores(
            item.question, row.answer, row.extension, True, item.extra.get("evidence") or []
        )
        sample = sample_of(item, row)
        for metric in metrics:
            value, error = tolerant(scorer)(metric, sample)
            out.append(Comparison(item.id, row.model, metric, ours.get(metric), value, error))
    return out
