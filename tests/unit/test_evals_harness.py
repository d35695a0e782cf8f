"""Whole evaluation runs against a real service on the fake engine: storing, resuming after an
interruption, error rows, RAG extensions, judging, reports and diffs."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgelm import rundb
from edgelm.catalog import Catalog
from edgelm.client import EdgelmClient
from edgelm.cost import Prices
from edgelm.evals import harness, runs_db
from edgelm.evals.report import (
    LoadedRun,
    by_category,
    category_table,
    diff_runs,
    render_html,
    summarize,
    summary_table,
)
from edgelm.server.app import create_app
from edgelm.server.virtual import VirtualAnswer, VirtualModel
from edgelm.types import Chunk
from tests.unit.conftest import fake_entry

ITEMS = [
    {"id": "q1", "question": "Capital of France?", "answers": ["Paris"], "category": "geo"},
    {"id": "q2", "question": "2+2?", "answers": ["4", "four"], "category": "math"},
    {"id": "q3", "question": "Capital of Peru?", "answers": ["Lima"], "category": "geo"},
    {"id": "q4", "question": "Colour of the sky?", "answers": ["blue"], "category": "science"},
]
GOOD = ["Paris", "It is 4.", "Lima, Peru", "Blue."]
JUDGE = '{"coherence": 4, "factuality": 5, "conciseness": 3}'


class FakeRag(VirtualModel):
    """``rag:<collection>``: a fixed retrieval, answering or refusing by the question."""

    def matches(self, name: str) -> bool:
        return name.startswith("rag:")

    def cards(self, state):
        return [self.card(state, "rag:docs")]

    async def answer(self, state, name, request) -> VirtualAnswer:
        question = request.messages[-1].text()
        refused = "moon" in question
        text = "The corpus does not say." if refused else "The pool unloads idle models."
        contexts = [
            {"chunk_id": "pool#1", "source": "pool.md", "text": "The pool unloads idle models "
             "after the TTL.", "score": 0.9},
            {"chunk_id": "misc#3", "source": "misc.md", "text": "Something else.", "score": 0.2},
        ]  # fmt: skip

        async def chunks() -> AsyncIterator[Chunk]:
            yield Chunk(text=text, prompt_tokens=10, completion_tokens=6, finish_reason="stop")

        extension = {"citations": [], "contexts": contexts, "refused": refused}
        return VirtualAnswer(chunks=chunks(), extension=extension)


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    return str(path)


@pytest.fixture
def service(settings, serve_app) -> str:
    catalog = Catalog(
        [
            fake_entry("good", replies=GOOD),
            fake_entry("bad", reply="I don't know"),
            fake_entry("broken", fail_load="weights are corrupt"),
            fake_entry("judge", reply=JUDGE),
        ],
        user_file=settings.home / "models.toml",
    )
    return serve_app(create_app(settings, catalog=catalog, virtual=[FakeRag()]))


def test_whole_run_is_stored_and_summarised(service, dataset, settings) -> None:
    db = settings.home / "evals.db"
    config = harness.EvalConfig(dataset=dataset, models=["good", "bad"], judge_model="judge")
    seen = []
    with EdgelmClient(service) as client:
        run_id = harness.run_eval(client, db, config, progress=lambda d, t, r: seen.append((d, t)))
    assert seen[-1] == (8, 8)
    run, rows = runs_db.load_run(db, run_id)
    assert run.status == "done" and run.params["temperature"] == 0.0
    assert run.params["judge_prompt_version"] == "v1" and run.judge_model == "judge"
    assert [it.id for it in run.items] == ["q1", "q2", "q3", "q4"]
    good = {r.item_id: r for r in rows if r.model == "good"}
    assert {k: v.answer for k, v in good.items()} == dict(
        zip(["q1", "q2", "q3", "q4"], GOOD, strict=True)
    )
    assert good["q1"].metrics == {"exact_match": 1.0, "f1": 1.0, "contains": 1.0, "quality": 1.0}
    assert good["q3"].metrics["exact_match"] == 0.0 and good["q3"].metrics["contains"] == 1.0
    assert good["q1"].ttft_s is not None and good["q1"].e2e_s >= good["q1"].ttft_s
    assert good["q1"].completion_tokens == 1 and good["q1"].prompt_tokens > 0
    assert good["q1"].judge_scores == {"coherence": 4, "factuality": 5, "conciseness": 3}
    assert good["q1"].judge_raw == JUDGE

    loaded = LoadedRun(run, rows)
    summary = {s["model"]: s for s in summarize(loaded, Prices())}
    assert summary["good"]["quality"] == 1.0 and summary["bad"]["quality"] == 0.0
    assert summary["good"]["metrics"]["exact_match"] == 0.5
    assert summary["good"]["judge_mean"] == pytest.approx(4.0)
    assert summary["good"]["local_cost_per_1k"] > 0
    assert all(v > 0 for v in summary["good"]["cloud_cost_per_1k"].values())
    cats = by_category(loaded)
    assert cats["good"] == {"geo": (1.0, 2), "math": (1.0, 1), "science": (1.0, 1)}
    assert summary_table([loaded]).row_count == 2
    assert category_table([loaded]).row_count == 3
    page = render_html([loaded])
    assert page.count("data:image/png;base64,") == 2
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Capital of Peru?" in page


def test_interrupted_run_resumes_without_redoing(service, dataset, settings) -> None:
    db = settings.home / "evals.db"
    config = harness.EvalConfig(dataset=dataset, models=["good"])

    def stop_after_two(done: int, total: int, row: runs_db.ResultRow) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with EdgelmClient(service) as client:
        run_id = harness.start_run(db, config).id
        with pytest.raises(KeyboardInterrupt):
            harness.run_eval(client, db, resume=run_id, progress=stop_after_two)
        run, rows = runs_db.load_run(db, run_id)
        assert run.status == "interrupted"
        assert [(r.item_id, r.answer) for r in rows] == [("q1", "Paris"), ("q2", "It is 4.")]
        first_written = {r.item_id: r.created_at for r in rows}
        asked = []
        harness.run_eval(
            client, db, resume=run_id, progress=lambda d, t, r: asked.append(r.item_id)
        )
    assert asked == ["q3", "q4"]
    run, rows = runs_db.load_run(db, run_id)
    assert run.status == "done"
    # the scripted replies continue in order: nothing was asked twice
    assert {r.item_id: r.answer for r in rows} == dict(
        zip(["q1", "q2", "q3", "q4"], GOOD, strict=True)
    )
    assert all(r.created_at == first_written[r.item_id] for r in rows if r.item_id in first_written)


def test_a_crash_mid_write_leaves_no_half_row(service, dataset, settings, monkeypatch) -> None:
    db = settings.home / "evals.db"
    config = harness.EvalConfig(dataset=dataset, models=["good"])
    real = runs_db.save_result
    calls = []

    def flaky(db_path, run_id, row):
        calls.append(row.item_id)
        if len(calls) == 2:
            with runs_db.connect(db_path) as conn, rundb.transaction(conn):
                conn.execute(
                    "INSERT INTO results (run_id, item_id, model, created_at, ok, answer, metrics,"
                    " prompt_tokens, completion_tokens) VALUES (?, 'q2', 'good', 0, 1, '', '{}', 0, 0)",
                    (run_id,),
                )
                raise RuntimeError("disk on fire")
        real(db_path, run_id, row)

    monkeypatch.setattr(runs_db, "save_result", flaky)
    with EdgelmClient(service) as client, pytest.raises(RuntimeError):
        harness.run_eval(client, db, config)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT item_id FROM results").fetchall() == [("q1",)]


def test_errors_are_rows_and_are_retried_on_resume(service, dataset, settings) -> None:
    db = settings.home / "evals.db"
    config = harness.EvalConfig(dataset=dataset, models=["broken"], limit=2)
    with EdgelmClient(service) as client:
        run_id = harness.run_eval(client, db, config)
        run, rows = runs_db.load_run(db, run_id)
        assert len(run.items) == 2
        assert [r.ok for r in rows] == [False, False] and "corrupt" in rows[0].error
        summary = summarize(LoadedRun(run, rows))[0]
        assert summary["errors"] == 2 and summary["quality"] == 0.0
        retried = []
        harness.run_eval(client, db, resume=run_id, progress=lambda d, t, r: retried.append(r))
    assert len(retried) == 2


def test_service_down_stops_the_run(dataset, settings) -> None:
    from edgelm.client import ServiceUnavailable
    from tests.unit.conftest import free_port

    db = settings.home / "evals.db"
    config = harness.EvalConfig(dataset=dataset, models=["good"])
    with (
        EdgelmClient(f"http://127.0.0.1:{free_port()}") as client,
        pytest.raises(ServiceUnavailable),
    ):
        harness.run_eval(client, db, config)
    assert runs_db.list_runs(db)[0]["status"] == "interrupted"


def test_rag_model_scored_from_the_extension(service, settings, tmp_path) -> None:
    rows = [
        {"id": "r1", "question": "What does the pool do with idle models?",
         "answer": "It unloads them", "answerable": True,
         "evidence": [{"source": "pool.md", "quote": "unloads idle models"}]},
        {"id": "r2", "question": "Who walked on the moon first?", "answer": "",
         "answerable": False, "evidence": []},
    ]  # fmt: skip
    path = tmp_path / "rag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = settings.home / "evals.db"
    with EdgelmClient(service) as client:
        run_id = harness.run_eval(client, db, harness.EvalConfig(str(path), ["rag:docs"]))
    _, results = runs_db.load_run(db, run_id)
    by_id = {r.item_id: r for r in results}
    r1 = by_id["r1"].metrics
    assert r1["faithfulness"] == 1.0 and r1["context_precision"] == 1.0
    assert r1["context_recall"] == 1.0 and r1["false_refusal"] == 0.0
    assert r1["answer_relevancy"] == 1.0
    assert by_id["r1"].extension["contexts"][0]["chunk_id"] == "pool#1"
    assert by_id["r2"].metrics == {"correct_refusal": 1.0, "quality": 1.0}
    assert by_id["r1"].e2e_s > 0 and by_id["r1"].completion_tokens == 6


def test_code_items_are_run(service, settings, tmp_path) -> None:
    item = {
        "id": "c1", "question": "Write add(a, b).", "entry_point": "add",
        "tests": "assert add(1, 2) == 3\n",
    }  # fmt: skip
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(item) + "\n")
    catalog_reply = "```python\ndef add(a, b):\n    return a + b\n```"
    db = settings.home / "evals.db"
    config = harness.EvalConfig(str(path), ["good"])
    # 'good' replies "Paris" to its first request: not code, so it fails its tests
    with EdgelmClient(service) as client:
        run_id = harness.run_eval(client, db, config)
    assert runs_db.load_run(db, run_id)[1][0].metrics == {"pass@1": 0.0, "quality": 0.0}
    assert harness.score_item(harness.load_dataset(str(path))[0], catalog_reply, None, config) == {
        "pass@1": 1.0,
        "quality": 1.0,
    }


def test_diff_flags_regressions(service, dataset, settings) -> None:
    db = settings.home / "evals.db"
    with EdgelmClient(service) as client:
        a = harness.run_eval(client, db, harness.EvalConfig(dataset, ["good"]))
        b = harness.run_eval(client, db, harness.EvalConfig(dataset, ["bad"]))
    run_a, run_b = (LoadedRun(*runs_db.load_run(db, x)) for x in (a, b))
    diff = diff_runs(run_a, run_b)
    assert diff["regressed"]
    quality = next(r for r in diff["rows"] if r["metric"] == "quality")
    assert quality["model"] == "good → bad" and quality["delta"] == -1.0 and quality["regression"]
    assert [f["item"] for f in diff["flips"]] == ["q1", "q2", "q3", "q4"]
    assert not diff_runs(run_a, run_a)["regressed"]
    page = render_html([run_a, run_b])
    assert "REGRESSION" in page and "items that got worse" in page
    assert runs_db.list_runs(db)[0]["results"] == "4/4"


def test_hybrid_rows_report_the_escalated_share() -> None:
    from edgelm.evals.datasets import QAItem
    from edgelm.evals.runs_db import EvalRun, ResultRow

    items = [QAItem(f"q{i}", "?", ["a"]) for i in range(4)]
    run = EvalRun("r", 0.0, "set", ["hybrid"], {}, items=items)
    routes = ["draft", "refine", "direct", "draft"]
    rows = [
        ResultRow(f"q{i}", "hybrid", True, "a", metrics={"quality": 1.0}, extension={"route": r})
        for i, r in enumerate(routes)
    ]
    (summary,) = summarize(LoadedRun(run, rows))
    assert summary["metrics"]["escalated"] == 0.5
    fewer = [ResultRow(f"q{i}", "hybrid", True, "a", metrics={"quality": 1.0},
                       extension={"route": "refine"}) for i in range(4)]  # fmt: skip
    diff = diff_runs(LoadedRun(run, rows), LoadedRun(run, fewer))
    flagged = {r["metric"] for r in diff["rows"] if r["regression"]}
    assert flagged == {"escalated"}  # same quality, but the LLM answered everything
