"""A model's runner: the process one loaded model's engine lives in, so that a segfault, an
abort or an out-of-memory kill in a native library ends this process only, not the service.

Started by :meth:`edgelm.engines.isolated.IsolatedEngine.start` as ``python -m
edgelm.engines.runner FD``, FD being its end of a socketpair (see
:mod:`edgelm.engines.runner_protocol`). It builds the engine the first message describes with
:func:`edgelm.engines.create_engine`, reports the engine's declared attributes, then serves:

* streams: on an asyncio loop of their own (``astream``) for engines that stream that way
  (llama.cpp's compute thread hands each token to that loop, which writes it to the socket),
  else ``stream`` in a thread each, at most ``concurrent_streams`` at once;
* cancel: sets the stream's cancel event (and cancels its task), so the model stops at the
  next token; the stream then answers ``end``;
* calls: ``embed``, ``raw_speed``, ``count_tokens`` in a small thread pool, ``live_info``
  at once;
* close: frees the engine and exits.

It exits as soon as its socket reaches end-of-file: the service closed it or died (even by
SIGKILL), so a runner never outlives its service. (``PR_SET_PDEATHSIG`` is not used: it
fires when the *thread* that started the child exits, and the service starts runners from
worker threads.) Ctrl-C in the service's terminal reaches the whole process group; the
runner ignores it and leaves its shutdown to the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from edgelm.engines.base import Engine, process_rss
from edgelm.engines.runner_protocol import Connection, pack_error

# What the service's proxy copies from the engine once it is loaded.
ATTRIBUTES = (
    "name",
    "supports_chat",
    "supports_completions",
    "supports_logprobs",
    "supports_embeddings",
    "supports_grammar",
    "supports_seed",
    "supports_raw_speed",
    "supports_tools",
    "reads_media",
    "concurrent_streams",
    "native_async",
    "model_id",
    "n_ctx",
    "memory_bytes",
    "threads",
)
CALLS = frozenset({"embed", "raw_speed", "count_tokens"})


class Runner:
    """Serves one loaded engine over one connection until it closes."""

    def __init__(self, engine: Engine, conn: Connection, base_rss: int = 0):
        self.engine = engine
        self.conn = conn
        self.base_rss = base_rss
        self.streams: dict[int, tuple[threading.Event, Future[None] | None]] = {}
        # Every entry is a stream still open; finish() removes it as it sends the last word.
        self.calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edgelm-runner-call")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stream_slots = threading.BoundedSemaphore(max(1, int(engine.concurrent_streams)))
        if engine.native_async:
            self.loop = asyncio.new_event_loop()
            threading.Thread(
                target=self.loop.run_forever, name="edgelm-runner-loop", daemon=True
            ).start()

    def serve(self) -> None:
        while True:
            messages = self.conn.receive()
            if messages is None:  # the service closed its end or died
                os._exit(0)
            for message in messages:
                self.handle(message)

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stream":
            self.start_stream(message[1], message[2])
        elif kind == "cancel":
            stream = self.streams.get(message[1])
            if stream is not None:
                cancel, task = stream
                cancel.set()
                if task is not None:
                    task.cancel()
        elif kind == "call":
            rid, method, args = message[1:]
            if method == "live_info":  # quick, and answered even while calls are busy
                self.answer(rid, self.engine.live_info)
            elif method in CALLS:
                self.calls.submit(self.answer, rid, getattr(self.engine, method), *args)
            else:
                self.answer(rid, _unknown_call, method)
        elif kind == "close":
            for cancel, _task in list(self.streams.values()):
                cancel.set()
            with contextlib.suppress(Exception):
                self.engine.close()
            os._exit(0)

    def answer(self, rid: int, fn: Any, *args: Any) -> None:
        """Run one call and send its result, with the engine's memory after it (an embedding
        context opened on first use adds to it)."""
        try:
            value = fn(*args)
        except Exception as exc:
            self.conn.send(("fail", rid, pack_error(exc), self.engine.memory_bytes + self.base_rss))
        else:
            self.conn.send(("reply", rid, value, self.engine.memory_bytes + self.base_rss))

    def finish(self, rid: int, message: tuple[Any, ...]) -> None:
        """A stream's last message, sent once whichever way it ended."""
        if self.streams.pop(rid, None) is not None:
            self.conn.send(message)

    def start_stream(self, rid: int, request: Any) -> None:
        cancel = threading.Event()
        self.streams[rid] = (cancel, None)
        if self.loop is not None:
            task = asyncio.run_coroutine_threadsafe(
                self.stream_on_loop(rid, request, cancel), self.loop
            )
            # A task cancelled before it ran never runs its body: end the stream here then.
            task.add_done_callback(lambda _task: self.finish(rid, ("end", rid)))
            if rid in self.streams:
                self.streams[rid] = (cancel, task)
        else:
            threading.Thread(
                target=self.stream_in_thread,
                args=(rid, request, cancel),
                name=f"edgelm-runner-stream-{rid}",
                daemon=True,
            ).start()

    async def stream_on_loop(self, rid: int, request: Any, cancel: threading.Event) -> None:
        send = self.conn.send
        try:
            async for chunk in self.engine.astream(request, cancel):
                send(("chunk", rid, chunk))
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self.finish(rid, ("error", rid, pack_error(exc)))
        self.finish(rid, ("end", rid))

    def stream_in_thread(self, rid: int, request: Any, cancel: threading.Event) -> None:
        send = self.conn.send
        try:
            # An engine that serves one stream at a time never sees two, even when a
            # cancelled stream is still finishing its token as the next one arrives.
            with self.stream_slots:
                chunks = self.engine.stream(request, cancel)
                try:
                    for chunk in chunks:
                        send(("chunk", rid, chunk))
                        if cancel.is_set():
                            break
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()
        except Exception as exc:
            self.finish(rid, ("error", rid, pack_error(exc)))
        self.finish(rid, ("end", rid))


def _unknown_call(method: str) -> None:
    raise ValueError(f"a runner does not serve '{method}'")


def describe(engine: Engine, base_rss: int) -> dict[str, Any]:
    """The engine's declared attributes; its memory includes the runner's own interpreter."""
    info = {name: getattr(engine, name) for name in ATTRIBUTES}
    info["memory_bytes"] = int(engine.memory_bytes) + base_rss
    info["base_rss"] = base_rss
    return info


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable()  # a crash leaves the Python stack in the service's log
    conn = Connection(socket.socket(fileno=int(argv[1])))
    first = conn.receive()
    if not first or first[0][0] != "load":
        return 2
    _, entry, settings, path = first[0]
    base_rss = process_rss()
    try:
        from edgelm.engines import create_engine

        engine = create_engine(entry, settings, path)
    except BaseException as exc:  # reported to the service, which answers it as a load error
        conn.send(("load_error", pack_error(exc)))
        return 1
    conn.send(("ready", describe(engine, base_rss)))
    Runner(engine, conn, base_rss).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
