"""The RAG section of the settings schema (``rag.*`` keys).

It lives here, free of imports beyond pydantic, so ``edgelm.settings`` can include it as
``rag: RagSettings`` without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from edgelm.settings import Settings

RetrievalMode = Literal["lexical", "dense", "hybrid"]


class RagSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    collection: str = Field("default", description="Collection used when none is named.")
    chunk_size: int = Field(800, ge=100, description="Largest chunk, in characters.")
    overlap: int = Field(120, ge=0, description="Characters repeated between neighbour chunks.")
    embed_model: str | None = Field(
        None,
        description="Model serving /v1/embeddings for dense retrieval (none: lexical only).",
    )
    top_k: int = Field(4, ge=1, le=50, description="Context blocks given to the model.")
    mode: RetrievalMode = Field(
        "hybrid", description="Retrieval: lexical (BM25), dense, or hybrid (RRF of both)."
    )
    min_relevance: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="Least share of the question's (IDF-weighted) terms a chunk must contain.",
    )
    min_similarity: float = Field(
        0.6, ge=-1.0, le=1.0, description="Least cosine similarity for a dense-only hit."
    )
    model: str = Field("slm", description="Model that writes grounded answers.")
    fallback_model: str | None = Field(
        "llm", description="Model asked when the first answer is insufficient (none: never)."
    )
    fallback_policy: str = Field(
        "degenerate,unsupported,insufficient",
        description="When the first answer escalates: a hybrid-router policy spec, e.g. "
        "'insufficient' or 'insufficient,confidence=-0.8' (see router.policy). Its "
        "'degenerate' and 'unsupported' terms also guard the last answer (the fallback's, or "
        "the only one): a looping, marker-only or empty answer, or one stating figures or "
        "names the context lacks, is replaced by the refusal; answers are then held until "
        "they end.",
    )
    max_tokens: int = Field(300, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(0.3, ge=0.0, le=2.0, description="Sampling temperature.")

    @field_validator("fallback_policy")
    @classmethod
    def _policy_parses(cls, spec: str) -> str:
        """A bad spec is a settings error now, not a 400 on the first question."""
        from edgelm.errors import EdgelmError
        from edgelm.router.policies import parse_policy

        try:
            parse_policy(spec)
        except EdgelmError as exc:
            raise ValueError(exc.message) from None
        return spec


def rag_settings(settings: Settings) -> RagSettings:
    """The ``rag`` section of ``settings``."""
    return settings.rag
