"""A sentence-embedding model (BERT family, GGUF) served by llama.cpp: ``/v1/embeddings`` only.

The chat engine's :meth:`~edgelm.engines.llamacpp.LlamaCppEngine.embed` pools a causal chat
model's hidden states 64 tokens at a time. An encoder such as all-MiniLM-L6-v2 is different:
its attention is bidirectional, so every token of a text must be in one micro-batch, and the
model pools (mean) and llama.cpp returns one vector per sequence. This engine therefore opens
one context with ``n_batch == n_ubatch`` and packs several texts per decode, one sequence id
each.

Why not ``llama_cpp.Llama(embedding=True).embed``: an encoder has no KV memory, and code that
clears "the KV cache" of such a context dereferenced NULL (a SIGSEGV that took the whole
service down, met earlier in this project). Here nothing is cleared: each decode is a fresh,
complete batch whose sequences never attend across ids, and the engine refuses a GGUF that is
causal or does not pool, instead of crashing inside llama.cpp.

Texts are truncated as sentence-transformers truncates them (``max_tokens`` including
``[CLS]`` and ``[SEP]``, 256 for MiniLM), so vectors match the reference implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelm.engines.base import Engine
from edgelm.errors import MissingExtra, ModelLoadError, Unsupported
from edgelm.types import Chunk, GenerationRequest

if TYPE_CHECKING:
    from edgelm.catalog import CatalogEntry
    from edgelm.settings import Settings

BATCH_TOKENS = 512
"""Tokens per decode (n_batch = n_ubatch): several short texts share one."""
MAX_SEQUENCES = 32
"""Texts per decode at most (the context's n_seq_max)."""


class SentenceEngine(Engine):
    """Mean-pooled, L2-normalised sentence vectors from a BERT GGUF, through llama.cpp."""

    name = "sentence"
    isolate = True
    supports_chat = False
    supports_completions = False
    supports_embeddings = True

    def __init__(self, model_path: Path, model_id: str, threads: int = 0, max_tokens: int = 256):
        try:
            import llama_cpp
            from llama_cpp import _internals
            from llama_cpp._logger import set_verbose
        except ImportError:
            raise MissingExtra("llama-cpp-python", "llamacpp") from None
        from edgelm.engines.base import default_threads

        self._lib = llama_cpp
        self.model_id = model_id
        self.model_path = Path(model_path)
        set_verbose(False)
        llama_cpp.llama_backend_init()
        try:
            self._model = _internals.LlamaModel(
                path_model=str(self.model_path),
                params=llama_cpp.llama_model_default_params(),
                verbose=False,
            )
        except Exception as exc:  # llama.cpp reports every load failure the same way
            raise ModelLoadError(
                f"llama.cpp could not load '{model_id}' from {self.model_path}: {exc}"
            ) from None
        meta = self._model.metadata()
        arch = meta.get("general.architecture", "")
        if meta.get(f"{arch}.attention.causal", "true") != "false":
            self._model.close()
            raise ModelLoadError(
                f"'{model_id}' ({self.model_path.name}) is not a bidirectional encoder "
                f"(architecture '{arch}'); the sentence engine serves BERT-family embedders"
            )
        self.n_ctx = min(BATCH_TOKENS, self._model.n_ctx_train())
        self.max_tokens = max(2, min(max_tokens, self.n_ctx))
        self.dimensions = self._model.n_embd()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx
        # llama.cpp aborts the process (GGML_ASSERT on n_outputs_max) when a pooled context
        # may hold more sequences than its batch has rows; a small encoder must keep fewer.
        self.max_sequences = min(MAX_SEQUENCES, self.n_ctx)
        params.n_seq_max = self.max_sequences
        params.kv_unified = True  # an encoder keeps no KV cache; this keeps n_ctx as asked
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED  # the GGUF's (mean)
        params.n_threads = params.n_threads_batch = threads or default_threads()
        params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
            self._batch = _internals.LlamaBatch(
                n_tokens=self.n_ctx, embd=0, n_seq_max=self.max_sequences, verbose=False
            )
        except Exception as exc:
            self._model.close()
            raise ModelLoadError(
                f"could not open an embedding context for '{model_id}': {exc}"
            ) from None
        if self._ctx.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            self.close()
            raise ModelLoadError(f"'{model_id}' declares no pooling; it cannot embed sentences")
        self._sep = self._model.token_eos()
        self._lock = threading.Lock()
        self.memory_bytes = self.model_path.stat().st_size + 64 * 2**20

    @classmethod
    def from_entry(
        cls, entry: CatalogEntry, settings: Settings, path: Path | None
    ) -> SentenceEngine:
        if path is None:
            raise ModelLoadError(f"model '{entry.alias}' has no file to load")
        max_tokens = int(entry.options.get("max_tokens", 256))
        return cls(path, entry.alias, threads=settings.compute.fixed_threads, max_tokens=max_tokens)

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[Chunk]:
        raise Unsupported(
            f"model '{self.model_id}' is an embedding model: use /v1/embeddings", param="model"
        )

    def tokenize(self, text: str) -> list[int]:
        """``[CLS] pieces [SEP]``, cut to ``max_tokens`` with the ``[SEP]`` kept."""
        tokens = self._model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(tokens) > self.max_tokens:
            tokens = [*tokens[: self.max_tokens - 1], self._sep]
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One unit vector per text (an empty text is ``[CLS] [SEP]``, as in the reference)."""
        if not texts:
            return [], 0
        tokenized = [self.tokenize(text) for text in texts]
        out: list[list[float]] = []
        with self._lock:
            group: list[list[int]] = []
            used = 0
            for tokens in tokenized:
                full = len(group) >= self.max_sequences
                if group and (used + len(tokens) > self.n_ctx or full):
                    out.extend(self._decode(group))
                    group, used = [], 0
                group.append(tokens)
                used += len(tokens)
            out.extend(self._decode(group))
        return out, sum(len(t) for t in tokenized)

    def _decode(self, group: list[list[int]]) -> list[list[float]]:
        """Evaluate one batch of whole texts; read each sequence's pooled vector."""
        lib = self._lib
        self._batch.reset()
        for seq, tokens in enumerate(group):
            self._batch.add_sequence(tokens, seq, True)
        code = lib.llama_decode(self._ctx.ctx, self._batch.batch)
        if code != 0:
            raise ModelLoadError(f"llama.cpp could not embed with '{self.model_id}' (code {code})")
        vectors = []
        for seq in range(len(group)):
            pointer: Any = lib.llama_get_embeddings_seq(self._ctx.ctx, seq)
            if not pointer:
                raise ModelLoadError(f"llama.cpp returned no vector for '{self.model_id}'")
            row = np.ctypeslib.as_array(pointer, shape=(self.dimensions,)).astype(np.float64)
            norm = float(np.linalg.norm(row))
            vectors.append((row / norm if norm else row).tolist())
        return vectors

    def close(self) -> None:
        for name in ("_batch", "_ctx", "_model"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
                setattr(self, name, None)
