"""`tunnel_process = shared` in the real kernel guest: one stunnel serves every tunnel.

Mounts through different access points or identities get tunnels of their own (a port
and a section each) in one stunnel process; each carries I/O; unmounting one leaves the
others working; the process goes with the last tunnel. kill -9 of that one process under
I/O on every mount brings every tunnel back within two poll intervals, and every file
arrives intact.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from efsbed.bed import Bed
from efsbed.procs import wait_until
from test_sharing_guest import by_mountpoint, copies_intact, listening_ports, write_read
from test_supervisor_guest import (  # noqa: F401 - fixtures
    EFSPLUG, POLL, STATE, _cert, _restart_gap, configure, mount, mounted, record_of, records, supervisors, tunnel_pids,
    umount,
)

pytestmark = pytest.mark.guest

SHARED = "[efsplug]\ntunnel_process = shared\n"
A, B, C = "/mnt/proc-a", "/mnt/proc-b", "/mnt/proc-c"


STOP = "/tmp/proc-writes.stop"


def steady_writes(bed: Bed, path: str) -> int:
    """A guest job appending 0, 1, 2, … to path, a line every 20 ms, until wrote_in_order
    stops it: I/O that spans whatever the test does meanwhile (reloads)."""
    bed.run(["rm", "-f", STOP])
    return bed.guest.spawn(["sh", "-c", f"i=0; while [ ! -e {STOP} ]; do echo $i >> {path} || exit 1; "
                                        f"i=$((i+1)); sleep 0.02; done"], log="/tmp/proc-writes.log")


def wrote_in_order(bed: Bed, job: int, exported: Path) -> int:
    """Stop the writes: they must have run all along (the job still there), and every line
    arrived, in order. Returns how many."""
    assert bed.guest.kill(job, 0), "the writes stopped early: " + bed.run(["cat", "/tmp/proc-writes.log"]).stdout
    bed.run(["touch", STOP])
    wait_until(lambda: not bed.guest.kill(job, 0), 60, "the steady writes stopped", 0.1)
    lines = exported.read_text().split()
    assert lines == [str(i) for i in range(len(lines))] and len(lines) >= 20, lines[-5:]
    bed.run(["rm", "-f", STOP, "/tmp/proc-writes.log"])
    return len(lines)


def test_tunnels_of_different_access_points_are_sections_of_one_process(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure(SHARED)
    supervisors()
    first, other = bed.access_points[0], bed.access_points[1]
    points = {A: f"tls,iam,accesspoint={first.id}", B: f"tls,iam,accesspoint={other.id}", C: f"tls,iam,accesspoint={first.id}"}
    try:
        for point, options in points.items():
            mount(bed, point, options)
        recs = {point: record_of(bed, point) for point in points}
        # Two tunnels (C joins A's: same access point and identity), one process.
        assert recs[A]["port"] != recs[B]["port"] and recs[C]["port"] == recs[A]["port"]
        assert len({r["tunnel"]["pid"] for r in recs.values()}) == 1 and len(tunnel_pids(bed)) == 1
        assert sorted(listening_ports(bed)) == sorted({recs[A]["port"], recs[B]["port"]})
        assert recs[A]["host_config"] == recs[B]["host_config"] and recs[A]["config_file"] != recs[B]["config_file"]
        views = by_mountpoint(bed)
        assert views[A]["shares_tunnel_with"] == [C] and views[B]["shares_tunnel_with"] == []
        assert views[B]["shares_process_with"] == [A, C], views[B]
        text = bed.run([EFSPLUG, "status"]).stdout
        assert f"stunnel process shared with: {A}, {C}" in text, text
        write_read(bed, A, C, "through-a")
        write_read(bed, B, B, "through-b")
        assert (first.export_dir / "through-a").exists() and (other.export_dir / "through-b").exists()

        umount(bed, B)  # its section goes; the others keep their process and their I/O
        pid = str(recs[A]["tunnel"]["pid"])
        assert tunnel_pids(bed) == [pid] and listening_ports(bed) == [recs[A]["port"]]
        write_read(bed, A, C, "after-b-left")
        umount(bed, A)
        umount(bed, C)
        wait_until(lambda: not tunnel_pids(bed), 10, "the process went with its last tunnel")
    finally:
        for point in reversed(list(points)):
            if mounted(bed, point):
                umount(bed, point)
    wait_until(lambda: not records(bed) and not tunnel_pids(bed), 20, "all reaped")


def test_the_shared_process_killed_under_io_on_every_mount(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure(SHARED)
    sup = supervisors()
    first, other = bed.access_points[0], bed.access_points[1]
    points = {A: (f"tls,iam,accesspoint={first.id}", first.export_dir),
              B: (f"tls,iam,accesspoint={other.id}", other.export_dir), C: ("tls", bed.export_dir)}
    targets = []
    try:
        for point, (options, _) in points.items():
            mount(bed, point, options)
        before = {point: record_of(bed, point) for point in points}
        assert len({r["port"] for r in before.values()}) == 3 and len(tunnel_pids(bed)) == 1
        old = before[A]["tunnel"]["pid"]
        bed.run(["dd", "if=/dev/urandom", "of=/tmp/proc-src", "bs=1M", "count=24"], timeout=120)
        want = bed.run(["sha256sum", "/tmp/proc-src"]).stdout.split()[0]
        jobs = [bed.guest.spawn(["dd", "if=/tmp/proc-src", f"of={point}/big-{i}", "bs=1M", "conv=fsync"],
                                log=f"/tmp/proc-dd-{i}.log") for i, point in enumerate(points)]
        targets = [export / f"big-{i}" for i, (_, export) in enumerate(points.values())]
        wait_until(lambda: all(t.exists() and t.stat().st_size > 2 << 20 for t in targets), 60, "dd under way", 0.05)
        assert bed.run(["kill", "-9", str(old)]).rc == 0
        killed = time.monotonic()
        wait_until(lambda: all((r := record_of(bed, p)) and r["tunnel"]["pid"] != old for p in points), 30,
                   "every record names the restarted process", 0.05)
        seen_after = time.monotonic() - killed
        after = {point: record_of(bed, point) for point in points}
        assert len({r["tunnel"]["pid"] for r in after.values()}) == 1 and len(tunnel_pids(bed)) == 1
        assert {p: r["port"] for p, r in after.items()} == {p: r["port"] for p, r in before.items()}
        copies_intact(bed, jobs, targets, "/tmp/proc-dd", 24, want)
        gap = _restart_gap(sup.log())
        assert gap <= 2 * POLL, f"back {gap:.3f}s after the process exited (log), {seen_after:.1f}s seen from the host"
    finally:
        for point in reversed(list(points)):
            if mounted(bed, point):
                umount(bed, point)
        bed.run(["sh", "-c", "rm -f /tmp/proc-src /tmp/proc-dd-*.log"])
        for target in targets:
            target.unlink(missing_ok=True)
    wait_until(lambda: not records(bed) and not tunnel_pids(bed), 20, "all reaped")


def test_renewals_reload_the_shared_process_under_io_on_its_other_tunnel(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure(SHARED, tls_cert_renewal_interval_sec=4)
    sup = supervisors()
    ap = bed.access_points[0]
    job = None
    mount(bed, A, "tls,iam")
    mount(bed, B, f"tls,accesspoint={ap.id}")
    try:
        rec, neighbour = record_of(bed, A), record_of(bed, B)
        pid = rec["tunnel"]["pid"]
        assert neighbour["tunnel"]["pid"] == pid
        job = steady_writes(bed, f"{B}/steady")
        serials = set()
        for i in range(2):
            before = _cert(bed, rec).serial_number
            wait_until(lambda: _cert(bed, rec).serial_number != before, 30, f"renewal {i + 1}")
            serials.add(_cert(bed, rec).serial_number)
            write_read(bed, A, A, f"renewed-{i}")
        wrote_in_order(bed, job, ap.export_dir / "steady")  # every write through the other tunnel
        assert len(serials) == 2 and "tunnel reloaded" in sup.log()
        assert {record_of(bed, p)["tunnel"]["pid"] for p in (A, B)} == {pid}  # reloaded, never restarted
    finally:
        if job is not None:
            bed.guest.kill(job)  # a failed test's writer stops too (a no-op once it stopped)
        bed.run(["rm", "-f", STOP, "/tmp/proc-writes.log"])
        for point in (B, A):
            if mounted(bed, point):
                umount(bed, point)
        (ap.export_dir / "steady").unlink(missing_ok=True)
        for i in range(2):
            (bed.export_dir / f"renewed-{i}").unlink(missing_ok=True)


def test_mount_cycles_next_to_a_live_tunnel_leak_nothing_and_never_disturb_it(configure, supervisors,
                                                                              clean_guest: Bed) -> None:
    bed = clean_guest
    configure(SHARED, unmount_grace_period_sec=0)
    supervisors()
    ap = bed.access_points[0]
    job = None
    mount(bed, B, f"tls,accesspoint={ap.id}")  # the neighbour: its section stays through every reload
    try:
        pid = record_of(bed, B)["tunnel"]["pid"]
        job = steady_writes(bed, f"{B}/cycles")
        bed.run(["mkdir", "-p", A])
        loop = (f"for i in $(seq 15); do mount -t efs {bed.fs_id} {A} -o tls || exit 1; "
                f"echo $i > {A}/cycle || exit 3; umount {A} || exit 2; done")
        res = bed.run(["sh", "-c", loop], timeout=900)
        assert res.rc == 0, res.stderr
        wrote_in_order(bed, job, ap.export_dir / "cycles")
        assert (bed.export_dir / "cycle").read_text().strip() == "15"
        wait_until(lambda: [r["mountpoint"] for r in records(bed)] == [B], 30, "every cycle's record reaped")
        assert tunnel_pids(bed) == [str(pid)] and listening_ports(bed) == [record_of(bed, B)["port"]]
    finally:
        if job is not None:
            bed.guest.kill(job)  # a failed test's writer stops too (a no-op once it stopped)
        bed.run(["rm", "-f", STOP, "/tmp/proc-writes.log"])
        if mounted(bed, A):
            umount(bed, A)
        umount(bed, B)
        (ap.export_dir / "cycles").unlink(missing_ok=True)
        (bed.export_dir / "cycle").unlink(missing_ok=True)
    wait_until(lambda: not tunnel_pids(bed) and not records(bed), 30, "everything reaped")
    left = bed.run(["sh", "-c", f"find {STATE} -mindepth 1 -not -path '*/ports/*' | sort"]).stdout.split()
    hosts = [p for p in left if p.startswith(f"{STATE}/hosts")]
    assert set(left) - set(hosts) <= {f"{STATE}/privateKey.pem", f"{STATE}/supervisor.lock", f"{STATE}/ports"}, left
    # Each shared process's directory stays for the next one: no section, no process recorded.
    assert not [p for p in hosts if "/services/" in p or p.endswith("host.json")], hosts
