"""Which sockets listen on 127.0.0.1:<port>, asked of the kernel over NETLINK_SOCK_DIAG.

/proc/<pid>/net/tcp answers the same question, but the kernel builds it by walking the
whole established-connections hash table (262,144 buckets on a 2-CPU machine, more with
more memory): 4-5 ms per read whatever the number of sockets, and mount.efs asks while
it waits for a tunnel to listen and before it joins one. A sock_diag dump of listening
sockets walks only the small listening table. The answer covers the network namespace of
the asking process, so callers use it only for tunnels in their own namespace.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Optional, Set

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBxI48s")  # inet_diag_req_v2: family, protocol, extensions, states, socket id
_MESSAGE = struct.Struct("=BBBB2s2s16s16sIQIIIII")  # inet_diag_msg, up to the inode
_LOOPBACK = socket.inet_aton("127.0.0.1")
_MAX_REPLY = 1 << 20  # a bound on what one dump may return: thousands of listeners


def same_namespace(pid: int) -> bool:
    """True if process pid is in this process's network namespace."""
    try:
        mine, theirs = os.stat("/proc/self/ns/net"), os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def loopback_listeners(port: int, timeout: float = 1.0) -> Optional[Set[str]]:
    """Inodes of the TCP sockets listening on 127.0.0.1:port in this network namespace;
    None if the kernel cannot be asked (no sock_diag: the caller reads /proc instead)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    except OSError:
        return None
    with sock:
        sock.settimeout(timeout)
        request = _REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN, b"\0" * 48)
        try:
            sock.send(_HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                      + request)
            return _read_dump(sock, port)
        except (OSError, ValueError):
            return None


def _read_dump(sock: socket.socket, port: int) -> Set[str]:
    found: Set[str] = set()
    received = 0
    while received < _MAX_REPLY:
        data = sock.recv(65536)
        received += len(data)
        if not data:
            raise ValueError("netlink closed mid-dump")
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size or offset + length > len(data):
                raise ValueError("malformed netlink message")
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR:
                raise ValueError("sock_diag refused the request")
            if kind == SOCK_DIAG_BY_FAMILY and length >= _HEADER.size + _MESSAGE.size:
                fields = _MESSAGE.unpack_from(data, offset + _HEADER.size)
                state, sport, src, inode = fields[1], fields[4], fields[6], fields[-1]
                if state == TCP_LISTEN and struct.unpack("!H", sport)[0] == port and src[:4] == _LOOPBACK:
                    found.add(str(inode))
            offset += (length + 3) & ~3  # messages are 4-byte aligned
    raise ValueError("sock_diag dump too large")
