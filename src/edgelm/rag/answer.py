"""Grounded answers: prompt with numbered context blocks, cite, refuse, escalate.

The flow is the same wherever generation happens (in the service through the pool, or in the
CLI and Chainlit app through the HTTP service), so it is written once against a small
:class:`Generator` protocol that streams :class:`~edgelm.types.Chunk` objects:

1. nothing relevant retrieved → a fixed refusal, **no model call** (it cannot invent);
2. otherwise the first model answers from numbered blocks ``[1]``, ``[2]`` …;
3. whether that answer is good enough is decided by the hybrid router's escalation policies
   (setting ``rag.fallback_policy``, same spec language as ``router.policy``), with the
   ``insufficient`` policy also taught how grounded answers decline ("the context does not
   mention…"). A question-only rule (``keywords=…``) sends the question straight to the
   fallback model. A policy that judges only the opening (``insufficient``) sees the first
   :data:`HOLD_CHARS` characters held back; if it does not fire they are released and the rest
   streams through untouched, so a good SLM answer costs one short delay. A policy that needs
   the whole draft (``length``, ``confidence``) holds all of it, as the hybrid router does.
   When the policy fires, the draft is dropped and the fallback (LLM) answers from the same
   context, streamed as if it had been the only answer;
4. the policy's answer checks (``degenerate``, ``unsupported``; see
   :mod:`edgelm.answer_checks`) guard every answer, not only the first: each stream is read by
   a loop monitor and stopped as soon as a loop is certain, and an answer that still fails a
   check when there is nowhere left to escalate (no fallback, or the fallback's own answer) is
   replaced by the refusal. Those checks need the whole answer, so with them in the policy
   an answer is held until it ends: an invented figure must not reach the user first.

The ``edgelm`` extension (citations, contexts, refused, escalated, model) is filled into a
dict the caller passed in, so a service can hand the very same dict to its response.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from edgelm.answer_checks import LoopMonitor
from edgelm.hybrid.policies import (
    INSUFFICIENT_PATTERNS,
    AllOf,
    AnyOf,
    Draft,
    Insufficient,
    Keywords,
    Never,
    Policy,
    Verdict,
    answer_checks,
    decide,
    decide_before_draft,
    parse_policy,
    watches_loops,
)
from edgelm.types import Chunk

if TYPE_CHECKING:
    from edgelm.rag.types import Hit
    from edgelm.settings import RagSettings, RetrievalMode

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

GROUNDED_DECLINE_PATTERNS: tuple[str, ...] = (
    r"\b(?:the )?(?:provided |given )?(?:context|documents?|text|passages?|sources?) "
    r"(?:does|do)(?: not|n't) (?:contain|provide|mention|say|include|specify|state|cover|give)",
    r"\bnot (?:mentioned|specified|provided|stated|included|covered) in the "
    r"(?:provided |given )?(?:context|documents?|text)",
    r"\bno (?:relevant )?(?:information|mention|details?)\b",
    r"\bis not clear from the (?:context|documents?)",
    r"\b(?:cannot|can't|can not) be (?:answered|determined|found)",
)
"""How grounded answers decline, added to the router's ``insufficient`` phrases."""


def grounded(policy: Policy) -> Policy:
    """``policy`` with every ``insufficient`` term also matching grounded declines."""
    if isinstance(policy, Insufficient):
        return Insufficient(policy.min_chars, INSUFFICIENT_PATTERNS + GROUNDED_DECLINE_PATTERNS)
    if isinstance(policy, AnyOf | AllOf):
        policy.children = [grounded(child) for child in policy.children]
    return policy


def fallback_policy(spec: str, topic_patterns: Sequence[str] = ()) -> Policy:
    """The router policy for ``spec`` (e.g. ``insufficient,confidence=-0.8``), grounded."""
    return grounded(parse_policy(spec, topic_patterns))


def judges_opening(policy: Policy) -> bool:
    """Whether ``policy`` decides from the start of a draft alone (so the rest may stream)."""
    if isinstance(policy, AnyOf | AllOf):
        return all(judges_opening(child) for child in policy.children)
    return isinstance(policy, Insufficient | Keywords | Never)


_DECLINES = grounded(Insufficient())


def insufficient(text: str) -> bool:
    """Whether a grounded answer declines (or is next to empty): the ``insufficient`` policy."""
    verdict = _DECLINES.check("", Draft(text))
    return bool(verdict and verdict.fired)


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
    return {
        "citations": [],
        "contexts": [],
        "refused": False,
        "escalated": False,
        "escalation_reason": None,
        "model": None,
        "checks": [],
    }


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
    fallback_policy: str = "insufficient"
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
            fallback_policy=rag.fallback_policy,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


class Generator(Protocol):
    """Streams a chat answer from some model; how (pool, HTTP) is the implementation's business."""

    def stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        temperature: float,
        logprobs: bool = False,
    ) -> AsyncIterator[Chunk]:
        """Stream the answer; with ``logprobs``, chunks carry token log-probabilities when the
        model can give them (confidence policies need them; others ignore them)."""
        ...

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

    sources = tuple(hit.chunk.text for hit in hits)
    policy = fallback_policy(options.fallback_policy)
    checks = answer_checks(policy)
    cut_loops = watches_loops(policy)
    model = options.model
    can_escalate = _escalates(model, options.fallback_model, generator)

    async def read(name: str, logprobs: bool) -> AsyncIterator[Answer]:
        """Stream ``name``'s answer, stopping it once it loops: yields the answer after each
        chunk, and once more at the end (the caller releases what it wants to)."""
        answer = Answer(name)
        monitor = LoopMonitor() if cut_loops else None
        stream = generator.stream(
            name, messages, options.max_tokens, options.temperature, logprobs=logprobs
        )
        async with aclosing(stream) as chunks:  # closing it stops the model
            async for chunk in chunks:
                answer.add(chunk)
                yield answer
                found = monitor.push(chunk.text) if monitor is not None else None
                if found is not None:
                    if not chunk.finish_reason:
                        answer.cut = found.describe()
                    break
        yield answer

    def failed(answer: Answer, terms: list[Policy]) -> Verdict | None:
        """The first answer check that ``answer`` fails, if any."""
        draft = answer.draft(sources)
        for term in terms:
            verdict = term.check(question, draft)
            if verdict is not None and verdict.fired:
                return verdict
        return None

    def note(answer: Answer, verdict: Verdict) -> None:
        extension["checks"].append(
            {"model": generator.canonical(answer.model), **verdict.to_dict(), "cut": answer.cut}
        )

    async def last_resort(name: str) -> AsyncIterator[Chunk]:
        """An answer nothing comes after: held and checked when the policy has checks, and
        replaced by the refusal when it fails one."""
        answer = Answer(name)
        async for answer in read(name, False):
            if not checks:
                for chunk in answer.held(retime):
                    yield chunk
        extension["model"] = generator.canonical(name)
        verdict = failed(answer, checks) if checks else None
        if verdict is None:
            for chunk in answer.held(retime):
                yield chunk
            _finish_citations(extension, hits, answer.text)
            return
        note(answer, verdict)
        extension["refused"] = True
        yield Chunk(text=REFUSAL, t=time.perf_counter() - start, finish_reason="stop")
        extension["citations"] = []

    async def second(reason: str) -> AsyncIterator[Chunk]:
        assert options.fallback_model is not None
        extension["escalated"] = True
        extension["escalation_reason"] = reason
        async for chunk in last_resort(options.fallback_model):
            yield chunk

    if not can_escalate:
        async for chunk in last_resort(model):
            yield chunk
        return
    early = decide_before_draft(policy, question)
    if early is not None and early.route == "direct":
        async for chunk in second(early.reason):
            yield chunk
        return
    opening_only = judges_opening(policy)
    answer = Answer(model)
    releasing = False
    async for answer in read(model, policy.needs_logprobs):
        if not releasing and opening_only and len(answer.text) >= HOLD_CHARS:
            # the opening passed: let the rest stream
            releasing = not decide(policy, question, answer.draft(sources)).verdict.fired
        if releasing:
            for chunk in answer.held(retime):
                yield chunk
    extension["model"] = generator.canonical(model)  # after the stream: HTTP reports it there
    if not releasing:
        decision = decide(policy, question, answer.draft(sources))
        if decision.route != "draft":
            if decision.verdict.policy in ("degenerate", "unsupported"):
                note(answer, decision.verdict)
            async for chunk in second(decision.reason):
                yield chunk
            return
        for waiting in answer.held(retime):
            yield waiting
    _finish_citations(extension, hits, answer.text)


@dataclass
class Answer:
    """One model's answer as it streams: its chunks, text, logprobs, and why it was cut."""

    model: str
    chunks: list[Chunk] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    cut: str | None = None
    _released: int = 0
    _closed: bool = False

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.text += chunk.text
        self.logprobs.extend(lp.logprob for lp in chunk.logprobs)

    @property
    def finish_reason(self) -> str | None:
        if self.cut:
            return "cancelled"
        return self.chunks[-1].finish_reason if self.chunks else None

    def draft(self, sources: tuple[str, ...]) -> Draft:
        return Draft(self.text, tuple(self.logprobs), self.finish_reason, sources=sources)

    def held(self, retime: Callable[[Chunk], Chunk]) -> list[Chunk]:
        """The chunks not yet released (retimed), marked as released; a cut answer ends with
        a closing chunk so clients still see a finish reason."""
        out = [retime(c) for c in self.chunks[self._released :]]
        self._released = len(self.chunks)
        if self.cut and self.chunks and not self._closed:
            self._closed = True
            last = retime(self.chunks[-1])
            out.append(replace(last, text="", token_ids=[], logprobs=[], finish_reason="stop"))
        return out


def _finish_citations(extension: dict[str, Any], hits: Sequence[Hit], text: str) -> None:
    """Citations are the blocks the answer cites; if it cites none, all blocks it was given
    (the answer was grounded on them). An answer that admits insufficiency cites nothing."""
    if insufficient(text):
        extension["citations"] = []
        return
    numbers = cited_numbers(text, len(hits)) or list(range(1, len(hits) + 1))
    extension["citations"] = [citation(n, hits[n - 1]) for n in numbers]
