"""The catalog is live: models added, changed or removed with the CLI while a service runs are
served (or refused) by it at once, without a restart."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.cli.main import app as cli
from edgelm.server.app import create_app
from tests.unit.conftest import fake_entry

runner = CliRunner()


def cli_run(*args: str) -> str:
    result = runner.invoke(cli, list(args), catch_exceptions=False, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def ask(base: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )


def test_user_file_changes_are_seen_by_an_existing_catalog(isolated_home: Path) -> None:
    running = Catalog([fake_entry("fixed")], user_file=isolated_home / "models.toml")
    other = Catalog.load(isolated_home)  # another process: the CLI
    other.add_user_entry(CatalogEntry(alias="mine", engine="fake"))
    assert running.resolve("mine").user and "fixed" in running.names()
    # Replacing an entry (same size, maybe the same mtime tick) is seen: atomic writes
    # replace the file, so its inode changes.
    other.add_user_entry(CatalogEntry(alias="mine", engine="fake", options={"reply": "b"}))
    assert running.resolve("mine").options == {"reply": "b"}
    other.remove_user_entry("mine")
    assert "mine" not in running.names() and running.resolve("fixed")
    # The running catalog's own writes keep entries another process added meanwhile.
    other.add_user_entry(CatalogEntry(alias="theirs", engine="fake"))
    running.add_user_entry(CatalogEntry(alias="ours", engine="fake"))
    assert {"theirs", "ours"} <= set(Catalog.load(isolated_home).names())


def test_a_broken_user_file_keeps_the_last_good_catalog(isolated_home: Path) -> None:
    running = Catalog.load(isolated_home)
    running.add_user_entry(CatalogEntry(alias="mine", engine="fake"))
    (isolated_home / "models.toml").write_text("[[model]\nbroken")
    assert running.resolve("mine").alias == "mine"  # logged, not fatal
    os.utime(isolated_home / "models.toml")  # still broken: still the last good entries
    assert running.resolve("mine").alias == "mine"


def test_models_added_changed_and_removed_by_the_cli_reach_a_running_service(
    settings, isolated_home: Path, serve_app
) -> None:
    catalog = Catalog([fake_entry("fake-a")], user_file=isolated_home / "models.toml")
    base = serve_app(create_app(settings, catalog=catalog))
    missing = ask(base, "late")
    assert missing.status_code == 404

    cli_run("model", "add", "late", "--engine", "fake")
    answer = ask(base, "late")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Fake answer to: hi"
    assert "late" in [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]

    # Registered again with other options: the idle model is reloaded with them.
    Catalog.load(isolated_home).add_user_entry(
        CatalogEntry(alias="late", engine="fake", options={"reply": "changed answer"})
    )
    assert ask(base, "late").json()["choices"][0]["message"]["content"] == "changed answer"

    cli_run("model", "remove", "late")
    gone = ask(base, "late")
    assert gone.status_code == 404
    error = gone.json()["error"]
    assert error["code"] == "model_not_found" and "'late' is not in the catalog" in error["message"]
    assert "late" not in [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    # It was loaded and is idle: the pool's sweep unloads it (every 2 s).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        loaded = [m["id"] for m in httpx.get(f"{base}/openai/loadedmodels").json()]
        if "late" not in loaded:
            break
        time.sleep(0.2)
    assert "late" not in loaded and ask(base, "fake-a").status_code == 200
