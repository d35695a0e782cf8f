"""Answer checks shared by the hybrid router and RAG: is this answer fit to reach the user?

Two families, both pure functions of the answer text (plus, for grounding, the texts the
answer was supposed to come from), so the service, the CLI and the offline evals judge a
recorded answer exactly as it was judged live:

* **degeneration** — the answer loops (a sentence, a phrase or a pair of citation markers
  repeated until ``max_tokens``), is only markers (``[1] [2] [3] …``, list numbers,
  punctuation) or is empty. :class:`LoopMonitor` reads the answer *while it streams* and says
  as soon as a loop is certain, so the caller can stop generating instead of paying for the
  rest of ``max_tokens``. :func:`degeneration` is the same monitor run over a whole text,
  which is what the ``degenerate`` policy of :mod:`edgelm.hybrid.policies` evaluates.
* **grounding** — :func:`unsupported_claims` lists the figures (numbers, dates, versions,
  numbers with units) and names (capitalised words and multi-word names, identifiers such as
  ``SM-1`` or ``IP65``) of an answer that occur nowhere in the retrieved context or the
  question: what a small model invented. The ``unsupported`` policy fires on them.

Why these thresholds: a loop is declared only when a unit of text repeats back-to-back more
often than normal writing ever does (a sentence of 6+ words three times in a row, a short
phrase five times, one word sixteen times), or when markers run without a single word
between them. A repeat counts only for its shortest unit (sixteen identical words are a
one-word loop, not a three-word phrase five times), so runs of one value in code or data
(``{0, 0, 0, …}``) need the one-word count. Table rules and cell borders (``|``, ``---``,
``:---:``) are layout, neither words nor markers. Inside a code fence one value may repeat
up to :data:`CODE_WORD_REPEATS` times (initialisers, byte tables). Lists, tables, code and repeated words
change at least one word per line and never meet those counts; the unit tests keep such
answers passing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_PERIOD = 64
"""Longest repeating unit looked for, in words (a long sentence or a short paragraph)."""
MARKER_RUN = 12
"""Markers in a row (citations, list numbers, punctuation) that no answer writes."""
TRUNCATED_REPEATS = 2.5
"""Copies of a unit of 6+ words ending an answer cut at ``max_tokens`` that make it a loop."""
MARKERS_BEFORE_WORDS = 8
"""Markers at the start of an answer with no word yet: the answer is markers only."""
CODE_WORD_REPEATS = 64
"""One word repeated this often inside a code fence is a loop (data such as ``{0, 0, …}``
legitimately repeats one value more than the sixteen allowed in prose)."""

_WORD = re.compile(r"\[\d{1,4}\]|[^\s\[]+|\[")
"""Units of the monitor: whitespace-separated words, with ``[n]`` split off even when glued
(``[2][1][2]`` is three units), so marker loops without spaces are seen too."""
_CITATION = re.compile(r"(?:\[\d{1,4}(?:\s*[,\-–]\s*\d{1,4})*\])+[.,;:!?)]*")
_LIST_NUMBER = re.compile(r"\(?\d{1,3}[.)]")
_PUNCTUATION = re.compile(r"[^\w\s]+")
_MARKER_TAIL = re.compile(r"\[\d{1,4}\]$")
_TABLE_RULE = re.compile(r"[|:\-]+")
"""Markdown table borders and separators (``|``, ``---``, ``:---:``) and rules: layout only."""


def min_repeats(period: int) -> int:
    """Back-to-back copies of a ``period``-word unit that make a loop certain."""
    if period == 1:
        return 16
    if period == 2:
        return 10
    if period <= 5:
        return 5
    return 3


def is_marker(word: str) -> bool:
    """A citation (``[3]``, ``[1][2].``), a list number (``4.``, ``2)``) or bare punctuation."""
    return bool(
        _CITATION.fullmatch(word) or _LIST_NUMBER.fullmatch(word) or _PUNCTUATION.fullmatch(word)
    )


@dataclass(frozen=True)
class Degeneration:
    """Why an answer is degenerate, and where that became certain."""

    kind: str
    """``loop``, ``marker-run``, ``marker-only`` or ``empty``."""
    detail: str
    words: int
    """Words read when it became certain (the cut point of a streamed answer)."""

    def describe(self) -> str:
        return f"{self.kind}: {self.detail}"


class LoopMonitor:
    """Reads an answer as it streams; :attr:`found` is set once the answer is degenerate.

    Only whole words are judged (a word is complete once whitespace or a closing citation
    bracket follows it), so the verdict does not depend on how the text was chunked. For every
    period ``p`` up to :data:`MAX_PERIOD` it keeps how many words in a row equalled the word
    ``p`` places back; a tail that is ``p``-periodic for ``p * min_repeats(p)`` words is a loop
when its unit is not itself a shorter unit repeated (that one is judged by its own count).
    That is ``O(MAX_PERIOD)`` per word, nothing per character.
    """

    def __init__(self, max_period: int = MAX_PERIOD) -> None:
        self.max_period = max_period
        self.words: list[str] = []
        self.found: Degeneration | None = None
        self._pending = ""
        self._runs = [0] * (max_period + 1)
        self._marker_run = 0
        self._content = 0
        self._markers = 0
        self._layout = 0
        self._sequence: list[str] = []
        """The words the loop check compares (all but table layout)."""
        self._line_start = True
        self._in_code = False

    def push(self, text: str) -> Degeneration | None:
        """Add streamed text; returns the finding as soon as there is one (and keeps it)."""
        if self.found is not None or not text:
            return self.found
        self._pending += text
        cut = max(self._pending.rfind(" "), self._pending.rfind("\n"), self._pending.rfind("\t"))
        marker = _MARKER_TAIL.search(self._pending)
        end = marker.end() if marker else cut + 1
        end = max(end, cut + 1)
        if end <= 0:
            return None
        complete, self._pending = self._pending[:end], self._pending[end:]
        self._feed(complete)
        return self.found

    def finish(self, truncated: bool = False) -> Degeneration | None:
        """The stream ended: judge the last word, then empty and marker-only answers. An
        answer ``truncated`` at ``max_tokens`` that ends in :data:`TRUNCATED_REPEATS` copies of
        a sentence-long unit was cut off mid-loop (the model had no way out of it)."""
        if self.found is None and self._pending:
            self._feed(self._pending)
            self._pending = ""
        if self.found is None and truncated:
            n = len(self.words)
            sequence = self._sequence
            for p in range(6, min(self.max_period, len(sequence) - 1) + 1):
                if self._runs[p] + p >= TRUNCATED_REPEATS * p and _primitive(sequence[-p:]):
                    unit = _shorten(" ".join(sequence[-p:]))
                    copies = (self._runs[p] + p) / p
                    detail = f"'{unit}' repeated {copies:.1f} times up to max_tokens"
                    self.found = Degeneration("loop", detail, n)
                    break
        if self.found is None and not self.words:
            self.found = Degeneration("empty", "the answer is empty", 0)
        elif self.found is None and self._content == 0 and not _a_bare_number(self.words):
            shown = " ".join(self.words[:6])
            self.found = Degeneration(
                "marker-only", f"no words, only markers ('{shown}')", len(self.words)
            )
        return self.found

    def _feed(self, text: str) -> None:
        """Judge the complete words of ``text``, noting which ones open a line (for fences)."""
        position = 0
        for match in _WORD.finditer(text):
            if "\n" in text[position : match.start()]:
                self._line_start = True
            position = match.end()
            if self._add(match.group(0)):
                return
        if "\n" in text[position:]:
            self._line_start = True

    def _add(self, word: str) -> bool:
        words = self.words
        words.append(word)
        n = len(words)
        if self._line_start and word.startswith(("```", "~~~")):
            self._in_code = not self._in_code
        self._line_start = False
        if _TABLE_RULE.fullmatch(word):
            # Table layout: a 5-column separator row is 11 such tokens; they neither break
            # nor extend a run of markers, and take no part in the loop check.
            self._layout += 1
            return False
        sequence = self._sequence
        sequence.append(word)
        length = len(sequence)
        marker = is_marker(word)
        if marker:
            self._markers += 1
            self._marker_run += 1
        else:
            self._content += 1
            self._marker_run = 0
        for p in range(1, min(self.max_period, length - 1) + 1):
            if sequence[-1] == sequence[-1 - p]:
                self._runs[p] += 1
                repeats = CODE_WORD_REPEATS if p == 1 and self._in_code else min_repeats(p)
                if self._runs[p] + p >= p * repeats and _primitive(sequence[-p:]):
                    unit = _shorten(" ".join(sequence[-p:]))
                    copies = (self._runs[p] + p) // p
                    self.found = Degeneration("loop", f"'{unit}' repeated {copies} times", n)
                    return True
            else:
                self._runs[p] = 0
        if self._marker_run >= MARKER_RUN:
            tail = " ".join(words[-4:])
            self.found = Degeneration(
                "marker-run", f"{self._marker_run} markers in a row ('... {tail}')", n
            )
            return True
        if self._content == 0 and self._markers >= MARKERS_BEFORE_WORDS:
            shown = " ".join(words[:6])
            self.found = Degeneration(
                "marker-only", f"{self._markers} markers and no words ('{shown} ...')", n
            )
            return True
        return False


def _primitive(unit: Sequence[str]) -> bool:
    """Whether ``unit`` is not a shorter unit repeated (``0, 0, 0,`` is ``0,`` three times):
    a repeat is judged only by its shortest unit, with that unit's count."""
    p = len(unit)
    return not any(
        p % d == 0 and unit[d:] == unit[:-d] for d in range(1, p // 2 + 1)
    )


def _a_bare_number(words: Sequence[str]) -> bool:
    """A short numeric answer (``42.``, ``(3)``, ``7. [2]``): one list-number-like word and
    otherwise only citations. A list number is a marker when words follow it; alone it is the
    answer. (``1. 2. 3.`` stays markers only.)"""
    numbers = [w for w in words if _LIST_NUMBER.fullmatch(w)]
    return len(numbers) == 1 and all(
        w is numbers[0] or _CITATION.fullmatch(w) or _TABLE_RULE.fullmatch(w) for w in words
    )


def _shorten(unit: str) -> str:
    return unit if len(unit) <= 60 else unit[:57] + "..."


def degeneration(text: str, truncated: bool = False) -> Degeneration | None:
    """The finding for a whole answer (what :class:`LoopMonitor` says once it has read it);
    ``truncated``: the answer stopped at ``max_tokens``."""
    monitor = LoopMonitor()
    monitor.push(text)
    return monitor.finish(truncated)


# -- grounding ---------------------------------------------------------------------------------

_NUMBER_WORDS = {
    0: "zero",
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    11: "eleven",
    12: "twelve",
    13: "thirteen",
    14: "fourteen",
    15: "fifteen",
    16: "sixteen",
    17: "seventeen",
    18: "eighteen",
    19: "nineteen",
    20: "twenty",
    30: "thirty",
    40: "forty",
    50: "fifty",
    60: "sixty",
    70: "seventy",
    80: "eighty",
    90: "ninety",
    100: "hundred",
    1000: "thousand",
}
_FIGURE = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_CITATIONS = re.compile(r"\[\d{1,4}(?:\s*[,\-–]\s*\d{1,4})*\]")
_LIST_START = re.compile(r"(?m)^\s*(?:\d{1,3}[.)]|[-*•])\s+")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/+]*[A-Za-z0-9]|[A-Za-z0-9]")
_SENTENCE_START = re.compile(r"(?:[.!?:;]\s|\n|\]\s|\"|\(|^)[\s#*>_`\-]*$")
"""What precedes a sentence's first word, including Markdown leads after the break:
headings (``## Overview``), bold items (``**Install**``), quotes (``> Note``), code ticks."""
NAME_STOPWORDS = frozenset(
    [
        "I",
        "A",
        "An",
        "The",
        "This",
        "That",
        "These",
        "Those",
        "It",
        "Its",
        "In",
        "On",
        "At",
        "For",
        "From",
        "With",
        "By",
        "To",
        "Of",
        "And",
        "Or",
        "But",
        "If",
        "Yes",
        "No",
        "Not",
        "Note",
        "Also",
        "However",
        "According",
        "Based",
        "Answer",
        "Context",
        "Question",
        "Source",
        "Sources",
        "Document",
        "Documents",
        "Block",
        "Blocks",
        "Step",
        "Steps",
        "There",
        "Here",
        "They",
        "We",
        "You",
        "He",
        "She",
        "Which",
        "What",
        "When",
        "Where",
        "Who",
        "Why",
        "How",
        "Each",
        "Every",
        "All",
        "Any",
        "Some",
        "Both",
        "Only",
        "Unfortunately",
        "Sorry",
    ]
)
"""Capitalised words that start sentences or refer to the prompt itself, not names."""


def _number_value(text: str) -> str:
    """A canonical form of a figure: ``2,160`` → ``2160``, ``1.50`` → ``1.5``."""
    plain = text.replace(",", "")
    if "." in plain:
        plain = plain.rstrip("0").rstrip(".") or "0"
    return plain.lstrip("0") or "0"


def _numbers_in(text: str) -> set[str]:
    return {_number_value(m.group(0)) for m in _FIGURE.finditer(text)}


@dataclass(frozen=True)
class Grounding:
    """What the sources contain, prepared once for checking any number of answers."""

    lowered: str
    numbers: frozenset[str]
    words: frozenset[str]

    @classmethod
    def of(cls, sources: Iterable[str]) -> Grounding:
        joined = "\n".join(sources)
        lowered = joined.lower()
        words = frozenset(w.strip(".-/+_") for w in _TOKEN.findall(lowered))
        return cls(lowered, frozenset(_numbers_in(joined)), words)

    def has_number(self, value: str) -> bool:
        if value in self.numbers:
            return True
        if value.isdigit():
            word = _NUMBER_WORDS.get(int(value))
            return word is not None and word in self.words
        return False

    def has_word(self, word: str) -> bool:
        """A name word as a whole word; an identifier (with ``-`` or digits) also inside a
        longer token of the sources (``WS-3`` in ``WS-3's``)."""
        word = word.lower()
        if word.endswith(("'s", "’s")):
            word = word[:-2]
        if word in self.words:
            return True
        return not word.isalpha() and word in self.lowered


_WITH_UNIT = re.compile(r"[\d.,]*\d-?[A-Za-z%°]{0,6}")
"""A figure with its unit glued on: ``16s``, ``2.4GHz``, ``3-year`` (checked as a figure)."""


def _identifier(token: str) -> bool:
    """``SM-1``, ``IP65``, ``HomeKit``, ``USB``: letters with digits, or inner capitals."""
    if not any(ch.isalpha() for ch in token) or _WITH_UNIT.fullmatch(token):
        return False
    digits = any(ch.isdigit() for ch in token)
    capitals = any(ch.isupper() for ch in token[1:])
    return digits or capitals


def unsupported_claims(answer: str, sources: Sequence[str]) -> list[str]:
    """Figures, identifiers and names in ``answer`` found nowhere in ``sources``.

    ``sources`` are the retrieved context blocks and the question. Figures are compared by
    value (``2,160`` = ``2160``, ``3`` = ``three``), identifiers and name words by their
    lower-cased text. Citation markers and list numbering are not claims. Returns each
    unsupported item once, in order.
    """
    ground = Grounding.of(sources)
    body = _LIST_START.sub(" ", _CITATIONS.sub(" ", answer))
    missing: list[str] = []

    def add(item: str) -> None:
        if item not in missing:
            missing.append(item)

    checked_tokens: set[str] = set()
    for match in _TOKEN.finditer(body):
        token = match.group(0).strip(".-/+_")
        if not token or token in checked_tokens:
            continue
        checked_tokens.add(token)
        if _identifier(token):
            if not ground.has_word(token):
                add(token)
            continue
        if any(ch.isdigit() for ch in token):
            for m in _FIGURE.finditer(token):
                if not ground.has_number(_number_value(m.group(0))):
                    add(token)
    for name in _names(body):
        if not all(ground.has_word(w) for w in name.split()):
            add(name)
    return missing


_CAPITALISED = re.compile(r"[A-Z][a-z]+(?:['’]s)?")


def _names(text: str) -> list[str]:
    """Capitalised words not opening a sentence, joined into multi-word names when adjacent
    (``Tidepool Instruments``); a sentence's first word counts only as part of a longer name."""
    names: list[str] = []
    run: list[str] = []
    run_opens_sentence = False
    position = 0
    for match in re.finditer(r"\S+", text):
        raw = match.group(0)
        word = raw.strip("\"'()[],.;:!?*")
        gap = text[position : match.start()]
        position = match.end()
        before = text[max(0, match.start() - 8) : match.start()]
        opens = match.start() == 0 or bool(_SENTENCE_START.search(before))
        capital = bool(_CAPITALISED.fullmatch(word)) and word not in NAME_STOPWORDS
        if capital and run and "\n" not in gap and not opens:
            run.append(word)
        else:
            _close(names, run, run_opens_sentence)
            run = [word] if capital else []
            run_opens_sentence = opens
        if raw.rstrip("\"')").endswith((".", "!", "?", ":", ";", ",")):
            _close(names, run, run_opens_sentence)
            run = []
    _close(names, run, run_opens_sentence)
    return names


def _close(names: list[str], run: list[str], opens_sentence: bool) -> None:
    if not run:
        return
    if opens_sentence and len(run) == 1:
        return
    names.append(" ".join(run))


@dataclass(frozen=True)
class CheckResult:
    """Both checks on one answer, for records and reports."""

    degeneration: Degeneration | None
    unsupported: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "degenerate": self.degeneration.describe() if self.degeneration else None,
            "unsupported": list(self.unsupported),
        }


def check_answer(text: str, sources: Sequence[str] | None = None) -> CheckResult:
    """Degeneration always; grounding when ``sources`` are given."""
    return CheckResult(
        degeneration(text), tuple(unsupported_claims(text, sources)) if sources else ()
    )
