"""A model run in a runner process of its own (setting ``compute.isolation``), seen by the
service as an ordinary :class:`Engine`.

llama.cpp's AMX kernel once segfaulted on the first batch and an embedding call crashed with
SIGSEGV: each time the whole service died, with every model and every open stream in it.
With a runner per loaded model (as Ollama runs its runners) such a crash ends that model's
requests only, each with a clear error naming the model and how its runner ended
(:class:`EngineCrashed`); the pool then drops the model and the next request loads it again.

The token path: the runner writes one small frame per chunk to a socketpair; one reader
thread per runner here reads them and hands each stream's chunks to the event loop that
consumes it with one ``call_soon_threadsafe`` per read (several chunks that arrived together
go in one hop). Calls (``embed``, ``count_tokens``, ``raw_speed``, ``live_info``) resolve
futures, so they work from any thread. See :mod:`edgelm.engines.runner` for the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edgelm
from edgelm.engines.base import Engine
from edgelm.engines.gguf_file import check_gguf_size
from edgelm.engines.runner_protocol import (
    RUNNER_ENV,
    Connection,
    describe_exit,
    unpack_error,
)
from edgelm.errors import EdgelmError, EngineCrashed, ModelLoadError
from edgelm.types import Chunk, GenerationRequest

if TYPE_CHECKING:
    from edgelm.catalog import CatalogEntry
    from edgelm.settings import Settings

log = logging.getLogger("edgelm.runner")

# How long a closing runner may take to free its model before it is killed.
CLOSE_WAIT_S = 5.0
# How long a cancelled stream waits for the runner to confirm that it stopped (the pool then
# frees its slot: an engine that serves one stream at a time never sees two).
CANCEL_WAIT_S = 10.0
# live_info() is read by status and metrics on the event loop; a runner that does not answer
# within this is reported as such rather than holding the loop.
INFO_WAIT_S = 1.0
_END = object()
# Where a stream's events go: (the consumer's loop or None for a thread, put function).
_Sink = tuple[asyncio.AbstractEventLoop | None, Callable[[object], None]]


class IsolatedEngine(Engine):
    """The proxy of an engine loaded in a runner process. Its capabilities, context size,
    threads and memory are those the runner reported for the real engine."""

    native_async = True

    def __init__(
        self,
        alias: str,
        proc: subprocess.Popen[bytes],
        conn: Connection,
        info: dict[str, Any],
        stderr_tail: deque[str],
        stderr_thread: threading.Thread,
    ):
        self.alias = alias
        self.proc = proc
        self.pid = proc.pid
        self._conn = conn
        for key, value in info.items():
            if key != "native_async":  # this proxy always streams on the caller's loop
                setattr(self, key, value)
        self._ids = itertools.count(1)
        self._streams: dict[int, _Sink] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()  # guards _streams/_calls against the reader's failure
        self._failure: EngineCrashed | None = None
        self._closing = False
        self._stderr_tail = stderr_tail
        self._stderr_thread = stderr_thread
        self._reader = threading.Thread(
            target=self._read, name=f"edgelm-runner-{alias}", daemon=True
        )
        self._reader.start()

    # -- start ------------------------------------------------------------------------------
    @classmethod
    def start(cls, entry: CatalogEntry, settings: Settings, path: Path | None) -> IsolatedEngine:
        """Start a runner for ``entry`` and wait until it has loaded the model. A load that
        fails is a :class:`ModelLoadError` with the engine's message; a runner that dies while
        loading (a file that crashes the library) is one naming how it died."""
        import socket

        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env[RUNNER_ENV] = "1"
        # The runner imports the same edgelm as the service, wherever that one came from.
        source = str(Path(edgelm.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgelm.engines.runner", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"could not start a runner for '{entry.alias}': {exc}") from exc
        finally:
            theirs.close()
        tail: deque[str] = deque(maxlen=12)
        stderr_thread = threading.Thread(
            target=_forward_stderr, args=(proc, tail), name="edgelm-runner-stderr", daemon=True
        )
        stderr_thread.start()
        conn = Connection(ours)
        try:
            conn.send(("load", entry, settings, path))
            first = conn.receive()
        except BaseException:
            _stop(proc, conn)
            raise
        if first and first[0][0] == "ready":
            return cls(entry.alias, proc, conn, first[0][1], tail, stderr_thread)
        _stop(proc, conn)
        if first and first[0][0] == "load_error":
            error = unpack_error(first[0][1])
            if isinstance(error, EdgelmError):  # as the engine said it (a 501 MissingExtra...)
                raise error
            raise ModelLoadError(f"could not load '{entry.alias}': {error}")
        stderr_thread.join(timeout=1)
        how = describe_exit(proc.returncode)
        _log_tail(entry.alias, how, tail)
        if path is not None and path.suffix == ".gguf" and path.is_file():
            check_gguf_size(path, entry.alias)  # a cut-off file, said so
        raise ModelLoadError(
            f"could not load '{entry.alias}': its runner {how} while loading the model; "
            "the file may be corrupt (re-download it with 'edgelm model download "
            f"{entry.alias} --force') or the engine cannot run it on this machine"
        )

    # -- the reader -------------------------------------------------------------------------
    def _read(self) -> None:
        """Deliver what the runner sends until it ends, then fail whatever is still open."""
        while True:
            messages = self._conn.receive()
            if messages is None:
                break
            batches: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[object], None], object]]]
            batches = {}
            for message in messages:
                kind = message[0]
                if kind in ("chunk", "end", "error"):
                    sink = self._streams.get(message[1])
                    if sink is None:
                        continue  # a stream whose consumer has left
                    item: object = (
                        message[2]
                        if kind == "chunk"
                        else _END
                        if kind == "end"
                        else unpack_error(message[2])
                    )
                    loop, put = sink
                    if loop is None:
                        put(item)
                    else:
                        batches.setdefault(loop, []).append((put, item))
                elif kind in ("reply", "fail"):
                    self.memory_bytes = message[3]
                    future = self._calls.pop(message[1], None)
                    if future is None:
                        continue
                    if kind == "reply":
                        future.set_result(message[2])
                    else:
                        future.set_exception(unpack_error(message[2]))
            for loop, items in batches.items():
                with contextlib.suppress(RuntimeError):  # that loop has closed
                    loop.call_soon_threadsafe(_deliver, items)
        self._ended()

    def _ended(self) -> None:
        """The runner's socket is closed: reap the process, and end every open stream and
        call with the reason."""
        try:
            self.proc.wait(timeout=CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:  # it closed the socket but lives on: end it
            self.proc.kill()
            self.proc.wait()
        if self._closing:
            failure = EngineCrashed(
                f"model '{self.alias}' was unloaded while this request ran", code="model_unloaded"
            )
        else:
            how = describe_exit(self.proc.returncode)
            failure = EngineCrashed(
                f"model '{self.alias}' stopped: its runner {how}; the next request restarts it"
            )
        with self._lock:
            self._failure = failure
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
        for loop, put in streams.values():
            if loop is None:
                put(failure)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(put, failure)
        for future in calls.values():
            future.set_exception(failure)
        self._conn.close()
        if not self._closing:
            self._stderr_thread.join(timeout=1)  # its last words, for the log
            _log_tail(self.alias, describe_exit(self.proc.returncode), self._stderr_tail)

    def failure(self) -> EngineCrashed | None:
        """How the runner ended, once it has (None while it runs, and after a close)."""
        return None if self._closing else self._failure

    def _raise_if_failed(self) -> None:
        failure = self._failure
        if failure is not None:
            raise EngineCrashed(failure.message, code=failure.code)

    def _send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the runner is gone; the reader fails what is open
            self._conn.send(message)

    def _register(self, sink: _Sink) -> int:
        rid = next(self._ids)
        with self._lock:
            self._raise_if_failed()
            self._streams[rid] = sink
        return rid

    # -- streams ----------------------------------------------------------------------------
    async def astream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]:
        """The runner's stream on the caller's event loop. Leaving early (a client that went
        away, a cancelled task, ``cancel`` set) stops the stream in the runner, and returns
        once the runner says it stopped."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        rid = self._register((loop, events.put_nowait))
        self._send(("stream", rid, request))
        ended = False
        try:
            while True:
                item = await events.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                yield item  # type: ignore[misc]
                if cancel is not None and cancel.is_set():
                    break
        finally:
            if not ended and rid in self._streams:
                self._send(("cancel", rid))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(_until_end(events), CANCEL_WAIT_S)
            self._streams.pop(rid, None)

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[Chunk]:
        """The same stream for a caller in a thread of its own."""
        events: queue.SimpleQueue[object] = queue.SimpleQueue()
        rid = self._register((None, events.put))
        self._send(("stream", rid, request))
        ended = False
        try:
            while True:
                item = events.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                yield item  # type: ignore[misc]
                if cancel is not None and cancel.is_set():
                    break
        finally:
            if not ended and rid in self._streams:
                self._send(("cancel", rid))
                with contextlib.suppress(queue.Empty):
                    item = events.get(timeout=CANCEL_WAIT_S)
                    while item is not _END and not isinstance(item, BaseException):
                        item = events.get(timeout=CANCEL_WAIT_S)
            self._streams.pop(rid, None)

    # -- calls ------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        future: Future[Any] = Future()
        rid = next(self._ids)
        with self._lock:
            self._raise_if_failed()
            self._calls[rid] = future
        self._send(("call", rid, method, args))
        try:
            return future.result(timeout)
        finally:
            self._calls.pop(rid, None)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        self.require("embeddings")
        return self._call("embed", texts)  # type: ignore[no-any-return]

    def raw_speed(self, n_prompt: int, n_gen: int, seed: int = 0) -> tuple[float, float]:
        self.require("raw_speed")
        return self._call("raw_speed", n_prompt, n_gen, seed)  # type: ignore[no-any-return]

    def count_tokens(self, text: str) -> int:
        return int(self._call("count_tokens", text))

    def live_info(self) -> dict[str, object]:
        """The engine's own figures, with the runner's pid; a runner that is gone or does not
        answer within a second says so instead (status pages must not hang on it)."""
        info: dict[str, object] = {"runner_pid": self.pid}
        failure = self.failure()
        if failure is not None:
            return {**info, "runner": failure.message}
        try:
            info.update(self._call("live_info", timeout=INFO_WAIT_S))
        except TimeoutError:
            info["runner"] = f"did not answer within {INFO_WAIT_S:g} s"
        except Exception as exc:
            info["runner"] = str(exc)
        return info

    def close(self) -> None:
        """Ask the runner to free the model and exit; kill it if it has not within a few
        seconds. The process is always reaped (no zombies)."""
        if self.proc.returncode is None:
            self._closing = True
            self._send(("close",))
            try:
                self.proc.wait(timeout=CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("runner of %s did not exit; killing it", self.alias)
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=CLOSE_WAIT_S)
        self._stderr_thread.join(timeout=1)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _deliver(items: list[tuple[Callable[[object], None], object]]) -> None:
    for put, item in items:
        put(item)


async def _until_end(events: asyncio.Queue[object]) -> None:
    while True:
        item = await events.get()
        if item is _END or isinstance(item, BaseException):
            return


def _forward_stderr(proc: subprocess.Popen[bytes], tail: deque[str]) -> None:
    """Pass the runner's stderr on to the service's, keeping its last lines for the log of a
    crash (faulthandler's Python stack, llama.cpp's GGML_ASSERT)."""
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode("utf-8", "replace")
        tail.append(line.rstrip("\n"))
        with contextlib.suppress(Exception):
            sys.stderr.write(line)


def _log_tail(alias: str, how: str, tail: deque[str]) -> None:
    lines = "\n".join(tail)
    log.error("the runner of %s %s%s", alias, how, f"; its last output:\n{lines}" if lines else "")


def _stop(proc: subprocess.Popen[bytes], conn: Connection) -> None:
    """End a runner that never became ready."""
    conn.close()
    try:
        proc.wait(timeout=CLOSE_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
