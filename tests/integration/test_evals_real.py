"""A small evaluation with the real tiny model through the real service (scores printed, the
model is too weak to assert on them; storage, timings, judging and determinism are asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from edgelm.client import EdgelmClient
from edgelm.evals import harness, runs_db
from edgelm.evals.datasets import load_dataset
from edgelm.evals.report import LoadedRun, render_html, summarize
from tests.integration.conftest import TINY


def test_tiny_model_eval_is_stored_and_deterministic(live_service: str, tmp_path: Path) -> None:
    items = load_dataset("general")[:3] + load_dataset("code")[:1]
    path = tmp_path / "mini.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": it.id,
                    "question": it.question,
                    "answers": it.answers,
                    "category": it.category,
                    **it.extra,
                }
            )
            + "\n"
            for it in items
        )
    )
    db = tmp_path / "evals.db"
    config = harness.EvalConfig(str(path), [TINY], max_tokens=48, judge_model=TINY)
    with EdgelmClient(live_service) as client:
        first = harness.run_eval(client, db, config)
        second = harness.run_eval(client, db, config)
    run, rows = runs_db.load_run(db, first)
    _, rows_again = runs_db.load_run(db, second)
    assert run.status == "done" and len(rows) == 4
    assert all(r.ok and r.answer and r.e2e_s and r.ttft_s for r in rows), rows
    assert all(r.completion_tokens > 0 and r.prompt_tokens > 0 for r in rows)
    assert all(r.judge_scores is not None or r.judge_error for r in rows)
    # temperature 0 and a fixed seed: the same answers again
    assert [r.answer for r in rows] == [r.answer for r in rows_again]
    code_row = next(r for r in rows if r.item_id.startswith("code-"))
    assert set(code_row.metrics) == {"pass@1", "quality"}
    summary = summarize(LoadedRun(run, rows))[0]
    print(json.dumps(summary, indent=1, default=str))
    assert "data:image/png" in render_html([LoadedRun(run, rows)])
