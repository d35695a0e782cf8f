"""LLM-as-judge: a rubric of 1–5 on coherence, factuality and conciseness.

The judge is any model the service answers (the LLM tier, or a remote model registered with
``edgelm model add --engine remote``). Its prompt is versioned (:data:`JUDGE_PROMPT_VERSION`,
stored with every run) because a changed prompt changes the scores; its raw output is kept so a
surprising score can be read back; and malformed output is parsed as far as it honestly can be
(code fences, text around the JSON, numbers as strings, "4/5", ``key: value`` lines) while
anything that still does not give three in-range scores is a counted parse failure, never a
guessed score.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.client import EdgelmClient

JUDGE_PROMPT_VERSION = "v1"
CRITERIA = ("coherence", "factuality", "conciseness")
SCALE = (1, 5)

JUDGE_SYSTEM_V1 = (
    "You are a strict, fair grader of answers to questions. Score the ANSWER on three "
    "criteria, each an integer from 1 (very poor) to 5 (excellent):\n"
    "- coherence: is it clear, well-formed and on topic?\n"
    "- factuality: is it factually correct (agreeing with the REFERENCE when one is given)?\n"
    "- conciseness: does it answer without padding, repetition or irrelevant text?\n"
    'Reply with only a JSON object: {"coherence": n, "factuality": n, "conciseness": n, '
    '"reason": "one short sentence"}'
)


def judge_messages(
    question: str, answer: str, reference: str | None = None
) -> list[dict[str, str]]:
    """The v1 prompt as chat messages."""
    parts = [f"QUESTION:\n{question}"]
    if reference:
        parts.append(f"REFERENCE:\n{reference}")
    parts.append(f"ANSWER:\n{answer}")
    return [
        {"role": "system", "content": JUDGE_SYSTEM_V1},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


@dataclass
class JudgeResult:
    """``scores`` maps each criterion to 1–5, or is None when the output could not be parsed."""

    scores: dict[str, float] | None
    raw: str
    parse_error: str | None = None

    @property
    def mean(self) -> float | None:
        if not self.scores:
            return None
        return sum(self.scores.values()) / len(self.scores)


class JudgeParseError(ValueError):
    pass


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?\s*$")


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object that can be decoded starting at some ``{`` of the text, in order."""
    decoder = json.JSONDecoder()
    found = []
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def _score_value(name: str, value: Any) -> float:
    """A criterion's value as a number on the 1–5 scale; "4", "4/5", 4.0 are fine."""
    if isinstance(value, bool):
        raise JudgeParseError(f"{name} is a boolean, not a score")
    if isinstance(value, dict) and "score" in value:
        value = value["score"]
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        match = _NUMBER.match(value)
        if not match:
            raise JudgeParseError(f"{name}={value!r} is not a number")
        number = float(match.group(1))
        if match.group(2) and float(match.group(2)) not in (0.0, float(SCALE[1])):
            raise JudgeParseError(f"{name}={value!r} is not on the 1–5 scale")
    else:
        raise JudgeParseError(f"{name}={value!r} is not a number")
    if not SCALE[0] <= number <= SCALE[1]:
        raise JudgeParseError(f"{name}={number:g} is outside {SCALE[0]}–{SCALE[1]}")
    return number


def _scores_from(obj: dict[str, Any]) -> dict[str, float]:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for nest in ("scores", "score", "rubric"):
        if isinstance(lowered.get(nest), dict):
            lowered = {str(k).strip().lower(): v for k, v in lowered[nest].items()}
            break
    missing = [c for c in CRITERIA if c not in lowered]
    if missing:
        raise JudgeParseError(f"missing {', '.join(missing)}")
    return {c: _score_value(c, lowered[c]) for c in CRITERIA}


_LINE = re.compile(
    r"\b(coherence|factuality|conciseness)\b[\"'*\s]*[:=\-]\s*[\"']?(\d+(?:\.\d+)?(?:\s*/\s*\d+)?)",
    re.IGNORECASE,
)


def parse_judge_output(raw: str) -> dict[str, float]:
    """The three scores from a judge's reply, or :class:`JudgeParseError` saying why not.

    Tried in order: JSON inside code fences, any JSON object in the text, then
    ``criterion: n`` pairs. The first candidate with all three in-range scores wins; when none
    does, the error of the most promising candidate is raised.
    """
    if not raw or not raw.strip():
        raise JudgeParseError("empty judge output")
    candidates: list[dict[str, Any]] = []
    for block in _FENCE.findall(raw):
        candidates.extend(_json_objects(block))
    candidates.extend(_json_objects(raw))
    pairs = {m.group(1).lower(): m.group(2) for m in _LINE.finditer(raw)}
    if pairs:
        candidates.append(pairs)
    first_error: JudgeParseError | None = None
    for candidate in candidates:
        try:
            return _scores_from(candidate)
        except JudgeParseError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    raise JudgeParseError("no JSON object or scores found in the judge output")


class Judge:
    """Scores answers with a model served by edgelm: ``Judge(client, "qwen2.5-1.5b")``."""

    version = JUDGE_PROMPT_VERSION

    def __init__(
        self, client: EdgelmClient, model: str, seed: int = 0, max_tokens: int = 200
    ) -> None:
        self.client = client
        self.model = model
        self.seed = seed
        self.max_tokens = max_tokens

    def score(self, question: str, answer: str, reference: str | None = None) -> JudgeResult:
        """Ask the judge once at temperature 0; a failed call or parse is data, not an error."""
        messages = judge_messages(question, answer, reference)
        params: dict[str, Any] = {
            "temperature": 0.0,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "response_format": {"type": "json_object"},
        }
        try:
            try:
                result = self.client.chat_once(self.model, messages, **params)
            except EdgelmError as exc:
                # A judge without JSON mode (some remote upstreams) still gets asked: the
                # prompt requests JSON and the parser copes with what comes back.
                if exc.param != "response_format" and exc.code != "unsupported":
                    raise
                params.pop("response_format")
                result = self.client.chat_once(self.model, messages, **params)
        except EdgelmError as exc:
            return JudgeResult(None, "", f"judge call failed: {exc.message}")
        try:
            return JudgeResult(parse_judge_output(result.text), result.text)
        except JudgeParseError as exc:
            return JudgeResult(None, result.text, str(exc))
