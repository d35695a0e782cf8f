"""Every CLI command, in-process with typer's runner, against the fake engine where a service
is needed (served for real on a loopback port)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.cli.main import app
from edgelm.settings import load_settings
from tests.unit.conftest import free_port

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None, **kw):
    """Invoke the CLI with a wide terminal, so tables and messages are not cut."""
    return runner.invoke(
        app, list(args), catch_exceptions=False, env={"COLUMNS": "250", **(env or {})}, **kw
    )


def test_help_and_version() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for group in ("model", "service", "cache", "config", "system"):
        assert group in result.output
    assert run("--version").output.startswith("edgelm ")


def test_model_list_and_info() -> None:
    result = run("model", "list")
    assert result.exit_code == 0
    for alias in ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"):
        assert alias in result.output
    info = run("model", "info", "slm")
    assert info.exit_code == 0
    assert "Qwen2.5-Coder-0.5B-Instruct" in info.output and "Q4_K_M" in info.output
    assert "hub" in info.output and "pypi" in info.output


def test_unknown_model_is_one_clear_line() -> None:
    import sys

    from edgelm.cli.main import main

    argv = sys.argv
    sys.argv = ["edgelm", "model", "info", "gpt-5"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 1


def test_model_add_remove(tmp_path: Path, isolated_home: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    assert run("model", "add", "mine", "--file", str(gguf)).exit_code == 0
    entry = Catalog.load(isolated_home).resolve("mine")
    assert entry.path == gguf and entry.size_bytes == 68
    assert "mine" in run("model", "list").output
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    bad = run("model", "add", "bad", "--file", str(not_gguf))
    assert bad.exit_code == 1 and "not a GGUF file" in bad.output
    missing = run("model", "add", "gone", "--file", str(tmp_path / "nope.gguf"))
    assert missing.exit_code == 1
    assert run("model", "add", "echo", "--engine", "fake").exit_code == 0
    assert run("model", "remove", "mine").exit_code == 0
    assert "mine" not in Catalog.load(isolated_home).names()
    assert run("model", "remove", "smollm2-135m").exit_code == 1


def test_config_commands(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the file layer and the defaults give: without the test's port from the environment.
    monkeypatch.delenv("EDGELM_SERVICE__PORT")
    assert run("config", "set", "service.port", "6001").exit_code == 0
    assert run("config", "get", "service.port").output.strip() == "6001"
    bad = run("config", "set", "service.port", "abc")
    assert bad.exit_code == 1 and "service.port" in bad.output
    unknown = run("config", "set", "service.nope", "1")
    assert unknown.exit_code == 1 and "unknown settings key" in unknown.output
    listed = json.loads(run("config", "list", "--json").output)
    assert any(row["key"] == "service.port" and row["value"] == "6001" for row in listed)
    assert run("config", "set", "service.api_key", "sekret").exit_code == 0
    assert "sekret" not in run("config", "list").output
    assert run("config", "unset", "service.port").exit_code == 0
    assert run("config", "get", "service.port").output.strip() == "5273"
    assert run("config", "path").output.strip() == str(isolated_home / "config.toml")
    env = run("config", "get", "service.port", env={"EDGELM_SERVICE__PORT": "7007"})
    assert env.output.strip() == "7007"


def test_cache_commands(isolated_home: Path) -> None:
    assert run("cache", "location").output.strip() == str(isolated_home / "models")
    assert "no models" in run("cache", "list").output
    target = isolated_home / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"x" * 10)
    assert "smollm2-135m" in run("cache", "list").output
    assert run("cache", "remove", "smollm2-135m").exit_code == 0
    assert not target.exists()
    assert run("cache", "remove", "smollm2-135m").exit_code == 1


def test_system_info() -> None:
    result = run("system", "info", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data
    assert run("system", "info").exit_code == 0


@pytest.fixture
def fake_service(isolated_home: Path, serve_app) -> str:
    """A real service serving a fake model registered in the user catalog."""
    from edgelm.server.app import create_app

    Catalog.load(isolated_home).add_user_entry(
        CatalogEntry(alias="echo", engine="fake", options={"reply": "pong pong"})
    )
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    return serve_app(create_app(settings))


def test_service_commands_against_running_service(fake_service: str) -> None:
    env = {"EDGELM_ENDPOINT": fake_service}
    status = run("service", "status", env=env)
    assert status.exit_code == 0 and "no models loaded" in status.output
    assert "loaded echo" in run("model", "load", "echo", env=env).output
    status = run("service", "status", env=env)
    assert "echo" in status.output and "fake" in status.output
    once = run("model", "run", "echo", "--prompt", "ping", env=env)
    assert once.exit_code == 0, once.output
    assert "pong pong" in once.output and "TTFT" in once.output
    chat = run("model", "run", "echo", env=env, input="hello\n/reset\nagain\n/exit\n")
    assert chat.exit_code == 0, chat.output
    assert chat.output.count("pong pong") == 2
    assert "unloaded" in run("model", "unload", "echo", env=env).output


def test_status_when_down(isolated_home: Path) -> None:
    port = free_port()
    result = run("service", "status", env={"EDGELM_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert result.exit_code == 1 and "not running" in result.output
    assert "no service was running" in run("service", "stop").output
