"""The mount.efs <-> resident efsplug messages (efsplug.handoff): bounded, strict, no leaks."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from efsplug import handoff


def test_round_trip_and_newline_framing() -> None:
    message = {"v": 1, "argv": ["fs-12345678", "/mnt/x", "-o", "tls"], "env": {"HOME": "/root"}}
    data = handoff.encode(message)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert handoff.decode(data) == message


@pytest.mark.parametrize("data", [b"[1, 2]\n", b"\xff\xfe\n", b"not json\n", b"\"text\"\n", b"[" * 5000 + b"\n"])
def test_what_is_not_one_json_object_is_refused(data: bytes) -> None:
    with pytest.raises(handoff.ProtocolError):
        handoff.decode(data)


def test_size_is_bounded_both_ways() -> None:
    with pytest.raises(handoff.ProtocolError):
        handoff.encode({"argv": ["x" * handoff.MAX_MESSAGE]})
    with pytest.raises(handoff.ProtocolError):
        handoff.decode(b"{" + b" " * handoff.MAX_MESSAGE + b"}\n")


def test_only_what_prepare_reads_is_passed() -> None:
    env = {"AWS_PROFILE": "team", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x", "EFSPLUG_CONFIG": "/etc/c",
           "HOME": "/root", "PATH": "/bin", "SSH_AUTH_SOCK": "/tmp/agent", "LD_PRELOAD": "/tmp/evil.so"}
    assert handoff.passed_environment(env) == {
        "AWS_PROFILE": "team", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x", "EFSPLUG_CONFIG": "/etc/c",
        "HOME": "/root"}


def test_a_message_split_across_reads_is_put_together() -> None:
    a, b = socket.socketpair()
    with a, b:
        data = handoff.encode({"v": 1, "handled": True})
        sender = threading.Thread(target=lambda: [a.sendall(bytes([c])) for c in data])
        sender.start()
        assert handoff.read_message(b, time.monotonic() + 5) == {"v": 1, "handled": True}
        sender.join()


def test_a_peer_that_closes_early_or_stalls_or_floods_is_an_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b'{"v": 1')
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(handoff.ProtocolError, match="closed before"):
            handoff.read_message(b, time.monotonic() + 5)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b'{"v": 1')
        with pytest.raises(socket.timeout):
            handoff.read_message(b, time.monotonic() + 0.05)
    a, b = socket.socketpair()
    with a, b:
        flood = threading.Thread(target=lambda: a.sendall(b" " * (handoff.MAX_MESSAGE + 10)), daemon=True)
        flood.start()
        with pytest.raises(handoff.ProtocolError, match="longer than"):
            handoff.read_message(b, time.monotonic() + 5)


def test_no_socket_means_do_it_here(tmp_path) -> None:
    assert handoff.request_prepare(["fs-12345678", "/mnt"], {handoff.SOCKET_ENV: str(tmp_path / "none.sock")}) is None
