"""A deterministic, scriptable engine, shipped so that users can test their code against edgelm.

Tokens are whitespace-delimited words (``"Hello, world"`` → ``["Hello, ", "world"]``) and ids
are stable hashes, so a test can predict usage counts exactly. Replies, delays, logprobs and
failures can be scripted per engine; with no script the reply is derived from the prompt.

Tools are rendered as for a model whose template has none (:func:`edgelm.tools.fallback_messages`)
and calls are written as models write them (``<tool_call>{...}</tool_call>``), so a scripted
reply can call tools and the service's parsing is what a test sees. A forced call
(``tool_choice`` ``required`` or named) with no scripted reply calls the first function it may,
with the smallest arguments its schema accepts.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from edgelm.engines.base import Engine, StopBuffer, check_capabilities, check_context, render_prompt
from edgelm.engines.runner_protocol import RUNNER_ENV
from edgelm.errors import ModelLoadError
from edgelm.tools import call_block, example_arguments
from edgelm.types import Chunk, GenerationRequest, TokenLogprob

if TYPE_CHECKING:
    from pathlib import Path

    from edgelm.catalog import CatalogEntry
    from edgelm.settings import Settings

_TOKEN = re.compile(r"\S+\s*|\s+")
EMBED_DIM = 64


def fake_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def fake_token_id(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big") % 50000


@dataclass
class FakeScript:
    """What the fake engine will do. Every field is optional."""

    replies: list[str] = field(default_factory=list)
    """Answers to give in order; when exhausted, the default reply is used."""
    reply: str | None = None
    """Fixed answer for every request (after ``replies`` run out)."""
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    load_delay_s: float = 0.0
    logprobs: list[float] | None = None
    """Per-token logprobs to report (cycled); default -0.1 for every token."""
    fail_load: str | None = None
    fail_after_tokens: int | None = None
    n_ctx: int = 2048
    memory_mb: int = 10
    single_stream: bool = False
    """Behave like an engine that serves one stream at a time, so the pool queues the rest."""
    streams: int | None = None
    """Behave like a batching engine that serves this many streams at once (default 64)."""
    on_loop: bool = False
    """Stream on the service's event loop (``astream``), as the llama.cpp engine does, rather
    than in a worker thread of the pool."""
    isolated: bool = False
    """Run in a runner process, as llama.cpp models do (setting ``compute.isolation``)."""
    crash: Literal["segfault", "abort", "exit"] | None = None
    """Kill the process the engine runs in, as a native library can: a real segmentation
    fault, an abort, or ``os._exit(3)``; only allowed in a runner process (``isolated``)."""
    crash_after_tokens: int = 0
    """Tokens a stream sends before the ``crash``."""
    crash_when: str | None = None
    """Crash only on requests whose text contains this (default: every request)."""
    crash_on_load: bool = False
    """Crash while loading instead (a corrupt file that brings the library down)."""

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> FakeScript:
        known = {k: v for k, v in (options or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


class FakeEngine(Engine):
    name = "fake"
    supports_logprobs = True
    supports_embeddings = True
    supports_grammar = True
    supports_seed = True
    supports_tools = True
    concurrent_streams = 64

    def __init__(self, model_id: str = "fake", script: FakeScript | None = None):
        self.model_id = model_id
        self.script = script or FakeScript()
        if self.script.crash and os.environ.get(RUNNER_ENV) != "1":
            raise ModelLoadError(
                f"the fake model '{model_id}' crashes only in a runner process: set its "
                "option 'isolated' (and compute.isolation 'process')"
            )
        if self.script.load_delay_s:
            time.sleep(self.script.load_delay_s)
        if self.script.crash_on_load:
            self._crash()
        if self.script.fail_load:
            raise ModelLoadError(f"could not load '{model_id}': {self.script.fail_load}")
        self.n_ctx = self.script.n_ctx
        if self.script.single_stream:
            self.concurrent_streams = 1
        elif self.script.streams:
            self.concurrent_streams = self.script.streams
        self.native_async = self.script.on_loop
        self.memory_bytes = self.script.memory_mb * 1024 * 1024
        self._replies: deque[str] = deque(self.script.replies)
        self._lock = threading.Lock()
        self.requests: list[GenerationRequest] = []
        self._open = 0  # streams generating now

    @classmethod
    def wants_isolation(cls, entry: CatalogEntry) -> bool:
        return bool(entry.options.get("isolated"))

    def _crash(self) -> None:
        """Die as a native library kills its process (script ``crash``)."""
        if self.script.crash == "segfault":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        elif self.script.crash == "abort":
            os.abort()
        os._exit(3)

    @classmethod
    def from_entry(cls, entry: CatalogEntry, settings: Settings, path: Path | None) -> FakeEngine:
        """The entry's ``options`` are the script (see :class:`FakeScript`)."""
        return cls(entry.alias, FakeScript.from_options(entry.options))

    def count_tokens(self, text: str) -> int:
        return len(fake_tokens(text))

    def live_info(self) -> dict[str, object]:
        """Streams generating now: what a test of cancellation (in this process or in a
        runner) looks at."""
        return {"open_streams": self._open}

    def _crashes_on(self, request: GenerationRequest) -> bool:
        marker = self.script.crash_when
        if not self.script.crash:
            return False
        if marker is None:
            return True
        texts = [request.prompt or ""] + [m.text() for m in request.messages or []]
        return any(marker in text for text in texts)

    def prompt_text(self, request: GenerationRequest) -> str:
        """ChatML (tools through the fallback prompt), as a model without a chat template of its
        own is prompted."""
        return render_prompt(request, None)

    def _reply_for(self, request: GenerationRequest) -> str:
        with self._lock:
            if self._replies:
                return self._replies.popleft()
        if self.script.reply is not None:
            return self.script.reply
        forced = request.forced_tools
        if forced:
            return call_block(forced[0].name, example_arguments(forced[0].parameters))
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            return '{"answer": "fake"}'
        if request.messages:
            last = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
            return f"Fake answer to: {last}"
        return f" fake continuation of: {request.prompt or ''}"

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[Chunk]:
        for step in self._script(request, cancel):
            if isinstance(step, Chunk):
                yield step
            else:
                time.sleep(step)

    async def astream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]:
        """The same chunks on the event loop, delays awaited (script ``on_loop``): how the
        llama.cpp engine serves the service, for tests of that path without a model."""
        for step in self._script(request, cancel):
            if isinstance(step, Chunk):
                yield step
            else:
                await asyncio.sleep(step)

    def _script(
        self, request: GenerationRequest, cancel: threading.Event | None
    ) -> Iterator[Chunk | float]:
        """The answer as chunks, with the scripted delays (seconds) between them."""
        check_capabilities(self, request)
        start = time.perf_counter()
        self.requests.append(request)
        prompt_tokens = self.count_tokens(self.prompt_text(request))
        limit = check_context(self, prompt_tokens, request.max_tokens)
        tokens = fake_tokens(self._reply_for(request))
        crash = self._crashes_on(request)
        with self._lock:
            self._open += 1
        try:
            yield from self._tokens(request, cancel, tokens, limit, prompt_tokens, crash, start)
        finally:
            with self._lock:
                self._open -= 1

    def _tokens(
        self,
        request: GenerationRequest,
        cancel: threading.Event | None,
        tokens: list[str],
        limit: int,
        prompt_tokens: int,
        crash: bool,
        start: float,
    ) -> Iterator[Chunk | float]:
        stops = StopBuffer(request.stop)
        produced = 0
        finish = "stop"
        if self.script.first_token_delay_s:
            yield self.script.first_token_delay_s
        for i, token in enumerate(tokens):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if produced >= limit:
                finish = "length"
                break
            if self.script.fail_after_tokens is not None and i >= self.script.fail_after_tokens:
                raise RuntimeError("scripted failure in the fake engine")
            if crash and i >= self.script.crash_after_tokens:
                self._crash()
            if i and self.script.token_delay_s:
                yield self.script.token_delay_s
            produced += 1
            text, hit = stops.push(token)
            lps = [self._logprob(i, token, request)] if request.logprobs else []
            chunk = Chunk(
                text=text,
                token_ids=[fake_token_id(token)],
                logprobs=lps,
                t=time.perf_counter() - start,
                prompt_tokens=prompt_tokens,
                completion_tokens=produced,
            )
            if hit:
                chunk.finish_reason = "stop"
                yield chunk
                return
            yield chunk
        tail = stops.flush()
        yield Chunk(
            text=tail,
            t=time.perf_counter() - start,
            prompt_tokens=prompt_tokens,
            completion_tokens=produced,
            finish_reason=finish,  # type: ignore[arg-type]
        )

    def _logprob(self, i: int, token: str, request: GenerationRequest) -> TokenLogprob:
        scripted = self.script.logprobs
        value = scripted[i % len(scripted)] if scripted else -0.1
        top = [(token, value)]
        for k in range(1, request.top_logprobs):
            top.append((f"<alt{k}>", value - k))
        return TokenLogprob(
            token=token, logprob=value, bytes=list(token.encode()), top=top[: request.top_logprobs]
        )

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Hashed bag of words: texts sharing words get similar vectors (enough for RAG tests)."""
        vectors = []
        used = 0
        for text in texts:
            vec = [0.0] * EMBED_DIM
            words = re.findall(r"\w+", text.lower())
            used += max(1, len(fake_tokens(text)))
            for word in words:
                vec[fake_token_id(word) % EMBED_DIM] += 1.0
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            vectors.append([v / norm for v in vec])
        return vectors, used
