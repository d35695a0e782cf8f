"""The learned router: train → save → load → route on fake eval data, and the ``learned`` policy
term deciding before any draft (the SLM is never asked for a question predicted to fail)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.cost import Prices
from edgelm.engines.fake import FakeEngine
from edgelm.errors import ConfigError, InvalidRequest
from edgelm.evals import hybrid as ev
from edgelm.evals import runs_db
from edgelm.evals.datasets import QAItem
from edgelm.hybrid import learned as lr
from edgelm.hybrid.pipeline import HybridRouter, RouteRecord
from edgelm.hybrid.policies import (
    Learned,
    bind_learned,
    decide_before_draft,
    parse_policy,
    uses_learned,
)
from edgelm.pool import ModelPool
from edgelm.settings import Settings
from edgelm.types import GenerationRequest, Message

EASY = [f"What colour is the cat number {n} in the picture book?" for n in range(12)]
HARD = [f"Prove the theorem {n} about prime gaps with a rigorous induction" for n in range(12)]


def fake_embed(texts: list[str]) -> list[list[float]]:
    """The fake engine's hashed bag of words: questions sharing words land close together."""
    return FakeEngine("embedder").embed(texts)[0]


def write_runs(db: Path, slm: str = "small", llm: str = "big") -> str:
    """One stored run in which both tiers answered: the SLM fails every HARD question."""
    items = [QAItem(f"e{n}", q, ["x"]) for n, q in enumerate(EASY)]
    items += [QAItem(f"h{n}", q, ["x"]) for n, q in enumerate(HARD)]
    run = runs_db.create_run(db, "fake", [slm, llm], {}, items)
    for item in items:
        hard = item.id.startswith("h")
        for model, quality in ((slm, 0.0 if hard else 1.0), (llm, 1.0)):
            runs_db.save_result(
                db, run.id, runs_db.ResultRow(item.id, model, True, "a", metrics={"quality": quality})
            )
    # An answer that failed (ok=0) and another model's rows must not become examples.
    runs_db.save_result(db, run.id, runs_db.ResultRow("e0", "other", True, metrics={"quality": 1.0}))
    return run.id


def test_train_save_load_route_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "evals.db"
    run_id = write_runs(db)
    examples, used = lr.examples_from_runs(db, "small", "big")
    assert used == [run_id]
    assert len(examples) == 24 and sum(e.label for e in examples) == 12
    assert all(e.label == int(e.question in HARD) for e in examples)

    vectors = fake_embed([e.question for e in examples])
    model = lr.train(examples, vectors, embedder="embedder", meta={"runs": used})
    path = model.save(tmp_path / "router" / "learned.json")
    loaded = lr.LearnedRouter.load(path)
    assert loaded.embedder == "embedder" and loaded.meta["runs"] == [run_id]
    assert loaded.meta["examples"] == 24 and loaded.meta["positives"] == 12

    unseen_hard = "Prove the theorem 99 about prime gaps by induction"
    unseen_easy = "What colour is the cat number 99 in the book?"
    p_hard = loaded.score(unseen_hard, fake_embed)
    p_easy = loaded.score(unseen_easy, fake_embed)
    assert p_hard > 0.7 > 0.3 > p_easy
    # The file keeps what it needs: the saved model predicts what the fitted one did.
    assert np.allclose(
        loaded.predict([unseen_hard], fake_embed([unseen_hard])),
        model.predict([unseen_hard], fake_embed([unseen_hard])),
        atol=1e-4,
    )

    policy = bind_learned(parse_policy("learned=0.5"), p_hard)
    decision = decide_before_draft(policy, unseen_hard)
    assert decision is not None and decision.route == "direct"
    decision = decide_before_draft(bind_learned(parse_policy("learned=0.5"), p_easy), "q")
    assert decision is not None and decision.route == "draft"


def test_cross_validation_holds_each_question_out(tmp_path: Path) -> None:
    db = tmp_path / "evals.db"
    write_runs(db)
    write_runs(db)  # the same questions in a second run: held out together, by text
    examples, used = lr.examples_from_runs(db, "small", "big")
    assert len(used) == 2 and len(examples) == 48
    vectors = fake_embed([e.question for e in examples])
    scores = lr.cross_validated(examples, vectors, folds=4)
    assert set(scores) == set(EASY + HARD)
    assert min(scores[q] for q in HARD) > max(scores[q] for q in EASY)
    summary = lr.routing_summary(examples, [scores[e.question] for e in examples], [0.5])
    assert summary[0]["to_llm"] == pytest.approx(0.5) and summary[0]["of_llm"] == 1.0


def test_examples_need_both_models_and_a_database(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no eval results"):
        lr.examples_from_runs(tmp_path / "none.db", "small", "big")
    db = tmp_path / "evals.db"
    write_runs(db)
    assert lr.examples_from_runs(db, "small", "absent") == ([], [])
    with pytest.raises(InvalidRequest, match="no eval run nope"):
        lr.examples_from_runs(db, "small", "big", ["nope"])


def test_a_router_file_for_other_features_is_refused(tmp_path: Path) -> None:
    examples = [lr.Example(q, int(q in HARD)) for q in EASY + HARD]
    model = lr.train(examples, fake_embed([e.question for e in examples]))
    data = model.to_dict()
    bad = tmp_path / "bad.json"
    import json

    bad.write_text(json.dumps({**data, "weights": data["weights"][:-1]}))
    with pytest.raises(ConfigError, match="weights"):
        lr.LearnedRouter.load(bad)
    bad.write_text(json.dumps({**data, "scale": [0.0] * len(data["scale"])}))
    with pytest.raises(ConfigError, match="scale"):
        lr.LearnedRouter.load(bad)
    bad.write_text(json.dumps({**data, "format": 99}))
    with pytest.raises(ConfigError, match="format"):
        lr.LearnedRouter.load(bad)


def test_shipped_router_loads_and_parses() -> None:
    router = lr.LearnedRouter.load(lr.shipped_path())
    assert router.embedder == "all-minilm-l6-v2" and router.dims == 384
    assert "hybrid train" in router.meta["command"]
    rng = np.random.default_rng(0)
    vectors = rng.normal(0, 0.05, (3, 384))
    probs = router.predict(["What is 7 times 8?", "Name a fruit.", "Why?"], vectors)
    assert np.all(np.isfinite(probs)) and np.all((probs > 0) & (probs < 1))


def test_policy_language() -> None:
    policy = parse_policy("learned=0.3,insufficient>direct")
    assert uses_learned(policy) and not uses_learned(parse_policy("length=5"))
    assert policy.spec() == "learned=0.3,insufficient=3>direct"
    assert parse_policy("learned") == Learned(0.5)
    with pytest.raises(InvalidRequest, match="probability"):
        parse_policy("learned=2")
    # Unbound (no router): never fires, and says why.
    verdict = parse_policy("learned=0.1").check("q", None)
    assert verdict is not None and not verdict.fired and "no learned router" in verdict.detail


# -- the pipeline: decided before the draft ---------------------------------------------------


def fake(alias: str, **options: object) -> CatalogEntry:
    return CatalogEntry(alias=alias, engine="fake", options=options)  # type: ignore[arg-type]


@pytest.fixture
def pool(settings: Settings) -> ModelPool:
    entries = [
        fake("small", reply="A cat is black.", logprobs=[-0.1]),
        fake("big", reply="The proof goes by induction."),
        fake("embedder"),
    ]
    return ModelPool(settings, Catalog(entries))


def trained_router() -> lr.LearnedRouter:
    examples = [lr.Example(q, int(q in HARD)) for q in EASY + HARD]
    return lr.train(examples, fake_embed([e.question for e in examples]), embedder="embedder")


async def ask(router: HybridRouter, question: str) -> tuple[str, RouteRecord]:
    answer = await router.start(_request(question))
    text = "".join([chunk.text async for chunk in answer.chunks])
    return text, answer.record


def test_learned_term_sends_a_predicted_miss_to_the_llm_without_a_draft(pool: ModelPool) -> None:
    router = HybridRouter(
        pool, "small", "big", parse_policy("learned=0.5"), Prices(), learned=trained_router()
    )

    async def run() -> None:
        text, record = await ask(router, "Prove the theorem 7 about prime gaps by induction")
        assert record.route == "direct" and text == "The proof goes by induction."
        assert "small" not in pool.models  # the SLM was never even loaded, let alone asked
        assert record.draft is None and record.decision is not None
        assert record.decision.verdict.policy == "learned"
        assert record.to_dict()["signals"][0]["value"] > 0.5

        text, record = await ask(router, "What colour is the cat number 5 in the book?")
        assert record.route == "draft" and text == "A cat is black."
        slm = pool.models["small"].engine
        assert isinstance(slm, FakeEngine) and len(slm.requests) == 1
        await pool.close()

    asyncio.run(run())


def test_learned_term_without_embedder_drafts_as_usual(settings: Settings) -> None:
    pool = ModelPool(settings, Catalog([fake("small", reply="ok"), fake("big", reply="big")]))
    router = HybridRouter(
        pool, "small", "big", parse_policy("learned=0.0"), Prices(), learned=trained_router()
    )

    async def run() -> None:
        answer = await router.start(_request("Prove theorem 1 about prime gaps"))
        assert answer.record.route == "draft"
        assert "embedder unavailable" in answer.record.reason
        async for _ in answer.chunks:
            pass
        await pool.close()

    asyncio.run(run())


def _request(question: str) -> GenerationRequest:
    return GenerationRequest(messages=[Message(role="user", content=question)], max_tokens=8)


def test_eval_scores_learned_configs_with_out_of_fold_probabilities() -> None:
    def piece(text: str) -> ev.Piece:
        return ev.Piece(text, 1.0, 0.1, 5, 5)

    pieces = [
        ev.Pieces(
            f"q{n}",
            q,
            ["induction" if q in HARD else "black"],
            "",
            piece("A cat is black."),
            -0.1,
            -0.2,
            piece("x"),
            piece("by induction"),
        )
        for n, q in enumerate(EASY + HARD)
    ]
    examples = [
        lr.Example(q, int(q in HARD), slm_quality=float(q in EASY), llm_quality=1.0)
        for q in EASY + HARD
    ]
    configs = ev.learned_configurations(pieces, examples, fake_embed, ["0.5"], folds=4)
    assert [c.name for c in configs] == ["learned=0.5", "learned=0.5,insufficient>direct"]
    base = [ev.Config("slm-only", "slm-only"), ev.Config("llm-only", "llm-only")]
    report = ev.evaluate(pieces, base + configs, Prices())
    learned = next(c for c in report.configs if c.name == "learned=0.5")
    assert learned.escalated == pytest.approx(0.5) and learned.quality == 1.0
    assert learned.direct == pytest.approx(0.5) and learned.refined == 0.0
    # A direct route decided before drafting costs only the LLM's time, not a draft too.
    assert learned.mean_latency_s == pytest.approx(1.0)
    assert ev.share_png(report).startswith("data:image/png;base64,")


# -- the CLI against a fake service -----------------------------------------------------------


def test_cli_train_then_eval_from_run(isolated_home: Path, serve_app) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from edgelm.cli.main import app as cli
    from edgelm.server.app import create_app
    from edgelm.settings import load_settings

    run_id = write_runs(isolated_home / "evals.db")
    entries = [
        CatalogEntry(alias="small", engine="fake", tier="slm"),
        CatalogEntry(alias="big", engine="fake", tier="llm"),
        CatalogEntry(alias="all-minilm-l6-v2", engine="fake", tier="embedding"),
    ]
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    catalog = Catalog(entries, user_file=isolated_home / "models.toml")
    user = Catalog([], user_file=isolated_home / "models.toml")  # what the CLI resolves with
    user.add_user_entry(entries[0])
    user.add_user_entry(entries[1])
    base = serve_app(create_app(settings, catalog=catalog))
    env = {"EDGELM_ENDPOINT": base, "COLUMNS": "200"}
    runner = CliRunner()

    result = runner.invoke(
        cli, ["hybrid", "train", "--slm", "small", "--llm", "big", "--folds", "3"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "trained on 24 questions (12 where big did better)" in result.output
    saved = json.loads(lr.home_path(isolated_home).read_text())
    assert saved["meta"]["runs"] == [run_id] and saved["meta"]["slm"] == "small"
    assert saved["embedder"] == "all-minilm-l6-v2" and saved["dims"] == 64
    assert "hybrid train" in saved["meta"]["command"]
    assert lr.load_router(isolated_home).meta["examples"] == 24  # the user's file wins

    out = isolated_home / "heval"
    args = ["hybrid", "eval", "--from-run", run_id, "--slm", "small", "--llm", "big"]
    result = runner.invoke(cli, [*args, "--learned", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    names = [c["name"] for c in report["configs"]]
    assert "learned=0.5" in names and "insufficient>direct" in names and "always" not in names
    assert "quality vs share sent to the LLM" in (out / "report.html").read_text()

    missing = runner.invoke(cli, ["hybrid", "train", "--slm", "small", "--llm", "x"], env=env)
    assert missing.exit_code != 0 and "x" in missing.output
