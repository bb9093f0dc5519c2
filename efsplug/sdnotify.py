"""sd_notify(3) without libsystemd: tell systemd (Type=notify) when the service is ready.

With Type=exec, `systemctl start` returns before the agent has bound its socket, so
`Before=docker.service` would not mean "the plugin answers". READY=1 is sent once it does.
Outside systemd (no NOTIFY_SOCKET) this does nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send state (e.g. "READY=1") to systemd; False when not running under Type=notify."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True
