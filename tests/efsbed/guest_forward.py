#!/usr/bin/python3
"""The guest's forwards: listen on each guest_ip:guest_port, relay to the host at 10.0.2.2.

Runs inside the kernel guest (stdlib only, Python 3.9+), started by guest_init.py before
the control agent. The product dials the addresses it uses by default (the mount target
on 2049, 169.254.169.254, 169.254.170.2); init puts those addresses on `lo` and this relays
each connection to the bed service on the host's loopback, which slirp shows at 10.0.2.2.

Why a relay and not netfilter DNAT: the 7.x kernel the bed needs on AMX CPUs has no IPv4
packet filter at all, and one mechanism for both kernels keeps them from drifting apart.
Fail closed comes from routing instead (init): the guest owns 10.0.2.15/32 with a route to
10.0.2.2 alone and an `unreachable` default, so nothing else can be reached.

    guest_forward.py <json: [{"guest_ip","guest_port","host_port"}, ...]>

Prints "ready" once every listener is bound; runs until killed.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from typing import Dict, List

HOST = "10.0.2.2"
CHUNK = 256 * 1024  # big reads: every syscall is expensive under user-mode Linux
CONNECT_TIMEOUT = 10.0


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until EOF (passed on as a half-close) or an error (ends both ways)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(view[:n])
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the other pump
            except OSError:
                pass


def _relay(client: socket.socket, host_port: int) -> None:
    try:
        upstream = socket.create_connection((HOST, host_port), timeout=CONNECT_TIMEOUT)
    except OSError:
        # The service is down: reset the client so it fails at once, as a refused connect would.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # NFS RPCs are small: no Nagle delay
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve(listener: socket.socket, host_port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            continue  # e.g. ECONNABORTED: keep serving
        threading.Thread(target=_relay, args=(client, host_port), daemon=True).start()


def main(argv: List[str]) -> int:
    forwards: List[Dict[str, object]] = json.loads(argv[1])
    listeners = []
    for f in forwards:
        family = socket.AF_INET6 if ":" in str(f["guest_ip"]) else socket.AF_INET  # an IPv6 mount target
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((str(f["guest_ip"]), int(f["guest_port"])))  # type: ignore[call-overload]
        s.listen(128)
        listeners.append((s, int(f["host_port"])))  # type: ignore[call-overload]
    threads = [threading.Thread(target=_serve, args=pair, daemon=True) for pair in listeners]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
