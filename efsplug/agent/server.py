"""HTTP/1.1 over a unix socket: bounded connections, one thread each, and a bounded shutdown.

dockerd keeps connections alive and posts small JSON bodies without a Content-Type; every
answer is JSON, errors included, so Docker always has an `Err` to show. The request
itself is read by connection.py (deadlines) and httpwire.py (framing and sizes).

What a misbehaving client can cost, at most:
- a connection slot and a thread: at most Limits.max_connections at once. Beyond that a
  connection that has been silent for Limits.evict_after gives way (idle keep-alives,
  clients that connect and send nothing); if none has, the new one is closed at once,
  before any thread exists. dockerd retries a closed connection for 30 s with back-off,
  and every non-dispatched slot frees itself within Limits.request_timeout (10 s).
- time: one request's head and body must arrive within Limits.request_timeout in all,
  not per read.
- memory: a head of 16 KiB and a body of protocol.MAX_BODY per connection.
- shutdown: connections not running a request are cut at once; only requests already
  with the plugin (a Mount) are waited for, by wait_idle().
"""

from __future__ import annotations

import os
import socket
import socketserver
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Set

from efsplug.agent.connection import DISPATCHED, READING, WAITING, Connection, Limits, Slot
from efsplug.agent.plugin import Plugin
from efsplug.agent.requestlog import RequestLog
from efsplug.errors import EfsplugError

__all__ = ["AgentServer", "Limits", "RequestLog", "SocketInUse", "bind_socket"]

SOCKET_MODE = 0o660
REFUSAL_NOTE_INTERVAL = 10.0  # at most one "connections refused" line this often


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


class AgentServer(socketserver.UnixStreamServer):
    """serve_forever() accepts; each admitted connection gets a thread (connection.py)."""

    def __init__(self, sock: socket.socket, plugin: Plugin, log: Optional[RequestLog] = None,
                 limits: Limits = Limits(), clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(sock.getsockname(), socketserver.BaseRequestHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.socket_path = Path(sock.getsockname())
        self._socket_inode = os.stat(self.socket_path).st_ino
        self.plugin = plugin
        self.log = log or RequestLog()
        self.limits = limits
        self._clock = clock
        self._lock = threading.Condition()
        self._slots: Set[Slot] = set()  # admitted and not yet closed (cut ones included)
        self._dispatched = 0
        self._stopping = False
        self._refused = 0
        self._next_refusal_note = 0.0

    # ---- admission: in the accept thread, never blocks ------------------------------

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        now = self._clock()
        note = None
        with self._lock:
            admitted = not self._stopping and self._make_room(now)
            if admitted:
                slot = Slot(request, now)
                self._slots.add(slot)
            else:
                note = self._refusal(now)
        if note:
            self.log.note(note)
        if not admitted:
            request.close()  # before any thread: a flood of connections costs no threads
            return
        try:
            threading.Thread(target=self._serve, args=(slot,), name="efsplug-agent-conn", daemon=True).start()
        except RuntimeError:  # no thread to be had: this one connection is closed
            self._forget(slot)
            self.log.note("efsplug agent: could not start a thread for a connection; closed it")

    def _make_room(self, now: float) -> bool:
        """Whether a connection may be admitted, evicting the longest-silent one at the cap."""
        live = [s for s in self._slots if not s.cut]
        if len(live) < self.limits.max_connections:
            return True
        silent = [s for s in live if s.state == WAITING and now - s.since >= self.limits.evict_after]
        if not silent:
            return False
        self._cut(min(silent, key=lambda s: s.since))  # an idle keep-alive may always be closed (RFC 9112 9.8)
        return True

    def _refusal(self, now: float) -> Optional[str]:
        self._refused += 1
        if now < self._next_refusal_note:
            return None
        self._next_refusal_note = now + REFUSAL_NOTE_INTERVAL
        count, self._refused = self._refused, 0
        state = "stopping" if self._stopping else f"{self.limits.max_connections} connections busy"
        return f"efsplug agent: refused {count} connection(s) ({state}); closed at once, dockerd retries"

    # ---- the connection's thread --------------------------------------------------

    def _serve(self, slot: Slot) -> None:
        try:
            Connection(slot, self, self.plugin.handle, self.log, self.limits, self._clock).serve()
        finally:
            self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        with self._lock:
            self._slots.discard(slot)
            slot.sock.close()  # under the lock: _cut() never touches a closed (reused) descriptor
            self._lock.notify_all()

    def to_reading(self, slot: Slot) -> bool:
        return self._move(slot, READING)

    def to_dispatched(self, slot: Slot) -> bool:
        return self._move(slot, DISPATCHED)

    def to_waiting(self, slot: Slot) -> bool:
        return self._move(slot, WAITING)

    def _move(self, slot: Slot, state: str) -> bool:
        with self._lock:
            if slot.state == DISPATCHED:
                self._dispatched -= 1
                self._lock.notify_all()
            go = not (slot.cut or self._stopping)
            slot.state, slot.since = (state if go else WAITING), self._clock()
            if slot.state == DISPATCHED:
                self._dispatched += 1
            return go

    @staticmethod
    def _cut(slot: Slot) -> None:
        """Wake the slot's thread out of any recv or send: it sees end of input and closes."""
        slot.cut = True
        try:
            slot.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client already went

    # ---- stopping ---------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting, then cut every connection that is not running a request.

        A client that promised a body and never sends it must not hold up the stop; a
        request the plugin already runs is left to finish (wait_idle)."""
        super().shutdown()
        with self._lock:
            self._stopping = True
            for slot in self._slots:
                if slot.state != DISPATCHED:
                    self._cut(slot)
            self._lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for requests in progress (a mount must finish or undo itself, not be cut
        off); once stopping, also for every connection's thread to close its socket."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self._dispatched == 0 and not (self._stopping and self._slots), timeout)

    def remove_socket(self) -> None:
        """Unlink the socket file if it is still ours (a newer agent's stays)."""
        try:
            if os.stat(self.socket_path).st_ino == self._socket_inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
