"""Helpers for `mount -t efs` tests in the bed's kernel guest (used by tests/bed/test_mount_guest*.py)."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from efsbed.bed import Bed
from efsbed.faulty import SilentServer
from efsbed.guest import GuestResult
from efsplug.mounttable import unescape
from efsplug.sigv4 import AwsCredentials

STATE_DIR = "/var/run/efs"
GUEST_CONFIG = "/etc/amazon/efs/efs-utils.conf"


# --- helpers -------------------------------------------------------------------------------

def sh(bed: Bed, script: str, timeout: float = 60) -> GuestResult:
    return bed.run(["sh", "-c", script], timeout=timeout)


def mount(bed: Bed, mountpoint: str, options: str = "", *, device: Optional[str] = None,
          env: Optional[Dict[str, str]] = None, timeout: float = 90) -> GuestResult:
    return bed.mount_efs(mountpoint, options, device=device, env=env, timeout=timeout)


def mounted(bed: Bed, mountpoint: str, options: str = "", **kw: object) -> GuestResult:
    res = mount(bed, mountpoint, options, **kw)  # type: ignore[arg-type]
    assert (res.rc, res.stderr) == (0, ""), res
    assert mountpoint in kernel_mounts(bed)
    return res


@contextlib.contextmanager
def mount_of(bed: Bed, mountpoint: str, options: str = "", **kw: object) -> Iterator[GuestResult]:
    """A mount that is unmounted (umount, as an operator would) whatever the test does."""
    res = mounted(bed, mountpoint, options, **kw)
    try:
        yield res
    finally:
        umounted = bed.run(["umount", mountpoint], timeout=60)
        assert umounted.rc == 0, umounted
        assert mountpoint not in kernel_mounts(bed)


def kernel_mounts(bed: Bed) -> List[str]:
    out = bed.run(["cat", "/proc/mounts"]).stdout
    return [unescape(line.split()[1]) for line in out.splitlines() if line.split()[2] in ("nfs", "nfs4")]


def records(bed: Bed) -> List[dict]:
    out = sh(bed, f"cat {STATE_DIR}/*.json 2>/dev/null || true").stdout
    return [json.loads(chunk) for chunk in re.split(r"(?<=\})\s*(?=\{)", out.strip()) if chunk.strip()]


def record_for(bed: Bed, mountpoint: str) -> dict:
    (found,) = [r for r in records(bed) if r["mountpoint"] == mountpoint]
    return found


def write_and_find(bed: Bed, mountpoint: str, host_dir: Path) -> str:
    name = f"from-guest-{secrets.token_hex(4)}"
    assert sh(bed, f"echo {name} > {shlex.quote(mountpoint)}/{name}").rc == 0
    assert (host_dir / name).read_text() == name + "\n"
    return name


def new_connections(bed: Bed, before: int) -> List[dict]:
    return bed.endpoint.connection_events()[before:]


def accepted_as(bed: Bed, before: int, *, key: Optional[str], access_point: Optional[str],
                transport: str = "tls") -> None:
    events = [e for e in new_connections(bed, before) if e["event"] == "accepted"]
    assert events, new_connections(bed, before)
    assert {(e["access_key_id"], e["access_point"], e["transport"]) for e in events} == {(key, access_point,
                                                                                         transport)}


@contextlib.contextmanager
def guest_file(bed: Bed, path: str, text: str) -> Iterator[None]:
    """Write a guest file for the test; remove it afterwards."""
    bed.run(["mkdir", "-p", str(Path(path).parent)])
    bed.guest.run(["tee", path], input=text.encode(), check=True)
    try:
        yield
    finally:
        bed.run(["rm", "-f", path])


@contextlib.contextmanager
def guest_config(bed: Bed, extra: str) -> Iterator[None]:
    """efs-utils.conf with extra [mount] lines; the bed's default config comes back after."""
    default = f"[mount]\nstunnel_cafile = {bed.ca.cert_path}\n"
    bed.write_guest_config(default + extra)
    try:
        yield
    finally:
        bed.write_guest_config(default)


def profile_text(c: AwsCredentials, *, secret: Optional[str] = None, name: str = "default") -> str:
    return (f"[{name}]\naws_access_key_id = {c.access_key_id}\n"
            f"aws_secret_access_key = {secret or c.secret_access_key}\naws_session_token = {c.session_token}\n")


def leftovers(bed: Bed) -> Dict[str, object]:
    """What a failed mount must not leave in the guest: tunnels, state, held port locks, mounts."""
    script = (
        "pgrep -x stunnel || true; echo '--'; ls -A /var/run/efs 2>/dev/null || true; echo '--'; "
        "for f in /var/run/efs/ports/*; do [ -e \"$f\" ] && ! flock -n \"$f\" true && echo \"$f\"; done; "
        "echo '--'"
    )
    tunnels, state, held, _ = sh(bed, script).stdout.split("--\n")
    return {
        "tunnels": tunnels.split(),
        "state": sorted(set(state.split()) - {"privateKey.pem", "ports"}),
        "held_port_locks": held.split(),
        "mounts": kernel_mounts(bed),
    }


NOTHING_LEFT = {"tunnels": [], "state": [], "held_port_locks": [], "mounts": []}


@contextlib.contextmanager
def task_netns(bed: Bed, name: str) -> Iterator[str]:
    """Namespace `name` joined to the root namespace by a veth pair (TEST-NET-2, guest-only), like a task's.

    The mount target's address sits on the root namespace's lo, where the bed's relay
    listens (guest_forward.py), so from the namespace it is one routed hop and delivered
    locally. The root namespace does not forward (ip_forward stays 0), so nothing else
    leaves it. Yields its path; deleted afterwards (if the test did not delete it first).
    """
    setup = (
        f"set -e; ip netns add {name}; ip link add efsh0 type veth peer name efst0; ip link set efst0 netns {name}; "
        "ip addr add 198.51.100.1/30 dev efsh0; ip link set efsh0 up; "
        f"ip netns exec {name} ip addr add 198.51.100.2/30 dev efst0; ip netns exec {name} ip link set efst0 up; "
        f"ip netns exec {name} ip link set lo up; ip netns exec {name} ip route add default via 198.51.100.1; "
        "test \"$(sysctl -n net.ipv4.ip_forward)\" = 0"
    )
    try:
        res = sh(bed, setup)
        assert res.rc == 0, res
        yield f"/var/run/netns/{name}"
    finally:
        sh(bed, f"ip netns del {name} 2>/dev/null; ip link del efsh0 2>/dev/null; true")


def stopped_part_way(bed: Bed, mountpoint: str, sig: str,
                     while_waiting: Callable[[], None] = lambda: None) -> GuestResult:
    """`mount -t efs -o tls` stopped by SIG<sig> while mount.nfs4 waits on a silent server
    (the mount target's stand-in); while_waiting runs just before the signal. Its result."""
    real = bed.endpoint.routes
    result: List[GuestResult] = []
    with SilentServer() as silent:
        try:
            bed.endpoint.reconfigure(routes={**real, None: silent.port})
            mounting = threading.Thread(target=lambda: result.append(mount(bed, mountpoint, "tls")))
            mounting.start()
            assert silent.first_accepted.wait(60), "mount.nfs4 never reached the server"
            while_waiting()
            sh(bed, f"pkill -{sig} -f '[m]ount.efs '")
            mounting.join(60)
        finally:
            bed.endpoint.reconfigure(routes=real)
    (res,) = result
    return res
