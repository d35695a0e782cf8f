"""The bench's stdlib HTTP client: the same results as the httpx client, errors mapped the
same way, and a keep-alive connection that went away is replaced."""

from __future__ import annotations

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


def test_one_connection_per_thread_is_kept_and_replaced_when_it_went_away(service: str) -> None:
    wire = WireClient(service)
    assert wire.chat_once("fake-a", "one").text == "Fake answer to: one"
    conn = wire._local.conn
    assert wire.chat_once("fake-a", "two").text == "Fake answer to: two"
    assert wire._local.conn is conn  # kept alive
    conn.sock.shutdown(socket.SHUT_RDWR)  # as a server closing an idle connection would
    assert wire.chat_once("fake-a", "three").text == "Fake answer to: three"
    assert wire._local.conn is not conn

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
    assert len(wire._opened) == 5  # the first, its replacement, one per worker thread
    wire.close()


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


def test_the_end_of_a_chunked_answer_is_read_before_the_next_request() -> None:
    """A server that sends the chunked body's last, empty chunk a moment after [DONE] (as
    uvicorn does): the next answer on the connection must not start with it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as incoming:
            for n in range(2):
                length = 0
                while (line := incoming.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                incoming.read(length)
                event = b'data: {"choices":[{"delta":{"content":"answer %d"}}]}\n\n' % n
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                    + chunk(event)
                    + chunk(b"data: [DONE]\n\n")
                )
                time.sleep(0.05)
                conn.sendall(b"0\r\n\r\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    wire = WireClient(f"http://127.0.0.1:{port}")
    assert [wire.chat_once("m", "hi").text for _ in range(2)] == ["answer 0", "answer 1"]
    wire.close()
    server.join(timeout=5)
    listener.close()
