"""Escalation policies: when is the small model's draft good enough to return?

A policy looks at the question (before any drafting) and at the draft (text and token
log-probabilities) and returns a :class:`Verdict`: whether it fired, what it measured, against
which threshold, and which route it asks for when it fires (``refine``: send question and draft
to the LLM; ``direct``: let the LLM answer the question alone). Policies are pure functions of
those inputs, which is what lets ``edgelm hybrid eval`` compute every policy and threshold from
one recorded draft per question instead of re-running models.

Policies compose with :class:`AnyOf` and :class:`AllOf`, and are written as one short spec
string used alike in settings, model names (``hybrid@length=600,confidence=-0.8``) and the CLI:

* terms separated by ``,`` or ``|`` are any-of; terms joined by ``&`` are all-of (``&`` binds
  tighter: ``topic,length=600&confidence=-1`` is topic OR (length AND confidence));
* a term is ``name`` or ``name=value``: ``never``, ``always``, ``length=<chars>``,
  ``confidence=<mean logprob>``, ``confidence-min=<min logprob>``, ``insufficient[=<chars>]``,
  ``keywords=<word;word;...>``, ``topic`` (the regexes from settings ``router.direct_patterns``),
  ``learned[=<probability>]`` (the learned router, :mod:`edgelm.hybrid.learned`: a question
  it predicts the LLM answers better goes to the LLM before any draft);
  ``degenerate`` (the draft loops, is only markers or is empty; see :mod:`edgelm.answer_checks`),
  ``unsupported[=<count>]`` (a grounded draft states figures or names its context lacks);
  ``confidence@<k>=<mean logprob>`` (and ``confidence-min@<k>``: judged on the first ``k``
  tokens while the draft streams) and ``tokens=<n>`` (a draft reaching ``n`` tokens): these
  *early* terms cut the draft the moment they fire and the LLM answers the question alone,
  so an escalated question pays ``k`` (or ``n``) draft tokens, not the whole draft (see
  :func:`early_cut`; inside ``&`` they are judged on the finished draft only);
* a term may end in ``>direct`` or ``>refine`` to choose how it escalates
  (``confidence=-0.5>direct``: an unsure draft is dropped and the LLM answers the question).

The same spec may be given as JSON-like data, e.g. ``{"policy": "confidence", "threshold": -1}``
or ``{"any": ["length=600", {"policy": "confidence", "threshold": -1}]}``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from edgelm.answer_checks import degeneration, unsupported_claims
from edgelm.errors import InvalidRequest
from edgelm.policy_spec import (
    DEFAULT_CONFIDENCE,
    DEFAULT_INSUFFICIENT_CHARS,
    DEFAULT_LEARNED,
    DEFAULT_LENGTH,
    Action,
    AllOfSpec,
    AnyOfSpec,
    Spec,
    Term,
    parse_spec,
)

Route = Literal["draft", "refine", "direct"]

# Phrases with which small models say they cannot answer. Lower-case; matched as regexes.
INSUFFICIENT_PATTERNS: tuple[str, ...] = (
    r"\bi (?:do not|don't|cannot|can't|am unable to|am not able to) (?:know|answer|say|"
    r"determine|provide|find|help|access|tell)",
    r"\bi'?m (?:not sure|unable|not able|sorry)",
    r"\bi (?:am )?(?:not sure|unsure)\b",
    r"\b(?:not|no) (?:enough|sufficient) (?:information|context|data|details)",
    r"\b(?:insufficient|missing) (?:information|context|data)",
    r"\bas an ai\b",
    r"\b(?:there is|there's) no (?:information|way to know|data)",
    r"\bunable to (?:answer|determine|provide|find)",
    r"\bi (?:have|had) no (?:information|knowledge|access|data)",
    r"\bnot (?:possible|able) to (?:answer|determine|know)",
    r"\b(?:unknown|cannot be determined)\b",
)


@dataclass(frozen=True)
class Draft:
    """What the policies may look at: the SLM's answer and how sure it was of each token."""

    text: str
    logprobs: tuple[float, ...] = ()
    finish_reason: str | None = "stop"
    mean_logprob_value: float | None = None
    min_logprob_value: float | None = None
    sources: tuple[str, ...] = ()
    """What a grounded draft had to answer from (context blocks and question); empty for an
    ungrounded one, which the ``unsupported`` policy then leaves alone."""
    tokens: int | None = None
    """Completion tokens (when ``logprobs`` do not say: an engine without logprobs, or a
    recorded draft that kept only their mean)."""

    @property
    def n_tokens(self) -> int:
        return self.tokens if self.tokens is not None else len(self.logprobs)

    @property
    def mean_logprob(self) -> float | None:
        """Mean token log-probability (a recorded value wins over the token list)."""
        if self.mean_logprob_value is not None:
            return self.mean_logprob_value
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None

    @property
    def min_logprob(self) -> float | None:
        if self.min_logprob_value is not None:
            return self.min_logprob_value
        return min(self.logprobs) if self.logprobs else None


@dataclass(frozen=True)
class Verdict:
    """One policy's measurement and decision. ``fired`` means "do not return the draft"."""

    policy: str
    fired: bool
    action: Action = "refine"
    value: float | str | None = None
    threshold: float | str | None = None
    detail: str = ""
    signals: tuple[Verdict, ...] = field(default=(), repr=False)

    def reason(self) -> str:
        """One line for logs and the ``x-edgelm-reason`` header."""
        return self.detail or self.policy

    def leaves(self) -> list[Verdict]:
        """The measured leaf verdicts (a composite's children, flattened)."""
        if not self.signals:
            return [self]
        return [leaf for s in self.signals for leaf in s.leaves()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "fired": self.fired,
            "action": self.action,
            "value": _round(self.value),
            "threshold": self.threshold,
            "detail": self.detail,
        }


def _round(value: float | str | None) -> float | str | None:
    return round(value, 4) if isinstance(value, float) else value


class Policy(ABC):
    """Decides from the question and, when it needs one, the draft.

    ``check(question, None)`` is asked before drafting: a question-only policy answers, a policy
    that needs the draft returns ``None`` ("cannot tell yet"). ``check(question, draft)`` must
    always return a verdict.
    """

    name: str = "policy"
    needs_draft: bool = True
    needs_logprobs: bool = False

    @abstractmethod
    def check(self, question: str, draft: Draft | None) -> Verdict | None: ...

    def check_partial(self, tokens: int, logprobs: Sequence[float]) -> Verdict | None:
        """Judge a draft still streaming, from its first ``tokens`` tokens (and their
        logprobs, when the engine gives them). A fired verdict cuts the draft there. Only
        the early terms (``confidence@<k>``, ``tokens=<n>``) answer; ``None``: cannot tell
        (yet)."""
        return None

    def spec(self) -> str:
        """The spec string that parses back to this policy."""
        return self.name


class Never(Policy):
    """Always return the draft: the SLM-only baseline."""

    name = "never"
    needs_draft = False

    def check(self, question: str, draft: Draft | None) -> Verdict:
        return Verdict("never", False, detail="never: the draft is always returned")


class Always(Policy):
    """Refine every draft: the "SLM then LLM every time" baseline."""

    name = "always"

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        if draft is None:
            return None
        return Verdict("always", True, detail="always: every draft is refined")


@dataclass
class Length(Policy):
    """Long drafts are where small models wander; refine a draft of ``min_chars`` or more."""

    min_chars: int = DEFAULT_LENGTH
    name = "length"

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        if draft is None:
            return None
        n = len(draft.text.strip())
        fired = n >= self.min_chars
        op = ">=" if fired else "<"
        return Verdict(
            "length", fired, "refine", n, self.min_chars, f"length: {n} chars {op} {self.min_chars}"
        )

    def spec(self) -> str:
        return f"length={self.min_chars}"


@dataclass
class Confidence(Policy):
    """Refine when the SLM was unsure: its mean (or minimum) token log-probability is below
    ``threshold``. A low mean says the whole answer was guessed; a low minimum catches one
    invented name or number inside an otherwise fluent answer."""

    threshold: float = DEFAULT_CONFIDENCE
    stat: Literal["mean", "min"] = "mean"
    at: int | None = None
    """Early form (``confidence@<k>``): judge the first ``at`` tokens while the draft streams
    and cut it as soon as they are unsure; a draft that ends sooner is judged whole."""
    needs_logprobs = True

    @property
    def name(self) -> str:  # type: ignore[override]
        base = "confidence" if self.stat == "mean" else "confidence-min"
        return base if self.at is None else f"{base}@{self.at}"

    def _judge(self, values: Sequence[float]) -> Verdict:
        if not values:
            return Verdict(
                self.name, False, self._action(), None, self.threshold, f"{self.name}: no logprobs"
            )
        value = sum(values) / len(values) if self.stat == "mean" else min(values)
        fired = value < self.threshold
        op = "<" if fired else ">="
        where = "" if self.at is None else f" over the first {len(values)} tokens"
        return Verdict(
            self.name,
            fired,
            self._action(),
            value,
            self.threshold,
            f"{self.name}: {self.stat} logprob {value:.3f}{where} {op} {self.threshold:g}",
        )

    def _action(self) -> Action:
        # An early cut leaves an unfinished draft: nothing to refine, the LLM answers afresh.
        return "refine" if self.at is None else "direct"

    def check_partial(self, tokens: int, logprobs: Sequence[float]) -> Verdict | None:
        if self.at is None or tokens < self.at:
            return None
        return self._judge(logprobs[: self.at])

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        if draft is None:
            return None
        if self.at is not None:
            if not draft.logprobs:
                return self._judge(())
            return self._judge(draft.logprobs[: self.at])
        value = draft.mean_logprob if self.stat == "mean" else draft.min_logprob
        if value is None:
            return Verdict(
                self.name, False, "refine", None, self.threshold, f"{self.name}: no logprobs"
            )
        fired = value < self.threshold
        op = "<" if fired else ">="
        return Verdict(
            self.name,
            fired,
            "refine",
            value,
            self.threshold,
            f"{self.name}: {self.stat} logprob {value:.3f} {op} {self.threshold:g}",
        )

    def spec(self) -> str:
        return f"{self.name}={self.threshold:g}"


@dataclass
class Tokens(Policy):
    """A draft token budget: a draft that reaches ``budget`` tokens is cut there and the LLM
    answers the question alone. Short factual answers fit in a few dozen tokens; a 0.5B model
    that is still writing at 64 tokens is usually wandering (a derivation, a list, a loop), and
    finishing it would cost more than the LLM's whole answer."""

    budget: int = 64
    name = "tokens"

    def _judge(self, tokens: int) -> Verdict:
        fired = tokens >= self.budget
        op = ">=" if fired else "<"
        return Verdict(
            "tokens",
            fired,
            "direct",
            tokens,
            self.budget,
            f"tokens: draft {'reached' if fired else 'has'} {tokens} {op} {self.budget}",
        )

    def check_partial(self, tokens: int, logprobs: Sequence[float]) -> Verdict | None:
        return self._judge(tokens) if tokens >= self.budget else None

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        if draft is None:
            return None
        return self._judge(draft.n_tokens)

    def spec(self) -> str:
        return f"tokens={self.budget}"


@dataclass
class Insufficient(Policy):
    """Escalate when the draft says it cannot answer, or is (nearly) empty. The LLM then
    answers the question alone (``direct``): a draft that declines has nothing to refine."""

    min_chars: int = DEFAULT_INSUFFICIENT_CHARS
    patterns: tuple[str, ...] = INSUFFICIENT_PATTERNS
    name = "insufficient"

    def __post_init__(self) -> None:
        self._compiled = [re.compile(p, re.IGNORECASE) for p in self.patterns]

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        if draft is None:
            return None
        text = draft.text.strip()
        if len(text) < self.min_chars:
            return Verdict(
                "insufficient",
                True,
                "direct",
                len(text),
                self.min_chars,
                f"insufficient: draft has {len(text)} chars < {self.min_chars}",
            )
        # Only the opening matters: "I don't know" later in a long answer is usually hedging.
        head = text[:300].replace("\u2019", "'")
        for pattern in self._compiled:
            match = pattern.search(head)
            if match:
                return Verdict(
                    "insufficient",
                    True,
                    "direct",
                    match.group(0),
                    "declines",
                    f"insufficient: draft says '{match.group(0)}'",
                )
        return Verdict(
            "insufficient", False, "direct", len(text), self.min_chars, "insufficient: no"
        )

    def spec(self) -> str:
        return f"insufficient={self.min_chars}"


class Degenerate(Policy):
    """Escalate a draft that loops, is nothing but markers, or is empty (see
    :func:`edgelm.answer_checks.degeneration`). Such a draft holds nothing worth refining, so
    the LLM answers afresh (``direct``). The pipelines also read the draft with a
    :class:`~edgelm.answer_checks.LoopMonitor` while it streams and stop it once the loop is
    certain, so this verdict is reached without generating up to ``max_tokens``."""

    name = "degenerate"

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        if draft is None:
            return None
        found = degeneration(draft.text, truncated=draft.finish_reason == "length")
        if found is None:
            return Verdict("degenerate", False, "direct", None, None, "degenerate: no")
        return Verdict(
            "degenerate",
            True,
            "direct",
            found.kind,
            "loop|markers|empty",
            f"degenerate: {found.describe()}",
        )


@dataclass
class Unsupported(Policy):
    """Escalate a grounded draft that states ``min_count`` or more figures or names found
    nowhere in its sources (see :func:`edgelm.answer_checks.unsupported_claims`): an invented
    number must not reach the user. Ungrounded drafts (no sources) never fire."""

    min_count: int = 1
    name = "unsupported"

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        if draft is None:
            return None
        if not draft.sources:
            return Verdict(
                "unsupported", False, "direct", None, self.min_count, "unsupported: no context"
            )
        missing = unsupported_claims(draft.text, (*draft.sources, question))
        fired = len(missing) >= self.min_count
        shown = ", ".join(f"'{m}'" for m in missing[:5])
        detail = f"unsupported: {shown} not in the context" if missing else "unsupported: none"
        return Verdict("unsupported", fired, "direct", len(missing), self.min_count, detail)

    def spec(self) -> str:
        return "unsupported" if self.min_count == 1 else f"unsupported={self.min_count}"


@dataclass
class Keywords(Policy):
    """Questions about listed topics go straight to the LLM, without a draft. ``patterns`` are
    case-insensitive regexes; ``words`` are matched as whole words."""

    patterns: tuple[str, ...] = ()
    label: str = "keywords"
    needs_draft = False

    def __post_init__(self) -> None:
        try:
            self._compiled = [re.compile(p, re.IGNORECASE) for p in self.patterns]
        except re.error as exc:
            raise InvalidRequest(f"bad {self.label} pattern: {exc}", param="policy") from None

    @classmethod
    def words(cls, words: Iterable[str], label: str = "keywords") -> Keywords:
        return cls(tuple(rf"\b{re.escape(w.strip())}\b" for w in words if w.strip()), label)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    def check(self, question: str, draft: Draft | None) -> Verdict:
        for pattern in self._compiled:
            match = pattern.search(question)
            if match:
                return Verdict(
                    self.label,
                    True,
                    "direct",
                    match.group(0),
                    pattern.pattern,
                    f"{self.label}: question mentions '{match.group(0)}'",
                )
        return Verdict(self.label, False, "direct", None, None, f"{self.label}: no match")

    def spec(self) -> str:
        if self.label == "topic":
            return "topic"
        words = [p.removeprefix(r"\b").removesuffix(r"\b").replace("\\", "") for p in self.patterns]
        return "keywords=" + ";".join(words)


@dataclass
class Learned(Policy):
    """The learned router's prediction, taken before any draft: when P(the LLM answers better)
    is at least ``threshold`` the LLM answers the question alone and no draft is paid for.

    The probability needs the question's embedding, which only the caller can get (the
    service's pool, or an eval's recorded scores), so the caller binds it with
    :func:`bind_learned` before deciding. Unbound (no router, no embedder) it never fires: a
    missing router must not block answers, and ``note`` says why in the route record.
    """

    threshold: float = DEFAULT_LEARNED
    probability: float | None = field(default=None, compare=False)
    note: str = field(default="", compare=False)
    name = "learned"
    needs_draft = False

    def check(self, question: str, draft: Draft | None) -> Verdict:
        p = self.probability
        if p is None:
            why = self.note or "no learned router bound"
            return Verdict("learned", False, "direct", None, self.threshold, f"learned: {why}")
        fired = p >= self.threshold
        op = ">=" if fired else "<"
        return Verdict(
            "learned",
            fired,
            "direct",
            p,
            self.threshold,
            f"learned: P(LLM better) {p:.3f} {op} {self.threshold:g}",
        )

    def spec(self) -> str:
        return f"learned={self.threshold:g}"


def uses_learned(policy: Policy) -> bool:
    """Whether a :class:`Learned` term appears anywhere in ``policy``."""
    if isinstance(policy, Learned):
        return True
    if isinstance(policy, Escalate):
        return uses_learned(policy.child)
    if isinstance(policy, _Composite):
        return any(uses_learned(c) for c in policy.children)
    return False


def bind_learned(policy: Policy, probability: float | None, note: str = "") -> Policy:
    """A copy of ``policy`` whose learned terms carry this question's probability."""
    if isinstance(policy, Learned):
        return replace(policy, probability=probability, note=note)
    if isinstance(policy, Escalate):
        return replace(policy, child=bind_learned(policy.child, probability, note))
    if isinstance(policy, _Composite):
        return type(policy)([bind_learned(c, probability, note) for c in policy.children])
    return policy


@dataclass
class Escalate(Policy):
    """Sends what ``child`` escalates by another route: ``confidence=-0.5>direct`` lets the LLM
    answer an unsure draft's question afresh instead of refining the draft. On 2 cores the
    refine prompt (instructions + draft) costs the LLM more prompt time than the question
    alone, so ``direct`` is the cheaper escalation when drafts are rarely worth keeping."""

    child: Policy
    action: Action = "direct"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.child.name

    @property
    def needs_draft(self) -> bool:  # type: ignore[override]
        return self.child.needs_draft

    @property
    def needs_logprobs(self) -> bool:  # type: ignore[override]
        return self.child.needs_logprobs

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        verdict = self.child.check(question, draft)
        if verdict is None or not verdict.fired:
            return verdict
        return replace(verdict, action=self.action, detail=f"{verdict.detail} -> {self.action}")

    def check_partial(self, tokens: int, logprobs: Sequence[float]) -> Verdict | None:
        # A cut draft is unfinished: it goes direct whatever the arrow says.
        return self.child.check_partial(tokens, logprobs)

    def spec(self) -> str:
        return f"{self.child.spec()}>{self.action}"


class _Composite(Policy):
    def __init__(self, children: Sequence[Policy]):
        if not children:
            raise InvalidRequest("a composite policy needs at least one policy", param="policy")
        self.children = list(children)
        self.needs_draft = any(c.needs_draft for c in self.children)
        self.needs_logprobs = any(c.needs_logprobs for c in self.children)


class AnyOf(_Composite):
    """Fires when any child fires; the first child that fires (in order) picks the route."""

    name = "any"

    def check_partial(self, tokens: int, logprobs: Sequence[float]) -> Verdict | None:
        for child in self.children:
            verdict = child.check_partial(tokens, logprobs)
            if verdict is not None and verdict.fired:
                return verdict
        return None

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        verdicts: list[Verdict] = []
        undecided = False
        for child in self.children:
            verdict = child.check(question, draft)
            if verdict is None:
                undecided = True
                continue
            verdicts.append(verdict)
            if verdict.fired:
                return Verdict(
                    verdict.policy,
                    True,
                    verdict.action,
                    verdict.value,
                    verdict.threshold,
                    verdict.detail,
                    tuple(verdicts),
                )
        if undecided:
            return None
        return Verdict(
            "any",
            False,
            "refine",
            detail="; ".join(v.detail for v in verdicts),
            signals=tuple(verdicts),
        )

    def spec(self) -> str:
        return ",".join(c.spec() for c in self.children)


class AllOf(_Composite):
    """Fires only when every child fires (e.g. long AND unsure). Routes ``direct`` only if every
    child asks for it, else ``refine``."""

    name = "all"

    def check(self, question: str, draft: Draft | None) -> Verdict | None:
        verdicts: list[Verdict] = []
        undecided = False
        for child in self.children:
            verdict = child.check(question, draft)
            if verdict is None:
                undecided = True
                continue
            verdicts.append(verdict)
            if not verdict.fired:
                # One child that does not fire settles it, draft or not.
                return Verdict(
                    "all", False, "refine", detail=verdict.detail, signals=tuple(verdicts)
                )
        if undecided:
            return None
        action: Action = "direct" if all(v.action == "direct" for v in verdicts) else "refine"
        return Verdict(
            "&".join(v.policy for v in verdicts),
            True,
            action,
            detail=" & ".join(v.detail for v in verdicts),
            signals=tuple(verdicts),
        )

    def spec(self) -> str:
        return "&".join(c.spec() for c in self.children)


@dataclass(frozen=True)
class Decision:
    """The route, the verdict behind it, and whether a draft was needed to reach it."""

    route: Route
    verdict: Verdict

    @property
    def reason(self) -> str:
        return self.verdict.reason()


def decide_before_draft(policy: Policy, question: str) -> Decision | None:
    """``direct`` when a question-only rule fires; ``None`` when the draft is needed."""
    verdict = policy.check(question, None)
    if verdict is not None and verdict.fired and verdict.action == "direct":
        return Decision("direct", verdict)
    if verdict is not None and not verdict.fired and not policy.needs_draft:
        # Nothing that looks at a draft could change the outcome: return the draft.
        return Decision("draft", verdict)
    return None


def decide(policy: Policy, question: str, draft: Draft) -> Decision:
    """Where a drafted answer goes; used by the service and, offline, by the eval."""
    verdict = policy.check(question, draft)
    if verdict is None:  # a policy broke its contract; never block an answer on it
        verdict = Verdict(policy.name, False, detail=f"{policy.name}: undecided")
    if not verdict.fired:
        return Decision("draft", verdict)
    return Decision(verdict.action, verdict)


def has_early_terms(policy: Policy) -> bool:
    """Whether ``policy`` can cut a streaming draft (an any-of ``confidence@<k>`` or
    ``tokens=<n>`` term); the pipeline then checks each chunk."""
    if isinstance(policy, Tokens) or (isinstance(policy, Confidence) and policy.at is not None):
        return True
    if isinstance(policy, Escalate):
        return has_early_terms(policy.child)
    if isinstance(policy, AnyOf):
        return any(has_early_terms(c) for c in policy.children)
    return False


def early_cut(policy: Policy, tokens: int, logprobs: Sequence[float]) -> Decision | None:
    """The ``direct`` decision when an early term fires on the draft's first ``tokens`` tokens,
    else ``None`` (keep drafting). Called by the pipeline after every streamed chunk."""
    verdict = policy.check_partial(tokens, logprobs)
    if verdict is None or not verdict.fired:
        return None
    return Decision("direct", replace(verdict, action="direct"))


def first_cut(
    policy: Policy, tokens: int, logprobs: Sequence[float]
) -> tuple[int, Decision] | None:
    """Offline replay of :func:`early_cut` over a recorded draft of ``tokens`` tokens, one
    token at a time (the llama.cpp engine streams one token per chunk): the token count at
    which the live pipeline would have cut it, and the decision; ``None`` when it would not."""
    if not has_early_terms(policy):
        return None
    for n in range(1, tokens + 1):
        decision = early_cut(policy, n, logprobs[:n])
        if decision is not None:
            return n, decision
    return None


def route_for(policy: Policy, question: str, draft: Draft) -> Decision:
    """The whole decision for a recorded draft, as the service would take it (pre-draft rules
    first). Pure, so the eval applies it to recorded pieces."""
    early = decide_before_draft(policy, question)
    if early is not None and early.route == "direct":
        return early
    return decide(policy, question, draft)


# -- building from a spec ----------------------------------------------------------------------


def parse_policy(
    spec: str | Mapping[str, Any] | Sequence[Any], topic_patterns: Sequence[str] = ()
) -> Policy:
    """Build a policy from a spec string or its JSON-like form (see the module docstring);
    the grammar itself is :func:`edgelm.policy_spec.parse_spec`."""
    return _build(parse_spec(spec), topic_patterns)


def _build(spec: Spec, topic_patterns: Sequence[str]) -> Policy:
    if isinstance(spec, AnyOfSpec):
        return AnyOf([_build(child, topic_patterns) for child in spec.children])
    if isinstance(spec, AllOfSpec):
        return AllOf([_build(child, topic_patterns) for child in spec.children])
    policy = _leaf(spec, topic_patterns)
    return Escalate(policy, spec.action) if spec.action else policy


def _leaf(term: Term, topic_patterns: Sequence[str]) -> Policy:
    if term.name == "never":
        return Never()
    if term.name == "always":
        return Always()
    if term.name == "length":
        return Length(int(_value(term)))
    if term.name == "confidence":
        return Confidence(float(_value(term)), "mean", term.at)
    if term.name == "confidence-min":
        return Confidence(float(_value(term)), "min", term.at)
    if term.name == "tokens":
        return Tokens(int(_value(term)))
    if term.name == "insufficient":
        return Insufficient(int(_value(term)))
    if term.name == "keywords":
        return Keywords.words(term.words)
    if term.name == "topic":
        patterns = topic_patterns if term.patterns is None else term.patterns
        return Keywords(tuple(patterns), "topic")
    if term.name == "learned":
        return Learned(float(_value(term)))
    if term.name == "degenerate":
        return Degenerate()
    if term.name == "unsupported":
        return Unsupported(int(_value(term)))
    raise InvalidRequest(f"unknown policy '{term.name}'", param="policy")


def _value(term: Term) -> float | int:
    assert term.value is not None, f"the spec parser gives '{term.name}' a value"
    return term.value


ANSWER_CHECKS: tuple[type[Policy], ...] = (Degenerate, Unsupported)
"""Policies that judge whether an answer may reach the user at all, not only whether a
better model could do better: when there is nowhere to escalate, RAG refuses instead."""


def answer_checks(policy: Policy) -> list[Policy]:
    """The ``degenerate`` and ``unsupported`` terms of ``policy`` (composites searched)."""
    if isinstance(policy, ANSWER_CHECKS):
        return [policy]
    if isinstance(policy, Escalate):
        return answer_checks(policy.child)
    if isinstance(policy, _Composite):
        return [p for child in policy.children for p in answer_checks(child)]
    return []


def watches_loops(policy: Policy) -> bool:
    """Whether a draft judged by ``policy`` should be cut as soon as it loops: only when the
    policy has a ``degenerate`` term (``never`` stays the plain SLM-only baseline)."""
    return any(isinstance(p, Degenerate) for p in answer_checks(policy))
