"""mount.efs handing the work before the kernel mount to a resident efsplug (client side).

A short-lived mount.efs spends most of its time starting Python and importing what a
mount needs. When an efsplug agent or supervisor runs, it has all of that loaded (and the
private key read), so mount.efs sends it its command line and environment over a root-only
socket; the resident process runs efsplug.mount.prepare_mount exactly as mount.efs would
(options, config, mount target, credentials, certificate, tunnel, record) and answers
with the mount.nfs4 run to make. mount.efs then runs mount.nfs4 itself, in its own mount
and network namespace. Whenever the resident process cannot be asked, or says it cannot
serve this caller (other namespaces, CloudWatch Logs on), mount.efs does it all itself.

This module imports only the interpreter's C modules (_socket, and _json through
efsplug.litejson): it runs before anything else in mount.efs, and the socket and json
packages would cost it about 10 ms (enum, re and the rest). The resident side passes
socket.socket objects, a subclass of _socket.socket. The protocol: one JSON object each
way, newline-terminated, bounded.
"""

from __future__ import annotations

import _socket
import os
import time

from efsplug import litejson

TYPE_CHECKING = False  # typing is not imported at run time: mount.efs pays for every import
if TYPE_CHECKING:
    from typing import Dict, List, Mapping, Optional

DEFAULT_SOCKET = "/run/efsplug/mount.sock"
SOCKET_ENV = "EFSPLUG_MOUNT_SOCKET"
MAX_MESSAGE = 64 * 1024
VERSION = 1
# The prepare step's own bounds (mount target 16 s, credentials 6 s, tunnel 30 s, ...) are
# inside this (52 s together); past it the resident process is hung, and mount.efs goes it alone.
ANSWER_TIMEOUT = 60.0
RELEASE_TIMEOUT = 15.0  # stopping one tunnel is bounded by 5 s; past this mount.efs undoes it itself
CONNECT_TIMEOUT = 1.0


class ProtocolError(ValueError):
    """A message that is not one: too big, not JSON, not an object."""


def socket_path(environ: Mapping[str, str]) -> str:
    return environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def namespaces(pid: str = "self") -> Dict[str, int]:
    """The mount and network namespaces of pid: the resident process serves only its own."""
    return {ns: os.stat(f"/proc/{pid}/ns/{ns}").st_ino for ns in ("mnt", "net")}


def passed_environment(environ: Mapping[str, str]) -> Dict[str, str]:
    """What prepare_mount reads from the environment: AWS_*, EFSPLUG_* and HOME (profiles)."""
    return {k: v for k, v in environ.items() if k.startswith(("AWS_", "EFSPLUG_")) or k == "HOME"}


def encode(message: dict) -> bytes:
    data = litejson.dumps(message).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes, more than {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes, more than {MAX_MESSAGE}")
    try:
        message = litejson.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("not a JSON message") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


def read_message(sock: _socket.socket, deadline: float) -> dict:
    """One newline-terminated message, read by the deadline (TimeoutError past it)."""
    chunks: List[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete message in time")
        sock.settimeout(remaining)
        chunk = sock.recv(MAX_MESSAGE + 1 - size)
        if not chunk:
            raise ProtocolError("connection closed before a complete message")
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            return decode(b"".join(chunks))
        if size > MAX_MESSAGE:
            raise ProtocolError(f"message longer than {MAX_MESSAGE} bytes")


def request_prepare(argv: List[str], environ: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The resident process's answer for this mount, or None: do it all here.

    An answer is {"ok": true, ...the prepared mount...} or {"ok": false, "error", "exit"}
    (the mount failed there: report it, as mount.efs would have).
    """
    # Gone, refused, hung or garbled: what it may have made for us, it undoes itself when
    # the answer cannot be delivered; a record left by a crash is the supervisor's.
    return _exchange({"v": VERSION, "argv": list(argv), "env": passed_environment(environ),
                      "ns": namespaces(), "pid": os.getpid()}, environ, ANSWER_TIMEOUT)


def request_release(record: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Ask the resident process to undo what it prepared for a mount that was not made.

    It started the tunnel, so only it can collect the stopped tunnel's exit status: undone
    here, the tunnel would stay a zombie of the agent or supervisor. False when it could
    not be asked or did not do it: mount.efs then undoes it itself.
    """
    answer = _exchange({"v": VERSION, "release": record, "env": passed_environment(environ),
                        "ns": namespaces(), "pid": os.getpid()}, environ, RELEASE_TIMEOUT)
    return bool(answer and answer.get("released"))


def _exchange(message: dict, environ: Mapping[str, str], timeout: float) -> Optional[dict]:
    """One request and its answer; None if there is no resident process or no usable answer."""
    path = socket_path(environ)
    if not os.path.exists(path):
        return None  # no agent or supervisor: the usual case on a plain host
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(path)
        sock.sendall(encode(message))
        answer = read_message(sock, time.monotonic() + timeout)
    except (OSError, ProtocolError):
        return None
    finally:
        sock.close()
    if answer.get("v") != VERSION or not answer.get("handled"):
        return None
    return answer
