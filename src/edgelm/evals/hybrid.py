"""``edgelm hybrid eval``: the quality / latency / cost trade-off of every policy and threshold.

Models run once per question, not once per policy. At temperature 0 with a fixed seed the
SLM's draft for a question is the same whatever policy later judges it, so each question is
asked three times in all:

1. ``hybrid:<slm>+<llm>@always`` — the draft (text, token logprobs, timings) and the LLM's
   refinement of it, both from the route record the service returns;
2. the LLM alone — the "direct" answer and the LLM-only baseline.

Every configuration's outcome is then computed offline from those recorded pieces with the
same :func:`edgelm.hybrid.policies.route_for` the service uses: a ``draft`` route costs the
draft's time, ``refine`` the draft plus the refinement, ``direct`` the LLM's direct answer (plus
the draft when the decision needed it). Times are the engines' own (queueing excluded), so the
baselines and the hybrid configurations are measured the same way in the same run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.answer_checks import LoopMonitor
from edgelm.client import EdgelmClient
from edgelm.cost import Prices, local_cost_per_request
from edgelm.hybrid.policies import (
    Decision,
    Draft,
    Policy,
    Verdict,
    bind_learned,
    decide,
    decide_before_draft,
    first_cut,
    parse_policy,
    watches_loops,
)
from edgelm.reporting import (
    escape,
    figure_data_uri,
    html_page,
    html_table,
    mpl_text,
    new_figure,
    write_atomically,
)
from edgelm.server.hybrid_model import name_for

if TYPE_CHECKING:
    from rich.table import Table

ProgressFn = Callable[[int, int, str], None]
Scorer = Callable[[str, Sequence[str]], float]

DEFAULT_SYSTEM = "Answer the question correctly and concisely."
QUALITY_TARGET = 0.95
LATENCY_TARGET = 0.60
ESCALATION_TARGET = 0.50
"""Issue 17's routing target: >= 95% of LLM-only quality with at most half of the questions
reaching the LLM, at a mean latency below the LLM's alone (``ConfigResult.meets_routing``)."""

# Thresholds swept when a policy is named without any.
DEFAULT_GRID: dict[str, tuple[str, ...]] = {
    "length": ("100", "200", "400", "600"),
    "confidence": ("-0.1", "-0.2", "-0.3", "-0.4", "-0.5", "-0.75", "-1.0"),
    "confidence-min": ("-1", "-2", "-3", "-4", "-6", "-8"),
    "insufficient": ("3",),
}
DEFAULT_POLICIES = ("length", "confidence", "confidence-min", "insufficient", "early")
EARLY_AT = (4, 8, 16)
EARLY_CONFIDENCE = ("-0.2", "-0.3", "-0.5", "-0.75")
EARLY_TOKENS = ("24", "32", "48", "64")


def early_specs() -> list[str]:
    """The ``early`` family swept by default: a running-confidence check after ``k`` tokens,
    a draft token budget, each alone, together, and beside ``confidence=<t>>direct`` on the
    finished draft (an unsure start is cut; an unsure end still escalates)."""
    out = [f"insufficient,tokens={n}" for n in EARLY_TOKENS]
    for k in EARLY_AT:
        for t in EARLY_CONFIDENCE:
            out.append(f"insufficient,confidence@{k}={t}")
            for n in EARLY_TOKENS:
                out.append(f"insufficient,tokens={n},confidence@{k}={t}")
    for n in EARLY_TOKENS:
        for final in ("-0.2", "-0.3"):
            out.append(f"insufficient,tokens={n},confidence={final}>direct")
            for k in EARLY_AT:
                out.append(f"insufficient,tokens={n},confidence@{k}=-0.5,confidence={final}>direct")
    return out


# -- recorded pieces ------------------------------------------------------------------------


@dataclass
class Piece:
    """One model answer, timed by the engine."""

    text: str
    total_s: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Pieces:
    """Everything recorded for one question; every configuration is computed from this."""

    id: str
    question: str
    answers: list[str]
    category: str
    draft: Piece
    mean_logprob: float | None
    min_logprob: float | None
    refine: Piece
    direct: Piece
    draft_logprobs: list[float] | None = None
    """Each draft token's logprob (recorded since the early checks; older files lack it)."""
    draft_token_s: list[float] | None = None
    """When the SLM produced each draft token, seconds since the draft started."""

    def draft_view(self) -> Draft:
        return Draft(
            self.draft.text,
            tuple(self.draft_logprobs or ()),
            mean_logprob_value=self.mean_logprob,
            min_logprob_value=self.min_logprob,
            tokens=self.draft.completion_tokens,
        )

    def draft_time_at(self, tokens: int) -> float:
        """Seconds the draft had run when its ``tokens``-th token came out: the recorded
        token time when there is one, else interpolated between the first token (TTFT) and
        the end at the draft's own decode rate (pieces recorded before per-token times)."""
        d = self.draft
        n = d.completion_tokens
        if tokens >= n:
            return d.total_s
        if self.draft_token_s and len(self.draft_token_s) >= tokens > 0:
            return min(d.total_s, self.draft_token_s[tokens - 1])
        first = d.ttft_s if d.ttft_s is not None else 0.0
        if n <= 1:
            return d.total_s
        return first + (d.total_s - first) * (max(tokens, 1) - 1) / (n - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pieces:
        return cls(
            **{
                **data,
                "draft": Piece(**data["draft"]),
                "refine": Piece(**data["refine"]),
                "direct": Piece(**data["direct"]),
            }
        )


def _piece_from_leg(text: str, leg: dict[str, Any] | None) -> Piece:
    leg = leg or {}
    ttft = leg.get("ttft_ms")
    return Piece(
        text=text,
        total_s=(leg.get("total_ms") or 0.0) / 1000,
        ttft_s=None if ttft is None else ttft / 1000,
        prompt_tokens=int(leg.get("prompt_tokens") or 0),
        completion_tokens=int(leg.get("completion_tokens") or 0),
    )


def collect(
    client: EdgelmClient,
    items: Sequence[Any],
    slm: str,
    llm: str,
    *,
    max_tokens: int = 256,
    system: str | None = DEFAULT_SYSTEM,
    seed: int = 0,
    warmup: bool = True,
    progress: ProgressFn | None = None,
    refine: bool = True,
    direct: bool = True,
    workers: int = 1,
) -> list[Pieces]:
    """Ask every question once as draft+refine and once to the LLM alone (see module doc).

    ``items`` are :class:`edgelm.evals.datasets.QAItem`-like (``id``, ``question``,
    ``answers``, ``category``). Runs sequentially by default: latency is what is being
    measured. ``refine=False`` records the draft alone (``hybrid@never``: no refinement; only
    routes ``draft`` and ``direct`` can then be scored), ``direct=False`` skips the LLM's own
    answer (to be filled in by :func:`graft_timings` from an earlier run), and ``workers``
    asks several questions at once: quality at temperature 0 stays valid, latency does not.
    """
    params = {"temperature": 0.0, "seed": seed, "max_tokens": max_tokens}
    hybrid = name_for(slm, llm, "always" if refine else "never")
    empty = Piece("", 0.0, None, 0, 0)

    def messages(question: str) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": question}]

    def ask(item: Any) -> Pieces:
        reply = client.chat_once(hybrid, messages(item.question), **params)
        ext = reply.extension or {}
        draft_leg = ext.get("draft") or {}
        draft_text = str(draft_leg.get("text", "")) if refine else reply.text
        lp = ext.get("draft_logprob") or {}
        token_ms = lp.get("token_ms") or []
        answer = empty
        if direct:
            reply_x = client.chat_once(llm, messages(item.question), **params)
            timings = reply_x.server_timings or {}
            answer = Piece(
                text=reply_x.text,
                total_s=(timings.get("total_ms") or reply_x.total_s * 1000) / 1000,
                ttft_s=(timings["ttft_ms"] / 1000) if timings.get("ttft_ms") else None,
                prompt_tokens=reply_x.prompt_tokens,
                completion_tokens=reply_x.completion_tokens,
            )
        return Pieces(
            id=str(item.id),
            question=item.question,
            answers=list(item.answers),
            category=getattr(item, "category", ""),
            draft=_piece_from_leg(draft_text, draft_leg),
            mean_logprob=lp.get("mean"),
            min_logprob=lp.get("min"),
            refine=_piece_from_leg(reply.text, ext.get("refine")) if refine else empty,
            direct=answer,
            draft_logprobs=[float(v) for v in lp.get("tokens") or []] or None,
            draft_token_s=[float(t) / 1000 for t in token_ms] or None,
        )

    if warmup and items:  # load both models and warm their caches outside the measurement
        client.chat_once(hybrid, messages(items[0].question), **{**params, "max_tokens": 8})
    if workers <= 1:
        out: list[Pieces] = []
        for n, item in enumerate(items, 1):
            out.append(ask(item))
            if progress:
                progress(n, len(items), "questions")
        return out
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(ask, item) for item in items]
        results = []
        for n, future in enumerate(futures, 1):
            results.append(future.result())
            if progress:
                progress(n, len(items), "questions")
    return results


def refines(policy: Policy) -> bool:
    """Whether ``policy`` can route a question to ``refine`` (pieces recorded without
    refinements cannot score such a policy)."""
    from edgelm.hybrid import policies as pol

    if isinstance(policy, pol.Escalate):
        return policy.action == "refine"
    if isinstance(policy, pol.AnyOf | pol.AllOf):
        return any(refines(c) for c in policy.children)
    if isinstance(policy, pol.Confidence):
        return policy.at is None
    return isinstance(policy, pol.Always | pol.Length)


def pieces_from_run(db_path: Path, run_id: str, slm: str, llm: str) -> list[Pieces]:
    """Pieces from a stored eval run in which both tiers answered: the SLM's answer is the
    draft, the LLM's the direct answer. Such a run records no refinement and no draft
    logprobs, so only routes ``draft`` and ``direct`` can be scored from it (the learned
    router, ``...>direct`` text policies); ``refine`` pieces are left empty."""
    from edgelm.evals import runs_db

    run, rows = runs_db.load_run(db_path, run_id)
    answers = {(r.item_id, r.model): r for r in rows if r.ok}

    def piece(row: Any) -> Piece:
        return Piece(
            row.answer, row.e2e_s or 0.0, row.ttft_s, row.prompt_tokens, row.completion_tokens
        )

    out = []
    for item in run.items:
        draft, direct = answers.get((item.id, slm)), answers.get((item.id, llm))
        if draft is None or direct is None:
            continue
        out.append(
            Pieces(
                id=item.id,
                question=item.question,
                answers=list(item.answers),
                category=item.category,
                draft=piece(draft),
                mean_logprob=None,
                min_logprob=None,
                refine=Piece("", 0.0, None, 0, 0),
                direct=piece(direct),
            )
        )
    return out


# -- offline computation -------------------------------------------------------------------


@dataclass
class Config:
    """One row of the trade-off table: a baseline or a policy spec."""

    name: str
    kind: str  # "slm-only" | "llm-only" | "hybrid"
    policy: Policy | None = None
    learned: dict[str, float] | None = None
    """Question id → the learned router's (out-of-fold) probability, for ``learned`` terms."""


@dataclass
class Outcome:
    route: str
    text: str
    latency_s: float
    ttft_s: float
    busy_s: float
    prompt_tokens: int
    completion_tokens: int
    reason: str = ""


def loop_cut_tokens(p: Pieces) -> int | None:
    """Where the live pipeline's loop monitor would have stopped this recorded draft, in
    tokens, or ``None`` when it does not loop. The monitor counts words; the word count is
    turned into tokens in proportion to the draft's characters (pieces keep no token texts),
    so the charged draft time is an estimate within a token or two."""
    monitor = LoopMonitor()
    text = p.draft.text
    monitor.push(text)
    if monitor.found is None or monitor.found.kind != "loop":
        return None
    words = text.split()
    upto = " ".join(words[: monitor.found.words])
    share = len(upto) / max(1, len(text))
    n = p.draft.completion_tokens
    return min(n, max(1, -(-int(share * n * 1000) // 1000)))


def draft_cut(policy: Policy, p: Pieces) -> tuple[int, Decision] | None:
    """The token count at which the live pipeline would stop this recorded draft, and the
    ``direct`` decision it takes there: an early term firing (:func:`first_cut`, replayed on
    the recorded token logprobs) or, with a ``degenerate`` term, a certain loop; whichever
    comes first. ``None``: the draft runs to its end."""
    cut = first_cut(policy, p.draft.completion_tokens, p.draft_logprobs or ())
    if watches_loops(policy):
        at = loop_cut_tokens(p)
        if at is not None and (cut is None or at < cut[0]):
            verdict = Verdict(
                "degenerate",
                True,
                "direct",
                "loop",
                "loop|markers|empty",
                "degenerate: loop (draft cut)",
            )
            cut = (at, Decision("direct", verdict))
    return cut


def outcome(config: Config, p: Pieces) -> Outcome:
    """What the service would have answered for this question under this configuration.

    The steps are the live pipeline's: question-only rules first (no draft), then the draft
    as it would stream (cut early by ``confidence@<k>``, ``tokens=<n>`` or a certain loop,
    charging only the draft time up to the cut, see :meth:`Pieces.draft_time_at`), then the
    policy's verdict on the whole draft."""
    d, r, x = p.draft, p.refine, p.direct
    if config.kind == "llm-only":
        return _out("direct", x, [x], x.total_s, x.ttft_s)
    if config.kind == "slm-only":
        return _out("draft", d, [d], d.total_s, d.total_s)
    assert config.policy is not None
    policy = config.policy
    if config.learned is not None:
        policy = bind_learned(policy, config.learned.get(p.id), "question not scored")
    early = decide_before_draft(policy, p.question)
    if early is not None and early.route == "direct":
        # A question rule sent it straight to the LLM: no draft was made.
        return _out("direct", x, [x], x.total_s, x.ttft_s, early.reason)
    cut = draft_cut(policy, p) if early is None else None
    if cut is not None:
        spent = p.draft_time_at(cut[0])
        used = Piece(d.text, spent, d.ttft_s, d.prompt_tokens, cut[0])
        return _out(
            "direct", x, [used, x], spent + x.total_s, spent + (x.ttft_s or 0.0), cut[1].reason
        )
    decision = early if early is not None else decide(policy, p.question, p.draft_view())
    if decision.route == "draft":
        # The draft is buffered while the policy decides: its first token shows at its end.
        return _out("draft", d, [d], d.total_s, d.total_s, decision.reason)
    if decision.route == "refine":
        return _out(
            "refine",
            r,
            [d, r],
            d.total_s + r.total_s,
            d.total_s + (r.ttft_s or 0.0),
            decision.reason,
        )
    # Escalated after drafting (the draft declined): the draft's time is spent too.
    return _out(
        "direct", x, [d, x], d.total_s + x.total_s, d.total_s + (x.ttft_s or 0.0), decision.reason
    )


def _out(
    route: str,
    shown: Piece,
    spent: list[Piece],
    latency: float,
    ttft: float | None,
    reason: str = "",
) -> Outcome:
    return Outcome(
        route=route,
        text=shown.text,
        latency_s=latency,
        ttft_s=latency if ttft is None else ttft,
        busy_s=sum(piece.total_s for piece in spent),
        prompt_tokens=sum(piece.prompt_tokens for piece in spent),
        completion_tokens=sum(piece.completion_tokens for piece in spent),
        reason=reason,
    )


@dataclass
class ConfigResult:
    name: str
    kind: str
    n: int
    quality: float
    f1: float
    contains: float
    mean_latency_s: float
    mean_ttft_s: float
    escalated: float
    refined: float
    direct: float
    local_cost_per_1k: float
    cloud_cost_per_1k: dict[str, float]
    quality_share: float | None = None
    latency_share: float | None = None
    meets_target: bool = False
    meets_routing: bool = False
    """>= 95% of LLM-only quality, <= 50% escalated, mean latency below LLM-only's."""
    routes: list[str] = field(default_factory=list)


@dataclass
class EvalReport:
    metric: str
    configs: list[ConfigResult]
    pieces: list[Pieces]
    meta: dict[str, Any] = field(default_factory=dict)

    def baseline(self, kind: str) -> ConfigResult | None:
        return next((c for c in self.configs if c.kind == kind), None)

    def best(self) -> ConfigResult | None:
        """The fastest hybrid configuration keeping the quality target, else the one with the
        best quality per latency share among those above the SLM's quality."""
        hybrids = [c for c in self.configs if c.kind == "hybrid" and c.quality_share is not None]
        keeping = [c for c in hybrids if (c.quality_share or 0) >= QUALITY_TARGET]
        if keeping:
            return min(keeping, key=lambda c: (c.mean_latency_s, -c.quality))
        return max(hybrids, key=lambda c: (c.quality, -c.mean_latency_s), default=None)

    def best_routed(self) -> ConfigResult | None:
        """The fastest hybrid configuration with >= 95% of LLM-only quality and at most half
        of the questions escalated (issue 17's choice of the default policy); ``None`` when
        none keeps both."""
        keeping = [
            c
            for c in self.configs
            if c.kind == "hybrid"
            and (c.quality_share or 0) >= QUALITY_TARGET
            and c.escalated <= ESCALATION_TARGET
        ]
        return min(keeping, key=lambda c: (c.mean_latency_s, -c.quality), default=None)

    def to_dict(self) -> dict[str, Any]:
        best = self.best()
        routed = self.best_routed()
        return {
            "metric": self.metric,
            "meta": self.meta,
            "targets": {"quality_share": QUALITY_TARGET, "latency_share": LATENCY_TARGET},
            "best": best.name if best else None,
            "best_meets_target": bool(best and best.meets_target),
            "best_routed": routed.name if routed else None,
            "best_routed_meets": bool(routed and routed.meets_routing),
            "configs": [asdict(c) for c in self.configs],
            "pieces": [asdict(p) for p in self.pieces],
        }


def metric_fn(metric: str) -> Scorer:
    """The QA metric by name, from :mod:`edgelm.evals.metrics`."""
    from edgelm.evals import metrics

    table: dict[str, Scorer] = {
        "contains": metrics.contains_answer,
        "f1": metrics.token_f1,
        "exact": metrics.exact_match,
    }
    if metric not in table:
        raise ValueError(f"unknown metric '{metric}'; use one of {', '.join(table)}")
    return table[metric]


def configurations(
    policies: Sequence[str] = DEFAULT_POLICIES,
    thresholds: dict[str, Sequence[str]] | None = None,
    specs: Sequence[str] = (),
    topic_patterns: Sequence[str] = (),
) -> list[Config]:
    """The baselines, each named policy at each threshold, ``insufficient`` combined with each
    confidence threshold (a draft that declines is escalated whatever its confidence), the same
    escalating ``>direct`` (the LLM answers afresh instead of refining), and any extra specs
    given verbatim."""
    grid = {**DEFAULT_GRID, **(thresholds or {})}
    out = [
        Config("slm-only", "slm-only"),
        Config("llm-only", "llm-only"),
        Config("always", "hybrid", parse_policy("always")),
    ]
    seen = {"always"}

    def add(spec: str) -> None:
        if spec not in seen:
            seen.add(spec)
            out.append(Config(spec, "hybrid", parse_policy(spec, topic_patterns)))

    for name in policies:
        name = name.strip()
        if not name:
            continue
        if name == "early":
            for spec in early_specs():
                add(spec)
            continue
        values = grid.get(name, ())
        if not values:
            add(name)
        for value in values:
            add(f"{name}={value}")
    for name in ("confidence", "confidence-min"):
        if name in policies:
            for value in grid.get(name, ()):
                head = "insufficient," if "insufficient" in policies else ""
                if head:
                    add(f"{head}{name}={value}")
                add(f"{head}{name}={value}>direct")
    for spec in specs:
        add(spec)
    return out


LEARNED_THRESHOLDS = ("0.2", "0.3", "0.4", "0.5", "0.6")


def learned_configurations(
    pieces: Sequence[Pieces],
    examples: Sequence[Any],
    embed: Callable[[list[str]], list[list[float]]],
    thresholds: Sequence[str] = LEARNED_THRESHOLDS,
    folds: int = 5,
    l2: float | None = None,
    with_insufficient: bool = True,
) -> list[Config]:
    """``learned=<t>`` configurations scored with cross-validation: each question's
    probability comes from a router trained without that question (by text, across every
    eval run in ``examples``); a question no example asks is scored by a router trained on
    all of them. Also each threshold with ``insufficient>direct`` (a draft that declines
    goes to the LLM too)."""
    from edgelm.hybrid.learned import DEFAULT_L2, cross_validated, train

    penalty = DEFAULT_L2 if l2 is None else l2
    texts = list(dict.fromkeys([e.question for e in examples] + [p.question for p in pieces]))
    vectors = dict(zip(texts, embed(texts), strict=True))
    example_vectors = [vectors[e.question] for e in examples]
    scores = cross_validated(examples, example_vectors, folds=folds, l2=penalty)
    unseen = [p.question for p in pieces if p.question not in scores]
    if unseen:
        model = train(examples, example_vectors, l2=penalty)
        probs = model.predict(unseen, [vectors[q] for q in unseen])
        scores.update(zip(unseen, (float(x) for x in probs), strict=True))
    by_id = {p.id: scores[p.question] for p in pieces}
    out = []
    for t in thresholds:
        specs = [f"learned={t}"] + (
            [f"learned={t},insufficient>direct"] if with_insufficient else []
        )
        for spec in specs:
            out.append(Config(spec, "hybrid", parse_policy(spec), learned=by_id))
    return out


def keeps_routing_target(
    quality_share: float | None, escalated: float, latency_share: float | None
) -> bool:
    """Issue 17's target for a router: >= 95% of LLM-only quality, at most half of the
    questions escalated, mean latency below LLM-only's."""
    return (
        quality_share is not None
        and latency_share is not None
        and quality_share >= QUALITY_TARGET
        and escalated <= ESCALATION_TARGET
        and latency_share < 1.0
    )


def evaluate(
    pieces: Sequence[Pieces],
    configs: Sequence[Config],
    prices: Prices,
    metric: str = "contains",
) -> EvalReport:
    """Score every configuration on the recorded pieces; no model is called here."""
    from edgelm.evals import metrics

    primary = metric_fn(metric)
    results: list[ConfigResult] = []
    for config in configs:
        outs = [outcome(config, p) for p in pieces]
        n = max(1, len(outs))
        busy = sum(o.busy_s for o in outs) / n
        prompt = sum(o.prompt_tokens for o in outs) / n
        completion = sum(o.completion_tokens for o in outs) / n
        local = local_cost_per_request(prices, busy)["total"]
        results.append(
            ConfigResult(
                name=config.name,
                kind=config.kind,
                n=len(outs),
                quality=sum(primary(o.text, p.answers) for o, p in zip(outs, pieces, strict=True))
                / n,
                f1=sum(
                    metrics.token_f1(o.text, p.answers) for o, p in zip(outs, pieces, strict=True)
                )
                / n,
                contains=sum(
                    metrics.contains_answer(o.text, p.answers)
                    for o, p in zip(outs, pieces, strict=True)
                )
                / n,
                mean_latency_s=sum(o.latency_s for o in outs) / n,
                mean_ttft_s=sum(o.ttft_s for o in outs) / n,
                escalated=sum(o.route != "draft" for o in outs) / n,
                refined=sum(o.route == "refine" for o in outs) / n,
                direct=sum(o.route == "direct" for o in outs) / n,
                local_cost_per_1k=local * 1000,
                cloud_cost_per_1k={
                    c.name: c.per_request(prompt, completion) * 1000 for c in prices.cloud
                },
                routes=[o.route for o in outs],
            )
        )
    llm = next((r for r in results if r.kind == "llm-only"), None)
    for r in results:
        if llm is not None and llm.quality > 0:
            r.quality_share = r.quality / llm.quality
        if llm is not None and llm.mean_latency_s > 0:
            r.latency_share = r.mean_latency_s / llm.mean_latency_s
        r.meets_target = (
            r.kind == "hybrid"
            and r.quality_share is not None
            and r.latency_share is not None
            and r.quality_share >= QUALITY_TARGET
            and r.latency_share <= LATENCY_TARGET
        )
        r.meets_routing = r.kind == "hybrid" and keeps_routing_target(
            r.quality_share, r.escalated, r.latency_share
        )
    return EvalReport(metric=metric, configs=results, pieces=list(pieces))


# -- reports ---------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def table_rows(report: EvalReport) -> list[list[str]]:
    cloud = next(iter(report.configs[0].cloud_cost_per_1k), None) if report.configs else None
    rows = []
    for c in report.configs:
        rows.append(
            [
                c.name,
                f"{c.quality:.3f}",
                _pct(c.quality_share),
                f"{c.f1:.3f}",
                f"{c.mean_latency_s:.2f}",
                _pct(c.latency_share),
                f"{c.mean_ttft_s:.2f}",
                _pct(c.escalated),
                f"{c.local_cost_per_1k:.4f}",
                f"{c.cloud_cost_per_1k.get(cloud, 0.0):.4f}" if cloud else "-",
                "yes" if c.meets_target else "",
            ]
        )
    return rows


def table_header(report: EvalReport) -> list[str]:
    cloud = next(iter(report.configs[0].cloud_cost_per_1k), None) if report.configs else None
    return [
        "config",
        report.metric,
        "of LLM",
        "f1",
        "latency s",
        "of LLM",
        "TTFT s",
        "escalated",
        "local $/1k",
        f"{cloud or 'cloud'} /1k",
        "target",
    ]


def rich_table(report: EvalReport) -> Table:
    from rich.table import Table

    n = report.configs[0].n if report.configs else len(report.pieces)
    table = Table(title=f"hybrid eval: {n} questions, quality = {report.metric}")
    for column in table_header(report):
        table.add_column(column, justify="left" if column == "config" else "right")
    best = report.best()
    for config, row in zip(report.configs, table_rows(report), strict=True):
        style = "bold green" if best is not None and config.name == best.name else None
        table.add_row(*row, style=style)
    return table


def write_json(report: EvalReport, path: Path, held_out: dict[str, Any] | None = None) -> Path:
    data = report.to_dict()
    if held_out is not None:
        data["held_out"] = held_out
    return write_atomically(path, json.dumps(data, indent=2))


def graft_timings(
    pieces: Sequence[Pieces], reference: Sequence[Pieces]
) -> tuple[list[Pieces], int]:
    """``pieces`` with the engine timings of ``reference`` (an earlier run of the same
    questions, e.g. on a quiet machine): quality recorded under load, latency measured
    without it. A draft with the same text takes the reference's timings (keeping its own
    token logprobs, dropping its per-token times, so cuts are charged by interpolation) and
    the reference's refinement; the LLM's direct answer is taken when it is the same text or
    was not recorded this time. A draft recorded with a smaller ``max_tokens`` that begins the
    reference's draft takes the reference's whole draft and keeps its own first token
    logprobs (enough for ``confidence@<k>`` up to that many tokens). A draft that differs is
    replaced by the reference's whole question. Returns the pieces and how many drafts
    matched."""
    ref = {p.id: p for p in reference}
    out: list[Pieces] = []
    grafted = 0
    for p in pieces:
        r = ref.get(p.id)
        if r is None:
            out.append(p)
            continue

        def fill(mine: Piece, theirs: Piece) -> Piece:
            # Missing (not recorded this time) or the same text: the reference's piece.
            return theirs if not mine.text or mine.text == theirs.text else mine

        same_draft = p.draft.text == r.draft.text
        # A draft recorded with a smaller max_tokens (only its first token logprobs were
        # wanted) is the start of the reference's: the reference's whole draft is used.
        head = (
            not same_draft
            and p.draft.completion_tokens < r.draft.completion_tokens
            and bool(p.draft.text.strip())
            and r.draft.text.startswith(p.draft.text.rstrip())
        )
        same_draft = same_draft or head
        grafted += same_draft
        if not same_draft and r.draft.text:
            # Another draft this time (batching, threads): its timings were taken under load
            # and its refinement is missing, so the reference's question is used whole (its
            # token logprobs are unknown: early confidence terms do not fire on it).
            out.append(r)
            continue
        out.append(
            replace(
                p,
                draft=(
                    r.draft
                    if head
                    else replace(p.draft, total_s=r.draft.total_s, ttft_s=r.draft.ttft_s)
                )
                if same_draft
                else p.draft,
                mean_logprob=r.mean_logprob if head else p.mean_logprob,
                min_logprob=r.min_logprob if head else p.min_logprob,
                # A refinement depends on the draft: reused only for the same draft.
                refine=fill(p.refine, r.refine) if same_draft else p.refine,
                direct=fill(p.direct, r.direct),
                draft_token_s=None if same_draft else p.draft_token_s,
            )
        )
    return out, grafted


def read_pieces(path: Path) -> list[Pieces]:
    """Pieces recorded by an earlier run (its results.json), to re-score without models."""
    data = json.loads(path.read_text("utf-8"))
    return [Pieces.from_dict(p) for p in data["pieces"]]


def frontier_png(report: EvalReport) -> str:
    """Quality against mean latency for every configuration, the Pareto frontier drawn through
    them and the target region shaded; a PNG data URI (Agg canvas, no pyplot, no display)."""
    figure = new_figure(8, 5)
    axes = figure.add_subplot()
    llm = report.baseline("llm-only")
    if llm is not None:
        axes.axvspan(0, llm.mean_latency_s * LATENCY_TARGET, alpha=0.08, color="green")
        axes.axhline(llm.quality * QUALITY_TARGET, color="green", lw=0.8, ls="--")
    points = sorted(report.configs, key=lambda c: (c.mean_latency_s, -c.quality))
    frontier, best_q = [], -1.0
    for c in points:
        if c.quality > best_q:
            frontier.append(c)
            best_q = c.quality
    axes.plot(
        [c.mean_latency_s for c in frontier], [c.quality for c in frontier], color="grey", lw=1
    )
    colours = {"slm-only": "tab:blue", "llm-only": "tab:red", "hybrid": "tab:orange"}
    for c in report.configs:
        axes.scatter(c.mean_latency_s, c.quality, color=colours[c.kind], s=30, zorder=3)
        if c.kind != "hybrid" or c in frontier:
            axes.annotate(
                mpl_text(c.name),
                (c.mean_latency_s, c.quality),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    axes.set_xlabel("mean latency (s, engine time)")
    axes.set_ylabel(f"quality ({report.metric})")
    axes.set_xlim(left=0)
    axes.set_title("hybrid router: quality vs latency (shaded: ≤60% of LLM latency)")
    return figure_data_uri(figure)


def share_png(report: EvalReport) -> str:
    """Quality against the share of questions that reach the LLM (RouteLLM's view of a
    router): learned configurations in green beside the heuristic ones; a PNG data URI."""
    figure = new_figure(8, 5)
    axes = figure.add_subplot()
    llm = report.baseline("llm-only")
    if llm is not None:
        axes.axhline(llm.quality * QUALITY_TARGET, color="green", lw=0.8, ls="--")
        axes.axvspan(0, 0.5, alpha=0.06, color="green")
    for c in report.configs:
        learned = c.name.startswith("learned")
        colour = {"slm-only": "tab:blue", "llm-only": "tab:red"}.get(
            c.kind, "tab:green" if learned else "tab:orange"
        )
        axes.scatter(c.escalated, c.quality, color=colour, s=34 if learned else 22, zorder=3)
        if c.kind != "hybrid" or learned:
            axes.annotate(
                c.name,
                (c.escalated, c.quality),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    axes.set_xlabel("share of questions reaching the LLM")
    axes.set_ylabel(f"quality ({report.metric})")
    axes.set_xlim(-0.02, 1.02)
    axes.set_title("quality vs LLM share (green: learned router, cross-validated)")
    return figure_data_uri(figure)


def write_html(report: EvalReport, path: Path) -> Path:
    """One offline file: the frontier plot, the table and the per-question routes."""
    e = escape
    best = report.best()
    verdict = (
        f"Best: <b>{e(best.name)}</b> keeps {_pct(best.quality_share)} of LLM-only quality at "
        f"{_pct(best.latency_share)} of its mean latency; target "
        f"{'met' if best.meets_target else 'not met'}."
        if best
        else "No hybrid configuration."
    )
    meta = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in report.meta.items())
    questions = html_table(
        ("id", "question", "answers", "draft", "mean logprob", "LLM"),
        (
            (p.id, p.question, " | ".join(p.answers), p.draft.text[:200], p.mean_logprob,
             p.direct.text[:200])
            for p in report.pieces
        ),
    )  # fmt: skip
    body = (
        f"<h1>edgelm hybrid eval</h1><p>{verdict}</p><ul>{meta}</ul>"
        f'<img alt="quality vs latency frontier" src="{frontier_png(report)}">'
        f'<img alt="quality vs share sent to the LLM" src="{share_png(report)}">'
        f"{html_table(table_header(report), table_rows(report))}"
        f"<h2>Questions</h2>{questions}"
    )
    return write_atomically(path, html_page("edgelm hybrid eval", body))
