"""Refusing an NFS client the way a server does: ONC RPC replies of MSG_DENIED / AUTH_ERROR.

A mount target that refuses a client (IAM identity rejected, plain NFS where IAM is
required) could just close the connection, but the kernel's NFS client reconnects at
once, up to a thousand times a second, until mount.nfs4 gives up. Through the guest's
slirp every one of those connections holds a host socket for a while: slirp runs out of
descriptors and aborts, taking the guest's network with it. Answering each call with
AUTH_ERROR (AUTH_TOOWEAK, which the kernel maps to EACCES) ends the mount attempt at once
with "access denied by server", and the client closes the connection itself.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Callable

from OpenSSL import SSL

LAST_FRAGMENT = 0x80000000
MAX_RECORD = 1 << 20
REPLY, MSG_DENIED, AUTH_ERROR, AUTH_TOOWEAK = 1, 1, 1, 5


def denial(xid: bytes) -> bytes:
    """A record-marked RPC reply rejecting call xid for weak authentication."""
    body = xid + struct.pack(">IIII", REPLY, MSG_DENIED, AUTH_ERROR, AUTH_TOOWEAK)
    return struct.pack(">I", LAST_FRAGMENT | len(body)) + body


def deny_calls(recv: Callable[[], bytes], send: Callable[[bytes], None]) -> int:
    """Answer every RPC call with a denial until the client closes; the number denied.

    Stops as soon as the bytes do not look like record-marked RPC (a fragment without
    the last-fragment bit, or a huge one): that client is not NFS, a plain close will do.
    """
    buffer = b""
    denied = 0
    while True:
        while len(buffer) >= 4:
            (mark,) = struct.unpack(">I", buffer[:4])
            length = mark & ~LAST_FRAGMENT
            if not mark & LAST_FRAGMENT or length > MAX_RECORD or length < 4:
                return denied
            if len(buffer) < 4 + length:
                break
            xid, buffer = buffer[4:8], buffer[4 + length:]
            send(denial(xid))
            denied += 1
        data = recv()
        if not data:
            return denied
        buffer += data


def _wait(sock: socket.socket, readable: bool, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not any(select.select([sock] if readable else [], [] if readable else [sock], [],
                                               remaining)[:2]):
        raise TimeoutError("the refused client neither closed nor sent")


def deny_over_tls(conn: SSL.Connection, raw: socket.socket, timeout: float) -> None:
    """deny_calls inside an established TLS connection (non-blocking raw socket), bounded in time."""
    deadline = time.monotonic() + timeout

    def recv() -> bytes:
        while True:
            try:
                return conn.recv(65536)
            except SSL.WantReadError:
                _wait(raw, True, deadline)
            except SSL.WantWriteError:
                _wait(raw, False, deadline)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                return b""

    def send(data: bytes) -> None:
        while data:
            try:
                data = data[conn.send(data):]
            except SSL.WantWriteError:
                _wait(raw, False, deadline)
            except SSL.WantReadError:
                _wait(raw, True, deadline)

    try:
        deny_calls(recv, send)
    except (SSL.Error, OSError, TimeoutError):
        pass  # the client went away or took too long: the caller closes as usual


def deny_plain(raw: socket.socket, timeout: float) -> None:
    """deny_calls on a plain TCP connection, bounded in time."""
    deadline = time.monotonic() + timeout

    def recv() -> bytes:
        _wait(raw, True, deadline)
        return raw.recv(65536)

    try:
        raw.setblocking(True)
        raw.settimeout(timeout)
        deny_calls(recv, raw.sendall)
    except (OSError, TimeoutError):
        pass
