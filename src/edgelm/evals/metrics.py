"""Answer-quality metrics, computed locally and deterministically.

Reference QA uses SQuAD's definitions (normalise: lowercase, drop punctuation and the articles
a/an/the, collapse whitespace; take the best score over the accepted answers), so figures are
comparable with the published ones and a grader's disagreement is easy to trace to a string.

RAG metrics follow the definitions Ragas documents, implemented here without Ragas and without
a network, so they run in tests and on machines with no judge model:

- faithfulness: supported claims / claims in the answer. A claim is a sentence of the answer.
  With a ``judge`` callable each claim is asked about; without one, a claim counts as supported
  when at least ``threshold`` of its content words (stop words removed) occur in the contexts.
  The lexical fallback cannot see paraphrase or negation, so treat it as a cheap lower-level
  signal, not as Ragas' LLM figure.
- answer relevancy: Ragas embeds questions regenerated from the answer and averages their cosine
  to the question; with an ``embed`` callable we take the cosine of the answer and the question
  directly, else the token-set overlap of their content words (recall of question words).
- context precision@k: mean over relevant ranks k of precision@k (relevant = the context holds
  an evidence quote or is one of the item's supporting chunks), the "average precision" Ragas'
  context precision reduces to once each context is labelled relevant or not.
- context recall: share of evidence quotes found in the retrieved contexts (by text, or by the
  id of a chunk that holds the quote). Ragas asks an LLM which reference claims the contexts
  support; with quotes as the reference's claims this is the same ratio without the LLM.
- correct refusal: on unanswerable questions, 1 when the service said ``refused`` or the text
  says it cannot answer.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+")

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "which",
        "who",
        "whom",
        "whose",
        "what",
        "when",
        "where",
        "why",
        "how",
        "not",
        "no",
        "do",
        "does",
        "did",
        "has",
        "have",
        "had",
        "i",
        "you",
        "he",
        "she",
        "we",
        "they",
        "them",
        "his",
        "her",
        "our",
        "your",
        "their",
        "my",
        "me",
        "us",
        "so",
        "than",
        "then",
        "too",
        "very",
        "can",
        "could",
        "should",
        "would",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "also",
        "just",
        "about",
        "into",
        "over",
        "under",
        "again",
        "further",
        "once",
        "all",
        "any",
        "both",
        "each",
        "few",
        "more",
        "most",
        "other",
        "some",
        "such",
        "only",
        "own",
        "same",
    ]
)
"""Words that carry no claim; dropped before lexical overlap so "the" does not support a claim."""

REFUSAL_PATTERNS = (
    r"\b(i|we) (do not|don't|cannot|can't|could not|couldn't) (know|find|answer|say|determine)",
    r"\b(cannot|can't|could not|couldn't|unable to) (be )?(answer|determine|find)",
    r"\bnot (mentioned|stated|covered|specified|provided|found|included|available)\b",
    r"\b(no|not enough|insufficient) (information|context|evidence|mention)\b",
    r"\b(does not|doesn't|do not|don't) (say|mention|contain|specify|state|provide|cover)\b",
    r"\bi'?m not (sure|able)\b",
    r"\bunanswerable\b",
)
"""Phrases of an answer that declines; matched case-insensitively on the raw text."""


# ------------------------------------------------------------------ reference QA


def normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _best(pred: str, refs: Sequence[str], score: Callable[[str, str], float]) -> float:
    if not refs:
        return 0.0
    return max(score(pred, ref) for ref in refs)


def exact_match(pred: str, refs: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    return _best(pred, refs, lambda p, r: float(normalize(p) == normalize(r)))


def _f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, refs: Sequence[str]) -> float:
    """SQuAD token F1: harmonic mean of token precision and recall, best over references."""
    return _best(pred, refs, _f1)


def _contains(pred: str, ref: str) -> float:
    r = normalize(ref)
    if not r:
        return 0.0
    return float(f" {r} " in f" {normalize(pred)} ")


def contains_answer(pred: str, refs: Sequence[str]) -> float:
    """1.0 when a normalised reference occurs in the prediction as whole words.

    Small chat models rarely answer with the bare phrase ("The capital is Paris."), so this is
    the fairer headline for them; exact match stays as the strict figure.
    """
    return _best(pred, refs, _contains)


def qa_scores(pred: str, refs: Sequence[str]) -> dict[str, float]:
    """All reference-QA metrics of one answer."""
    return {
        "exact_match": exact_match(pred, refs),
        "f1": token_f1(pred, refs),
        "contains": contains_answer(pred, refs),
    }


# ------------------------------------------------------------------ RAG


def content_words(text: str) -> list[str]:
    """Lowercased word tokens without stop words; the unit of lexical support."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


def split_claims(answer: str) -> list[str]:
    """Sentences of an answer that carry at least one content word (citation marks dropped)."""
    text = re.sub(r"\[\d+\]", "", answer)
    parts = (s.strip() for s in _SENTENCE.split(text))
    return [s for s in parts if s and content_words(s)]


Judge = Callable[[str, str], bool]
"""``judge(claim, context) -> supported?``: an LLM check, plugged in by the caller."""


def faithfulness(
    answer: str,
    contexts: Sequence[str],
    judge: Judge | None = None,
    threshold: float = 0.6,
) -> float | None:
    """Share of the answer's claims supported by the contexts; ``None`` for an empty answer.

    Without a ``judge``, a claim is supported when at least ``threshold`` of its content words
    occur in the joined contexts (see the module docstring for what that misses).
    """
    claims = split_claims(answer)
    if not claims:
        return None
    joined = "\n".join(contexts)
    if judge is not None:
        supported = sum(1 for claim in claims if judge(claim, joined))
        return supported / len(claims)
    vocabulary = set(content_words(joined))
    supported = 0
    for claim in claims:
        words = content_words(claim)
        share = sum(1 for w in words if w in vocabulary) / len(words)
        supported += share >= threshold
    return supported / len(claims)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def answer_relevancy(
    question: str,
    answer: str,
    embed: Callable[[list[str]], list[list[float]]] | None = None,
) -> float:
    """How much the answer is about the question, 0–1.

    With ``embed`` (texts → vectors, e.g. the service's /v1/embeddings): cosine similarity of
    the two, clipped at 0. Without: the share of the question's distinct content words that the
    answer uses, a lexical stand-in that rewards answers staying on the question's topic.
    """
    if not answer.strip():
        return 0.0
    if embed is not None:
        q, a = embed([question, answer])
        return max(0.0, cosine(q, a))
    q_words = set(content_words(question))
    if not q_words:
        return 0.0
    return len(q_words & set(content_words(answer))) / len(q_words)


def _has_quote(context: str, quote: str) -> bool:
    """A context holds an evidence quote when the quote's normalised text occurs in it."""
    q = normalize(quote)
    return bool(q) and q in normalize(context)


def average_precision(relevant: Sequence[bool]) -> float:
    """``sum_k precision@k * rel_k / (relevant in the list)``; 0 when nothing is relevant.

    Ragas' context precision@k reduces to this over the ranked contexts' relevance flags.
    """
    hits = 0
    total = 0.0
    for rank, flag in enumerate(relevant, 1):
        if flag:
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


def context_precision(
    contexts: Sequence[str],
    quotes: Sequence[str],
    k: int | None = None,
    chunk_ids: Sequence[str | None] = (),
    supporting: Sequence[str] = (),
) -> float:
    """Average precision of the top-``k`` contexts. A context is relevant when it holds an
    evidence quote or, given the contexts' ``chunk_ids``, is one of the ``supporting`` chunks
    (which catches a quote cut in two by a chunk boundary)."""
    ranked = list(contexts)[: k or len(contexts)]
    ids = list(chunk_ids) + [None] * (len(ranked) - len(chunk_ids))
    wanted = set(supporting)
    return average_precision(
        [
            (ids[i] is not None and ids[i] in wanted) or any(_has_quote(c, q) for q in quotes)
            for i, c in enumerate(ranked)
        ]
    )


def context_recall(
    contexts: Sequence[str],
    quotes: Sequence[str],
    chunk_ids: Sequence[str | None] = (),
    evidence_chunks: Sequence[Sequence[str]] = (),
) -> float | None:
    """Share of evidence quotes found in the retrieved contexts; None without quotes.

    A quote is found when a context holds its text or, given ``evidence_chunks`` (the ids of the
    chunks holding each quote, in the order of ``quotes``), one of those chunks was retrieved.
    """
    if not quotes:
        return None
    retrieved = {c for c in chunk_ids if c}
    found = 0
    for n, quote in enumerate(quotes):
        by_id = n < len(evidence_chunks) and bool(retrieved & set(evidence_chunks[n]))
        found += by_id or any(_has_quote(c, quote) for c in contexts)
    return found / len(quotes)


def is_refusal(answer: str, refused: bool | None = None) -> bool:
    """The service flagged a refusal, or the text says it cannot answer (or is empty)."""
    if refused:
        return True
    text = answer.strip().lower().replace("’", "'")
    if not text:
        return True
    return any(re.search(p, text) for p in REFUSAL_PATTERNS)


def rag_scores(
    question: str,
    answer: str,
    extension: dict[str, Any] | None,
    answerable: bool,
    evidence: Sequence[dict[str, Any]],
    k: int | None = None,
    judge: Judge | None = None,
    embed: Callable[[list[str]], list[list[float]]] | None = None,
) -> dict[str, float | None]:
    """The RAG metrics of one answer from the service's ``edgelm`` extension.

    Unanswerable questions are scored only on refusal (``correct_refusal``); answerable ones on
    the retrieval and generation metrics plus ``false_refusal``.
    """
    ext = extension or {}
    entries = [c for c in ext.get("contexts") or [] if isinstance(c, dict)]
    contexts = [str(c.get("text", "")) for c in entries]
    ids = [c.get("chunk_id") for c in entries]
    refused = is_refusal(answer, ext.get("refused"))
    if not answerable:
        return {"correct_refusal": float(refused)}
    quoted = [e for e in evidence if e.get("quote")]
    quotes = [str(e["quote"]) for e in quoted]
    supporting = [cid for e in quoted for cid in e.get("chunks") or []]
    return {
        "faithfulness": None if refused else faithfulness(answer, contexts, judge),
        "answer_relevancy": answer_relevancy(question, answer, embed),
        "context_precision": context_precision(contexts, quotes, k, ids, supporting)
        if quotes
        else None,
        "context_recall": context_recall(
            contexts, quotes, ids, [e.get("chunks") or [] for e in quoted]
        ),
        "false_refusal": float(refused),
    }
