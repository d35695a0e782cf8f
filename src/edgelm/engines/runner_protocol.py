"""What the service and a model's runner process say to each other, and how.

Messages are tuples, pickled (both ends are the same user running the same code), each sent
as one frame: a 4-byte big-endian length and the pickle. A socketpair carries them; one
small frame per chunk keeps the token path to one write and one read.

Service → runner: ``("load", entry, settings, path)`` first, then ``("stream", rid,
request)``, ``("cancel", rid)``, ``("call", rid, method, args)`` and ``("close",)``.
Runner → service: ``("ready", attributes)`` or ``("load_error", error)`` once, then
``("chunk", rid, chunk)``, ``("end", rid)``, ``("error", rid, error)`` for streams and
``("reply", rid, value, memory_bytes)`` / ``("fail", rid, error, memory_bytes)`` for calls.

Errors cross as plain dicts (:func:`pack_error`): an :class:`EdgelmError` keeps its class,
message, param and code (its status with them); anything else keeps its type name and text.
"""

from __future__ import annotations

import importlib
import pickle
import signal
import socket
import struct
import threading
from typing import Any

from edgelm.errors import EdgelmError

# Set in a runner's environment: where engines may do what only a runner may (the fake
# engine's scripted crash).
RUNNER_ENV = "EDGELM_RUNNER"
_HEADER = struct.Struct(">I")
_READ_SIZE = 1 << 16


class Connection:
    """One end of the socketpair: framed pickles out (from any thread), framed pickles in
    (from one reader)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()
        self._buffer = bytearray()

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _HEADER.pack(len(data)) + data
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self) -> list[tuple[Any, ...]] | None:
        """The messages that arrived (at least one), blocking until some do; None at the end
        of the stream (the other process closed its end or died)."""
        while True:
            messages = self._parse()
            if messages:
                return messages
            try:
                data = self.sock.recv(_READ_SIZE)
            except OSError:
                return None
            if not data:
                return None
            self._buffer += data

    def _parse(self) -> list[tuple[Any, ...]]:
        messages = []
        buffer = self._buffer
        at = 0
        while len(buffer) - at >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, at)
            if len(buffer) - at - _HEADER.size < size:
                break
            start = at + _HEADER.size
            messages.append(pickle.loads(buffer[start : start + size]))
            at = start + size
        if at:
            del buffer[:at]
        return messages

    def close(self) -> None:
        self.sock.close()


def pack_error(exc: BaseException) -> dict[str, Any]:
    """An exception as data that unpickles anywhere (exception classes with their own
    ``__init__`` arguments do not round-trip through pickle)."""
    if isinstance(exc, EdgelmError):
        return {
            "module": type(exc).__module__,
            "class": type(exc).__qualname__,
            "message": exc.message,
            "param": exc.param,
            "code": exc.code,
        }
    return {"class": type(exc).__name__, "message": str(exc)}


def unpack_error(data: dict[str, Any]) -> Exception:
    """The exception :func:`pack_error` described: the same EdgelmError class (so the same
    status and body), or a RuntimeError naming the original type."""
    module = data.get("module")
    if module is not None:
        try:
            cls = getattr(importlib.import_module(module), data["class"])
        except (ImportError, AttributeError):
            cls = EdgelmError
        if isinstance(cls, type) and issubclass(cls, EdgelmError):
            exc = cls.__new__(cls)
            Exception.__init__(exc, data["message"])
            exc.message = data["message"]
            exc.param = data["param"]
            exc.code = data["code"]
            return exc
    return RuntimeError(f"{data['class']}: {data['message']}")


def describe_exit(returncode: int | None) -> str:
    """How a runner ended, for the error its model's requests get: "was killed by SIGSEGV
    (segmentation fault)", "exited with status 3". A SIGKILL nobody here sent is most often
    the kernel's out-of-memory killer, and the message says where to look."""
    if returncode is None:
        return "stopped answering"
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"was killed by signal {-returncode}"
    text = f"was killed by {sig.name}"
    description = signal.strsignal(sig)
    if description:
        text += f" ({description[0].lower()}{description[1:]})"
    if sig == signal.SIGKILL:
        text += (
            "; when nobody killed it on purpose, this is the system's out-of-memory killer "
            "(see 'dmesg'): load a smaller model or lower compute.n_ctx or compute.parallel"
        )
    return text
