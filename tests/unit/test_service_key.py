"""A service that requires an API key answers every command family that talks to it, whether
the key is given with the global ``--api-key`` or is the service's own (``EDGELM_API_KEY``),
and one resolver decides endpoint and key for all of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelm.bench.targets import HttpTarget, make_target
from edgelm.bench.workloads import Prompt
from edgelm.cli.main import app
from edgelm.client import EdgelmClient, ServiceError, resolve_service
from edgelm.server.app import create_app
from edgelm.settings import Settings, load_settings
from tests.unit.test_rag_model import GOOD, QUESTION, rag_catalog

KEY = "sekret-key"
runner = CliRunner()

# How a user gives the CLI the key: the global flag, or the key the service itself was
# configured with (EDGELM_API_KEY is service.api_key), which every command falls back to.
WAYS = {
    "flag": (["--api-key", KEY], {}),
    "service key": ([], {"EDGELM_API_KEY": KEY}),
}


@pytest.fixture
def keyed(settings: Settings, isolated_home: Path, serve_app) -> str:
    settings.service.api_key = KEY
    return serve_app(create_app(settings, catalog=rag_catalog(isolated_home)))


def cli(base: str, way: str, *args: str):  # type: ignore[no-untyped-def]
    flags, env = WAYS[way]
    return runner.invoke(
        app,
        ["--endpoint", base, *flags, *args],
        catch_exceptions=False,
        env={"COLUMNS": "250", **env},
    )


def test_without_a_key_the_service_refuses(keyed: str) -> None:
    """The control: the commands below pass only because they send the key."""
    result = runner.invoke(app, ["--endpoint", keyed, "model", "load", "fake-slm"])
    assert result.exit_code == 1 and "API key" in result.output
    with pytest.raises(ServiceError) as info:
        EdgelmClient(keyed).models()
    assert info.value.status == 401


@pytest.mark.parametrize("way", list(WAYS))
def test_every_command_family_reaches_a_keyed_service(keyed: str, way: str, tmp_path: Path) -> None:
    loaded = cli(keyed, way, "model", "load", "fake-slm")
    assert loaded.exit_code == 0, loaded.output
    assert "loaded fake-slm" in loaded.output
    status = cli(keyed, way, "service", "status")
    assert status.exit_code == 0, status.output
    assert f"service running at {keyed}" in status.output and "fake-slm" in status.output
    unloaded = cli(keyed, way, "model", "unload", "fake-slm")
    assert unloaded.exit_code == 0 and "fake-slm: unloaded" in unloaded.output

    hybrid = cli(keyed, way, "hybrid", "ask", "-p", "What is 2+2?", "--json")
    assert hybrid.exit_code == 0, hybrid.output
    answer = json.loads(hybrid.output)
    assert answer["model"] == "hybrid" and answer["text"] in (GOOD, "LLM says 45 days [1].")
    assert answer["edgelm"]["route"]

    dataset = tmp_path / "qa.jsonl"
    dataset.write_text(json.dumps({"id": "q1", "question": "Battery?", "answers": ["45"]}) + "\n")
    evaluated = cli(keyed, way, "eval", "run", "-m", "fake-slm", "-d", str(dataset), "--no-html")
    assert evaluated.exit_code == 0, evaluated.output
    assert "fake-slm" in evaluated.output and "failed" not in evaluated.output.lower()

    assert cli(keyed, way, "rag", "ingest", "--demo", "-c", "demo").exit_code == 0
    rag = cli(keyed, way, "rag", "ask", QUESTION, "-c", "demo", "--json", "--no-fallback")
    assert rag.exit_code == 0, rag.output
    assert json.loads(rag.output)["answer"] == GOOD
    embedded = cli(
        keyed, way, "rag", "ingest", "--demo", "-c", "dense", "--embed-model", "fake-embed"
    )
    assert embedded.exit_code == 0, embedded.output
    assert "fake-embed" in cli(keyed, way, "rag", "list").output

    bench = cli(
        keyed, way, "bench", "run", "-m", "service:fake-slm", "-n", "1", "--warmup", "0",
        "--max-tokens", "4", "--no-html", "--out", str(tmp_path / "bench"),
    )  # fmt: skip
    assert bench.exit_code == 0, bench.output
    block = bench.output.split("[BENCHMARK RESULTS]", 1)[1].rsplit("run ", 1)[0]
    (row,) = json.loads(block)
    assert (row["kind"], row["model"], row["ok"], row["errors"]) == ("service", "fake-slm", 1, 0)


@pytest.mark.parametrize("way", list(WAYS))
def test_bench_targets_are_built_with_the_key(keyed: str, way: str, isolated_home: Path) -> None:
    flags, env = WAYS[way]
    settings = load_settings(
        {"client.endpoint": keyed}, env={"EDGELM_HOME": str(isolated_home), **env}
    )
    explicit = flags[1] if flags else None
    for spec in ("service:fake-slm", "fake-slm"):  # the plain alias finds the running service
        target = make_target(spec, settings, api_key=explicit)
        assert isinstance(target, HttpTarget) and target.kind == "service"
        try:
            target.open()
            prompt = Prompt(id="p", messages=[{"role": "user", "content": QUESTION}])
            result = target.request(prompt, {"max_tokens": 8})
        finally:
            target.close()
        assert result.ok, result.error
        assert result.text == GOOD[: len(result.text)] and result.text


def test_resolver_precedence(isolated_home: Path) -> None:
    def resolved(env: dict[str, str], overrides: dict | None = None, **explicit: str):  # type: ignore[no-untyped-def]
        settings = load_settings(overrides, env={"EDGELM_HOME": str(isolated_home), **env})
        address = resolve_service(settings, **explicit)
        return address.endpoint, address.api_key

    # nothing set: the local service, no key
    assert resolved({}) == ("http://127.0.0.1:5273", None)
    # the service's own key (EDGELM_API_KEY is service.api_key), then the client's, then a flag
    assert resolved({"EDGELM_API_KEY": "svc"})[1] == "svc"
    both = {"EDGELM_API_KEY": "svc", "EDGELM_CLIENT__API_KEY": "cli"}
    assert resolved(both)[1] == "cli"
    assert resolved(both, {"client.api_key": "flag"})[1] == "flag"  # the global --api-key
    assert resolved(both, api_key="explicit")[1] == "explicit"  # a command's own option
    # endpoint: EDGELM_ENDPOINT, the global --endpoint over it, an explicit one over both
    env = {"EDGELM_ENDPOINT": "http://env:1/", "EDGELM_SERVICE__PORT": "7000"}
    assert resolved(env)[0] == "http://env:1"
    assert resolved(env, {"client.endpoint": "http://flag:2"})[0] == "http://flag:2"
    assert resolved(env, endpoint="http://given:3/")[0] == "http://given:3"
    assert resolved({"EDGELM_SERVICE__PORT": "7000"})[0] == "http://127.0.0.1:7000"
    # the local service's own key never goes to another server
    assert resolved({"EDGELM_API_KEY": "svc", "EDGELM_ENDPOINT": "http://elsewhere:1"})[1] is None
    assert resolved({"EDGELM_API_KEY": "svc"}, endpoint="http://elsewhere:1")[1] is None
    assert resolved({"EDGELM_API_KEY": "svc"}, endpoint="http://127.0.0.1:5273/")[1] == "svc"
    assert resolved({"EDGELM_API_KEY": "svc"}, endpoint="http://localhost:6000")[1] == "svc"
    # the config file is a layer under the environment, like every setting
    (isolated_home / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text('[client]\napi_key = "file"\n')
    assert resolved({"EDGELM_API_KEY": "svc"})[1] == "file"
    assert resolved({"EDGELM_CLIENT__API_KEY": "cli"})[1] == "cli"
    # and the client built from the settings sends what the resolver says
    settings = load_settings(
        {"client.endpoint": "http://x:9"}, env={"EDGELM_HOME": str(isolated_home)}
    )
    client = EdgelmClient.for_settings(settings)
    assert client.endpoint == "http://x:9"
    assert client.http.headers["authorization"] == "Bearer file"
