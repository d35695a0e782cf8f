"""The learned router: predict, before any draft, whether the LLM would answer a question
better than the SLM, in the spirit of RouteLLM (a classifier on the question alone).

Training data are stored eval runs (``$EDGELM_HOME/evals.db``) in which both tiers answered
the same questions at temperature 0. A question is labelled 1 when the LLM's answer scored
higher than the SLM's: only then does sending it to the LLM buy quality. Questions both tiers
get right (or both get wrong) are 0: the cheaper model is as good there.

The classifier is a logistic regression (numpy, Newton steps with an L2 penalty) on the
question's sentence embedding (all-MiniLM-L6-v2 by default, served at ``/v1/embeddings``)
plus a few cheap lexical features (length, digits, code punctuation, the opening word). It
is small enough to ship in the package (``hybrid/data/learned.json``) and to read per
request; ``edgelm hybrid train`` writes a new one under ``$EDGELM_HOME/router/``, which then
wins over the shipped one.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import ConfigError, InvalidRequest
from edgelm.reporting import write_atomically

FORMAT_VERSION = 1
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
DEFAULT_L2 = 3.0
HOME_FILE = Path("router") / "learned.json"

EmbedFn = Callable[[list[str]], list[list[float]]]
"""Texts → one vector each (the embedder the router was trained with)."""

_OPENERS = ("what", "who", "when", "where", "which", "how", "why", "write", "explain", "list")
_CODE = re.compile(r"[(){}\[\]=_`<>]|\bdef\b|\bfunction\b|\bpython\b|\bcode\b", re.IGNORECASE)
LEXICAL_FEATURES = (
    "log_chars",
    "log_words",
    "digit_share",
    "code_marks",
    "sentences",
    *(f"opens_{w}" for w in _OPENERS),
)


def lexical_features(question: str) -> list[float]:
    """Cheap features of the question text, in the order of :data:`LEXICAL_FEATURES`."""
    text = question.strip()
    words = text.split()
    first = words[0].lower().strip("\"'(") if words else ""
    return [
        math.log1p(len(text)),
        math.log1p(len(words)),
        sum(c.isdigit() for c in text) / max(1, len(text)),
        math.log1p(len(_CODE.findall(text))),
        float(len(re.findall(r"[.!?](?:\s|$)", text))),
        *(float(first == w) for w in _OPENERS),
    ]


@dataclass
class Example:
    """One question both tiers answered, and whether the LLM did better."""

    question: str
    label: int
    dataset: str = ""
    item_id: str = ""
    slm_quality: float = 0.0
    llm_quality: float = 0.0


@dataclass
class LearnedRouter:
    """A fitted model: standardisation, weights and what it was trained on."""

    embedder: str
    weights: list[float]
    bias: float
    mean: list[float]
    scale: list[float]
    dims: int
    l2: float = DEFAULT_L2
    meta: dict[str, Any] = field(default_factory=dict)

    def features(self, questions: Sequence[str], vectors: Sequence[Sequence[float]]) -> np.ndarray:
        return _matrix(questions, vectors, self.dims)

    def predict(self, questions: Sequence[str], vectors: Sequence[Sequence[float]]) -> np.ndarray:
        """P(the LLM answers better) for each question."""
        x = (self.features(questions, vectors) - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(x @ np.asarray(self.weights) + self.bias)

    def score(self, question: str, embed: EmbedFn) -> float:
        """One question's probability, embedding it with ``embed``."""
        return float(self.predict([question], embed([question]))[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "embedder": self.embedder,
            "dims": self.dims,
            "lexical_features": list(LEXICAL_FEATURES),
            "l2": self.l2,
            "bias": _short(self.bias),
            "weights": [_short(w) for w in self.weights],
            "mean": [_short(m) for m in self.mean],
            "scale": [_short(s) for s in self.scale],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "router file") -> LearnedRouter:
        if data.get("format") != FORMAT_VERSION:
            raise ConfigError(f"{origin}: format {data.get('format')!r} is not {FORMAT_VERSION}")
        if list(data.get("lexical_features", [])) != list(LEXICAL_FEATURES):
            raise ConfigError(f"{origin}: written for other lexical features; retrain it")
        width = int(data["dims"]) + len(LEXICAL_FEATURES)
        for key in ("weights", "mean", "scale"):
            if len(data[key]) != width:
                raise ConfigError(f"{origin}: '{key}' has {len(data[key])} values, not {width}")
        if min(float(s) for s in data["scale"]) <= 0:
            raise ConfigError(f"{origin}: a feature scale is not positive")
        return cls(
            embedder=str(data["embedder"]),
            weights=[float(w) for w in data["weights"]],
            bias=float(data["bias"]),
            mean=[float(m) for m in data["mean"]],
            scale=[float(s) for s in data["scale"]],
            dims=int(data["dims"]),
            l2=float(data.get("l2", DEFAULT_L2)),
            meta=dict(data.get("meta") or {}),
        )

    def save(self, path: Path) -> Path:
        """Write atomically (a reader never sees half a file)."""
        return write_atomically(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> LearnedRouter:
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the learned router {path}: {exc}") from None
        return cls.from_dict(data, str(path))


def _short(value: float) -> float:
    """Eight significant digits: a small file that predicts what the fitted model did
    (rounding to decimal places turned a near-constant feature's scale into 0)."""
    return float(f"{value:.8g}")


def shipped_path() -> Path:
    """The router trained on the shipped eval sets (package data)."""
    return Path(str(resources.files("edgelm.hybrid").joinpath("data/learned.json")))


def home_path(home: Path) -> Path:
    return home / HOME_FILE


def load_router(home: Path) -> LearnedRouter:
    """The user's trained router when there is one, else the shipped one."""
    own = home_path(home)
    return LearnedRouter.load(own if own.is_file() else shipped_path())


# -- fitting ---------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def _matrix(questions: Sequence[str], vectors: Sequence[Sequence[float]], dims: int) -> np.ndarray:
    if len(questions) != len(vectors):
        raise InvalidRequest("one vector per question is needed")
    rows = []
    for question, vector in zip(questions, vectors, strict=True):
        if len(vector) != dims:
            raise InvalidRequest(
                f"the embedder gave {len(vector)} dimensions; the router expects {dims}"
            )
        rows.append([*vector, *lexical_features(question)])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), dims + len(LEXICAL_FEATURES))


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = DEFAULT_L2, iterations: int = 50
) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method (IRLS); the bias is not penalised.

    A few hundred features and examples: each step solves one (d+1)x(d+1) system, and the
    penalty keeps it well-posed even with more features than examples.
    """
    n, d = x.shape
    design = np.hstack([x, np.ones((n, 1))])
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    theta = np.zeros(d + 1)
    for _ in range(iterations):
        p = _sigmoid(design @ theta)
        gradient = design.T @ (p - y) + penalty * theta
        w = p * (1 - p)
        hessian = (design * w[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def train(
    examples: Sequence[Example],
    vectors: Sequence[Sequence[float]],
    embedder: str = DEFAULT_EMBEDDER,
    l2: float = DEFAULT_L2,
    meta: dict[str, Any] | None = None,
) -> LearnedRouter:
    """Fit a router on labelled examples and their question vectors."""
    if not examples:
        raise InvalidRequest("no training examples: run evals of both tiers first")
    dims = len(vectors[0])
    x = _matrix([e.question for e in examples], vectors, dims)
    y = np.asarray([e.label for e in examples], dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0  # a (nearly) constant feature carries nothing to learn from
    weights, bias = fit_logistic((x - mean) / scale, y, l2)
    info = {"examples": len(examples), "positives": int(y.sum()), **(meta or {})}
    return LearnedRouter(
        embedder=embedder,
        weights=weights.tolist(),
        bias=bias,
        mean=mean.tolist(),
        scale=scale.tolist(),
        dims=dims,
        l2=l2,
        meta=info,
    )


def cross_validated(
    examples: Sequence[Example],
    vectors: Sequence[Sequence[float]],
    folds: int = 5,
    l2: float = DEFAULT_L2,
    seed: int = 0,
) -> dict[str, float]:
    """Out-of-fold P(LLM better) per question text: each question is scored by a model that
    never saw it (every example with the same question text is held out together)."""
    questions = sorted({e.question for e in examples})
    order = np.random.default_rng(seed).permutation(len(questions))
    fold_of = {questions[i]: n % folds for n, i in enumerate(order)}
    first = {e.question: i for i, e in reversed(list(enumerate(examples)))}
    out: dict[str, float] = {}
    for fold in range(folds):
        train_idx = [i for i, e in enumerate(examples) if fold_of[e.question] != fold]
        test_q = [q for q in questions if fold_of[q] == fold]
        if not train_idx or not test_q:
            continue
        model = train([examples[i] for i in train_idx], [vectors[i] for i in train_idx], l2=l2)
        probs = model.predict(test_q, [vectors[first[q]] for q in test_q])
        out.update(zip(test_q, (float(p) for p in probs), strict=True))
    return out


# -- training data from stored eval runs ------------------------------------------------------


def examples_from_runs(
    db_path: Path, slm: str, llm: str, run_ids: Sequence[str] = ()
) -> tuple[list[Example], list[str]]:
    """Questions that both ``slm`` and ``llm`` answered (without error) in the same stored run,
    labelled by whether the LLM's quality score was higher; returns (examples, run ids used).

    Without ``run_ids`` every run that has both models is used. A question asked in several
    runs appears once per run (its labels may differ with the answers).
    """
    if not db_path.is_file():
        raise InvalidRequest(f"no eval results at {db_path}: run 'edgelm eval run' first")
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        runs = [r["id"] for r in con.execute("SELECT id FROM runs ORDER BY created_at")]
        if run_ids:
            wanted = [next((r for r in runs if r.startswith(x)), None) for x in run_ids]
            missing = [x for x, r in zip(run_ids, wanted, strict=True) if r is None]
            if missing:
                raise InvalidRequest(f"no eval run {', '.join(missing)} in {db_path}")
            runs = [r for r in wanted if r is not None]
        examples: list[Example] = []
        used: list[str] = []
        for run in runs:
            dataset = con.execute("SELECT dataset FROM runs WHERE id = ?", (run,)).fetchone()[0]
            rows = con.execute(
                "SELECT i.item_id, i.question, r.model, r.metrics FROM results r "
                "JOIN items i ON i.run_id = r.run_id AND i.item_id = r.item_id "
                "WHERE r.run_id = ? AND r.ok = 1 AND r.model IN (?, ?)",
                (run, slm, llm),
            ).fetchall()
            scores: dict[str, dict[str, float]] = {}
            questions: dict[str, str] = {}
            for row in rows:
                quality = json.loads(row["metrics"]).get("quality")
                if quality is None:
                    continue
                scores.setdefault(row["item_id"], {})[row["model"]] = float(quality)
                questions[row["item_id"]] = row["question"]
            before = len(examples)
            for item_id, pair in scores.items():
                if slm in pair and llm in pair:
                    examples.append(
                        Example(
                            question=questions[item_id],
                            label=int(pair[llm] > pair[slm]),
                            dataset=dataset,
                            item_id=item_id,
                            slm_quality=pair[slm],
                            llm_quality=pair[llm],
                        )
                    )
            if len(examples) > before:
                used.append(run)
    finally:
        con.close()
    return examples, used


def routing_summary(
    examples: Sequence[Example], probabilities: Sequence[float], thresholds: Sequence[float]
) -> list[dict[str, float]]:
    """For each threshold: the share of questions sent to the LLM and the quality reached
    (the LLM's score where it was sent, the SLM's elsewhere), also as a share of LLM-only."""
    llm_only = sum(e.llm_quality for e in examples) / max(1, len(examples))
    rows = []
    for t in thresholds:
        sent = [p >= t for p in probabilities]
        quality = sum(
            e.llm_quality if s else e.slm_quality for e, s in zip(examples, sent, strict=True)
        ) / max(1, len(examples))
        rows.append(
            {
                "threshold": t,
                "to_llm": sum(sent) / max(1, len(sent)),
                "quality": quality,
                "of_llm": quality / llm_only if llm_only > 0 else 0.0,
            }
        )
    return rows
