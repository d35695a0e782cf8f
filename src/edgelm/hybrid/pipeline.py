"""The hybrid pipeline: the SLM drafts, a policy decides, the LLM refines only when needed.

Routes:

* ``draft``  — the SLM's answer is returned as it is;
* ``refine`` — the question and the draft go to the LLM, whose answer is returned;
* ``direct`` — the LLM answers the question alone: a question-only rule fired before any
  drafting (no SLM time spent), or the draft declined to answer (nothing in it to refine).

Both models are called through :meth:`edgelm.pool.ModelPool.stream`, so loading, queueing and
cancellation behave exactly as for a direct request. The draft is buffered while the policy
decides (a client must never see an answer that is then replaced); the LLM's output streams
live. When the policy has a ``degenerate`` term, the draft is read by a
:class:`~edgelm.answer_checks.LoopMonitor` as it streams and stopped (the SLM's generation is
cancelled) as soon as a loop is certain, so a looping draft costs a few repeats rather than
``max_tokens``, and the policy then sends the question to the LLM. Every answer carries a :class:`RouteRecord`: route, the policy's measured value against
its threshold, TTFT and total time of each model, tokens of each, and the blended cost.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from edgelm.answer_checks import LoopMonitor
from edgelm.cost import Prices, local_cost_per_request
from edgelm.engines.base import Fold
from edgelm.errors import EdgelmError, InvalidRequest
from edgelm.hybrid.learned import LearnedRouter
from edgelm.hybrid.policies import (
    Decision,
    Draft,
    Policy,
    Route,
    Verdict,
    bind_learned,
    decide,
    decide_before_draft,
    early_cut,
    has_early_terms,
    uses_learned,
    watches_loops,
)
from edgelm.pool import ModelPool
from edgelm.types import Chunk, GenerationRequest, Message

REFINE_PROMPT = """\
Improve a draft answer written by a smaller assistant. The draft may be right, incomplete, or \
wrong. Keep what it gets right, correct what it gets wrong, and add anything important that is \
missing; if it is wrong or says it cannot answer, ignore it and answer the question yourself. \
Reply with the final answer only, as if answering the question directly: do not mention the \
draft or describe your changes, and make it as short or as detailed as the question calls for.

Question:
{question}

Draft answer:
{draft}"""
# The instructions come first and the question and draft last: refine requests then share one
# prefix (system prompt + instructions), which the llama.cpp engine's prefix reuse can skip when
# refinements follow each other. On 2 cores the LLM's prompt time dominates a short refine.


def question_of(request: GenerationRequest) -> str:
    """The text the policies judge: the last user turn of a chat."""
    if request.messages is None:
        raise InvalidRequest(
            "hybrid models answer chat requests only; use /v1/chat/completions", param="model"
        )
    for message in reversed(request.messages):
        if message.role == "user":
            return message.text()
    raise InvalidRequest("the conversation has no user message to answer", param="messages")


def refine_messages(
    messages: list[Message], question: str, draft: str, template: str = REFINE_PROMPT
) -> list[Message]:
    """The conversation for the LLM: earlier turns as they were, the last user turn replaced by
    the refine instruction. ``str.replace`` rather than ``format`` so braces in a question
    (code, JSON) cannot break the template."""
    last_user = max(i for i, m in enumerate(messages) if m.role == "user")
    content = template.replace("{question}", question.strip()).replace("{draft}", draft.strip())
    return [*messages[:last_user], Message(role="user", content=content)]


@dataclass
class Leg:
    """One model call of a hybrid answer, timed inside the engine (queueing excluded)."""

    model: str
    role: str
    ttft_s: float | None = None
    total_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    started_s: float = 0.0
    """When the call started, in seconds since the hybrid request started."""

    @classmethod
    def of(cls, model: str, role: str, fold: Fold, started_s: float) -> Leg:
        timing = fold.timing()
        usage = fold.usage()
        return cls(
            model=model,
            role=role,
            ttft_s=timing.ttft_s,
            total_s=timing.total_s,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            finish_reason=fold.finish if fold.last is not None else None,
            started_s=started_s,
        )

    def to_dict(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 2)

        return {
            "model": self.model,
            "ttft_ms": ms(self.ttft_s),
            "total_ms": ms(self.total_s),
            "started_ms": ms(self.started_s),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }


@dataclass
class RouteRecord:
    """Everything about how one hybrid answer was produced; the ``edgelm`` extension."""

    slm: str
    llm: str
    policy: str
    route: Route | None = None
    reason: str = ""
    decision: Decision | None = None
    draft: Leg | None = None
    draft_text: str | None = None
    draft_mean_logprob: float | None = None
    draft_min_logprob: float | None = None
    draft_cut: str | None = None
    """Why the draft was stopped before its end (a certain loop, an early check), if it was."""
    draft_token_logprobs: tuple[float, ...] = ()
    draft_token_s: tuple[float, ...] = ()
    """Each draft token's log-probability and when the SLM produced it (seconds since the
    draft started): what ``edgelm hybrid eval`` needs to replay early checks offline."""
    second: Leg | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    decide_s: float = 0.0
    cost: dict[str, Any] = field(default_factory=dict)
    complete: bool = False

    def legs(self) -> list[Leg]:
        return [leg for leg in (self.draft, self.second) if leg is not None]

    def to_dict(self) -> dict[str, Any]:
        verdict = self.decision.verdict if self.decision else None
        data: dict[str, Any] = {
            "route": self.route,
            "reason": self.reason,
            "policy": self.policy,
            "fired": verdict.policy if verdict and verdict.fired else None,
            "signals": [v.to_dict() for v in verdict.leaves()] if verdict else [],
            "slm": self.slm,
            "llm": self.llm,
            "draft": self.draft.to_dict() if self.draft else None,
            "draft_logprob": {
                "mean": _r(self.draft_mean_logprob),
                "min": _r(self.draft_min_logprob),
                "tokens": [round(v, 4) for v in self.draft_token_logprobs],
                "token_ms": [round(t * 1000, 2) for t in self.draft_token_s],
            },
            "refine" if self.route == "refine" else "direct": (
                self.second.to_dict() if self.second else None
            ),
            "draft_cut": self.draft_cut,
            "decide_ms": round(self.decide_s * 1000, 3),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 2),
            "total_ms": None if self.total_s is None else round(self.total_s * 1000, 2),
            "tokens": {
                "slm": _tokens(self.draft),
                "llm": _tokens(self.second),
            },
            "cost": self.cost,
            "complete": self.complete,
        }
        if self.route != "draft" and self.draft_text is not None:
            data["draft"] = {**(data["draft"] or {}), "text": self.draft_text}
        return data


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _tokens(leg: Leg | None) -> dict[str, int]:
    if leg is None:
        return {"prompt": 0, "completion": 0}
    return {"prompt": leg.prompt_tokens, "completion": leg.completion_tokens}


def blended_cost(prices: Prices, legs: list[Leg]) -> dict[str, Any]:
    """Local cost from the time each model was busy, and what the same tokens would cost at
    each cloud price in the prices file. Per request, in the prices' currency."""
    busy = sum(leg.total_s for leg in legs)
    local = local_cost_per_request(prices, busy)
    prompt = sum(leg.prompt_tokens for leg in legs)
    completion = sum(leg.completion_tokens for leg in legs)
    return {
        "currency": prices.local.currency,
        "busy_s": round(busy, 4),
        "local": local["total"],
        "local_energy": local["energy"],
        "local_hardware": local["hardware"],
        "cloud_equivalent": {c.name: c.per_request(prompt, completion) for c in prices.cloud},
    }


@dataclass
class RoutedAnswer:
    """The chunks the client sees and the record, which is complete once they are consumed."""

    chunks: AsyncIterator[Chunk]
    record: RouteRecord


class HybridRouter:
    """One SLM/LLM pair with one policy, over a model pool."""

    def __init__(
        self,
        pool: ModelPool,
        slm: str,
        llm: str,
        policy: Policy,
        prices: Prices,
        refine_prompt: str = REFINE_PROMPT,
        clock: Callable[[], float] = time.perf_counter,
        learned: LearnedRouter | None = None,
    ):
        self.learned = learned
        self.pool = pool
        self.slm = slm
        self.llm = llm
        self.policy = policy
        self.prices = prices
        self.refine_prompt = refine_prompt
        self.clock = clock

    async def start(self, request: GenerationRequest) -> RoutedAnswer:
        """Draft (unless a question rule sends it straight to the LLM) and decide.

        Returns once the route is known, so the caller can send the route as headers; the LLM,
        when needed, runs while the returned chunks are consumed. Closing those chunks early
        cancels whichever model is generating.
        """
        t0 = self.clock()
        question = question_of(request)
        record = RouteRecord(self.slm, self.llm, self.policy.spec())
        policy = self.policy
        if uses_learned(policy):  # scored before any draft: a predicted miss costs no draft
            policy = await self._bind_learned(question)
        early = decide_before_draft(policy, question)
        if early is not None and early.route == "direct":
            self._decided(record, early, self.clock() - t0)
            return RoutedAnswer(self._second(request, request, "direct", t0, record), record)

        draft_request = request.model_copy(
            update={"logprobs": await self._slm_logprobs(), "top_logprobs": 0}
        )
        fold = Fold()
        buffered: list[Chunk] = []
        started = self.clock() - t0
        monitor = LoopMonitor() if watches_loops(self.policy) else None
        watch_early = early is None and has_early_terms(policy)
        values: list[float] = []
        times: list[float] = []
        tokens = 0
        cut: Decision | None = None
        async with aclosing(self.pool.stream(self.slm, draft_request)) as stream:
            async for chunk in stream:
                fold.add(chunk)
                buffered.append(chunk)
                values.extend(lp.logprob for lp in chunk.logprobs)
                tokens += max(len(chunk.token_ids), len(chunk.logprobs))
                times.extend([chunk.t] * (tokens - len(times)))
                if monitor is not None and monitor.push(chunk.text) is not None:
                    break  # leaving the block closes the stream: the pool cancels the SLM
                if watch_early and (cut := early_cut(policy, tokens, values)) is not None:
                    break  # an unsure start or a spent budget: the LLM answers instead
        record.draft = Leg.of(self.slm, "draft", fold, started)
        last = fold.last
        if monitor is not None and monitor.found and last is not None and not last.finish_reason:
            record.draft_cut = monitor.found.describe()
        elif cut is not None:
            record.draft_cut = cut.verdict.detail
        if record.draft_cut is not None and last is not None and not last.finish_reason:
            record.draft.finish_reason = "cancelled"
            buffered.append(replace(last, text="", token_ids=[], logprobs=[], finish_reason="stop"))
        draft = Draft(fold.text, tuple(values), fold.finish, tokens=tokens)
        record.draft_text = draft.text
        record.draft_mean_logprob = draft.mean_logprob
        record.draft_min_logprob = draft.min_logprob
        record.draft_token_logprobs = draft.logprobs
        record.draft_token_s = tuple(times)

        before = self.clock()
        if early is not None:
            decision = early
        elif cut is not None:
            decision = cut
        else:
            decision = decide(policy, question, draft)
        if record.draft_cut is not None and decision.route != "direct":
            decision = _escalate_cut(decision, record.draft_cut)
        self._decided(record, decision, self.clock() - before)
        if decision.route == "draft":
            chunks = self._replay(buffered, request.logprobs, t0, record)
        elif decision.route == "refine":
            assert request.messages is not None
            messages = refine_messages(request.messages, question, draft.text, self.refine_prompt)
            second = request.model_copy(update={"messages": messages})
            chunks = self._second(request, second, "refine", t0, record)
        else:
            chunks = self._second(request, request, "direct", t0, record)
        return RoutedAnswer(chunks, record)

    async def _bind_learned(self, question: str) -> Policy:
        """The policy with the learned router's probability for ``question``: its embedding
        comes from the pool like any /v1/embeddings request. Without a router or an embedder
        the learned terms stay unbound and do not fire (the note says why)."""
        if self.learned is None:
            return bind_learned(self.policy, None, "no learned router")
        try:
            vectors, _ = await self.pool.embed(self.learned.embedder, [question])
            probability = float(self.learned.predict([question], vectors)[0])
        except EdgelmError as exc:
            return bind_learned(self.policy, None, f"embedder unavailable: {exc.message}")
        return bind_learned(self.policy, probability)

    async def _slm_logprobs(self) -> bool:
        """Ask the SLM for logprobs whenever it can give them (one log-softmax row per token in
        the llama.cpp engine), so every record carries the confidence signal, whatever the
        policy; the eval relies on that."""
        loaded = await self.pool.get(self.slm)
        return bool(loaded.engine.supports_logprobs)

    def _decided(self, record: RouteRecord, decision: Decision, spent: float) -> None:
        record.decision = decision
        record.route = decision.route
        record.reason = decision.reason
        record.decide_s = spent

    def _finish(self, record: RouteRecord, t0: float) -> None:
        record.total_s = self.clock() - t0
        record.cost = blended_cost(self.prices, record.legs())

    async def _replay(
        self, buffered: list[Chunk], keep_logprobs: bool, t0: float, record: RouteRecord
    ) -> AsyncIterator[Chunk]:
        """Send the buffered draft. The client gets it in one burst, so the delivery times say
        nothing about the SLM; the chunks keep the times the SLM produced them at (on the
        hybrid request's clock), which is what the response's ``timings`` then describe. What
        the client waited is ``ttft_s`` in the route record."""
        started = record.draft.started_s if record.draft is not None else 0.0
        for chunk in buffered:
            if record.ttft_s is None and chunk.text:
                record.ttft_s = self.clock() - t0
            yield replace(
                chunk, t=started + chunk.t, logprobs=chunk.logprobs if keep_logprobs else []
            )
        record.complete = True
        self._finish(record, t0)

    async def _second(
        self,
        original: GenerationRequest,
        request: GenerationRequest,
        role: str,
        t0: float,
        record: RouteRecord,
    ) -> AsyncIterator[Chunk]:
        """Stream the LLM live; chunk times count from the start of the hybrid request, so the
        service's TTFT is what the client waited, draft included."""
        fold = Fold()
        started = self.clock() - t0
        try:
            async with aclosing(self.pool.stream(self.llm, request)) as stream:
                async for chunk in stream:
                    fold.add(chunk)
                    t = self.clock() - t0
                    if record.ttft_s is None and chunk.text:
                        record.ttft_s = t
                    yield replace(chunk, t=t, logprobs=chunk.logprobs if original.logprobs else [])
            record.complete = True
        finally:
            record.second = Leg.of(self.llm, role, fold, started)
            self._finish(record, t0)


def _escalate_cut(decision: Decision, cut: str) -> Decision:
    """A draft stopped mid-loop is unfinished text: it must never reach the user, nor be
    refined (it holds nothing worth keeping), whatever the rest of the policy said (a
    ``degenerate`` term inside ``&`` can leave the combined verdict at "draft"). The LLM
    answers afresh; the policy's own verdict stays in the signals."""
    verdict = Verdict(
        "degenerate",
        True,
        "direct",
        cut.split(":", 1)[0],
        "loop|markers|empty",
        f"degenerate: {cut} (draft cut)",
        signals=(decision.verdict,),
    )
    return Decision("direct", verdict)
