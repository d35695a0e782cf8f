"""Virtual models: names the service answers without a model file of their own.

The hybrid router (``hybrid``, ``hybrid:<slm>+<llm>``) and RAG (``rag:<collection>``) are
served through the same OpenAI routes as real models. A virtual model turns a request into a
stream of chunks (usually by calling real models through the pool) and may attach an
``extension`` — route, citations, timings — that the service returns under the ``edgelm``
key of the response (or the final stream chunk) and, for short facts, as response headers.
OpenAI clients ignore both; edgelm's own tools read them.

A virtual model sees the running service through :class:`StateView`, the part of
:class:`edgelm.server.state.ServiceState` it may use; the state holds the virtual models, so
naming the state itself here would make the two modules import each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from edgelm.types import Chunk, GenerationRequest

if TYPE_CHECKING:
    from edgelm.catalog import Catalog
    from edgelm.pool import ModelPool
    from edgelm.settings import Settings


class StateView(Protocol):
    """What a virtual model may use of the running service (``ServiceState`` provides it)."""

    settings: Settings
    catalog: Catalog
    pool: ModelPool
    started_at: float

    def find_virtual(self, name: str) -> VirtualModel | None:
        """The virtual model family that serves ``name``, if any."""
        ...


@dataclass
class VirtualAnswer:
    """What a virtual model returns: the chunks to stream, plus side information.

    ``extension`` may still be filled in while ``chunks`` is consumed; the service reads it
    after the last chunk. ``headers`` must be final when returned (they are sent first).
    """

    chunks: AsyncIterator[Chunk]
    extension: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class VirtualModel(ABC):
    """A family of virtual model names, e.g. every name starting with ``rag:``."""

    supports_tools: ClassVar[bool] = False
    """Whether it takes ``tools``; the service refuses them with a 400 naming the field if
    not (the hybrid router and RAG answer from prompts of their own)."""
    content_parts: ClassVar[tuple[str, ...]] = ("text", "refusal")
    """Message content part types it reads; others are refused, naming the part."""
    ignores: ClassVar[tuple[str, ...]] = ()
    """Request fields (of :class:`~edgelm.types.GenerationRequest`) it cannot honour: a
    request that sets one to anything but its default is refused with a 400 naming it,
    rather than answered as if it had not been sent."""

    @abstractmethod
    def matches(self, name: str) -> bool:
        """Whether ``name`` (as sent in a request's ``model``) belongs to this family."""

    @abstractmethod
    def cards(self, state: StateView) -> list[dict[str, Any]]:
        """Entries for ``GET /v1/models`` (OpenAI model objects with edgelm's extra fields)."""

    @abstractmethod
    async def answer(
        self, state: StateView, name: str, request: GenerationRequest
    ) -> VirtualAnswer:
        """Start answering; raise an EdgelmError for a bad name or request."""

    def card(self, state: StateView, model_id: str, **extra: Any) -> dict[str, Any]:
        """A model object in the same shape as real models' cards."""
        return {
            "id": model_id,
            "object": "model",
            "created": int(state.started_at),
            "owned_by": "edgelm",
            "name": model_id,
            "tier": "virtual",
            "engine": "virtual",
            "loaded": True,
            "cached": True,
            **extra,
        }
