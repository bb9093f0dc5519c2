"""An NFS NULL call (ONC RPC procedure 0 of program 100003, version 4) over TCP.

The smallest thing an NFS server answers: it proves the whole path (tunnel, TLS, the
mount target's admission of this client) without mounting anything. A server that
refuses the client answers MSG_DENIED (EFS, and the bed, say AUTH_ERROR).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

LAST_FRAGMENT = 0x80000000
CALL, REPLY = 0, 1
MSG_ACCEPTED, MSG_DENIED = 0, 1
NFS_PROGRAM, NFS_V4, NULL_PROC = 100003, 4, 0
AUTH_NONE, AUTH_SYS = 0, 1
MAX_REPLY = 1024  # a NULL reply is 24 bytes; anything longer is not one


@dataclass(frozen=True)
class NullReply:
    accepted: bool
    detail: str  # "success", or what the server said instead


def null_call(xid: int) -> bytes:
    """The record-marked call, with AUTH_SYS root credentials as the kernel's mount sends."""
    machine = b"efsplug"
    cred = struct.pack(">II", 0, len(machine)) + machine + b"\0" * (-len(machine) % 4) + struct.pack(">III", 0, 0, 0)
    body = struct.pack(">IIIIII", xid, CALL, 2, NFS_PROGRAM, NFS_V4, NULL_PROC)
    body += struct.pack(">II", AUTH_SYS, len(cred)) + cred + struct.pack(">II", AUTH_NONE, 0)
    return struct.pack(">I", LAST_FRAGMENT | len(body)) + body


def parse_reply(xid: int, record: bytes) -> NullReply:
    """What the server said to call xid; ValueError if record is not an RPC reply to it."""
    if len(record) < 12:
        raise ValueError("a reply too short to be RPC")
    got_xid, kind, stat = struct.unpack(">III", record[:12])
    if got_xid != xid or kind != REPLY:
        raise ValueError("not a reply to the call sent")
    if stat == MSG_DENIED:
        reason = struct.unpack(">I", record[12:16])[0] if len(record) >= 16 else -1
        return NullReply(False, "authentication refused" if reason == 1 else "RPC version refused")
    if stat != MSG_ACCEPTED or len(record) < 24:
        raise ValueError("a reply neither accepted nor denied")
    verf_len = struct.unpack(">I", record[16:20])[0]
    offset = 20 + verf_len + (-verf_len % 4)
    if len(record) < offset + 4:
        raise ValueError("a reply cut short")
    accept = struct.unpack(">I", record[offset:offset + 4])[0]
    return NullReply(accept == 0, "success" if accept == 0 else f"accept status {accept}")


def call_null(sock: socket.socket) -> NullReply:
    """Send a NULL call on a connected socket (with its timeout set) and read the reply.
    ConnectionError if the other side closes without answering."""
    xid = int.from_bytes(os.urandom(4), "big")
    sock.sendall(null_call(xid))
    mark = _read(sock, 4)
    (value,) = struct.unpack(">I", mark)
    length = value & ~LAST_FRAGMENT
    if not value & LAST_FRAGMENT or length > MAX_REPLY:
        raise ValueError("the answer is not a single RPC record")
    return parse_reply(xid, _read(sock, length))


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed without an answer")
        data += chunk
    return data
