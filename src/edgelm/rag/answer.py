"""Grounded answers: prompt with numbered context blocks, cite, refuse, escalate.

The flow is the same wherever generation happens (in the service through the pool, or in the
CLI and Chainlit app through the HTTP service), so it is written once against a small
:class:`Generator` protocol that streams :class:`~edgelm.types.Chunk` objects:

1. nothing relevant retrieved → a fixed refusal, **no model call** (it cannot invent);
2. otherwise the first model answers from numbered blocks ``[1]``, ``[2]`` …;
3. its first characters are held back briefly; if the answer turns out insufficient ("the
   context does not say…", or a few words), it is dropped and the fallback (LLM) answers
   instead, streamed as if it had been the only answer. Otherwise the held text is released
   and the rest streams through untouched, so a good SLM answer costs one short delay only.

The ``edgelm`` extension (citations, contexts, refused, escalated, model) is filled into a
dict the caller passed in, so a service can hand the very same dict to its response.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from edgelm.types import Chunk

if TYPE_CHECKING:
    from edgelm.rag.config import RagSettings, RetrievalMode
    from edgelm.rag.retrieve import Hit

SYSTEM_RULE = "Answer using ONLY the provided context. If insufficient, say so."
SYSTEM_PROMPT = (
    f"{SYSTEM_RULE} Cite the context blocks you use with their numbers in square brackets, "
    "like [1] or [2]. Be concise."
)
REFUSAL = (
    "I could not find anything relevant to this question in the documents, so I cannot "
    "answer it from them."
)
HOLD_CHARS = 160
"""Characters held back before deciding that the first answer is good enough to stream."""

_CITE = re.compile(r"\[(\d{1,3})\]")
_INSUFFICIENT = re.compile(
    r"\b(not enough information|insufficient|does(?: not|n't) (?:contain|provide|mention|say|"
    r"include|specify|state)|no (?:relevant )?information|not (?:mentioned|specified|provided|"
    r"stated|included)|(?:cannot|can't|can not|unable to) (?:answer|determine|find|tell)|"
    r"i (?:do not|don't) know|no mention|is not clear from the context)\b",
    re.IGNORECASE,
)


def insufficient(text: str, min_words: int = 3) -> bool:
    """Whether a grounded answer admits the context is not enough, or is too short to help.

    A local stand-in for the hybrid router's policy of the same name; it looks only at the
    text, so it works for any engine (no logprobs needed).
    """
    words = _CITE.sub(" ", text).split()
    return len(words) < min_words or bool(_INSUFFICIENT.search(text))


def cited_numbers(text: str, limit: int) -> list[int]:
    """Block numbers cited in ``text`` (first appearance order), ignoring out-of-range ones."""
    seen: list[int] = []
    for match in _CITE.finditer(text):
        n = int(match.group(1))
        if 1 <= n <= limit and n not in seen:
            seen.append(n)
    return seen


def context_block(n: int, hit: Hit) -> str:
    chunk = hit.chunk
    return f"[{n}] (source: {chunk.source}, {chunk.location})\n{chunk.text.strip()}"


def build_messages(
    question: str, hits: Sequence[Hit], history: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """System rule, earlier turns (if any), then the numbered context and the question."""
    blocks = "\n\n".join(context_block(n, hit) for n, hit in enumerate(hits, 1))
    user = f"Context:\n{blocks}\n\nQuestion: {question}"
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        *history,
        {"role": "user", "content": user},
    ]


def citation(n: int, hit: Hit) -> dict[str, Any]:
    chunk = hit.chunk
    return {
        "n": n,
        "source": chunk.source,
        "location": chunk.location,
        "chunk_id": chunk.chunk_id,
        "text": chunk.text,
    }


def context_entry(hit: Hit) -> dict[str, Any]:
    chunk = hit.chunk
    return {
        "chunk_id": chunk.chunk_id,
        "source": chunk.source,
        "text": chunk.text,
        "score": round(hit.score, 6),
    }


def empty_extension() -> dict[str, Any]:
    return {"citations": [], "contexts": [], "refused": False, "escalated": False, "model": None}


@dataclass
class AnswerOptions:
    """Per-request knobs; defaults come from the ``rag`` settings section."""

    model: str = "slm"
    fallback_model: str | None = "llm"
    max_tokens: int = 300
    temperature: float = 0.3
    top_k: int = 4
    mode: RetrievalMode = "hybrid"
    min_relevance: float = 0.4
    min_similarity: float = 0.6
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_settings(cls, rag: RagSettings, **overrides: Any) -> AnswerOptions:
        base = cls(
            model=rag.model,
            fallback_model=rag.fallback_model,
            max_tokens=rag.max_tokens,
            temperature=rag.temperature,
            top_k=rag.top_k,
            mode=rag.mode,
            min_relevance=rag.min_relevance,
            min_similarity=rag.min_similarity,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


class Generator(Protocol):
    """Streams a chat answer from some model; how (pool, HTTP) is the implementation's business."""

    def stream(
        self, model: str, messages: list[dict[str, Any]], max_tokens: int, temperature: float
    ) -> AsyncIterator[Chunk]: ...

    def canonical(self, model: str) -> str:
        """The name the model is really known by (alias), for the ``model`` field."""
        ...


def _escalates(model: str, fallback: str | None, generator: Generator) -> bool:
    if not fallback or model.startswith("hybrid"):  # the hybrid router escalates on its own
        return False
    try:
        return generator.canonical(model) != generator.canonical(fallback)
    except Exception:
        return model != fallback


async def answer_stream(
    question: str,
    hits: Sequence[Hit],
    generator: Generator,
    options: AnswerOptions,
    extension: dict[str, Any],
) -> AsyncIterator[Chunk]:
    """Stream the grounded answer for already-retrieved ``hits``; fills ``extension``."""
    start = time.perf_counter()
    extension.update(empty_extension())
    extension["contexts"] = [context_entry(h) for h in hits]
    if not hits:
        extension["refused"] = True
        yield Chunk(text=REFUSAL, t=time.perf_counter() - start, finish_reason="stop")
        return
    messages = build_messages(question, hits, options.history)

    def retime(chunk: Chunk) -> Chunk:
        return replace(chunk, t=time.perf_counter() - start)

    model = options.model
    can_escalate = _escalates(model, options.fallback_model, generator)
    held: list[Chunk] = []
    text = ""
    releasing = not can_escalate
    async for chunk in generator.stream(model, messages, options.max_tokens, options.temperature):
        text += chunk.text
        if releasing:
            yield retime(chunk)
            continue
        held.append(chunk)
        if len(text) >= HOLD_CHARS and not insufficient(text):
            releasing = True
            for waiting in held:
                yield retime(waiting)
            held = []
    extension["model"] = generator.canonical(model)  # after the stream: HTTP reports it there
    if held and can_escalate and insufficient(text):
        assert options.fallback_model is not None
        extension["escalated"] = True
        text = ""
        async for chunk in generator.stream(
            options.fallback_model, messages, options.max_tokens, options.temperature
        ):
            text += chunk.text
            yield retime(chunk)
        extension["model"] = generator.canonical(options.fallback_model)
    else:
        for waiting in held:
            yield retime(waiting)
    _finish_citations(extension, hits, text)


def _finish_citations(extension: dict[str, Any], hits: Sequence[Hit], text: str) -> None:
    """Citations are the blocks the answer cites; if it cites none, all blocks it was given
    (the answer was grounded on them). An answer that admits insufficiency cites nothing."""
    if insufficient(text):
        extension["citations"] = []
        return
    numbers = cited_numbers(text, len(hits)) or list(range(1, len(hits) + 1))
    extension["citations"] = [citation(n, hits[n - 1]) for n in numbers]
