"""Where dense vectors come from: the service's ``/v1/embeddings`` or an engine in-process.

Both sit behind one small protocol so ingest, the CLI and tests do not care which; the
collection records the embedding model's name, and queries must be embedded by the same one.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from edgelm.client import ServiceUnavailable, _error_from
from edgelm.engines.base import Engine
from edgelm.errors import EdgelmError


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order."""
        ...


class ServiceEmbedder:
    """Embeddings from a running edgelm (or any OpenAI-compatible) service, in batches."""

    def __init__(
        self,
        model: str,
        endpoint: str,
        api_key: str | None = None,
        batch: int = 64,
        transport: httpx.BaseTransport | None = None,
    ):
        self.name = model
        self.batch = batch
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=endpoint.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(600.0, connect=5.0),
            transport=transport,
        )

    def embed(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), self.batch):
            try:
                response = self.http.post(
                    "/v1/embeddings", json={"model": self.name, "input": texts[i : i + self.batch]}
                )
            except httpx.TransportError as exc:
                raise ServiceUnavailable(
                    f"cannot reach the service at {self.http.base_url} for embeddings: {exc}; "
                    "start it with: edgelm service start"
                ) from None
            if response.status_code >= 400:
                raise _error_from(response)
            data = sorted(response.json()["data"], key=lambda d: d["index"])
            out.extend(d["embedding"] for d in data)
        return out

    def close(self) -> None:
        self.http.close()


class EngineEmbedder:
    """Embeddings from an engine object in this process (tests, benchmarks, offline tools)."""

    def __init__(self, engine: Engine, name: str | None = None):
        self.engine = engine
        self.name = name or engine.model_id

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors, _ = self.engine.embed(texts)
        return vectors


def service_embedder(
    model: str | None, explicit: bool, endpoint: str, api_key: str | None = None
) -> tuple[ServiceEmbedder | None, str]:
    """The embedder for an ingest: ``(embedder or None, note)``.

    A model the user named (flag, or the collection's own) is used as it is, and any failure
    is theirs to see. The *default* embedder (``rag.embed_model``) is tried first with one
    short text: when the service is down or the model is not downloaded, the ingest goes on
    lexical-only and the note says why and how to get dense retrieval, instead of failing.
    """
    if not model:
        return None, ""
    embedder = ServiceEmbedder(model, endpoint, api_key)
    if explicit:
        return embedder, ""
    try:
        embedder.embed(["probe"])
    except EdgelmError as exc:
        embedder.close()
        return None, (
            f"lexical only: the default embedder '{model}' is not available ({exc.message}); "
            f"for dense and hybrid retrieval run: edgelm model download {model}"
        )
    return embedder, ""
