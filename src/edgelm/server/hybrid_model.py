"""``model="hybrid"`` in the service: the SLM drafts, the LLM refines when a policy says so.

Names this family answers::

    hybrid                                 the catalog's slm and llm tiers, settings' policy
    hybrid:<slm>+<llm>                     an explicit pair
    hybrid@<policy>                        a policy for this request (spec syntax of
    hybrid:<slm>+<llm>@<policy>            :mod:`edgelm.hybrid.policies`), e.g.
                                           hybrid@insufficient,confidence=-0.8

Why the policy travels in the model name rather than in an ``edgelm`` body object: a virtual
model only receives the :class:`~edgelm.types.GenerationRequest` (which must not carry router
concerns), every OpenAI client can set ``model`` (curl, LangChain, the playground; not all can
send ``extra_body``), and the response's ``model`` and the service metrics then name the policy
that produced each answer. Catalog aliases cannot contain ``+`` or ``@``, so names are
unambiguous.

The route comes back as headers (``x-edgelm-route``, ``x-edgelm-reason``, sent once the draft
is judged) and in full as the ``edgelm`` extension of the response (or the final stream chunk).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from edgelm.cost import Prices
from edgelm.errors import EdgelmError, InvalidRequest, ModelNotFound
from edgelm.hybrid.learned import LearnedRouter, load_router
from edgelm.hybrid.pipeline import REFINE_PROMPT, HybridRouter
from edgelm.hybrid.policies import parse_policy, uses_learned
from edgelm.server.virtual import StateView, VirtualAnswer, VirtualModel
from edgelm.types import Chunk, GenerationRequest

PREFIX = "hybrid"


@dataclass(frozen=True)
class HybridName:
    """A parsed ``hybrid[:<slm>+<llm>][@<policy>]`` name; ``None`` parts use the settings."""

    slm: str | None = None
    llm: str | None = None
    policy: str | None = None

    @classmethod
    def parse(cls, name: str) -> HybridName:
        if not (name == PREFIX or name.startswith((PREFIX + ":", PREFIX + "@"))):
            raise InvalidRequest(f"'{name}' is not a hybrid model name", param="model")
        rest = name[len(PREFIX) :]
        pair, _, policy = rest.partition("@")
        if "@" in rest and not policy.strip():
            raise InvalidRequest("the policy after '@' is empty", param="model")
        slm = llm = None
        if pair:
            slm, plus, llm = pair[1:].partition("+")
            if not plus or not slm or not llm:
                raise InvalidRequest(
                    f"a hybrid pair is written hybrid:<slm>+<llm>, got '{name}'", param="model"
                )
        return cls(slm, llm, policy or None)


def name_for(slm: str | None = None, llm: str | None = None, policy: str | None = None) -> str:
    """The model name that asks for a pair and a policy (``None`` keeps the service's)."""
    name = PREFIX
    if slm or llm:
        if not (slm and llm):
            raise InvalidRequest("give both the SLM and the LLM, or neither", param="model")
        name += f":{slm}+{llm}"
    if policy:
        name += f"@{policy}"
    return name


def _header(text: str, limit: int = 200) -> str:
    """Header values must be latin-1 and one line."""
    clean = " ".join(text.split()).encode("ascii", "replace").decode("ascii")
    return clean[:limit]


class HybridModels(VirtualModel):
    """The ``hybrid`` family. Holds no per-request state; prices are read once per service."""

    def __init__(self, prices: Prices | None = None):
        self._prices = prices
        self._learned: LearnedRouter | None = None

    def matches(self, name: str) -> bool:
        return name == PREFIX or name.startswith((PREFIX + ":", PREFIX + "@"))

    def _pair(self, state: StateView, parsed: HybridName) -> tuple[str, str]:
        config = state.settings.router
        slm = parsed.slm or config.slm
        llm = parsed.llm or config.llm
        try:
            slm_entry = state.catalog.resolve(slm) if slm else state.catalog.for_tier("slm")
            llm_entry = state.catalog.resolve(llm) if llm else state.catalog.for_tier("llm")
        except ModelNotFound as exc:
            raise ModelNotFound(f"hybrid: {exc.message}", param="model") from None
        return slm_entry.alias, llm_entry.alias

    def cards(self, state: StateView) -> list[dict[str, Any]]:
        try:
            slm, llm = self._pair(state, HybridName())
        except EdgelmError:
            return []  # no slm/llm tiers in this catalog: hybrid needs an explicit pair
        policy = state.settings.router.policy
        return [
            self.card(
                state,
                PREFIX,
                slm=slm,
                llm=llm,
                policy=policy,
                description=f"{slm} drafts, {llm} refines when '{policy}' fires",
            )
        ]

    def prices(self, state: StateView) -> Prices:
        if self._prices is None:
            self._prices = Prices.load(state.settings.home)
        return self._prices

    def router(self, state: StateView, name: str) -> HybridRouter:
        """The router a name asks for; errors (unknown model, bad policy) are 4xx."""
        parsed = HybridName.parse(name)
        config = state.settings.router
        slm, llm = self._pair(state, parsed)
        policy = parse_policy(parsed.policy or config.policy, config.direct_patterns)
        return HybridRouter(
            state.pool,
            slm,
            llm,
            policy,
            self.prices(state),
            refine_prompt=config.refine_prompt or REFINE_PROMPT,
            learned=self.learned(state) if uses_learned(policy) else None,
        )

    def learned(self, state: StateView) -> LearnedRouter:
        """The learned router ($EDGELM_HOME/router/learned.json, else the shipped one), read
        once per service."""
        if self._learned is None:
            self._learned = load_router(state.settings.home)
        return self._learned

    async def answer(
        self, state: StateView, name: str, request: GenerationRequest
    ) -> VirtualAnswer:
        routed = await self.router(state, name).start(request)
        record = routed.record
        extension: dict[str, Any] = record.to_dict()
        headers = {
            "x-edgelm-route": str(record.route),
            "x-edgelm-reason": _header(record.reason),
            "x-edgelm-slm": record.slm,
            "x-edgelm-llm": record.llm,
        }

        async def chunks() -> AsyncIterator[Chunk]:
            try:
                async with aclosing(routed.chunks) as stream:
                    async for chunk in stream:
                        yield chunk
            finally:
                # Filled in place: the service reads the extension after the last chunk.
                extension.clear()
                extension.update(record.to_dict())

        return VirtualAnswer(chunks=chunks(), extension=extension, headers=headers)
