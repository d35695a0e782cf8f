"""Eval reports show which answer check kept answers from the user (RAG ``checks``, the
hybrid route's firing policy)."""

from __future__ import annotations

from pathlib import Path

from edgelm.evals import report, runs_db
from edgelm.evals.datasets import QAItem


def test_summary_counts_the_checks_that_fired(isolated_home: Path) -> None:
    db = isolated_home / "evals.db"
    items = [QAItem(id=f"q{i}", question=f"Q{i}?", answers=["x"]) for i in range(4)]
    run_id = runs_db.create_run(db, "rag", ["rag:demo", "hybrid"], {}, items, None).id
    rag_ext = [
        {"checks": [{"model": "slm", "policy": "degenerate"}]},
        {"checks": [{"model": "slm", "policy": "unsupported"}]},
        {"checks": [{"model": "slm", "policy": "unsupported"}, {"model": "llm", "policy": "x"}]},
        {"checks": []},
    ]
    hybrid_ext = [{"route": "direct", "fired": "degenerate"}] + [{"route": "draft"}] * 3
    for i in range(4):
        for model, ext in (("rag:demo", rag_ext[i]), ("hybrid", hybrid_ext[i])):
            row = runs_db.ResultRow(f"q{i}", model, True, "x", metrics={"quality": 1.0})
            row.extension = ext
            runs_db.save_result(db, run_id, row)
    run, rows = runs_db.load_run(db, run_id)
    by_model = {s["model"]: s["metrics"] for s in report.summarize(report.LoadedRun(run, rows))}
    assert by_model["rag:demo"]["degenerate_caught"] == 0.25
    assert by_model["rag:demo"]["unsupported_caught"] == 0.5
    assert by_model["hybrid"]["degenerate_caught"] == 0.25
    assert "unsupported_caught" not in by_model["hybrid"]
