"""``edgelm hybrid eval``: the offline computation on recorded pieces, the collection through a
service on fake engines, and both CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.cli.hybrid_cmd import app as hybrid_app
from edgelm.client import EdgelmClient
from edgelm.cost import Prices
from edgelm.evals import hybrid as ev
from edgelm.evals.datasets import QAItem
from edgelm.server.app import create_app
from edgelm.server.hybrid_model import HybridModels
from edgelm.settings import Settings


def piece(text: str, total: float, completion: int = 5) -> ev.Piece:
    return ev.Piece(text, total, total / 4, 10, completion)


def pieces() -> list[ev.Pieces]:
    """Q1: the SLM is right and sure. Q2: wrong and unsure. Q3: declines. Q4: wrong but sure.

    SLM answers take 1 s, the LLM 4 s, a refinement 3 s."""

    def make(i: int, draft: str, mean: float, answers: list[str]) -> ev.Pieces:
        return ev.Pieces(
            id=f"q{i}",
            question=f"question {i}?",
            answers=answers,
            category="",
            draft=piece(draft, 1.0),
            mean_logprob=mean,
            min_logprob=mean * 3,
            refine=piece(f"refined {answers[0]}", 3.0),
            direct=piece(f"llm says {answers[0]}", 4.0),
        )

    return [
        make(1, "Paris", -0.1, ["Paris"]),
        make(2, "Lyon", -2.0, ["Rome"]),
        make(3, "I don't know.", -0.3, ["Tokyo"]),
        make(4, "Oslo", -0.2, ["Bern"]),
    ]


def by_name(report: ev.EvalReport) -> dict[str, ev.ConfigResult]:
    return {c.name: c for c in report.configs}


def test_offline_outcomes_per_route() -> None:
    p = pieces()
    conf = ev.Config("c", "hybrid", ev.parse_policy("insufficient,confidence=-1.0"))
    outs = [ev.outcome(conf, x) for x in p]
    assert [o.route for o in outs] == ["draft", "refine", "direct", "draft"]
    assert [o.latency_s for o in outs] == [1.0, 4.0, 5.0, 1.0]  # direct after a draft pays both
    assert outs[0].ttft_s == 1.0  # a returned draft shows once it is complete
    assert outs[1].ttft_s == pytest.approx(1.75)
    topic = ev.Config("t", "hybrid", ev.parse_policy("keywords=question"))
    assert ev.outcome(topic, p[0]).latency_s == 4.0  # straight to the LLM, no draft time


def test_evaluate_scores_every_config_from_the_same_pieces() -> None:
    configs = ev.configurations(["confidence", "insufficient"], {"confidence": ["-1.0"]})
    names = [c.name for c in configs]
    assert names[:3] == ["slm-only", "llm-only", "always"]
    assert "insufficient,confidence=-1.0" in names
    report = ev.evaluate(pieces(), configs, Prices(), "contains")
    rows = by_name(report)
    assert rows["llm-only"].quality == 1.0 and rows["llm-only"].mean_latency_s == 4.0
    assert rows["slm-only"].quality == 0.25 and rows["slm-only"].escalated == 0
    assert rows["always"].quality == 1.0 and rows["always"].latency_share == 1.0
    combo = rows["insufficient,confidence=-1.0"]
    assert combo.quality == 0.75 and combo.quality_share == 0.75
    assert combo.mean_latency_s == pytest.approx((1 + 4 + 5 + 1) / 4)
    assert combo.escalated == 0.5 and combo.refined == 0.25 and combo.direct == 0.25
    assert combo.routes == ["draft", "refine", "direct", "draft"]
    assert not combo.meets_target
    assert rows["slm-only"].local_cost_per_1k < rows["llm-only"].local_cost_per_1k
    best = report.best()
    assert best is not None and best.name == "always"  # the only hybrid keeping 95%


def test_target_is_flagged() -> None:
    p = pieces()[:1]  # the SLM is right: every policy that keeps the draft meets the target
    report = ev.evaluate(p, ev.configurations(["confidence"], {"confidence": ["-1.0"]}), Prices())
    row = by_name(report)["confidence=-1.0"]
    assert row.quality_share == 1.0 and row.latency_share == 0.25 and row.meets_target
    assert report.best() is row


def test_reports_write(tmp_path: Path) -> None:
    report = ev.evaluate(pieces(), ev.configurations(), Prices())
    ev.write_json(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["configs"][0]["name"] == "slm-only" and len(data["pieces"]) == 4
    assert [p.id for p in ev.read_pieces(tmp_path / "r.json")] == ["q1", "q2", "q3", "q4"]
    html = ev.write_html(report, tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html


@pytest.fixture
def service(settings: Settings, isolated_home: Path, serve_app) -> str:  # type: ignore[no-untyped-def]
    entries = [
        CatalogEntry(
            alias="small",
            engine="fake",
            tier="slm",
            options={"replies": ["Paris", "I don't know."] * 4, "logprobs": [-0.1]},
        ),
        CatalogEntry(alias="big", engine="fake", tier="llm", options={"reply": "Paris or Tokyo"}),
    ]
    catalog = Catalog(entries, user_file=isolated_home / "models.toml")
    return serve_app(create_app(settings, catalog=catalog, virtual=[HybridModels()]))


def test_collect_through_the_service(service: str) -> None:
    items = [
        QAItem("a", "Capital of France?", ["Paris"]),
        QAItem("b", "Capital of Japan?", ["Tokyo"]),
    ]
    recorded = ev.collect(EdgelmClient(service), items, "small", "big", warmup=False)
    assert [r.draft.text for r in recorded] == ["Paris", "I don't know."]
    assert recorded[0].mean_logprob == pytest.approx(-0.1)
    assert (
        recorded[0].refine.text == "Paris or Tokyo" and recorded[0].direct.text == "Paris or Tokyo"
    )
    assert recorded[0].draft.total_s > 0 and recorded[0].direct.completion_tokens == 3
    report = ev.evaluate(recorded, ev.configurations(["insufficient"]), Prices())
    assert by_name(report)["insufficient=3"].routes == ["draft", "direct"]
    assert by_name(report)["insufficient=3"].quality == 1.0


runner = CliRunner()


def test_cli_ask_and_eval(service: str, isolated_home: Path, tmp_path: Path) -> None:
    env = {"EDGELM_ENDPOINT": service, "EDGELM_HOME": str(isolated_home), "COLUMNS": "250"}
    result = runner.invoke(
        hybrid_app, ["ask", "--prompt", "Capital?", "--policy", "always"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "Paris or Tokyo" in result.output and "route: refine" in result.output
    as_json = runner.invoke(hybrid_app, ["ask", "-p", "Capital?", "--json"], env=env)
    payload = json.loads(as_json.output)
    assert payload["edgelm"]["route"] in ("draft", "direct")
    # the form, through the real entry point: `edgelm hybrid --prompt ...`
    from edgelm.cli.main import app as edgelm_app

    direct = runner.invoke(
        edgelm_app, ["hybrid", "--prompt", "Capital?", "--policy", "always", "--json"], env=env
    )
    assert direct.exit_code == 0, direct.output
    record = json.loads(direct.output)
    assert record["text"] == "Paris or Tokyo" and record["edgelm"]["route"] == "refine"
    assert record["edgelm"]["draft"]["text"] and record["edgelm"]["refine"]["total_ms"] > 0
    bare = runner.invoke(edgelm_app, ["hybrid"], env=env)
    assert bare.exit_code == 0 and "--prompt" in bare.output and "eval" in bare.output

    dataset = tmp_path / "set.jsonl"
    dataset.write_text(
        '{"id": "a", "question": "Capital of France?", "answers": ["Paris"]}\n'
        '{"id": "b", "question": "Capital of Japan?", "answers": ["Tokyo"]}\n'
    )
    out = tmp_path / "out"
    result = runner.invoke(
        hybrid_app,
        [
            "eval",
            "-d",
            str(dataset),
            "--policies",
            "insufficient,length",
            "--thresholds",
            "length=3;50",
            "--out",
            str(out),
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "llm-only" in result.output and "length=50" in result.output
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["questions"] == 2 and data["best"]
    assert (out / "report.html").exists()
    # re-scoring recorded pieces needs no service
    again = runner.invoke(
        hybrid_app,
        [
            "eval",
            "--pieces",
            str(out / "results.json"),
            "--policies",
            "confidence",
            "--out",
            str(tmp_path / "again"),
        ],
        env={**env, "EDGELM_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert again.exit_code == 0, again.output
    assert "confidence=-0.5" in again.output


def test_cli_errors_are_one_line(isolated_home: Path) -> None:
    env = {"EDGELM_ENDPOINT": "http://127.0.0.1:9", "EDGELM_HOME": str(isolated_home)}
    result = runner.invoke(hybrid_app, ["eval", "--policies", "sometimes"], env=env)
    assert result.exit_code == 1
