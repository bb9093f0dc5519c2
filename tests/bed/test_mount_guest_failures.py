"""`mount -t efs` in the guest when it must fail, when 20 start at once, and inside a netns.

A refused mount must say why in one line (exit 32) and leave nothing behind: no stunnel,
no state record or per-mount directory (the shared key and the ports lock directory
may stay), no held port lock, no mount.
"""

from __future__ import annotations

import secrets
import threading
from typing import Iterator, List

import pytest

from efsbed import iam
from efsbed.bed import Bed
from efsbed.faulty import SilentServer
from efsbed.guestmount import (
    NOTHING_LEFT, guest_config, guest_file, kernel_mounts, leftovers, mount, mount_of, new_connections, profile_text,
    record_for, records, sh, stopped_part_way, task_netns, write_and_find,
)
from efsplug.credentials import detail_tag

pytestmark = pytest.mark.guest


def refused_in_one_line(res, *parts: str) -> str:
    assert res.rc == 32, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mount.efs: "), res.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# --- wrong credentials ----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["wrong-secret", "revoked-key"])
def test_refused_identity_leaves_nothing(bed: Bed, clean_guest: Bed, case: str) -> None:
    c = bed.credentials.issue(f"guest-{case}")
    text = profile_text(c, secret="x" * 40) if case == "wrong-secret" else profile_text(c)
    if case == "revoked-key":
        bed.credentials.revoke(c.access_key_id)
    before = len(bed.endpoint.connection_events())
    with guest_file(bed, "/root/.aws/credentials", text):
        res = mount(bed, "/mnt/refused", "tls,iam")
    line = refused_in_one_line(
        res, "access denied by server",
        f"the server refused IAM identity profile:default (access key {c.access_key_id}); check that the "
        "credentials are valid and current")
    assert c.secret_access_key not in line and (c.session_token or "") not in line
    assert leftovers(bed) == NOTHING_LEFT
    expected = iam.SIGNATURE_MISMATCH if case == "wrong-secret" else iam.REVOKED_KEY
    events = new_connections(bed, before)
    assert events and {(e["event"], e["reason"], e["access_key_id"]) for e in events} == {
        ("refused", expected, c.access_key_id)}


def test_refused_identity_with_access_point_is_retried_then_reported(bed: Bed, clean_guest: Bed) -> None:
    """EFS may take a moment to apply a policy change: 'access denied' with an access point is retried."""
    c = bed.credentials.issue("guest-ap-revoked")
    bed.credentials.revoke(c.access_key_id)
    ap = bed.access_points[0]
    before = len(bed.endpoint.connection_events())
    with guest_file(bed, "/root/.aws/credentials", profile_text(c)):
        res = mount(bed, "/mnt/refused", f"tls,iam,accesspoint={ap.id}")
    refused_in_one_line(res, "access denied by server", f"to mount access point {ap.id}")
    refusals = [e for e in new_connections(bed, before) if e["event"] == "refused"]
    assert len(refusals) >= 3 and {e["access_point"] for e in refusals} == {ap.id}  # 3 attempts (config default)
    assert leftovers(bed) == NOTHING_LEFT


def test_awscredsuri_revoked_before_the_mount(bed: Bed, clean_guest: Bed) -> None:
    rel = "stopped-" + secrets.token_hex(4)
    c = bed.task_credentials.grant(rel)
    bed.task_credentials.revoke(rel)
    uri = bed.task_credentials.path_of(rel)
    before = len(bed.endpoint.connection_events())
    res = mount(bed, "/mnt/refused", f"tls,iam,awscredsuri={uri}")
    assert res.stderr.splitlines() == [
        f"mount.efs: awscredsuri {detail_tag(uri)} answered HTTP 400; the task's credentials are gone (task "
        "stopped?) or the URI is wrong"]
    assert res.rc == 32 and c.access_key_id not in res.stderr and rel not in res.stderr
    assert new_connections(bed, before) == []  # nothing was sent to the mount target
    assert leftovers(bed) == NOTHING_LEFT


# --- a mount target that stalls longer than one attempt -----------------------------------------

def test_a_stall_longer_than_one_attempt_is_retried_on_the_same_tunnel(bed: Bed, clean_guest: Bed) -> None:
    """The first attempt meets a silent server and times out; the mount target then recovers:
    the next attempt (retry_nfs_mount_command_count) mounts, as efs-utils' retries do."""
    real = bed.endpoint.routes
    result: List[object] = []
    with SilentServer() as silent:
        try:
            bed.endpoint.reconfigure(routes={**real, None: silent.port})
            with guest_config(bed, "retry_nfs_mount_command_timeout_sec = 5\nretry_nfs_mount_command_count = 3\n"):
                mounting = threading.Thread(target=lambda: result.append(mount(bed, "/mnt/stall", "tls")))
                mounting.start()
                assert silent.ended.wait(60), "the first attempt never gave up on the silent server"
                bed.endpoint.reconfigure(routes=real)  # the mount target recovers
                mounting.join(120)
        finally:
            bed.endpoint.reconfigure(routes=real)
    (res,) = result
    assert res.rc == 0, res  # type: ignore[attr-defined]
    assert silent.accepted >= 1 and len(records(bed)) == 1
    write_and_find(bed, "/mnt/stall", bed.export_dir)
    assert bed.run(["umount", "/mnt/stall"], timeout=60).rc == 0


@pytest.mark.parametrize("sig", ["TERM", "INT", "HUP"])
def test_mount_efs_killed_part_way_leaves_nothing(bed: Bed, clean_guest: Bed, sig: str) -> None:
    """Stopped while mount.nfs4 waits on a silent server: tunnel, port, record and directory all go."""
    res = stopped_part_way(bed, "/mnt/killed", sig)
    assert res.rc == 32, res  # type: ignore[attr-defined]
    assert res.stderr.splitlines()[-1] == (  # type: ignore[attr-defined]
        f"mount.efs: interrupted by SIG{sig}; what the mount had made is removed")
    assert leftovers(bed) == NOTHING_LEFT


def test_a_leftover_mount_directory_does_not_fail_the_next_mount(bed: Bed, clean_guest: Bed) -> None:
    """A mount killed with SIGKILL leaves its per-mount directory; the next mount on that port replaces it."""
    name = f"{bed.fs_id}.mnt-leftover.20777"
    sh(bed, f"mkdir -p /var/run/efs/{name} && echo stale > /var/run/efs/{name}/stunnel.conf")
    with mount_of(bed, "/mnt/leftover", "tls,tlsport=20777"):
        record = record_for(bed, "/mnt/leftover")
        assert record["files_created"] == [f"/var/run/efs/{name}"]
        assert "stale" not in sh(bed, f"cat /var/run/efs/{name}/stunnel.conf").stdout
        write_and_find(bed, "/mnt/leftover", bed.export_dir)


# --- many at once ------------------------------------------------------------------------------

def test_twenty_mounts_started_together(bed: Bed, clean_guest: Bed) -> None:
    """20 `mount -t efs` at the same moment: 20 distinct tunnel ports, all mounted."""
    n = 20
    script = (
        f"rm -f /var/run/efs/privateKey.pem; for i in $(seq {n}); do mkdir -p /mnt/par$i; done; "
        f"for i in $(seq {n}); do (mount -t efs {bed.fs_id} /mnt/par$i -o tls,iam > /tmp/par$i.log 2>&1; "
        "echo \"$i $?\" >> /tmp/par.rc) & done; wait; cat /tmp/par.rc; cat /tmp/par*.log; rm -f /tmp/par*"
    )
    res = sh(bed, script, timeout=300)
    try:
        assert sorted(res.stdout.split("\n")[:n]) == sorted(f"{i} 0" for i in range(1, n + 1)), res.stdout
        mountpoints = {f"/mnt/par{i}" for i in range(1, n + 1)}
        assert mountpoints <= set(kernel_mounts(bed))
        ours = [r for r in records(bed) if r["mountpoint"] in mountpoints]
        assert len(ours) == n and len({r["port"] for r in ours}) == n
        assert len({r["tunnel"]["pid"] for r in ours}) == n
        write_and_find(bed, "/mnt/par7", bed.export_dir)
    finally:
        for i in range(1, n + 1):
            bed.run(["umount", f"/mnt/par{i}"], timeout=60)
        for r in records(bed):
            bed.run(["kill", str(r["tunnel"]["pid"])])
            # The record is named like its per-mount directory, plus .json.
            bed.run(["rm", "-rf", *r["files_created"], r["files_created"][0] + ".json"])
    assert leftovers(bed) == NOTHING_LEFT


# --- a network namespace -------------------------------------------------------------------------

NS = "efst1"


@pytest.fixture
def netns(bed: Bed) -> Iterator[str]:
    with task_netns(bed, NS) as path:
        yield path


def test_tunnel_and_mount_live_in_the_namespace(bed: Bed, clean_guest: Bed, netns: str) -> None:
    with mount_of(bed, "/mnt/ns", f"tls,netns={netns}"):
        record = record_for(bed, "/mnt/ns")
        pid, port = record["tunnel"]["pid"], record["port"]
        assert record["netns"] == netns
        assert f":{port} " in sh(bed, f"ip netns exec {NS} ss -ltn").stdout
        assert f":{port} " not in sh(bed, "ss -ltn").stdout
        inode = sh(bed, f"stat -L -c %i {netns} /proc/{pid}/ns/net /proc/self/ns/net").stdout.split()
        assert inode[0] == inode[1] != inode[2]
        write_and_find(bed, "/mnt/ns", bed.export_dir)


def test_namespace_stays_fail_closed(bed: Bed, clean_guest: Bed, netns: str) -> None:
    """From the namespace only the forwarded mount target flow leaves: other addresses and ports do not."""
    probe = ("import socket,sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
             "    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)\n")
    for host, port in (("192.0.2.99", 80), ("10.0.2.2", bed.moto.port)):
        res = bed.run(["ip", "netns", "exec", NS, "python3", "-c", probe, host, str(port)], timeout=30)
        assert res.stdout.strip() in ("TimeoutError", "ConnectionRefusedError", "OSError"), (host, res)
