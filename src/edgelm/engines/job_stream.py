"""A request's way from a scheduler's job to stream chunks, shared by the engines that run a
scheduler thread of their own (llama.cpp's batch scheduler, the ONNX generator scheduler).

The scheduler thread only samples tokens and sends ``(kind, value)`` events; turning them into
text (UTF-8 assembly or the tokenizer's incremental decoding), holding back stop sequences and
timing happens wherever the events are consumed, never on the scheduler's thread, where the
next step would wait for it. :func:`stream_answer` consumes them in the caller's thread (the
bench's in-process target), :func:`astream_answer` on an event loop (the service), with the
scheduler handing each event straight to the loop: no thread per stream.
"""

from __future__ import annotations

import asyncio
import codecs
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from edgelm.engines.base import TokenChunker
from edgelm.engines.batching import DONE, ERROR, Job
from edgelm.types import Chunk, FinishReason, GenerationRequest


class Scheduler(Protocol):
    def submit(self, job: Any) -> None: ...

    def poke(self) -> None: ...


class JobAnswer:
    """One request's job and the text work that turns the job's events into chunks.

    ``text(token)`` gives the text a sampled token adds (it may hold back part of a
    character until the next token); ``end()`` forgets what it held back when the answer
    stops there."""

    def __init__(
        self,
        job: Job,
        out: TokenChunker,
        text: Callable[[int], str],
        end: Callable[[], None] | None = None,
    ):
        self.job = job
        self.out = out
        self.finish: FinishReason | None = None
        self._text = text
        self._end = end

    @property
    def done(self) -> bool:
        return self.finish is not None or self.out.stopped

    def take(self, kind: str, value: Any) -> Chunk | None:
        """One event from the scheduler; a chunk when there is something to send."""
        if kind == ERROR:
            raise value
        if kind == DONE:
            self.finish = value
            return None
        out = self.out
        if out.prompt_seconds is None:
            out.prompt_seconds = time.perf_counter() - out.start
        if self.job.cancel.is_set():
            self.finish = "cancelled"
            return None
        token, entry = value
        return out.token(token, self._text(token), entry)

    def last(self) -> Chunk | None:
        """The closing chunk, unless the chunk that completed a stop sequence closed it."""
        if self.out.stopped:
            return None
        if self._end is not None:
            self._end()
        return self.out.finish(self.finish or "length")


def utf8_text(piece: Callable[[int], bytes]) -> tuple[Callable[[int], str], Callable[[], None]]:
    """A :class:`JobAnswer`'s ``text`` and ``end`` for a model whose tokens are bytes
    (``piece(token)``). Byte-level tokenizers split multi-byte characters (emoji, CJK,
    accents) across tokens: the bytes of an unfinished character wait for the next token,
    bytes that can never form one become U+FFFD, and one cut off at the very end (max_tokens)
    is dropped rather than shown as U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return (lambda token: decoder.decode(piece(token))), decoder.reset


def stream_answer(
    answer: JobAnswer, scheduler: Scheduler, still_queued: Callable[[Job], bool] | None = None
) -> Iterator[Chunk]:
    """Queue the answer's job and yield its chunks in the caller's thread. A consumer that
    cancels while the job waits (``still_queued``, default: always) leaves at once rather than
    waiting for the scheduler to notice."""
    job = answer.job
    if not answer.done:
        scheduler.submit(job)
        try:
            while not answer.done:
                try:
                    event = job.events.get(timeout=0.05)
                except queue.Empty:
                    if job.cancel.is_set() and (still_queued is None or still_queued(job)):
                        answer.finish = "cancelled"
                    continue
                chunk = answer.take(*event)
                if chunk is not None:
                    yield chunk
        finally:
            job.cancel.set()  # a stop string, a consumer gone away, or done: alike
            scheduler.poke()
    last = answer.last()
    if last is not None:
        yield last


async def astream_answer(answer: JobAnswer, scheduler: Scheduler) -> AsyncIterator[Chunk]:
    """The same on the running event loop: the scheduler thread hands each event to the loop.

    Through a stream thread, every token woke two threads in turn (that one, then the event
    loop), each needing a core and the GIL while the model's threads were already computing
    the next token; and every open stream held a thread for its whole answer."""
    job = answer.job
    if not answer.done:
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        job.deliver = on_loop(asyncio.get_running_loop(), events.put_nowait, job.cancel)
        scheduler.submit(job)
        try:
            while not answer.done:
                chunk = answer.take(*await events.get())
                if chunk is not None:
                    yield chunk
        finally:
            job.cancel.set()
            scheduler.poke()
    last = answer.last()
    if last is not None:
        yield last


def on_loop(
    loop: asyncio.AbstractEventLoop,
    put: Callable[[tuple[str, Any]], None],
    cancel: threading.Event,
) -> Callable[[tuple[str, Any]], None]:
    """A job's ``deliver`` for a consumer on ``loop``, callable from the scheduler's thread."""

    def deliver(event: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(put, event)
        except RuntimeError:  # the loop has closed: nobody listens, so stop the sequence
            cancel.set()

    return deliver


# Requests with more text than this are rendered and tokenized off the event loop. A short
# chat takes ~0.2 ms there, less than a thread hop; tokenizing tens of kilobytes, or turning a
# JSON schema into a grammar, can take milliseconds that every other stream would wait for.
LONG_REQUEST_CHARS = 8192


def is_long(request: GenerationRequest) -> bool:
    """Whether preparing ``request`` (rendering, tokenizing, compiling a grammar) is worth a
    worker thread rather than a moment of the event loop."""
    if request.response_format is not None and request.response_format.type == "json_schema":
        return True
    if request.forced_tools:  # a grammar from the functions' schemas
        return True
    text = len(request.prompt or "")
    for message in request.messages or []:
        text += len(message.text())
    return text > LONG_REQUEST_CHARS
