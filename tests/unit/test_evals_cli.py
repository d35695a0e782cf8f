"""``edgelm eval`` through typer's runner against a real service on the fake engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgelm.catalog import Catalog
from edgelm.cli import eval_cmd
from edgelm.cli.main import EdgelmGroup, root
from edgelm.server.app import create_app
from tests.unit.conftest import fake_entry, free_port

runner = CliRunner()


def make_app() -> typer.Typer:
    """The real root options with the eval group, as cli/main.py registers it."""
    app = typer.Typer(cls=EdgelmGroup, pretty_exceptions_enable=False)
    app.callback()(root)
    app.add_typer(eval_cmd.app, name="eval")
    return app


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(
        make_app(), list(args), catch_exceptions=False, env={"COLUMNS": "250", **(env or {})}
    )


@pytest.fixture
def endpoint(settings, serve_app) -> str:
    catalog = Catalog(
        [fake_entry("good", reply="Paris, 4"), fake_entry("bad", reply="no idea")],
        user_file=settings.home / "models.toml",
    )
    return serve_app(create_app(settings, catalog=catalog))


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    path = tmp_path / "qa.jsonl"
    rows = [
        {"id": "q1", "question": "Capital of France?", "answers": ["Paris"], "category": "geo"},
        {"id": "q2", "question": "2+2?", "answers": ["4"], "category": "math"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_run_report_list_diff(endpoint, dataset, isolated_home) -> None:
    result = run("--endpoint", endpoint, "eval", "run", "-m", "good,bad", "-d", dataset)
    assert result.exit_code == 0, result.output
    assert "evaluation summary" in result.output and "quality per category" in result.output
    html = list((isolated_home / "evals").glob("*/report.html"))
    assert len(html) == 1 and "data:image/png" in html[0].read_text()
    listed = run("eval", "list")
    assert "done" in listed.output and "4/4" in listed.output

    # one model per run: the diff pairs them up although their names differ
    for model in ("good", "bad"):
        again = run("--endpoint", endpoint, "eval", "run", "-m", model, "-d", dataset, "--no-html")
        assert again.exit_code == 0
    first, second = _ids(isolated_home)[1:]
    out = isolated_home / "both.html"
    report = run("eval", "report", first, second, "--out", str(out))
    assert report.exit_code == 0 and out.exists()
    assert "regression" in report.output
    diff = run("eval", "diff", first, second)
    assert diff.exit_code == 1 and "regression" in diff.output
    assert run("eval", "diff", first, first).exit_code == 0


def _ids(home: Path) -> list[str]:
    from edgelm.evals.runs_db import list_runs

    return [r["id"] for r in reversed(list_runs(home / "evals.db"))]


def test_resume_and_errors(endpoint, dataset, isolated_home) -> None:
    result = run("--endpoint", endpoint, "eval", "run", "--resume", "latest")
    assert result.exit_code == 1 and "no evaluation runs" in result.output
    result = run("--endpoint", endpoint, "eval", "run", "-d", dataset)
    assert result.exit_code == 1 and "--models" in result.output
    down = f"http://127.0.0.1:{free_port()}"
    result = run("--endpoint", down, "eval", "run", "-m", "good", "-d", dataset)
    assert result.exit_code == 1 and "not running" in result.output
    assert _ids(isolated_home) == []  # nothing stored when the service is down
    ok = run("--endpoint", endpoint, "eval", "run", "-m", "good", "-d", dataset, "--no-html")
    assert ok.exit_code == 0
    resumed = run("--endpoint", endpoint, "eval", "run", "--resume", "latest", "--no-html")
    assert resumed.exit_code == 0 and "resuming run" in resumed.output


def test_datasets_command() -> None:
    result = run("eval", "datasets")
    assert result.exit_code == 0
    assert "general" in result.output and "CC0" in result.output and "code" in result.output
