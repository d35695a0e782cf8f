"""Run a question set against models on an edgelm service and store every answer as it comes.

Models are whatever the service answers: catalog aliases, ``hybrid``, ``rag:<collection>`` or
remote models. Each (item, model) pair is asked once at temperature 0 with a fixed seed, scored
(reference QA, code tests, or RAG metrics, chosen per item from what the item carries), judged
when a judge model is set, and written in its own transaction before the next is asked, so an
interruption loses at most the answer in flight and :func:`run_eval` with ``resume=`` finishes
the rest. Concurrency is 1 on purpose: latency figures are then not skewed by queueing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgelm.client import EdgelmClient, ServiceUnavailable
from edgelm.errors import EdgelmError, InvalidRequest
from edgelm.evals import code_exec, metrics, runs_db
from edgelm.evals.datasets import QAItem, load_dataset
from edgelm.evals.judge import JUDGE_PROMPT_VERSION, Judge

QA_SYSTEM = "Answer the question with a short phrase only, without explanation."
CODE_SYSTEM = (
    "You are a careful Python programmer. Reply with one ```python code block that defines "
    "the requested function completely. Do not include tests or example usage."
)

Progress = Callable[[int, int, runs_db.ResultRow], None]
"""``progress(done, total, row)`` after each stored result; raising from it stops the run."""


@dataclass
class EvalConfig:
    """What a run asks: stored with the run (as ``params``) so a resume asks the same way."""

    dataset: str
    models: list[str]
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    judge_model: str | None = None
    limit: int | None = None
    code_timeout_s: float = 10.0
    code_memory_mb: int = 512
    rag_k: int | None = None

    def params(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("dataset")
        data.pop("models")
        data.pop("judge_model")
        data["judge_prompt_version"] = JUDGE_PROMPT_VERSION
        return data


def item_kind(item: QAItem) -> str:
    """``code`` (has tests), ``rag`` (has evidence/answerable) or ``qa``."""
    if "tests" in item.extra:
        return "code"
    if "evidence" in item.extra or "answerable" in item.extra:
        return "rag"
    return "qa"


def build_messages(item: QAItem) -> list[dict[str, str]]:
    """The chat messages for an item; RAG questions go bare (the RAG model adds context)."""
    kind = item_kind(item)
    if kind == "rag":
        return [{"role": "user", "content": item.question}]
    system = CODE_SYSTEM if kind == "code" else QA_SYSTEM
    return [{"role": "system", "content": system}, {"role": "user", "content": item.question}]


def score_item(
    item: QAItem, answer: str, extension: dict[str, Any] | None, config: EvalConfig
) -> dict[str, float | None]:
    """The metrics of one answer; ``quality`` is the headline every report ranks by.

    quality = contains-answer for reference QA, pass@1 for code, and for RAG: contains-answer
    on answerable questions, correct refusal on unanswerable ones.
    """
    kind = item_kind(item)
    if kind == "code":
        result = code_exec.score_answer(
            answer,
            str(item.extra["tests"]),
            item.extra.get("entry_point"),
            config.code_timeout_s,
            config.code_memory_mb,
        )
        return {"pass@1": float(result.passed), "quality": float(result.passed)}
    if kind == "rag":
        answerable = bool(item.extra.get("answerable", True))
        scores = metrics.rag_scores(
            item.question,
            answer,
            extension,
            answerable,
            item.extra.get("evidence") or [],
            config.rag_k,
        )
        if answerable:
            scores.update(metrics.qa_scores(answer, item.answers))
            scores["quality"] = scores["contains"]
        else:
            scores["quality"] = scores["correct_refusal"]
        return scores
    scores: dict[str, float | None] = dict(metrics.qa_scores(answer, item.answers))
    scores["quality"] = scores["contains"]
    return scores


def _ask(
    client: EdgelmClient, model: str, item: QAItem, config: EvalConfig
) -> tuple[str, dict[str, Any]]:
    """Ask once (streamed, so TTFT is measured); returns the answer text and the row's timing,
    usage and ``edgelm`` extension (RAG contexts, hybrid route) fields."""
    params: dict[str, Any] = {
        "temperature": config.temperature,
        "seed": config.seed,
        "max_tokens": config.max_tokens,
    }
    messages = build_messages(item)
    result = client.chat_once(model, messages, **params)
    return result.text, {
        "finish_reason": result.finish_reason,
        "ttft_s": result.ttft_s,
        "e2e_s": result.total_s,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "extension": result.extension,
    }


def evaluate_one(
    client: EdgelmClient,
    model: str,
    item: QAItem,
    config: EvalConfig,
    judge: Judge | None = None,
) -> runs_db.ResultRow:
    """Ask, score and judge one item. Service errors become an error row; an unreachable
    service raises :class:`ServiceUnavailable` (the run stops and can be resumed)."""
    try:
        answer, fields = _ask(client, model, item, config)
    except ServiceUnavailable:
        raise
    except EdgelmError as exc:
        return runs_db.ResultRow(item.id, model, ok=False, error=exc.message)
    row = runs_db.ResultRow(item.id, model, ok=True, answer=answer, **fields)
    row.metrics = score_item(item, answer, row.extension, config)
    if judge is not None:
        verdict = judge.score(item.question, answer, item.answers[0] if item.answers else None)
        row.judge_scores, row.judge_raw, row.judge_error = (
            verdict.scores,
            verdict.raw,
            verdict.parse_error,
        )
    return row


def start_run(db_path: Path, config: EvalConfig) -> runs_db.EvalRun:
    """Load the dataset and store a new run with its items (nothing is asked yet)."""
    if not config.models:
        raise InvalidRequest("give at least one model to evaluate")
    items = load_dataset(config.dataset)
    if config.limit is not None:
        items = items[: config.limit]
    return runs_db.create_run(
        db_path, config.dataset, config.models, config.params(), items, config.judge_model
    )


def config_of(run: runs_db.EvalRun) -> EvalConfig:
    """The config a stored run was started with (for resuming it the same way)."""
    known = set(EvalConfig.__dataclass_fields__)
    params = {k: v for k, v in run.params.items() if k in known}
    return EvalConfig(dataset=run.dataset, models=run.models, judge_model=run.judge_model, **params)


def run_eval(
    client: EdgelmClient,
    db_path: Path,
    config: EvalConfig | None = None,
    resume: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Run (or, with ``resume=<run id>``, finish) an evaluation; returns the run id.

    Pairs already stored without error are skipped on resume; error rows are asked again.
    """
    if resume is not None:
        run, rows = runs_db.load_run(db_path, resume)
        config = config_of(run)
        done = {(r.item_id, r.model) for r in rows if r.ok}
    elif config is not None:
        run = start_run(db_path, config)
        done = set()
    else:
        raise InvalidRequest("give either a config for a new run or a run id to resume")
    judge = Judge(client, config.judge_model, seed=config.seed) if config.judge_model else None
    pairs = [(item, model) for item in run.items for model in run.models]
    total = len(pairs)
    finished = len(done)
    if resume is not None:
        runs_db.set_status(db_path, run.id, "running")
    try:
        for item, model in pairs:
            if (item.id, model) in done:
                continue
            row = evaluate_one(client, model, item, config, judge)
            runs_db.save_result(db_path, run.id, row)
            finished += 1
            if progress is not None:
                progress(finished, total, row)
    except BaseException:
        runs_db.set_status(db_path, run.id, "interrupted")
        raise
    runs_db.set_status(db_path, run.id, "done")
    return run.id
