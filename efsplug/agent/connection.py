"""One client connection: read each request within its deadline, hand it to the plugin, answer.

A connection is always in one of three states; the server reads them to decide what its
connection cap may evict and what shutdown cuts:
- WAITING: no byte of the next request yet (a fresh or a kept-alive connection);
- READING: part of a request is in, and the request's deadline runs;
- DISPATCHED: the plugin has the request (a Mount may take minutes). Never cut: shutdown
  waits for it, because a mount cut halfway leaves a tunnel or an unrecorded mount.
Every transition goes through the server (the Gate), under its lock.
"""

from __future__ import annotations

import http
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from efsplug.agent import protocol
from efsplug.agent.httpwire import BadRequest, ClientGone, Head, Reader, ReadTimeout, read_body, read_head
from efsplug.agent.plugin import Answer
from efsplug.agent.requestlog import RequestLog

WAITING, READING, DISPATCHED = "waiting", "reading", "dispatched"


@dataclass(frozen=True)
class Limits:
    max_connections: int = 64  # served at once; more are closed at accept, without a thread
    request_timeout: float = 10.0  # head + body of one request, from its first byte (from accept on a fresh connection)
    idle_timeout: float = 300.0  # a kept-alive connection's wait for its next request
    write_timeout: float = 10.0  # one answer; a client that does not read is cut
    evict_after: float = 1.0  # at the cap, a connection silent this long gives way to a new one
    linger_seconds: float = 2.0  # after refusing a request, how long its unread input is drained
    linger_bytes: int = 16 * protocol.MAX_BODY


class Slot:
    """A connection as the server tracks it; state and since change only under its lock."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.accepted = now
        self.state = WAITING
        self.since = now
        self.cut = False


class Gate(Protocol):
    """The server's side of a connection's state changes."""

    def to_reading(self, slot: Slot) -> bool: ...  # False: stopping or cut, give up
    def to_dispatched(self, slot: Slot) -> bool: ...  # False: stopping or cut, do not start it
    def to_waiting(self, slot: Slot) -> bool: ...  # leaves DISPATCHED; False: close now


class Connection:
    def __init__(self, slot: Slot, gate: Gate, handle: Callable[[str, bytes], Answer],
                 log: RequestLog, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.slot = slot
        self.sock = slot.sock
        self.gate = gate
        self.handle = handle
        self.log = log
        self.limits = limits
        self.clock = clock
        self.reader = Reader(slot.sock, clock)

    def serve(self) -> None:
        """Requests until the client closes, goes quiet, sends something unframeable, or the
        server stops. The caller closes the socket."""
        try:
            first = True
            while True:
                # A fresh connection's silence counts against its first request's deadline:
                # connecting and sending nothing must not hold a slot for the idle timeout.
                now = self.clock()
                wait = self.slot.accepted + self.limits.request_timeout - now if first else self.limits.idle_timeout
                if not self.reader.wait_for_data(wait) or not self.gate.to_reading(self.slot):
                    return  # nothing of a request arrived: closed without an answer or a log line
                started = self.slot.accepted if first else self.clock()
                self.reader.deadline = started + self.limits.request_timeout
                if not self._one_request():
                    return
                first = False
        except Exception as exc:  # a bug: this connection ends, the agent serves on
            where = "".join(traceback.format_tb(exc.__traceback__))  # locations only: no request data
            print(f"efsplug agent: connection failed ({type(exc).__name__}); closed\n{where}",
                  file=sys.stderr, end="", flush=True)

    def _one_request(self) -> bool:
        """Read, dispatch and answer one request; whether the connection stays open."""
        started = time.perf_counter()
        head: Optional[Head] = None
        try:
            head = read_head(self.reader)
            if head.method != "POST":
                raise BadRequest(405, f"method {head.method} is not supported; the plugin protocol uses POST",
                                 head.target)
            body = read_body(self.reader, head, protocol.MAX_BODY, self._send_continue)
        except BadRequest as exc:
            self._refuse(exc.target, Answer(exc.status, protocol.error(exc.text), err=exc.text), started, linger=True)
            return False
        except ReadTimeout:
            text = f"request not complete within {self.limits.request_timeout:g} s; send it at once"
            self._refuse(head.target if head else "", Answer(408, protocol.error(text), err=text), started)
            return False
        except ClientGone:
            if self.slot.cut:  # by shutdown: the client did nothing wrong
                text = "the agent is stopping; the request was cut before it was complete"
                self.log.request(head.target if head else "-", Answer(503, {}, err=text), time.perf_counter() - started)
                return False
            text = "connection closed before the request was complete"  # a half-closed client can still read this
            self._refuse(head.target if head else "", Answer(400, protocol.error(text), err=text), started)
            return False
        assert head is not None
        if not self.gate.to_dispatched(self.slot):
            return False  # stopping: not started, so not answered (dockerd retries, maybe on our successor)
        answer = Answer(499, {}, err="client went away before the answer")
        keep = False
        try:
            answer = self.handle(head.endpoint, body)
            keep = self._send(answer, close=not head.keep_alive) and head.keep_alive
        finally:
            keep = self.gate.to_waiting(self.slot) and keep
            self.log.request(head.endpoint, answer, time.perf_counter() - started)
        return keep

    def _refuse(self, target: str, answer: Answer, started: float, linger: bool = False) -> None:
        """Answer a request that is not dispatched, log it, and (linger) drain its unread input."""
        sent = self._send(answer, close=True)
        self.log.request(target or "-", answer, time.perf_counter() - started)
        if sent and linger:
            self._linger()

    def _send_continue(self) -> None:
        self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _send(self, answer: Answer, close: bool) -> bool:
        data = protocol.encode(answer.body)
        try:
            reason = http.HTTPStatus(answer.status).phrase
        except ValueError:
            reason = "Error"
        lines = [f"HTTP/1.1 {answer.status} {reason}", f"Content-Type: {protocol.CONTENT_TYPE}",
                 f"Content-Length: {len(data)}"]
        if close:
            lines.append("Connection: close")
        return self._write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + data)

    def _write(self, data: bytes) -> bool:
        """All of data within the write timeout (Python bounds sendall as a whole since 3.5)."""
        try:
            self.sock.settimeout(self.limits.write_timeout)
            self.sock.sendall(data)
            return True
        except OSError:  # reset, cut by shutdown, or the client does not read (timeout)
            return False

    def _linger(self) -> None:
        """Close gently after refusing a request whose input was not all read: closing a unix
        socket with unread input makes the client's read fail (ECONNRESET), often before it
        has read our answer. Bounded in time and bytes; cut at once by shutdown."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = self.clock() + self.limits.linger_seconds
            left = self.limits.linger_bytes
            scratch = bytearray(65536)
            while left > 0:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                self.sock.settimeout(remaining)
                n = self.sock.recv_into(scratch)
                if not n:
                    break
                left -= n
        except OSError:
            pass  # the client went away: nothing left to be gentle about
