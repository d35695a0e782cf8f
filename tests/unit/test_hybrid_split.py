"""Held-out evaluation of the hybrid router: the split is deterministic and stratified, the
learned router is trained on the train part only, and k-fold figures cover the whole set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgelm.cost import Prices
from edgelm.errors import InvalidRequest
from edgelm.evals import hybrid as ev
from edgelm.evals import hybrid_split as hs
from edgelm.evals.datasets import list_datasets, load_dataset
from edgelm.evals.metrics import contains_answer
from edgelm.hybrid.policies import parse_policy

CATEGORIES = {"geo": 10, "math": 7, "lang": 5, "one": 1}


def make_pieces() -> list[ev.Pieces]:
    """Math drafts are wrong (the LLM is right), the rest right: a learnable signal."""
    out = []
    for cat, n in CATEGORIES.items():
        for i in range(n):
            wrong = cat == "math"
            draft = ev.Piece("no idea" if wrong else "ans", 1.0, 0.1, 10, 20)
            direct = ev.Piece("ans", 0.8, 0.2, 10, 5)
            out.append(
                ev.Pieces(
                    f"{cat}-{i}",
                    f"{cat} question {i} {'sum' if wrong else 'name'}",
                    ["ans"],
                    cat,
                    draft,
                    -0.5 if wrong else -0.1,
                    -2.0,
                    ev.Piece("", 0, None, 0, 0),
                    direct,
                    draft_logprobs=[-0.1] * 20,
                )
            )
    return out


def embed(texts: list[str]) -> list[list[float]]:
    """A deterministic stand-in for the sentence embedder: 'sum' questions lie apart."""
    out = []
    for t in texts:
        seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
        noise = np.random.default_rng(seed).normal(scale=0.1, size=7)
        out.append([3.0 if "sum" in t else -3.0, *noise])
    return out


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    pieces = make_pieces()
    train, test = hs.split_ids(pieces, 0.5, seed=3)
    assert (train, test) == hs.split_ids(list(reversed(pieces)), 0.5, seed=3)  # order-free
    assert not set(train) & set(test) and len(train) + len(test) == len(pieces)
    cat = {p.id: p.category for p in pieces}
    assert sum(cat[i] == "geo" for i in test) == 5
    assert sum(cat[i] == "math" for i in test) in (3, 4)
    assert sum(cat[i] == "lang" for i in test) in (2, 3)
    assert sum(cat[i] == "geo" for i in train) >= 1 and sum(cat[i] == "one" for i in test) <= 1
    assert hs.split_ids(pieces, 0.5, seed=4) != (train, test)  # the seed matters
    # Adding a question does not move the others across the split.
    more = [*pieces, ev.Pieces(**{**pieces[0].__dict__, "id": "geo-new"})]
    _, test_more = hs.split_ids(more, 0.5, seed=3)
    moved = set(test) ^ (set(test_more) - {"geo-new"})
    assert len(moved) <= 1
    with pytest.raises(InvalidRequest):
        hs.split_ids(pieces, 1.0)


def test_folds_partition_and_mix_categories() -> None:
    pieces = make_pieces()
    folds = hs.fold_ids(pieces, 5, seed=0)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == sorted(p.id for p in pieces)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    geo = [sum(i.startswith("geo") for i in f) for f in folds]
    assert geo == [2] * 5


def test_learned_router_never_sees_test_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = make_pieces()
    trained_on: list[set[str]] = []
    real_train = hs.train

    def spy(examples, vectors, **kw):  # type: ignore[no-untyped-def]
        trained_on.append({e.question for e in examples})
        return real_train(examples, vectors, **kw)

    monkeypatch.setattr(hs, "train", spy)
    configs = [ev.Config("llm-only", "llm-only"), ev.Config("slm-only", "slm-only")]
    held = hs.evaluate_held_out(
        pieces, configs, Prices.load(Path("/nonexistent")), holdout=0.5, seed=1, folds=3,
        embed=embed, learned_thresholds=["0.3"],
    )  # fmt: skip
    by_id = {p.id: p.question for p in pieces}
    test_questions = {by_id[i] for i in held.test_ids}
    # The first fit scores the held-out part: it saw the train part and nothing else.
    assert trained_on[0] == {by_id[i] for i in held.train_ids}
    assert not trained_on[0] & test_questions
    # The learned router, trained without them, sends the held-out math questions to the LLM.
    learned = next(c for c in held.test.configs if c.name == "learned=0.3")
    assert learned.quality == 1.0 and learned.escalated < 0.5
    assert {c.name for c in held.train.configs} >= {"learned=0.3", "slm-only"}
    assert held.cv and {s.name for s in held.cv} >= {"learned=0.3", "llm-only"}
    data = held.to_dict()
    assert data["test_ids"] == held.test_ids and data["chosen_on_train"] is not None
    # The nested figure: each fold answered by the router trained and chosen without it.
    assert held.nested is not None and held.nested.chosen == ["learned=0.3"] * 3
    assert held.nested.quality_share == 1.0 and data["nested_cv"]["chosen"] == held.nested.chosen
    with pytest.raises(InvalidRequest, match="held-out"):
        hs.learned_probabilities(pieces[:5], pieces[3:8], dict(zip(
            [p.question for p in pieces], embed([p.question for p in pieces]), strict=True)))  # fmt: skip


def test_examples_from_pieces_label_llm_better() -> None:
    examples = hs.examples_from_pieces(make_pieces())
    assert {e.label for e in examples if e.dataset == "math"} == {1}
    assert {e.label for e in examples if e.dataset != "math"} == {0}


def test_general2_loads_and_scores() -> None:
    items = load_dataset("general2")
    assert len(items) == 150 and len({i.id for i in items}) == 150
    general = {i.question for i in load_dataset("general")}
    assert not general & {i.question for i in items}
    cats = {i.category for i in items}
    assert cats == {i.category for i in load_dataset("general")}
    assert {i.difficulty for i in items} == {"easy", "medium", "hard"}
    assert all(i.answers for i in items)
    row = next(r for r in list_datasets() if r["name"] == "general2")
    assert row["size"] == 150 and "CC0" in row["licence"]
    first = items[0]
    assert contains_answer(f"The answer is {first.answers[0]}.", first.answers) == 1.0
    assert contains_answer("I do not know.", first.answers) == 0.0


def test_graft_timings_takes_the_quiet_run_where_the_answers_match() -> None:
    ref = make_pieces()[:3]
    quiet = {p.id: p for p in ref}
    loaded = []
    for i, p in enumerate(ref):
        draft = ev.Piece(p.draft.text, 9.0, 5.0, 10, p.draft.completion_tokens)
        if i == 1:  # recorded with a smaller max_tokens: the start of the quiet draft
            draft = ev.Piece(p.draft.text[:2], 3.0, 1.0, 10, 1)
        if i == 2:  # another draft this time
            draft = ev.Piece("something else", 9.0, 5.0, 10, 3)
        loaded.append(
            ev.Pieces(
                **{
                    **p.__dict__,
                    "draft": draft,
                    "direct": ev.Piece("", 0, None, 0, 0),
                    "draft_logprobs": [-0.7],
                    "draft_token_s": [5.0],
                }
            )
        )
    out, matched = ev.graft_timings(loaded, ref)
    assert matched == 2
    same, head, other = out
    assert same.draft.total_s == quiet[same.id].draft.total_s and same.draft_token_s is None
    assert same.draft_logprobs == [-0.7] and same.direct == quiet[same.id].direct
    assert head.draft == quiet[head.id].draft and head.draft_logprobs == [-0.7]
    assert other is quiet[other.id]


def test_extra_training_questions_train_but_are_never_scored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pieces = make_pieces()
    extra = [ev.Pieces(**{**p.__dict__, "id": f"x-{p.id}", "question": f"extra {p.question}"})
             for p in pieces]  # fmt: skip
    trained_on: list[set[str]] = []
    real_train = hs.train

    def spy(examples, vectors, **kw):  # type: ignore[no-untyped-def]
        trained_on.append({e.question for e in examples})
        return real_train(examples, vectors, **kw)

    monkeypatch.setattr(hs, "train", spy)
    held = hs.evaluate_held_out(
        pieces, [ev.Config("llm-only", "llm-only")], Prices.load(Path("/nonexistent")),
        folds=3, embed=embed, learned_thresholds=["0.3"], extra_train=extra,
    )  # fmt: skip
    test_q = {p.question for p in pieces if p.id in set(held.test_ids)}
    assert {p.question for p in extra} <= trained_on[0] and not trained_on[0] & test_q
    assert held.test.configs[0].n == len(held.test_ids)  # the extra ones are not scored
    assert held.auc_test is not None and held.auc_test > 0.9


def test_nested_cv_scores_the_choice_on_folds_that_did_not_make_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pieces = make_pieces()
    chose_on: list[set[str]] = []
    real = hs._out_of_fold

    def spy(part, *args, **kw):  # type: ignore[no-untyped-def]
        chose_on.append({p.id for p in part})
        return real(part, *args, **kw)

    monkeypatch.setattr(hs, "_out_of_fold", spy)
    prices = Prices.load(Path("/nonexistent"))
    hybrid = [ev.Config(spec, "hybrid", parse_policy(spec))
              for spec in ("confidence=-0.3>direct", "confidence=-0.05>direct", "never")]  # fmt: skip
    baselines = [ev.Config("llm-only", "llm-only"), ev.Config("slm-only", "slm-only")]
    nested = hs.nested_cv(pieces, [*baselines, *hybrid], prices, folds=5, seed=2)
    # Only 'confidence=-0.3>direct' keeps the LLM's quality with at most half escalated (it
    # sends exactly the math questions), so every fold is answered by it.
    assert nested.chosen == ["confidence=-0.3>direct"] * 5
    folds = hs.fold_ids(pieces, 5, seed=2)
    assert [ids | set(fold) for ids, fold in zip(chose_on, folds, strict=True)] == [
        {p.id for p in pieces}
    ] * 5 and all(not ids & set(fold) for ids, fold in zip(chose_on, folds, strict=True))
    math = sum(p.category == "math" for p in pieces)
    assert nested.quality_share == 1.0
    assert nested.escalated == pytest.approx(math / len(pieces))
    # Math pays its draft (1.0 s) and the LLM (0.8 s); the rest the draft: slower than the LLM.
    latency = (math * 1.8 + (len(pieces) - math) * 1.0) / len(pieces)
    assert nested.latency_share == pytest.approx(latency / 0.8)
    assert not nested.meets_routing
    # Where nothing keeps the target on the other folds, the LLM answers that fold alone.
    alone = hs.nested_cv(pieces, [*baselines, hybrid[2]], prices, folds=5, seed=2)
    assert alone.chosen == [None] * 5
    assert (alone.quality_share, alone.escalated, alone.latency_share) == (1.0, 1.0, 1.0)


def test_hybrid_eval_holdout_prints_and_stores_the_nested_figure(isolated_home: Path) -> None:
    from typer.testing import CliRunner

    from edgelm.cli.main import app as cli

    pieces = make_pieces()
    recorded = isolated_home / "pieces" / "results.json"
    ev.write_json(ev.evaluate(pieces, [], Prices.load(Path("/nonexistent"))), recorded)
    out = isolated_home / "heval"
    args = ["hybrid", "eval", "--pieces", str(recorded), "--holdout", "0.5", "--folds", "3",
            "--policies", "confidence", "--thresholds", "confidence=-0.3", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "the choice itself, 3-fold" in result.output
    stored = json.loads((out / "results.json").read_text())["held_out"]["nested_cv"]
    assert stored["chosen"] == ["confidence=-0.3>direct"] * 3 and stored["quality_share"] == 1.0
