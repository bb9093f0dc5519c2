"""HTTP/1.1 over a unix socket: one thread per connection, bounded bodies, a log line per request.

dockerd keeps connections alive and posts small JSON bodies without a Content-Type; every
answer is JSON, errors included, so Docker always has an `Err` to show.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import stat
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO

from efsplug.agent import protocol
from efsplug.agent.plugin import Answer, Plugin
from efsplug.errors import EfsplugError

if TYPE_CHECKING:
    from efsplug.cloudwatch import LogSink

SOCKET_MODE = 0o660
IDLE_TIMEOUT = 300.0  # an idle keep-alive connection's thread ends after this


class SocketInUse(EfsplugError):
    """Another live process answers on the socket path."""


def bind_socket(path: Path) -> socket.socket:
    """A listening unix socket at path, 0660 root:root; a stale socket file is replaced."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; move it away")
        if _answers(path):
            raise SocketInUse(f"another process serves {path}; stop it first (or pass --socket)")
        os.unlink(path)  # a crashed agent's socket: nobody listens on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no moment where the socket is open to others
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)
    sock.listen(64)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class RequestLog:
    """One line per request on stdout (journald): endpoint, volume, duration, outcome.

    With a sink ([cloudwatch-log] enabled), the same line goes to CloudWatch Logs too.
    """

    def __init__(self, out: Optional[TextIO] = None, sink: Optional[LogSink] = None) -> None:
        self.out = out
        self.sink = sink
        self._lock = threading.Lock()

    def request(self, endpoint: str, answer: Answer, seconds: float) -> None:
        # json.dumps: quotes and control characters escaped, so one request stays one line.
        outcome = "ok" if not answer.err else f"error err={json.dumps(answer.err[:500])}"
        volume = answer.volume or "-"
        line = f"endpoint={endpoint.lstrip('/')} volume={volume} duration_ms={seconds * 1000:.1f} outcome={outcome}\n"
        out = self.out or sys.stdout
        with self._lock:
            out.write(line)
            out.flush()
        if self.sink is not None:
            self.sink.emit(line.rstrip("\n"))  # never blocks: a bounded queue


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as dockerd's client expects
    timeout = IDLE_TIMEOUT
    server: "AgentServer"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        started = time.perf_counter()
        endpoint = self.path.split("?", 1)[0]
        answer = Answer(499, {}, err="client went away before the answer")
        self.server.enter()
        try:
            body = self._body()
            if body is None:
                self.close_connection = True  # the unread body cannot be skipped safely
                self._linger = True
                text = f"request body over {protocol.MAX_BODY} bytes; Docker never sends one this large"
                answer = Answer(413, protocol.error(text), err=text)
            else:
                answer = self.server.plugin.handle(endpoint, body)
            self._send(answer)
        finally:
            self.server.leave()
            self.server.log.request(endpoint, answer, time.perf_counter() - started)

    _linger = False
    LINGER_BYTES = 16 * protocol.MAX_BODY
    LINGER_SECONDS = 2.0

    def finish(self) -> None:
        super().finish()
        if self._linger:
            self._drain()

    def _drain(self) -> None:
        """Close gently after refusing an unread body: closing a unix socket with unread
        input makes the client's read fail (ECONNRESET) before it sees our answer."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.LINGER_SECONDS
            left = self.LINGER_BYTES
            while left > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # the client went away: nothing left to be gentle about

    def _not_post(self) -> None:
        text = f"method {self.command} is not supported; the plugin protocol uses POST"
        self.close_connection = True
        self._send(Answer(405, protocol.error(text), err=text))

    do_GET = do_PUT = do_DELETE = do_HEAD = _not_post  # noqa: N815

    def _body(self) -> Optional[bytes]:
        """The request body, or None if it exceeds the limit."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if length < 0 or length > protocol.MAX_BODY:
            return None
        return self.rfile.read(length)

    def _chunked(self) -> Optional[bytes]:
        parts = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > protocol.MAX_BODY:
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # CRLF after the chunk

    def _send(self, answer: Answer) -> None:
        data = protocol.encode(answer.body)
        self.send_response(answer.status)
        self.send_header("Content-Type", protocol.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # RequestLog writes the one line per request; http.server's own would leak paths

    def address_string(self) -> str:
        return "unix"  # client_address is '' for unix sockets


class AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # idle keep-alive connections must not block exit
    block_on_close = False

    def __init__(self, sock: socket.socket, plugin: Plugin, log: Optional[RequestLog] = None) -> None:
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.socket_path = Path(sock.getsockname())
        self._socket_inode = os.stat(self.socket_path).st_ino
        self.plugin = plugin
        self.log = log or RequestLog()
        self._busy = 0
        self._idle = threading.Condition()

    def enter(self) -> None:
        with self._idle:
            self._busy += 1

    def leave(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for requests in progress (a mount must finish or undo itself, not be cut off)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def remove_socket(self) -> None:
        """Unlink the socket file if it is still ours (a newer agent's stays)."""
        try:
            if os.stat(self.socket_path).st_ino == self._socket_inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
