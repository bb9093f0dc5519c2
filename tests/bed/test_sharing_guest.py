"""Shared tunnels in the real kernel guest: mounts with one identity share one stunnel.

Two mounts of the same file system, access point, IAM identity, network namespace and
TLS settings go through one tunnel process on one port; each carries I/O; unmounting
either keeps the other working; the tunnel goes with the last of them. Different access
points or identities never share. Killing the shared tunnel under I/O on both mounts
brings it back within two poll intervals, and both files arrive intact.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import List

import pytest

from efsbed.bed import Bed
from efsbed.guestmount import guest_file, profile_text
from efsbed.procs import wait_until
from test_supervisor_guest import (  # noqa: F401 - fixtures
    EFSPLUG, POLL, _restart_gap, configure, mount, mounted, record_of, records, status, supervisors, tunnel_pids, umount,
)

pytestmark = pytest.mark.guest

A, B = "/mnt/share-a", "/mnt/share-b"


def listening_ports(bed: Bed) -> List[int]:
    out = bed.run(["ss", "-Hltn", "sport", ">=", ":20049", "and", "sport", "<", ":21049"]).stdout
    return sorted(int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip())


def write_read(bed: Bed, writer: str, reader: str, name: str) -> str:
    """Write a random file through one mount, read it back through another: its checksum."""
    res = bed.run(["sh", "-c", f"head -c 262144 /dev/urandom > {writer}/{name} && sync && "
                               f"sha256sum {writer}/{name} {reader}/{name}"])
    assert res.rc == 0, res.stderr
    sums = [line.split()[0] for line in res.stdout.splitlines()]
    assert len(sums) == 2 and sums[0] == sums[1], res.stdout
    return sums[0]


def copies_intact(bed: Bed, jobs: List[int], targets: List[Path], logs: str, megabytes: int, want: str) -> None:
    """Each dd (logging to <logs>-<i>.log) finished whole, and each copy's checksum is want."""
    for job in jobs:
        wait_until(lambda: not bed.guest.kill(job, 0), 300, "dd finished", 0.5)
    for i, target in enumerate(targets):
        assert f"{megabytes}+0 records out" in bed.run(["cat", f"{logs}-{i}.log"]).stdout
        assert hashlib.sha256(target.read_bytes()).hexdigest() == want


def by_mountpoint(bed: Bed) -> dict:
    return {v["mountpoint"]: v for v in status(bed)}


def test_same_identity_shares_one_tunnel_and_either_may_go_first(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    sup = supervisors()
    ap = bed.access_points[0]
    options = f"tls,iam,accesspoint={ap.id}"
    mount(bed, A, options)
    try:
        mount(bed, B, options)
        first, second = record_of(bed, A), record_of(bed, B)
        assert second["port"] == first["port"] and second["tunnel"] == first["tunnel"]
        assert second["config_file"] == first["config_file"]
        own = second["files_created"]  # B's own directory: the supervisor's status for B, nothing else
        assert len(own) == 1 and own[0] not in first["config_file"] and bed.run(["test", "-d", own[0]]).rc == 0
        assert len(tunnel_pids(bed)) == 1 and listening_ports(bed) == [first["port"]]
        certs = bed.run(["sh", "-c", "ls /run/efs/*/certificate.pem"]).stdout.split()
        assert len(certs) == 1, certs  # one certificate for one identity
        views = by_mountpoint(bed)
        assert views[A]["shares_tunnel_with"] == [B] and views[B]["shares_tunnel_with"] == [A]
        text = bed.run([EFSPLUG, "status"]).stdout
        assert f"tunnel shared with: {B}" in text and f"tunnel shared with: {A}" in text, text
        write_read(bed, A, B, "from-a")
        write_read(bed, B, A, "from-b")
        assert (ap.export_dir / "from-a").exists() and (ap.export_dir / "from-b").exists()

        umount(bed, A)  # the one that started the tunnel goes first: its record is reaped alone
        assert tunnel_pids(bed) == [str(first["tunnel"]["pid"])]
        assert bed.run(["test", "-e", first["config_file"]]).rc == 0  # the tunnel's config stays with it
        write_read(bed, B, B, "after-a-left")
        assert by_mountpoint(bed)[B]["shares_tunnel_with"] == []

        mount(bed, A, options)  # joins B's tunnel, which A started
        assert record_of(bed, A)["port"] == first["port"] and len(tunnel_pids(bed)) == 1
        umount(bed, B)
        write_read(bed, A, A, "after-b-left")
        assert tunnel_pids(bed) == [str(first["tunnel"]["pid"])]
    finally:
        for point in (A, B):
            if mounted(bed, point):
                umount(bed, point)
    wait_until(lambda: not records(bed) and not tunnel_pids(bed), 20, "the last mount took the tunnel along")
    assert bed.run(["sh", "-c", "ls -d /run/efs/fs-* 2>/dev/null"]).stdout == ""  # no directory left
    assert "reaped /mnt/share-a" in sup.log() and "reaped /mnt/share-b" in sup.log()
    for name in ("from-a", "from-b", "after-a-left", "after-b-left"):
        (ap.export_dir / name).unlink(missing_ok=True)


def test_different_access_points_or_identities_never_share(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    supervisors()
    first, other = bed.access_points[0], bed.access_points[1]
    c = bed.credentials.issue("sharing-profile")
    points = {
        "/mnt/share-ap0": f"tls,iam,accesspoint={first.id}",
        "/mnt/share-ap1": f"tls,iam,accesspoint={other.id}",  # another access point
        "/mnt/share-prof": f"tls,iam,awsprofile=efs-team,accesspoint={first.id}",  # another identity
        "/mnt/share-noiam": f"tls,accesspoint={first.id}",  # no IAM identity at all
        "/mnt/share-root": "tls,iam",  # the file system root
    }
    with guest_file(bed, "/root/.aws/credentials", profile_text(c, name="efs-team")):
        try:
            for point, options in points.items():
                mount(bed, point, options)
            recs = {point: record_of(bed, point) for point in points}
            assert len({r["port"] for r in recs.values()}) == len(points)
            assert len({r["tunnel"]["pid"] for r in recs.values()}) == len(points)
            assert len(tunnel_pids(bed)) == len(points) and len(listening_ports(bed)) == len(points)
            assert all(v["shares_tunnel_with"] == [] for v in status(bed))
            # The same identity and access point again does share: the one above is the reason.
            mount(bed, "/mnt/share-ap0b", f"tls,iam,accesspoint={first.id}")
            assert record_of(bed, "/mnt/share-ap0b")["port"] == recs["/mnt/share-ap0"]["port"]
        finally:
            # Last in, first out: NFSv4.1 trunking lets the kernel carry a later mount of the
            # same server (here: the same access point's export) over an earlier mount's
            # connection, whose record then stays while that mount is there.
            for point in reversed([*points, "/mnt/share-ap0b"]):
                if mounted(bed, point):
                    umount(bed, point)
    wait_until(lambda: not records(bed) and not tunnel_pids(bed), 20, "all reaped")


def test_shared_tunnel_killed_under_io_on_both_mounts(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    sup = supervisors()
    mount(bed, A, "tls")
    mount(bed, B, "tls")
    try:
        shared = record_of(bed, A)
        assert record_of(bed, B)["tunnel"] == shared["tunnel"]
        bed.run(["dd", "if=/dev/urandom", "of=/tmp/share-src", "bs=1M", "count=40"], timeout=120)
        want = bed.run(["sha256sum", "/tmp/share-src"]).stdout.split()[0]
        jobs = [bed.guest.spawn(["dd", "if=/tmp/share-src", f"of={point}/big-{i}", "bs=1M", "conv=fsync"],
                                log=f"/tmp/share-dd-{i}.log") for i, point in enumerate((A, B))]
        targets = [bed.export_dir / f"big-{i}" for i in range(2)]
        wait_until(lambda: all(t.exists() and t.stat().st_size > 4 << 20 for t in targets), 60, "dd under way", 0.05)
        old = shared["tunnel"]["pid"]
        assert bed.run(["kill", "-9", str(old)]).rc == 0
        killed = time.monotonic()
        wait_until(lambda: all((r := record_of(bed, p)) and r["tunnel"]["pid"] != old for p in (A, B)), 30,
                   "both records name the restarted tunnel", 0.05)
        seen_after = time.monotonic() - killed
        assert record_of(bed, A)["tunnel"] == record_of(bed, B)["tunnel"]  # still one process for both
        assert len(tunnel_pids(bed)) == 1 and listening_ports(bed) == [shared["port"]]
        copies_intact(bed, jobs, targets, "/tmp/share-dd", 40, want)
        gap = _restart_gap(sup.log())
        assert gap <= 2 * POLL, f"tunnel back {gap:.3f}s after it exited (log), {seen_after:.1f}s seen from the host"
    finally:
        for point in (A, B):
            if mounted(bed, point):
                umount(bed, point)
        bed.run(["sh", "-c", "rm -f /tmp/share-src /tmp/share-dd-*.log"])
        for i in range(2):
            (bed.export_dir / f"big-{i}").unlink(missing_ok=True)
    wait_until(lambda: not records(bed) and not tunnel_pids(bed), 20, "all reaped")
