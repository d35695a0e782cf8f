"""The one tokenizer behind lexical retrieval and the relevance threshold.

FTS5 indexes the *output* of :func:`terms` (joined by spaces, read back by ``unicode61``), so
document frequencies from ``fts5vocab`` and the per-chunk term sets computed here in Python
are the same terms. That consistency is what makes a relevance score in [0, 1] possible:
BM25 itself is unbounded and cannot say "nothing here is about the question".
"""

from __future__ import annotations

import re
from functools import lru_cache

_WORD = re.compile(r"[^\W_]+", re.UNICODE)

STOPWORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "tell",
        "please",
        "much",
        "many",
        "also",
        "may",
        "might",
        "must",
        "shall",
        "use",
        "used",
        "using",
        "get",
        "gets",
        "one",
        "two",
    ]
)


@lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """A deliberately small suffix stripper: plurals and -ing/-ed/-e, enough to match
    "batteries"/"battery" and "charging"/"charged"/"charge" without a stemming library."""
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        word = word[:-3]
    elif word.endswith("ed") and len(word) > 4:
        word = word[:-2]
    if word.endswith("e") and len(word) > 4:
        word = word[:-1]
    return word


def terms(text: str) -> list[str]:
    """Lower-cased, stemmed content words of ``text``, in order (stopwords dropped).

    Ingest calls this for every chunk, so it is written for speed: one ``findall`` and a
    cached :func:`stem` (words repeat; at 1M chunks the uncached stemmer was most of the
    ingest time)."""
    return [stem(word) for word in _WORD.findall(text.lower()) if word not in STOPWORDS]
