"""sock_diag: which sockets listen on 127.0.0.1:<port>, asked of the kernel."""

from __future__ import annotations

import os
import socket
import struct
from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from efsplug import sockdiag
from efsplug.tunnel import listening_on


class Replies:
    """A netlink socket that answers with the given datagrams."""

    def __init__(self, datagrams: List[bytes]) -> None:
        self.datagrams = list(datagrams)

    def recv(self, size: int) -> bytes:
        return self.datagrams.pop(0) if self.datagrams else b""


def message(port: int, inode: int, address: str = "127.0.0.1", state: int = sockdiag.TCP_LISTEN) -> bytes:
    body = sockdiag._MESSAGE.pack(socket.AF_INET, state, 0, 0, struct.pack("!H", port), b"\0\0",
                                  socket.inet_aton(address) + b"\0" * 12, b"\0" * 16, 0, 0, 0, 0, 0, 0, inode)
    return sockdiag._HEADER.pack(sockdiag._HEADER.size + len(body), sockdiag.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


DONE = sockdiag._HEADER.pack(20, sockdiag.NLMSG_DONE, 2, 1, 0) + b"\0" * 4


def test_a_dump_is_read_across_datagrams_and_filtered_by_port_and_address() -> None:
    first = message(20050, 11) + message(20051, 12) + message(20050, 13, "0.0.0.0")
    second = message(20050, 14) + message(20050, 15, state=1) + DONE
    assert sockdiag._read_dump(Replies([first, second]), 20050) == {"11", "14"}


@pytest.mark.parametrize("datagrams, why", [
    ([b""], "closed mid-dump"),
    ([sockdiag._HEADER.pack(4, sockdiag.SOCK_DIAG_BY_FAMILY, 0, 1, 0)], "malformed"),
    ([sockdiag._HEADER.pack(36, sockdiag.NLMSG_ERROR, 0, 1, 0) + b"\0" * 20], "refused"),
])
def test_a_broken_reply_is_a_value_error(datagrams: List[bytes], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        sockdiag._read_dump(Replies(datagrams), 20050)


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_any_reply_ends_in_a_set_or_a_value_error(datagrams: List[bytes]) -> None:
    try:
        found = sockdiag._read_dump(Replies(datagrams), 20050)
    except ValueError:
        return
    assert isinstance(found, set)


def test_the_kernel_answers_for_this_namespace() -> None:
    with socket.socket() as mine, socket.socket() as wildcard:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        wildcard.bind(("0.0.0.0", 0))
        wildcard.listen()
        port = mine.getsockname()[1]
        assert sockdiag.loopback_listeners(port) == {str(os.fstat(mine.fileno()).st_ino)}
        assert sockdiag.loopback_listeners(wildcard.getsockname()[1]) == set()
        assert sockdiag.same_namespace(os.getpid()) and listening_on(os.getpid(), port)
    assert sockdiag.loopback_listeners(port) == set() and not listening_on(os.getpid(), port)
