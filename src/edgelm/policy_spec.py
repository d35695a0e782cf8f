"""The spec language of escalation policies, parsed into plain terms.

A spec such as ``insufficient,confidence=-0.8>direct`` is written in settings
(``router.policy``, ``rag.fallback_policy``), in model names (``hybrid@length=600``) and on the
command line; its grammar is described in :mod:`edgelm.hybrid.policies`. This module turns a
spec into a tree of :class:`Term`, :class:`AnyOfSpec` and :class:`AllOfSpec`, raising every
syntax and value error as :class:`~edgelm.errors.InvalidRequest`, and does nothing else:
building policies from the tree is the hybrid router's job
(:func:`edgelm.hybrid.policies.parse_policy`).

It is a leaf (it imports only :mod:`edgelm.errors`) so that the settings schema can reject a
bad spec when it is set, without importing the router package, which pulls in the model pool,
which imports the settings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from edgelm.errors import InvalidRequest

Action = Literal["refine", "direct"]

DEFAULT_LENGTH = 600
DEFAULT_CONFIDENCE = -1.0
DEFAULT_CONFIDENCE_MIN = -6.0
DEFAULT_INSUFFICIENT_CHARS = 3
DEFAULT_LEARNED = 0.5
DEFAULT_TOKENS = 64


@dataclass(frozen=True)
class Term:
    """One policy term with its value parsed and its default applied.

    ``name`` is one of ``never``, ``always``, ``length``, ``confidence``, ``confidence-min``,
    ``insufficient``, ``keywords``, ``topic``, ``degenerate``, ``unsupported``, ``learned`` or
    ``tokens``. ``value`` is the number of the numeric terms (an int for ``length``,
    ``insufficient`` and ``tokens``); ``at`` the token count after which a ``confidence@<k>``
    term decides while the draft streams; ``words`` the words of ``keywords``;
    ``patterns`` the regexes of a ``topic`` given as data (None: the settings' patterns);
    ``action`` the route asked for with ``>refine`` / ``>direct`` (None: the term's own).
    """

    name: str
    value: float | int | None = None
    words: tuple[str, ...] = ()
    patterns: tuple[str, ...] | None = None
    action: Action | None = None
    at: int | None = None


@dataclass(frozen=True)
class AnyOfSpec:
    """Escalate when any child does (``,`` or ``|`` in a spec)."""

    children: tuple[Spec, ...]


@dataclass(frozen=True)
class AllOfSpec:
    """Escalate only when every child does (``&`` in a spec)."""

    children: tuple[Spec, ...]


Spec = Term | AnyOfSpec | AllOfSpec


def parse_spec(spec: str | Mapping[str, Any] | Sequence[Any]) -> Spec:
    """Parse a spec string or its JSON-like form; a single term or alternative is returned
    as itself, not wrapped in a one-child composite."""
    if isinstance(spec, Mapping):
        return _from_mapping(spec)
    if not isinstance(spec, str):
        return _one([parse_spec(s) for s in spec], AnyOfSpec)
    if not spec.strip():
        raise InvalidRequest("empty policy", param="policy")
    alternatives = [a for a in re.split(r"[,|]", spec) if a.strip()]
    any_children: list[Spec] = []
    for alternative in alternatives:
        terms: list[Spec] = [_term(t) for t in alternative.split("&") if t.strip()]
        any_children.append(_one(terms, AllOfSpec))
    return _one(any_children, AnyOfSpec)


def _one(children: list[Spec], kind: type[AnyOfSpec] | type[AllOfSpec]) -> Spec:
    if not children:
        raise InvalidRequest("a composite policy needs at least one policy", param="policy")
    return children[0] if len(children) == 1 else kind(tuple(children))


def _composite(children: Sequence[Any], kind: type[AnyOfSpec] | type[AllOfSpec]) -> Spec:
    """``{"any": [...]}`` / ``{"all": [...]}``: a composite even with one child."""
    parsed = tuple(parse_spec(s) for s in children)
    if not parsed:
        raise InvalidRequest("a composite policy needs at least one policy", param="policy")
    return kind(parsed)


def _number(name: str, raw: str | None, default: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(
            f"policy '{name}' needs a number, got '{raw}'", param="policy"
        ) from None
    if math.isnan(value):
        raise InvalidRequest(f"policy '{name}' needs a number, got '{raw}'", param="policy")
    return value


def _term(text: str) -> Term:
    term, arrow, action = text.partition(">")
    if arrow:
        action = action.strip().lower()
        if action not in ("refine", "direct"):
            raise InvalidRequest(
                f"'{text.strip()}': escalate with '>refine' or '>direct', not '>{action}'",
                param="policy",
            )
        return _with_action(_term(term), action)  # type: ignore[arg-type]
    name, _, raw = text.strip().partition("=")
    name = name.strip().lower()
    raw = raw.strip()
    if "@" in name:
        return _at_term(name, raw)
    if name in ("never", "always"):
        return Term(name)
    if name == "length":
        return Term(name, int(_number(name, raw, DEFAULT_LENGTH)))
    if name in ("confidence", "confidence-mean"):
        return Term("confidence", _number(name, raw, DEFAULT_CONFIDENCE))
    if name == "confidence-min":
        return Term(name, _number(name, raw, DEFAULT_CONFIDENCE_MIN))
    if name == "insufficient":
        return Term(name, int(_number(name, raw, DEFAULT_INSUFFICIENT_CHARS)))
    if name == "keywords":
        words = [w for w in raw.split(";") if w.strip()]
        if not words:
            raise InvalidRequest("policy 'keywords' needs words: keywords=a;b", param="policy")
        return Term(name, words=tuple(words))
    if name == "topic":
        return Term(name)
    if name == "degenerate":
        return Term(name)
    if name == "unsupported":
        count = int(_number(name, raw, 1))
        if count < 1:
            raise InvalidRequest("policy 'unsupported' needs a count of 1 or more", param="policy")
        return Term(name, count)
    if name == "tokens":
        budget = int(_number(name, raw, DEFAULT_TOKENS))
        if budget < 1:
            raise InvalidRequest("policy 'tokens' needs a budget of 1 or more", param="policy")
        return Term(name, budget)
    if name == "learned":
        value = _number(name, raw, DEFAULT_LEARNED)
        if not 0.0 <= value <= 1.0:
            raise InvalidRequest(f"learned={raw}: a probability from 0 to 1", param="policy")
        return Term(name, value)
    raise InvalidRequest(
        f"unknown policy '{name}'; use never, always, length, confidence, confidence-min, "
        "insufficient, keywords, topic, degenerate, unsupported, learned or tokens",
        param="policy",
    )


def _at_term(name: str, raw: str) -> Term:
    """``confidence@<k>=<t>`` (also ``confidence-min@<k>``): judged on the first ``k`` tokens
    while the draft streams, so an unsure start is cut there instead of paid to the end."""
    base, _, count = name.partition("@")
    if base == "confidence-mean":
        base = "confidence"
    if base not in ("confidence", "confidence-min"):
        raise InvalidRequest(
            f"'{name}': only confidence@<k> and confidence-min@<k> take a token count",
            param="policy",
        )
    try:
        at = int(count)
    except ValueError:
        raise InvalidRequest(f"'{name}': @ needs a whole token count", param="policy") from None
    if at < 1:
        raise InvalidRequest(f"'{name}': the token count must be 1 or more", param="policy")
    default = DEFAULT_CONFIDENCE if base == "confidence" else DEFAULT_CONFIDENCE_MIN
    return Term(base, _number(base, raw, default), at=at)


def _with_action(term: Term, action: Action) -> Term:
    return Term(term.name, term.value, term.words, term.patterns, action, term.at)


def _from_mapping(data: Mapping[str, Any]) -> Spec:
    if "any" in data:
        return _composite(data["any"], AnyOfSpec)
    if "all" in data:
        return _composite(data["all"], AllOfSpec)
    name = str(data.get("policy") or "")
    if not name:
        raise InvalidRequest("a policy object needs 'policy', 'any' or 'all'", param="policy")
    if name == "keywords":
        words = data.get("keywords") or data.get("words") or []
        if isinstance(words, str):
            words = words.split(";")
        return Term("keywords", words=tuple(words))
    if name == "topic" and data.get("patterns"):
        return Term("topic", patterns=tuple(data["patterns"]))
    threshold = data.get("threshold")
    return _term(name if threshold is None else f"{name}={threshold}")
