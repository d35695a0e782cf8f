"""``edgelm compare``: the quality column (quick eval or stored run), each model's own memory,
and a decision that does not recommend a small model whose answers are far worse."""

from __future__ import annotations

import json
from pathlib import Path

from edgelm.bench.targets import HttpTarget
from edgelm.catalog import Catalog, CatalogEntry
from edgelm.compare import ModelReport, decision_line, good_enough, model_memory
from edgelm.evals import runs_db
from edgelm.evals.datasets import QAItem
from tests.unit.test_cli import run


def register(home: Path) -> None:
    catalog = Catalog.load(home)
    catalog.add_user_entry(
        CatalogEntry(
            alias="small",
            engine="fake",
            tier="custom",
            options={"reply": "loop loop " * 20, "memory_mb": 10},
        )
    )
    catalog.add_user_entry(
        CatalogEntry(
            alias="large",
            engine="fake",
            tier="custom",
            options={"reply": "Paris is the capital.", "token_delay_s": 0.003, "memory_mb": 50},
        )
    )


def quality_set(tmp_path: Path) -> Path:
    path = tmp_path / "set.jsonl"
    rows = [{"id": f"q{i}", "question": f"Capital {i}?", "answers": ["Paris"]} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def rows_of(output: str) -> dict[str, dict]:
    rows = json.loads(output.split("[COMPARISON RESULTS]", 1)[1])
    return {row["model"]: row for row in rows}


def test_compare_weighs_quality_and_each_models_own_memory(
    isolated_home: Path, tmp_path: Path
) -> None:
    register(isolated_home)
    result = run(
        "compare", "--slm", "local:small", "--llm", "local:large", "-n", "2",
        "--prompt", "What is the capital of France?", "--quality", str(quality_set(tmp_path)),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    by_model = rows_of(result.output)
    small, large = by_model["small"], by_model["large"]
    assert small["quality"]["overall"] == 0.0 and small["quality"]["items"] == 3
    assert small["quality"]["degenerate"] == 1.0  # "loop loop ..." every time
    assert large["quality"] == {"overall": 1.0, "items": 3.0, "degenerate": 0.0}
    # each model's own footprint, as the engine accounts it (not the test process's RSS)
    assert small["model_memory_bytes"] == 10 * 2**20
    assert large["model_memory_bytes"] == 50 * 2**20
    # the faster, smaller model is not recommended for anything on its own
    assert "memory-constrained" not in small["best_use"]
    assert small["best_use"].startswith("not on its own: quality 100 points below large")
    # the only model good enough is not "best for memory-constrained devices" by default
    assert "memory-constrained" not in large["best_use"]
    assert "quality-critical answers" in large["best_use"]
    assert large["decision"].startswith("use large: small answers 100 quality points worse")
    assert "decision:" in result.output and "model memory" in result.output


def test_compare_takes_quality_from_a_stored_eval_run(isolated_home: Path) -> None:
    register(isolated_home)
    db = isolated_home / "evals.db"
    items = [QAItem(id=f"q{i}", question=f"Q{i}?", answers=["x"]) for i in range(4)]
    run_id = runs_db.create_run(db, "general", ["small", "large"], {}, items, None).id
    for i in range(4):
        metrics = {"quality": 1.0 if i < 3 else 0.0}
        runs_db.save_result(db, run_id, runs_db.ResultRow(f"q{i}", "small", True, "x", metrics=metrics))
        runs_db.save_result(
            db, run_id, runs_db.ResultRow(f"q{i}", "large", True, "x", metrics={"quality": 1.0})
        )
    result = run(
        "compare", "--slm", "local:small", "--llm", "local:large", "-n", "1",
        "--prompt", "Hi", "--quality-run", run_id,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    by_model = rows_of(result.output)
    assert by_model["small"]["quality"]["overall"] == 0.75
    assert by_model["large"]["quality"]["overall"] == 1.0
    # 25 points worse: still not worth it, whatever the speed
    assert by_model["small"]["decision"].startswith("use large")


def report(model: str, quality: float | None, e2e: float, memory: int, cost: float) -> ModelReport:
    return ModelReport(
        target=model, model=model, kind="in-process", tier="custom", cold_s=None, load_s=None,
        warm_e2e_s=e2e, warm_ttft_s=None, completion_tokens=10, prompt_tokens=10,
        decode_tokens_per_s=None, peak_rss_bytes=None, cost={"local_per_1k": cost},
        answers=[], quality=None if quality is None else {"overall": quality},
        model_memory_bytes=memory,
    )  # fmt: skip


def test_decision_picks_the_cheaper_model_when_quality_is_close() -> None:
    slm = report("slm", 0.80, 1.0, 500, 0.1)
    llm = report("llm", 0.86, 3.0, 1500, 0.3)
    assert good_enough([slm, llm]) == [slm, llm]
    line = decision_line([slm, llm])
    assert line.startswith("use slm: quality 0.80, within 10 points of llm (0.86)")
    assert "0.33x the latency, 0.33x the memory, 0.33x the local cost" in line
    far = report("slm", 0.40, 1.0, 500, 0.1)
    assert decision_line([far, llm]).startswith("use llm: slm answers 46 quality points worse")
    unmeasured = [report("slm", None, 1.0, 500, 0.1), report("llm", None, 3.0, 1500, 0.3)]
    assert decision_line(unmeasured).startswith("no quality measured")


def test_service_memory_is_the_models_own(isolated_home: Path, serve_app) -> None:  # type: ignore[no-untyped-def]
    from edgelm.server.app import create_app
    from edgelm.settings import load_settings

    register(isolated_home)
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    base = serve_app(create_app(settings, catalog=Catalog.load(isolated_home)))
    for alias, mb in (("small", 10), ("large", 50)):
        target = HttpTarget(base, alias, kind="service")
        try:
            target.open()  # loads the model
            assert model_memory(target) == mb * 2**20
        finally:
            target.close()
