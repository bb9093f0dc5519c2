"""sd_notify over a real datagram socket, as systemd listens for it."""

from __future__ import annotations

import socket

from efsplug.sdnotify import notify


def test_ready_reaches_the_notify_socket(tmp_path):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(path)}) is True
        assert listener.recv(64) == b"READY=1"


def test_abstract_socket_address(tmp_path):
    name = f"efsplug-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert listener.recv(64) == b"STOPPING=1"


def test_outside_systemd_nothing_happens():
    assert notify("READY=1", {}) is False
