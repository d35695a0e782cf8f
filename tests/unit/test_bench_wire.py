"""The bench's stdlib HTTP client: the same results as the httpx client, errors mapped the
same way, and a keep-alive connection that went away is replaced."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from edgelm.bench.wire import WireClient
from edgelm.client import EdgelmClient, ServiceError, ServiceUnavailable
from edgelm.server.app import create_app
from tests.unit.conftest import free_port


@pytest.fixture
def service(settings, catalog, serve_app) -> str:
    return serve_app(create_app(settings, catalog=catalog))


def test_answers_read_as_the_httpx_client_reads_them(service: str) -> None:
    wire = WireClient(service)
    ours = wire.chat_once("fake-slow", "hi", max_tokens=None, temperature=0)
    theirs = EdgelmClient(service).chat_once("fake-slow", "hi", temperature=0)
    same = ("text", "finish_reason", "prompt_tokens", "completion_tokens", "usage_estimated")
    assert [getattr(ours, f) for f in same] == [getattr(theirs, f) for f in same]
    assert ours.text == "one two three four five six"
    assert ours.server_timings is not None and ours.server_timings["predicted_n"] == 6
    assert 0 <= ours.prepare_s <= ours.ttfb_s <= ours.ttft_s <= ours.total_s
    assert len(ours.itl_s) == 5 and sum(ours.itl_s) >= 4 * 0.02  # 20 ms between tokens
    wire.close()


def test_connections_are_kept_and_replaced_when_they_went_away(service: str) -> None:
    wire = WireClient(service)
    assert wire.chat_once("fake-a", "one").text == "Fake answer to: one"
    (conn,) = wire._idle
    assert wire.chat_once("fake-a", "two").text == "Fake answer to: two"
    assert wire._idle == [conn]  # kept alive
    conn.sock.shutdown(socket.SHUT_RDWR)  # as a server closing an idle connection would
    assert wire.chat_once("fake-a", "three").text == "Fake answer to: three"
    assert len(wire._idle) == 1 and wire._idle[0] is not conn

    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: answers.append(wire.chat_once("fake-a", f"t{i}").text))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [f"Fake answer to: t{i}" for i in range(3)]
    assert 1 <= len(wire._idle) <= 3  # as many as were needed at once, all kept for later
    wire.close()
    assert wire._idle == []


def test_errors_are_the_services_own(service: str) -> None:
    wire = WireClient(service)
    with pytest.raises(ServiceError) as info:
        wire.chat_once("nope", "hi")
    assert info.value.status == 404 and "fake-a" in info.value.message
    with pytest.raises(ServiceError) as bad:
        wire.chat_once("fake-a", "hi", temperature=7)
    assert bad.value.status == 400 and bad.value.param == "temperature"
    assert wire.chat_once("fake-a", "still fine").text == "Fake answer to: still fine"
    with pytest.raises(ServiceUnavailable):
        WireClient(f"http://127.0.0.1:{free_port()}").chat_once("fake-a", "hi")
    with pytest.raises(ValueError):
        WireClient("ftp://example")


@pytest.mark.parametrize("first", ["answer", "error"])
def test_the_end_of_a_chunked_answer_is_read_before_the_next_request(first: str) -> None:
    """A server that sends the chunked body's last, empty chunk a moment after [DONE] (as
    uvicorn does): the next answer must not start with it, whether the first one ended well
    or with an in-band error (a generation timeout, say)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def serve() -> None:
        answered = 0
        while answered < 2:  # a client that dropped its connection comes back on a new one
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as incoming:
                while answered < 2:
                    length = 0
                    while (line := incoming.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    if not line:
                        break  # the client closed this connection
                    incoming.read(length)
                    n = answered
                    event = b'data: {"choices":[{"delta":{"content":"answer %d"}}]}\n\n' % n
                    if n == 0 and first == "error":
                        event = b'data: {"error":{"message":"too slow","type":"server_error"}}\n\n'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"
                        + chunk(event)
                        + chunk(b"data: [DONE]\n\n")
                    )
                    time.sleep(0.05)
                    with contextlib.suppress(OSError):  # the client may have left already
                        conn.sendall(b"0\r\n\r\n")
                    answered += 1

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    wire = WireClient(f"http://127.0.0.1:{port}")
    if first == "error":
        with pytest.raises(ServiceError, match="too slow"):
            wire.chat_once("m", "hi")
    else:
        assert wire.chat_once("m", "hi").text == "answer 0"
    assert wire.chat_once("m", "hi").text == "answer 1"
    wire.close()
    server.join(timeout=5)
    listener.close()
