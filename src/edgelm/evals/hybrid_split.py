"""Held-out and cross-validated figures for ``edgelm hybrid eval``.

Scoring every policy on the questions it was chosen on flatters the winner, and a learned
router scored on its own training questions flatters it far more. This module splits recorded
pieces (:class:`edgelm.evals.hybrid.Pieces`) deterministically and by category, trains the
learned router on the train part only (labels from the same pieces: 1 when the LLM's direct
answer scored higher than the SLM's draft), and reports every configuration on the test part.
It also runs k-fold cross-validation over the whole set (each fold scored by a router trained
on the other folds), for figures that do not hang on one lucky split.

The split is a pure function of the question ids, their categories, the held-out share and a
seed (a SHA-256 of ``seed:id`` orders each category), so it is the same on every machine and
Python version, and a question keeps its side when others are added to the set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgelm.cost import Prices
from edgelm.errors import InvalidRequest
from edgelm.evals.hybrid import (
    LEARNED_THRESHOLDS,
    Config,
    ConfigResult,
    EvalReport,
    Pieces,
    evaluate,
    keeps_routing_target,
    metric_fn,
    outcome,
)
from edgelm.hybrid.learned import DEFAULT_L2, Example, train
from edgelm.hybrid.policies import parse_policy

EmbedFn = Callable[[list[str]], list[list[float]]]


def _rank(seed: int, item_id: str) -> str:
    return hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()


def _by_category(pieces: Sequence[Pieces], seed: int) -> dict[str, list[str]]:
    """Question ids per category, each category in its seeded order."""
    groups: dict[str, list[str]] = {}
    for p in pieces:
        groups.setdefault(p.category or "", []).append(p.id)
    if sum(len(ids) for ids in groups.values()) != len({p.id for p in pieces}):
        raise InvalidRequest("question ids repeat; a split needs one id per question")
    return {c: sorted(ids, key=lambda i: _rank(seed, i)) for c, ids in sorted(groups.items())}


def split_ids(
    pieces: Sequence[Pieces], holdout: float = 0.5, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train ids, test ids): ``holdout`` of each category held out (rounded, at least one
    question on each side of a category with two or more)."""
    if not 0.0 < holdout < 1.0:
        raise InvalidRequest(f"the held-out share must be between 0 and 1, got {holdout}")
    train_ids: list[str] = []
    test_ids: list[str] = []
    for ids in _by_category(pieces, seed).values():
        n_test = round(len(ids) * holdout)
        if len(ids) >= 2:
            n_test = min(len(ids) - 1, max(1, n_test))
        test_ids += ids[:n_test]
        train_ids += ids[n_test:]
    return train_ids, test_ids


def fold_ids(pieces: Sequence[Pieces], folds: int = 5, seed: int = 0) -> list[list[str]]:
    """``folds`` disjoint id lists covering every question, each category dealt round-robin
    (so every fold has about the same mix of categories)."""
    if folds < 2:
        raise InvalidRequest("cross-validation needs at least 2 folds")
    out: list[list[str]] = [[] for _ in range(folds)]
    dealt = 0
    for ids in _by_category(pieces, seed).values():
        for i in ids:
            out[dealt % folds].append(i)
            dealt += 1
    return out


def examples_from_pieces(pieces: Sequence[Pieces], metric: str = "contains") -> list[Example]:
    """Training examples from recorded pieces: the draft is the SLM's answer, the direct
    answer the LLM's; label 1 when the LLM scored higher (only then does escalating buy
    quality)."""
    score = metric_fn(metric)
    out = []
    for p in pieces:
        slm, llm = score(p.draft.text, p.answers), score(p.direct.text, p.answers)
        out.append(
            Example(p.question, int(llm > slm), p.category, p.id, slm_quality=slm, llm_quality=llm)
        )
    return out


def learned_probabilities(
    train_pieces: Sequence[Pieces],
    score_pieces: Sequence[Pieces],
    vectors: dict[str, list[float]],
    metric: str = "contains",
    l2: float = DEFAULT_L2,
) -> dict[str, float]:
    """P(LLM better) for each of ``score_pieces`` (by id) from a router fitted on
    ``train_pieces`` only. Raises when the two share a question text: a router must never
    be scored on a question it was trained on."""
    seen = {p.question for p in train_pieces}
    leaked = [p.id for p in score_pieces if p.question in seen]
    if leaked:
        raise InvalidRequest(f"held-out questions also in the training part: {leaked[:5]}")
    examples = examples_from_pieces(train_pieces, metric)
    model = train(examples, [vectors[e.question] for e in examples], l2=l2)
    probs = model.predict(
        [p.question for p in score_pieces], [vectors[p.question] for p in score_pieces]
    )
    return {p.id: float(x) for p, x in zip(score_pieces, probs, strict=True)}


def learned_configs(
    probabilities: dict[str, float],
    thresholds: Sequence[str] = LEARNED_THRESHOLDS,
    extra: Sequence[str] = (),
) -> list[Config]:
    """``learned=<t>`` alone, with ``insufficient>direct``, and combined with each spec of
    ``extra`` (e.g. an early-cut policy), all bound to the given probabilities."""
    out = []
    for t in thresholds:
        specs = [f"learned={t}", f"learned={t},insufficient>direct"]
        specs += [f"learned={t},{spec}" for spec in extra]
        out += [Config(s, "hybrid", parse_policy(s), learned=probabilities) for s in specs]
    return out


def auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (the chance that a random positive outscores a random
    negative, ties counting half); ``None`` without both classes. 0.5 is a coin."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@dataclass
class FoldSummary:
    """One configuration across the folds of a cross-validation."""

    name: str
    quality: float
    quality_share: float | None
    escalated: float
    latency_share: float | None
    meets_routing: bool
    folds_meeting: int
    """Folds on which the configuration alone keeps the routing target."""
    quality_share_min: float | None
    quality_share_max: float | None


@dataclass
class NestedCV:
    """The choice of a configuration, cross-validated: on each fold, the configuration chosen
    on the other folds (:meth:`EvalReport.best_routed`) answers that fold's questions, and the
    answers are pooled over the whole set. A fixed configuration's k-fold figures still flatter
    whichever row looks best, because it is picked after seeing every fold; here nothing is
    scored on questions that took part in choosing it, so this is the figure a user can expect
    from choosing a policy with ``hybrid eval`` on questions like these."""

    quality_share: float | None
    escalated: float
    latency_share: float | None
    meets_routing: bool
    chosen: list[str | None]
    """Per fold, the configuration chosen without it; ``None`` where nothing kept the target
    on the other folds, and that fold's questions then go to the LLM alone."""


@dataclass
class HeldOut:
    """A held-out evaluation: the test-part report, the train-part report (on which a policy
    would be chosen), the cross-validated summary and which questions were held out."""

    test: EvalReport
    train: EvalReport
    train_ids: list[str]
    test_ids: list[str]
    seed: int
    holdout: float
    cv: list[FoldSummary] = field(default_factory=list)
    folds: int = 0
    nested: NestedCV | None = None
    auc_test: float | None = None
    """The learned router's AUC on the held-out part (trained on the train part)."""
    auc_cv: float | None = None
    """Its AUC over the whole set, each question scored by a router trained without its fold."""

    def chosen(self) -> tuple[ConfigResult | None, ConfigResult | None]:
        """The configuration chosen on the train part (fastest keeping 95% with <= 50%
        escalated) and its figures on the test part."""
        picked = self.train.best_routed()
        if picked is None:
            return None, None
        return picked, next((c for c in self.test.configs if c.name == picked.name), None)

    def to_dict(self) -> dict[str, Any]:
        picked, tested = self.chosen()
        return {
            "seed": self.seed,
            "holdout": self.holdout,
            "train_ids": self.train_ids,
            "test_ids": self.test_ids,
            "chosen_on_train": picked.name if picked else None,
            "chosen_on_test": asdict(tested) if tested else None,
            "test_best_routed": (b.name if (b := self.test.best_routed()) else None),
            "folds": self.folds,
            "nested_cv": asdict(self.nested) if self.nested else None,
            "learned_auc": {"test": self.auc_test, "cv": self.auc_cv},
            "cv": [asdict(s) for s in self.cv],
        }


def evaluate_held_out(
    pieces: Sequence[Pieces],
    configs: Sequence[Config],
    prices: Prices,
    metric: str = "contains",
    *,
    holdout: float = 0.5,
    seed: int = 0,
    folds: int = 5,
    embed: EmbedFn | None = None,
    learned_thresholds: Sequence[str] = LEARNED_THRESHOLDS,
    learned_extra: Sequence[str] = (),
    l2: float = DEFAULT_L2,
    extra_train: Sequence[Pieces] = (),
) -> HeldOut:
    """Every configuration on the held-out part, and k-fold figures over the whole set.

    With ``embed`` the learned router is added: trained on the train part for the held-out
    report, on the other folds for each fold. Heuristic policies need no training; their
    cross-validated figures show how much they move from fold to fold. ``extra_train`` are
    questions of other sets that only ever train the router (never scored), e.g. the
    ``general2`` set beside a held-out part of ``general``."""
    by_id = {p.id: p for p in pieces}
    train_ids, test_ids = split_ids(pieces, holdout, seed)
    train_p = [by_id[i] for i in train_ids]
    test_p = [by_id[i] for i in test_ids]
    vectors: dict[str, list[float]] = {}
    scored = {p.question for p in pieces}
    extra = [p for p in extra_train if p.question not in scored]
    if embed is not None:
        texts = list(dict.fromkeys([p.question for p in pieces] + [p.question for p in extra]))
        vectors = dict(zip(texts, embed(texts), strict=True))

    # The same fold is scored by the fixed figures (_cv, per fold and pooled) and by the
    # nested choice: one router per (train, scored) pair, trained once.
    trained: dict[tuple[frozenset[str], frozenset[str]], list[Config]] = {}

    def with_learned(train_part: Sequence[Pieces], score_part: Sequence[Pieces]) -> list[Config]:
        if embed is None:
            return list(configs)
        key = (frozenset(p.id for p in train_part), frozenset(p.id for p in score_part))
        if key not in trained:
            probs = learned_probabilities([*train_part, *extra], score_part, vectors, metric, l2)
            trained[key] = [*configs, *learned_configs(probs, learned_thresholds, learned_extra)]
        return trained[key]

    test_report = evaluate(test_p, with_learned(train_p, test_p), prices, metric)
    # On the train part the router is scored out-of-fold within it (never on its own
    # training questions), so choosing a threshold there is fair too.
    train_report = _out_of_fold(train_p, configs, prices, metric, folds, seed, with_learned)
    result = HeldOut(test_report, train_report, train_ids, test_ids, seed, holdout)
    result.folds = folds
    result.cv = _cv(pieces, configs, prices, metric, folds, seed, with_learned)
    result.nested = nested_cv(pieces, configs, prices, metric, folds, seed, with_learned)
    if embed is not None:
        labels = {e.item_id: e.label for e in examples_from_pieces(pieces, metric)}
        probs = learned_probabilities([*train_p, *extra], test_p, vectors, metric, l2)
        result.auc_test = auc([labels[i] for i in test_ids], [probs[i] for i in test_ids])
        oof: dict[str, float] = {}
        for ids in fold_ids(pieces, folds, seed):
            part = [by_id[i] for i in ids]
            rest = [p for p in pieces if p.id not in set(ids)]
            oof.update(learned_probabilities([*rest, *extra], part, vectors, metric, l2))
        result.auc_cv = auc([labels[i] for i in oof], list(oof.values()))
    return result


def _out_of_fold(
    pieces: Sequence[Pieces],
    configs: Sequence[Config],
    prices: Prices,
    metric: str,
    folds: int,
    seed: int,
    with_learned: Callable[[Sequence[Pieces], Sequence[Pieces]], list[Config]],
) -> EvalReport:
    """One report over ``pieces`` in which each fold's learned probabilities come from a
    router trained on the other folds (heuristic configurations are unaffected)."""
    by_id = {p.id: p for p in pieces}
    parts = [[by_id[i] for i in ids] for ids in fold_ids(pieces, min(folds, len(pieces)), seed)]
    merged: dict[str, Config] = {}
    for k, part in enumerate(parts):
        if not part:
            continue
        rest = [p for j, other in enumerate(parts) if j != k for p in other]
        for config in with_learned(rest, part):
            if config.learned is None:
                merged.setdefault(config.name, config)
                continue
            held = merged.setdefault(
                config.name, Config(config.name, config.kind, config.policy, learned={})
            )
            assert held.learned is not None
            held.learned.update(config.learned)
    return evaluate(pieces, list(merged.values()), prices, metric)


def _cv(
    pieces: Sequence[Pieces],
    configs: Sequence[Config],
    prices: Prices,
    metric: str,
    folds: int,
    seed: int,
    with_learned: Callable[[Sequence[Pieces], Sequence[Pieces]], list[Config]],
) -> list[FoldSummary]:
    by_id = {p.id: p for p in pieces}
    parts = [[by_id[i] for i in ids] for ids in fold_ids(pieces, folds, seed)]
    per_fold: list[EvalReport] = []
    for k, part in enumerate(parts):
        rest = [p for j, other in enumerate(parts) if j != k for p in other]
        per_fold.append(evaluate(part, with_learned(rest, part), prices, metric))
    pooled = _out_of_fold(pieces, configs, prices, metric, folds, seed, with_learned)
    out = []
    for c in pooled.configs:
        shares = [
            r.quality_share
            for report in per_fold
            for r in report.configs
            if r.name == c.name and r.quality_share is not None
        ]
        meeting = sum(
            1 for report in per_fold for r in report.configs if r.name == c.name and r.meets_routing
        )
        out.append(
            FoldSummary(
                c.name,
                c.quality,
                c.quality_share,
                c.escalated,
                c.latency_share,
                c.meets_routing,
                meeting,
                min(shares) if shares else None,
                max(shares) if shares else None,
            )
        )
    return out


def nested_cv(
    pieces: Sequence[Pieces],
    configs: Sequence[Config],
    prices: Prices,
    metric: str = "contains",
    folds: int = 5,
    seed: int = 0,
    with_learned: Callable[[Sequence[Pieces], Sequence[Pieces]], list[Config]] | None = None,
) -> NestedCV:
    """Choose on k-1 folds, answer the k-th, pool (see :class:`NestedCV`). The choice on the
    other folds is made as ``hybrid eval --holdout`` makes it on its train part, learned
    routers scored out of fold within them."""
    expand = with_learned or (lambda _train, _score: list(configs))
    by_id = {p.id: p for p in pieces}
    score = metric_fn(metric)
    llm = Config("llm-only", "llm-only")
    chosen: list[str | None] = []
    answers: list[tuple[float, float, bool]] = []  # (quality, latency, escalated) per question
    for ids in fold_ids(pieces, folds, seed):
        part = [by_id[i] for i in ids]
        held = set(ids)
        rest = [p for p in pieces if p.id not in held]
        inner = min(folds, len(rest))
        picked = (
            _out_of_fold(rest, configs, prices, metric, inner, seed, expand).best_routed()
            if inner >= 2
            else None
        )
        config = next(c for c in expand(rest, part) if c.name == picked.name) if picked else llm
        chosen.append(picked.name if picked else None)
        for p in part:
            out = outcome(config, p)
            answers.append((score(out.text, p.answers), out.latency_s, out.route != "draft"))
    n = max(1, len(answers))
    alone = [outcome(llm, p) for p in pieces]
    llm_quality = sum(score(o.text, p.answers) for o, p in zip(alone, pieces, strict=True)) / n
    llm_latency = sum(o.latency_s for o in alone) / n
    quality = sum(a[0] for a in answers) / n
    quality_share = quality / llm_quality if llm_quality > 0 else None
    latency_share = sum(a[1] for a in answers) / n / llm_latency if llm_latency > 0 else None
    escalated = sum(a[2] for a in answers) / n
    return NestedCV(
        quality_share=quality_share,
        escalated=escalated,
        latency_share=latency_share,
        meets_routing=keeps_routing_target(quality_share, escalated, latency_share),
        chosen=chosen,
    )
