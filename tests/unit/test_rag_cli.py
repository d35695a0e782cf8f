"""``edgelm rag ...`` with typer's runner; answers come from a fake-engine service on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from edgelm.cli import rag_cmd
from edgelm.cli.main import EdgelmGroup
from edgelm.rag.evaluate import corpus_dir
from edgelm.server.app import create_app
from edgelm.settings import load_settings
from tests.unit.test_rag_model import GOOD, QUESTION, rag_catalog

runner = CliRunner()


def cli() -> typer.Typer:
    """The rag commands mounted the way ``edgelm`` mounts them (same error handling)."""
    root = typer.Typer(cls=EdgelmGroup)
    root.add_typer(rag_cmd.app, name="rag")

    @root.callback()
    def _root(ctx: typer.Context) -> None:
        ctx.obj = {}

    return root


def run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(cli(), list(args), env={"COLUMNS": "200", **(env or {})})


def test_ingest_list_ask_remove(isolated_home: Path, serve_app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("rag", "ingest", str(corpus_dir()), "--collection", "demo")
    assert result.exit_code == 0, result.output
    assert "8 added" in result.output
    again = run("rag", "ingest", str(corpus_dir()), "-c", "demo")
    assert "8 unchanged" in again.output
    listing = run("rag", "list")
    assert "demo" in listing.output
    assert "8 unchanged" in run("rag", "ingest", "--demo", "-c", "demo").output
    assert run("rag", "ingest").exit_code == 1

    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    base = serve_app(create_app(settings, catalog=rag_catalog(isolated_home), virtual=[]))
    env = {"EDGELM_ENDPOINT": base}
    answer = run("rag", "ask", QUESTION, "-c", "demo", env=env)
    assert answer.exit_code == 0, answer.output
    assert GOOD in answer.output and "[1] power.txt" in answer.output
    as_json = run("rag", "ask", QUESTION, "-c", "demo", "--json", "--mode", "lexical", env=env)
    data = json.loads(as_json.output)
    assert data["answer"] == GOOD and data["edgelm"]["citations"][0]["source"] == "power.txt"
    refused = run("rag", "ask", "What is the capital of France?", "-c", "demo", env=env)
    assert "cannot answer" in refused.output and "refused" in refused.output

    missing = run("rag", "ask", QUESTION, "-c", "nope", env=env)
    assert missing.exit_code == 1 and "no RAG collection 'nope'" in missing.output
    assert run("rag", "remove", "demo").exit_code == 0
    assert run("rag", "remove", "demo").exit_code == 1


def test_ingest_with_embeddings_from_the_service(isolated_home: Path, serve_app) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    base = serve_app(create_app(settings, catalog=rag_catalog(isolated_home), virtual=[]))
    env = {"EDGELM_ENDPOINT": base}
    result = run("rag", "ingest", str(corpus_dir()), "--embed-model", "fake-embed", env=env)
    assert result.exit_code == 0, result.output
    assert "fake-embed" in run("rag", "list").output
    answer = run("rag", "ask", QUESTION, "--mode", "hybrid", "--json", env=env)
    assert json.loads(answer.output)["edgelm"]["contexts"]
    report = run("rag", "eval", "--embed-model", "fake-embed", "--json", env=env)
    modes = [row["mode"] for row in json.loads(report.output)]
    assert modes == ["lexical", "dense", "hybrid"]


def test_eval_lexical_and_bad_paths() -> None:
    result = run("rag", "eval")
    assert result.exit_code == 0 and "recall@4" in result.output and "lexical" in result.output
    bad = run("rag", "ingest", "/no/such/dir")
    assert bad.exit_code == 1 and "no such file" in bad.output


def test_chat_starts_chainlit_outside_the_current_directory(
    isolated_home: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    calls = []

    def fake_call(cmd, env, cwd):  # type: ignore[no-untyped-def]
        calls.append((cmd, env, cwd))
        return 0

    monkeypatch.setattr(rag_cmd.subprocess, "call", fake_call)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    result = run("rag", "chat", "-c", "demo", "--headless", "--port", "8123")
    assert result.exit_code == 0, result.output
    [(cmd, env, cwd)] = calls
    assert cmd[1:3] == ["run", str(Path(rag_cmd.__file__).parents[1] / "rag/chainlit_app.py")]
    assert cmd[-3:] == ["--port", "8123", "--headless"]
    assert env["EDGELM_RAG_COLLECTION"] == "demo"
    assert env["CHAINLIT_APP_ROOT"] == cwd == str(isolated_home / "chainlit")
    assert "edgelm RAG" in (Path(cwd) / ".chainlit" / "config.toml").read_text()
    assert list(workdir.iterdir()) == []
    assert run("rag", "chat", "-c", "../x").exit_code == 1


def test_bench_prints_its_figures_as_json(tmp_path: Path) -> None:
    result = run(
        "rag", "bench", "--chunks", "600", "--dim", "16", "--queries", "4", "--dir", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.split("[RAG BENCHMARK RESULTS]", 1)[1])
    assert figures["chunks"] == 600 and figures["dense_recall_at_10"] == 1.0
    assert {"lexical_p99_ms", "hybrid_p95_ms", "chunks_per_s", "db_mb"} <= set(figures)


def test_bench_makes_its_folder_and_names_one_it_cannot_use(tmp_path: Path) -> None:
    """--dir may name a folder that does not exist yet (it is made); a file there is a clear
    error, not a traceback."""
    new = tmp_path / "big" / "disk"
    args = ("rag", "bench", "--chunks", "300", "--dim", "8", "--queries", "2", "--dir")
    result = run(*args, str(new))
    assert result.exit_code == 0, result.output
    assert new.is_dir() and list(new.iterdir()) == []  # the collection itself is gone
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run(*args, str(blocker / "sub"))
    assert result.exit_code == 1
    assert "cannot use" in result.output and "Traceback" not in result.output
