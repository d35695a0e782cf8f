"""The engine interface: one streaming primitive plus declared capabilities.

An engine turns a :class:`GenerationRequest` into an iterator of :class:`Chunk`. Everything
else — the non-streaming answer, usage, TTFT and tokens/s — is derived from that stream by
:func:`collect`, so the service, bench and router measure the very path users are served by.

The contract, in full: :meth:`Engine.from_entry` builds an engine from a catalog entry (the
pool and the bench build every engine that way), :meth:`Engine.stream` (and, for engines
that set ``native_async``, :meth:`Engine.astream`) generates, and the optional parts —
:meth:`Engine.embed`, :meth:`Engine.raw_speed`, logprobs, grammars — are declared as
``supports_*`` flags. :meth:`Engine.require` is the one check of a capability: it answers a
clear 400 naming the model and the parameter before any work starts, instead of a failure
deep inside a backend. :func:`check_capabilities` applies it to a whole request.

The helpers below are what local engines share: the prompt renderer (:func:`render_prompt`),
the per-token logprob (:func:`token_logprob`), the chunker and the stop buffer.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from edgelm.errors import ConfigError, InvalidRequest, Unsupported
from edgelm.tools import chat_messages, has_tool_turns
from edgelm.types import (
    Chunk,
    Completion,
    FinishReason,
    GenerationRequest,
    Message,
    Timing,
    TokenLogprob,
    Usage,
    decode_rate,
    prompt_rate,
)

if TYPE_CHECKING:
    from pathlib import Path

    from edgelm.catalog import CatalogEntry
    from edgelm.settings import Settings

Capability = Literal[
    "chat", "completions", "logprobs", "embeddings", "grammar", "seed", "raw_speed", "tools"
]

# What a model lacking a capability does not do, as the error says it, and the request
# parameter that asked for it.
_REFUSALS: dict[Capability, tuple[str, str | None]] = {
    "chat": ("does not support chat", "messages"),
    "completions": ("does not support text completions", "prompt"),
    "logprobs": ("does not return logprobs", "logprobs"),
    "embeddings": ("does not serve embeddings", None),
    "grammar": ("does not support response_format", "response_format"),
    "seed": ("does not take a seed", "seed"),
    "raw_speed": ("has no raw pp/tg benchmark", None),
    "tools": ("does not support tool calling", "tools"),
}


class Engine(ABC):
    """A loaded model. Subclasses implement :meth:`stream` and :meth:`from_entry`; the rest
    has sane defaults. An optional method is implemented exactly when its ``supports_*`` flag
    is set (``embed``: ``supports_embeddings``, ``raw_speed``: ``supports_raw_speed``)."""

    name: ClassVar[str] = "base"
    supports_chat: ClassVar[bool] = True
    supports_completions: ClassVar[bool] = True
    supports_logprobs: ClassVar[bool] = False
    supports_embeddings: ClassVar[bool] = False
    supports_grammar: ClassVar[bool] = False
    supports_seed: ClassVar[bool] = False
    supports_raw_speed: ClassVar[bool] = False
    # Takes ``tools`` (renders them for the model and has its calls parsed, see edgelm.tools).
    supports_tools: ClassVar[bool] = False
    # Reads content parts other than text (images, audio, files): only a remote upstream may.
    reads_media: ClassVar[bool] = False
    # How many streams one instance serves at once (a batching engine runs them together);
    # the pool hands it that many and queues the rest. 1: the pool serialises requests.
    concurrent_streams: int = 1
    # Whether the pool consumes astream() on its event loop (True) or runs stream() in a thread.
    native_async: bool = False
    # Whether the service runs it in a runner process of its own (setting compute.isolation):
    # native libraries that can segfault or abort (llama.cpp, ONNX Runtime) are; engines of
    # pure Python (remote, fake) gain nothing from it. See :mod:`edgelm.engines.isolated`.
    isolate: ClassVar[bool] = False

    model_id: str = ""
    n_ctx: int = 4096
    memory_bytes: int = 0
    # CPU threads a local engine computes with (the bench reports them); None: not ours to set.
    threads: int | None = None

    @classmethod
    def from_entry(cls, entry: CatalogEntry, settings: Settings, path: Path | None) -> Engine:
        """Build the engine for a catalog entry: how the pool and the bench load every model
        (see :func:`edgelm.engines.create_engine`). ``path`` is the model's file or directory
        for engines that need one (``entry.needs_file``), else None."""
        raise ConfigError(f"the {cls.name} engine cannot be built from a catalog entry")

    @classmethod
    def wants_isolation(cls, entry: CatalogEntry) -> bool:
        """Whether the model of ``entry`` should run in a runner process (``isolate``)."""
        return cls.isolate

    def failure(self) -> Exception | None:
        """Why this engine can serve no more requests (its runner process died), else None:
        the pool then drops it and loads the model again on the next request."""
        return None

    def supports(self, capability: Capability) -> bool:
        """Whether this model declares ``capability`` (for callers that adapt, not refuse)."""
        return bool(getattr(self, f"supports_{capability}"))

    def require(self, capability: Capability, detail: str = "") -> None:
        """The one capability check: refuse with a clear 400 (:class:`Unsupported`) naming the
        model, its engine and the parameter when ``capability`` is not declared. ``detail``
        ends the message (what exactly was asked for)."""
        if self.supports(capability):
            return
        refusal, param = _REFUSALS[capability]
        raise Unsupported(f"model '{self.model_id}' ({self.name}) {refusal}{detail}", param=param)

    @abstractmethod
    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[Chunk]:
        """Yield chunks until done; the last one has ``finish_reason`` set.

        ``cancel`` is checked between tokens so a client that goes away frees the model.
        """

    def astream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]:
        """The same stream, consumed on an event loop without a thread of its own. Engines
        that set ``native_async`` implement it; for the others the pool runs :meth:`stream`
        in a worker thread."""
        raise NotImplementedError(f"{type(self).__name__} streams through stream() only")

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Return one vector per text and the number of tokens read (``supports_embeddings``)."""
        self.require("embeddings")
        raise NotImplementedError(f"{type(self).__name__} declares embeddings but has no embed()")

    def raw_speed(self, n_prompt: int, n_gen: int, seed: int = 0) -> tuple[float, float]:
        """llama-bench style (``supports_raw_speed``): seconds to evaluate ``n_prompt`` random
        tokens as a prompt, and seconds for ``n_gen`` decode steps after them, without
        templates, sampling or streaming. The bench's reference for the engine's own speed."""
        self.require("raw_speed")
        raise NotImplementedError(f"{type(self).__name__} declares raw_speed but has none")

    def live_info(self) -> dict[str, object]:
        """What the engine is doing now, for ``/openai/status``, ``/metrics`` and ``edgelm
        service status``: figures that change while it runs (threads in use, batch counters),
        as JSON-ready values. Engines with nothing to report return an empty dict."""
        return {}

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` as this model counts them (rough default: 4 chars a token)."""
        return max(1, len(text) // 4)

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to free
        """Free the model's memory."""


def check_capabilities(engine: Engine, request: GenerationRequest) -> None:
    """Refuse a request the engine cannot honour, naming the parameter."""
    kind = "chat" if request.is_chat else "completions"
    engine.require(kind)
    if request.logprobs:
        engine.require("logprobs", f" for {kind}")
    if request.offers_tools:  # tools with tool_choice "none" never reach the model
        engine.require("tools")
    if not engine.reads_media:
        check_text_only(engine.model_id, request)
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        engine.require("grammar", f" '{fmt.type}'")


def check_text_only(
    model_id: str, request: GenerationRequest, reads: tuple[str, ...] = ("text", "refusal")
) -> None:
    """Refuse content parts a text-only model would not see (images, audio, files), naming the
    model and the part, rather than answering as if they were not there. ``reads``: the part
    types it does take."""
    for i, message in enumerate(request.messages or []):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            kind = part.get("type")
            if kind not in reads:
                raise Unsupported(
                    f"model '{model_id}' reads text only and cannot take the {kind!r} part "
                    f"of message {i}; send text, or use a model that reads {kind!r}",
                    param=f"messages[{i}].content[{j}]",
                )


def check_context(engine: Engine, prompt_tokens: int, max_tokens: int | None) -> int:
    """Return the max_tokens to use, or raise when the prompt cannot fit the context."""
    room = engine.n_ctx - prompt_tokens
    if room <= 0:
        raise _context_error(engine, prompt_tokens, max_tokens)
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise _context_error(engine, prompt_tokens, max_tokens)
    return max_tokens


def _context_error(engine: Engine, prompt_tokens: int, max_tokens: int | None) -> InvalidRequest:
    from edgelm.errors import ContextLengthExceeded

    wanted = f" + max_tokens {max_tokens}" if max_tokens else ""
    return ContextLengthExceeded(
        f"this model's context is {engine.n_ctx} tokens; the prompt has {prompt_tokens}"
        f"{wanted}. Shorten the messages or lower max_tokens.",
        param="messages",
    )


class StopBuffer:
    """Holds back text that might be the start of a stop sequence.

    Streams must never show a stop string (OpenAI semantics), yet text should flow as soon as
    it cannot be one; this keeps the shortest possible tail back.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop sequence was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            index = min(i for i, _ in hits)
            out = self.pending[:index]
            self.pending = ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenChunker:
    """Turns sampled tokens into stream chunks, for engines that decode token by token.

    Each chunk carries the token ids and logprobs added since the previous one, the running
    completion count and timing; stop sequences are held back by a :class:`StopBuffer`.
    Engines keep only their own decode loop.
    """

    def __init__(
        self,
        start: float,
        prompt_tokens: int,
        stops: Iterable[str],
        prompt_seconds: float | None = None,
    ):
        self.start = start
        self.prompt_tokens = prompt_tokens
        self.prompt_seconds = prompt_seconds
        self.produced = 0
        self.stopped = False
        self._stops = StopBuffer(stops)
        self._ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []

    def token(self, token_id: int, piece: str, logprob: TokenLogprob | None = None) -> Chunk | None:
        """Add one sampled token and its text; a chunk when there is something to send.

        When the text completes a stop sequence the chunk ends the answer (``stopped``).
        """
        self.produced += 1
        self._ids.append(token_id)
        if logprob is not None:
            self._logprobs.append(logprob)
        text, hit = self._stops.push(piece)
        if hit:
            self.stopped = True
            return self.chunk(text, "stop")
        return self.chunk(text) if text or self._logprobs else None

    def finish(self, reason: FinishReason) -> Chunk:
        """The last chunk: whatever the stop buffer still held back."""
        return self.chunk(self._stops.flush(), reason)

    def chunk(self, text: str, reason: FinishReason | None = None) -> Chunk:
        out = Chunk(
            text=text,
            token_ids=self._ids.copy(),
            logprobs=self._logprobs.copy(),
            t=time.perf_counter() - self.start,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.produced,
            finish_reason=reason,
            prompt_seconds=self.prompt_seconds,
        )
        self._ids.clear()
        self._logprobs.clear()
        return out


class Fold:
    """Accumulates a stream into a whole answer; :func:`collect` is a fold with it.

    Streaming consumers (the SSE route, the router) feed chunks as they pass them on and ask
    for usage and timing at the end, so the two paths compute them the same way.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict[str, object]] = []
        self.first_t: float | None = None
        self.last: Chunk | None = None
        self.finish: FinishReason = "stop"
        self.tool_calls: list[dict[str, str]] = []  # OpenAI's shape, from the chunks' deltas

    def add(self, chunk: Chunk) -> None:
        if (chunk.text or chunk.tool_calls) and self.first_t is None:
            self.first_t = chunk.t
        self.parts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(asdict(lp) for lp in chunk.logprobs)
        self.last = chunk
        if chunk.finish_reason:
            self.finish = chunk.finish_reason
        for delta in chunk.tool_calls:
            while len(self.tool_calls) <= delta.index:
                self.tool_calls.append({"id": "", "name": "", "arguments": ""})
            call = self.tool_calls[delta.index]
            call["id"] = delta.id or call["id"]
            call["name"] = delta.name or call["name"]
            call["arguments"] += delta.arguments

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def usage(self) -> Usage:
        if self.last is None:
            return Usage()
        return Usage(
            prompt_tokens=self.last.prompt_tokens,
            completion_tokens=self.last.completion_tokens,
            total_tokens=self.last.prompt_tokens + self.last.completion_tokens,
        )

    def timing(self) -> Timing:
        return Timing() if self.last is None else timing_from(self.first_t, self.last)

    def result(self) -> Completion:
        return Completion(
            text=self.text,
            finish_reason=self.finish,
            usage=self.usage(),
            timing=self.timing(),
            token_ids=self.token_ids,
            logprobs=self.logprobs,
        )


def collect(chunks: Iterable[Chunk]) -> Completion:
    """Fold a stream into a whole answer with usage and timing."""
    fold = Fold()
    for chunk in chunks:
        fold.add(chunk)
    return fold.result()


def timing_from(first_t: float | None, last: Chunk) -> Timing:
    """Derive the latency decomposition from the first text time and the final chunk."""
    timing = Timing(ttft_s=first_t, total_s=last.t, prompt_s=first_t)
    timing.decode_tokens_per_s = decode_rate(last.completion_tokens, first_t, last.t)
    if timing.decode_tokens_per_s is not None and first_t is not None:
        timing.decode_s = last.t - first_t
    timing.prompt_tokens_per_s = prompt_rate(last.prompt_tokens, first_t)
    return timing


def chatml(messages: Iterable[object], add_generation_prompt: bool = True) -> str:
    """ChatML rendering, the fallback for models whose file carries no chat template."""
    out = []
    for m in messages:
        out.append(f"<|im_start|>{m.role}\n{m.text()}<|im_end|>\n")  # type: ignore[attr-defined]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


ChatTemplate = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]
"""A model's chat template, applied: messages and the tools offered (None: no tools section)
in, prompt text out (ending with the assistant's generation prompt)."""


def jinja_chat_template(template: str, bos_token: str, eos_token: str) -> ChatTemplate | None:
    """A Jinja chat template compiled once (llama-cpp-python's sandboxed Jinja2 formatter, the
    renderer HF templates are written for); None when jinja2 cannot compile it.

    Compiling once matters: onnxruntime-genai's ``apply_chat_template`` parses the template on
    every call, 7.9 ms a request for Qwen2.5's against 0.1 ms here (same text, checked on the
    catalog's templates), and the service renders on its event loop, so a burst of requests
    waited for each other's rendering."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=eos_token,
            bos_token=bos_token,
            add_generation_prompt=True,
        )
    except Exception:  # a template jinja2 cannot compile
        return None
    return lambda messages, tools: formatter(messages=messages, tools=tools).prompt


def render_prompt(
    request: GenerationRequest, template: ChatTemplate | None, template_has_tools: bool = False
) -> str:
    """The prompt text of a request, the same way for every local engine: a completion's
    prompt as is; chat messages through the model's template, or ChatML when the model has
    none. Tools go through the template's own tools section when it has one, else through the
    fallback prompt of :mod:`edgelm.tools` (which also writes earlier calls and tool results
    as text). ``developer`` messages become ``system`` ones (templates know only the latter),
    and a template that rejects the messages (e.g. an unsupported role order) is a 400."""
    if request.messages is None:
        return request.prompt or ""
    if template is None and not has_tool_turns(request):
        return chatml(request.messages)
    messages, tools = chat_messages(request, template is not None and template_has_tools)
    if template is None:
        return chatml(Message(**m) for m in messages)
    try:
        return template(messages, tools)
    except Exception as exc:  # templates raise for e.g. unsupported role orders
        raise InvalidRequest(
            f"the model's chat template rejected the messages: {exc}", param="messages"
        ) from None


def token_logprob(
    row: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """Log-softmax of the logits row the sampler just used (one row, not all of them).

    These are the model's own probabilities, before temperature, top-k/p or a grammar
    reshaped them, which is what a confidence signal wants. ``piece`` gives a token's bytes;
    ``top`` alternatives are listed, most likely first.
    """
    n_vocab = row.shape[0]
    peak = float(row.max())
    log_z = peak + float(np.log(np.exp(row - peak, dtype=np.float64).sum()))
    alternatives: list[tuple[str, float]] = []
    if top > 0:
        top = min(top, n_vocab)
        best = np.argpartition(row, -top)[-top:]
        best = best[np.argsort(row[best])[::-1]]
        alternatives = [
            (piece(int(t)).decode("utf-8", "replace"), float(row[t]) - log_z) for t in best
        ]
    text = piece(token)
    return TokenLogprob(
        token=text.decode("utf-8", "replace"),
        logprob=min(0.0, float(row[token]) - log_z),
        bytes=list(text),
        top=alternatives,
    )


def default_threads() -> int:
    """Physical cores: decode is compute-bound here and hyper-threads only add contention."""
    import os

    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def process_rss() -> int:
    """This process's resident memory, which local engines measure around a load."""
    import psutil

    return psutil.Process().memory_info().rss
