"""Servers that misbehave on purpose, on 127.0.0.1, for tests of bounded waits.

    with SilentServer() as s:      # accepts, reads, never answers
    with TrickleServer() as t:     # an HTTP answer that never ends: one header byte at a time
    with HugeAnswer() as h:        # an HTTP answer with an endless body
    with JsonAnswer(403, {...}, "AccessDeniedException") as j:  # one scripted JSON answer, always
    with HoldingProxy(moto_url, hold=("POST", path)) as p:  # relays; one matching call's answer never comes

Each runs in daemon threads and is stopped (listener and connections closed) on exit.
"""

from __future__ import annotations

import socket
import threading
from typing import Iterator, List, Optional, Tuple


class _Server:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self.first_accepted = threading.Event()
        self.ended = threading.Event()  # the first connection was closed by its client
        self._stopping = threading.Event()
        self._conns: List[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "_Server":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                self._conns.append(conn)
                self.accepted += 1
            self.first_accepted.set()
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except OSError:
            pass
        finally:
            self.ended.set()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class SilentServer(_Server):
    def handle(self, conn: socket.socket) -> None:
        while conn.recv(65536):
            pass  # read requests, answer none


class TrickleServer(_Server):
    """Reads the request, then sends a status line and one header byte every `gap` seconds, for ever."""

    gap = 0.2

    def handle(self, conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not self._stopping.wait(self.gap):
            conn.sendall(b"a")


class HugeAnswer(_Server):
    """Reads the request, then answers 200 with a body that never ends."""

    def handle(self, conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        chunk = b"x" * 65536
        while not self._stopping.is_set():
            conn.sendall(chunk)


class JsonAnswer(_Server):
    """Every request gets the same answer: status, JSON body, and an AWS error type header
    when given (as the rest-json services send errors). Keep-alive, as botocore expects."""

    def __init__(self, status: int, body: dict, error_type: str = "") -> None:
        super().__init__()
        import json

        self.body = json.dumps(body).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(self.body)}\r\n"
        if error_type:
            head += f"x-amzn-ErrorType: {error_type}\r\n"
        self.head = (head + "\r\n").encode()

    def handle(self, conn: socket.socket) -> None:
        for _ in _requests(conn):
            conn.sendall(self.head + self.body)


class HoldingProxy(_Server):
    """Relays HTTP requests to upstream (moto) and its answers back, except the first request
    whose method and path match hold: that one reaches upstream, which acts on it, but its
    answer is kept (`held` is set, `held_answer` has it) and the client waits for ever, as a
    client killed right after the call would never have heard."""

    def __init__(self, upstream: str, *, hold: Tuple[str, str]) -> None:
        super().__init__()
        self.upstream, self.hold = upstream, hold
        self.held = threading.Event()
        self.held_answer: Optional[bytes] = None

    def handle(self, conn: socket.socket) -> None:
        import urllib.error
        import urllib.request

        for head, body in _requests(conn):
            method, path = head.split(b" ")[:2]
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() not in ("host", "content-length", "connection", "expect"):
                    headers[name] = value.strip()
            request = urllib.request.Request(self.upstream + path.decode(), data=body or None,
                                             method=method.decode(), headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    status, answer_headers, data = answer.status, answer.getheaders(), answer.read()
            except urllib.error.HTTPError as refused:
                status, answer_headers, data = refused.code, refused.headers.items(), refused.read()
            if (method.decode(), path.decode().split("?")[0]) == self.hold and not self.held.is_set():
                self.held_answer = data
                self.held.set()
                self._stopping.wait()
                return
            kept = "".join(f"{k}: {v}\r\n" for k, v in answer_headers
                           if k.lower() not in ("content-length", "transfer-encoding", "connection"))
            conn.sendall(f"HTTP/1.1 {status} X\r\n{kept}Content-Length: {len(data)}\r\n\r\n".encode() + data)


def _requests(conn: socket.socket) -> Iterator[Tuple[bytes, bytes]]:
    """(head, body) of each request on a kept-alive connection, until the client closes."""
    buffered = b""
    while True:
        while b"\r\n\r\n" not in buffered:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffered += chunk
        head, _, buffered = buffered.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(buffered) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffered += chunk
        body, buffered = buffered[:length], buffered[length:]
        yield head, body
