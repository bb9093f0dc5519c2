"""The agent's HTTP framing (httpwire) and log escaping (requestlog), over a socketpair."""

from __future__ import annotations

import io
import socket
import threading
import time
from typing import Iterator, Tuple

import pytest
from hypothesis import given, strategies as st

from efsplug.agent import httpwire
from efsplug.agent.httpwire import BadRequest, Head, Reader, ReadTimeout, read_body, read_head
from efsplug.agent.plugin import Answer
from efsplug.agent.protocol import MAX_BODY
from efsplug.agent.requestlog import MAX_FIELD, RequestLog, log_field


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def parse(pair: Tuple[socket.socket, socket.socket], data: bytes, *, eof: bool = True) -> Tuple[Head, bytes]:
    server, client = pair

    def send() -> None:  # from a thread: more than a socket buffer must not block the reader
        try:
            client.sendall(data)
            if eof:
                client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reader gave up and the test closed the pair

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    reader = Reader(server)
    reader.deadline = time.monotonic() + 5
    try:
        head = read_head(reader)
        return head, read_body(reader, head, MAX_BODY, lambda: None)
    finally:
        server.shutdown(socket.SHUT_RD)  # a sender still writing is released
        sender.join(5)


def refused(pair: Tuple[socket.socket, socket.socket], data: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse(pair, data)
    return caught.value


POST = b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\n"


def test_dockerds_request_and_a_chunked_one(pair: Tuple[socket.socket, socket.socket]) -> None:
    head, body = parse(pair, POST + b"Content-Length: 14\r\nAccept: x\r\n\r\n{\"Name\":\"v\"}\n\n")
    assert (head.method, head.endpoint, head.version, head.keep_alive) == ("POST", "/VolumeDriver.Get", (1, 1), True)
    assert body == b'{"Name":"v"}\n\n'


def test_chunked_body_with_an_extension_and_trailers(pair: Tuple[socket.socket, socket.socket]) -> None:
    _, body = parse(pair, POST + b"Transfer-Encoding: chunked\r\n\r\n"
                    b"5 ;x=y\r\n{\"Nam\r\n9\r\ne\":\"v1\"}\n\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert body == b'{"Name":"v1"}\n'


@pytest.mark.parametrize("size", [b"-100000", b"+5", b"0x5", b" 5", b"5 ", b"1_0", b"", b"g", b"000000005", b"5\r"])
def test_a_chunk_size_that_is_not_plain_hex_is_refused(pair: Tuple[socket.socket, socket.socket], size: bytes) -> None:
    exc = refused(pair, POST + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n{\"Name\":\"v1\"}\r\n0\r\n\r\n")
    assert exc.status == 400 and ("chunk size" in exc.text or "chunk extension" in exc.text)


def test_chunks_count_against_the_body_limit_before_they_are_read(pair: Tuple[socket.socket, socket.socket]) -> None:
    half = b"%x\r\n" % (MAX_BODY // 2)
    exc = refused(pair, POST + b"Transfer-Encoding: chunked\r\n\r\n" + half + b"x" * (MAX_BODY // 2) + b"\r\n"
                  + b"%x\r\n" % (MAX_BODY // 2 + 1))  # the third chunk's data is never sent: never waited for
    assert exc.status == 413 and exc.text.startswith(f"request body over {MAX_BODY} bytes")


def test_chunk_data_must_end_where_its_size_says(pair: Tuple[socket.socket, socket.socket]) -> None:
    exc = refused(pair, POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n")
    assert exc.status == 400 and "not followed by CRLF" in exc.text


@pytest.mark.parametrize("headers, status, text", [
    (b"Content-Length: -1\r\n", 400, "Content-Length '-1' is not a decimal number"),
    (b"Content-Length: +1\r\n", 400, "is not a decimal number"),
    (b"Content-Length: 0x10\r\n", 400, "is not a decimal number"),
    (b"Content-Length: 1 2\r\n", 400, "is not a decimal number"),
    (b"Content-Length: 2\r\nContent-Length: 3\r\n", 400, "different values"),
    (b"Content-Length: 9" + b"9" * 5000 + b"\r\n", 413, "request body over"),
    (b"Content-Length: 1048577\r\n", 413, "request body over"),
    (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", 400, "both Transfer-Encoding and Content-Length"),
    (b"Transfer-Encoding: gzip, chunked\r\n", 501, "transfer coding 'gzip, chunked' is not supported"),
    (b"Expect: something\r\nContent-Length: 2\r\n", 417, "Expect 'something'"),
    (b" folded: x\r\n", 400, "folded header lines"),
    (b"no colon here\r\n", 400, "malformed header line"),
    (b"Bad Name: x\r\n", 400, "malformed header line"),
    (b"X: a\x1bb\r\n", 400, "holds control characters"),
    (b"X: " + b"a" * httpwire.MAX_HEAD + b"\r\n", 431, "request head over"),
    (b"X: a\r\n" * (httpwire.MAX_HEADERS + 1), 431, "more than 64 request headers"),
])
def test_bad_heads_and_framing_are_refused(pair: Tuple[socket.socket, socket.socket],
                                           headers: bytes, status: int, text: str) -> None:
    exc = refused(pair, POST + headers + b"\r\n{}")
    assert (exc.status, text in exc.text) == (status, True), exc.text
    assert exc.target == "/VolumeDriver.Get"


@pytest.mark.parametrize("line, status", [
    (b"POST /VolumeDriver.Get HTTP/2.0", 505),
    (b"POST /VolumeDriver.Get HTTP/1.1 x", 400),
    (b"POST  /VolumeDriver.Get HTTP/1.1", 400),
    (b"POST VolumeDriver.Get HTTP/1.1", 400),
    (b"POST /Volume\x1bDriver.Get HTTP/1.1", 400),
    (b"POST /Volume\xe9Driver.Get HTTP/1.1", 400),
    (b"P(ST /VolumeDriver.Get HTTP/1.1", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS hello
    (b"", 400),
])
def test_bad_request_lines_are_refused(pair: Tuple[socket.socket, socket.socket], line: bytes, status: int) -> None:
    assert refused(pair, line + b"\r\n\r\n").status == status


def test_a_huge_request_line_is_refused_with_its_start_for_the_log(pair: Tuple[socket.socket, socket.socket]) -> None:
    exc = refused(pair, b"POST /" + b"A" * 100_000 + b" HTTP/1.1\r\n\r\n")
    assert exc.status == 414 and exc.target.startswith("/AAAA") and len(exc.target) < httpwire.MAX_REQUEST_LINE


def test_the_deadline_is_for_the_whole_request_not_one_read(pair: Tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    stop = threading.Event()

    def trickle() -> None:  # a byte every 50 ms: a per-read timeout of 0.3 s would never fire
        for byte in POST:
            if stop.wait(0.05):
                return
            client.sendall(bytes([byte]))

    t = threading.Thread(target=trickle)
    t.start()
    try:
        reader = Reader(server)
        reader.deadline = time.monotonic() + 0.3
        started = time.monotonic()
        with pytest.raises(ReadTimeout):
            read_head(reader)
        assert 0.25 < time.monotonic() - started < 1.0
    finally:
        stop.set()
        t.join(5)


def test_http_1_0_and_connection_close_end_the_connection(pair: Tuple[socket.socket, socket.socket]) -> None:
    head, _ = parse(pair, b"POST /Plugin.Activate HTTP/1.0\r\n\r\n")
    assert head.keep_alive is False


@given(st.binary(max_size=300))
def test_any_bytes_are_a_request_or_a_bad_request(data: bytes) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            parse((a, b), data)
        except (BadRequest, httpwire.ClientGone):
            pass
    finally:
        a.close()
        b.close()


# ---- the log line ------------------------------------------------------------------

def test_log_field_escapes_controls_and_bounds_the_length() -> None:
    assert log_field("VolumeDriver.Get") == "VolumeDriver.Get"
    assert log_field("a\x1b[2Jb\nc d\\e\x85\u2028\x00") == "a\\x1b[2Jb\\nc\\x20d\\\\e\\x85\\u2028\\x00"
    long = log_field("A" * 100_000)
    assert long == "A" * (MAX_FIELD - 3) + "..." and len(long) == MAX_FIELD
    escapes = log_field("\x01" * 100)  # 4 characters each: cut between escapes, not inside one
    assert escapes.endswith("\\x01...") and len(escapes) <= MAX_FIELD and escapes.count("\\x01") == (MAX_FIELD - 3) // 4
    assert log_field("é✓") == "é✓"


@given(st.text(max_size=500))
def test_log_field_is_one_printable_bounded_token(text: str) -> None:
    field = log_field(text)
    assert len(field) <= MAX_FIELD and field.isprintable() and " " not in field


def test_request_log_escapes_endpoint_and_volume() -> None:
    out = io.StringIO()
    RequestLog(out).request("/Volume\x1b]0;pwned\x07" + "x" * 5000, Answer(404, {}, volume="v\n1", err="no\nsuch"), 0.001)
    line = out.getvalue()
    assert line.count("\n") == 1 and "\x1b" not in line and "\x07" not in line
    endpoint = line.split(" ")[0]
    assert endpoint.startswith("endpoint=Volume\\x1b]0;pwned\\x07xxx") and endpoint.endswith("...")
    assert len(endpoint) == len("endpoint=") + MAX_FIELD
    assert " volume=v\\n1 " in line and line.endswith('outcome=error err="no\\nsuch"\n')
