"""`mount -t efs` prepared by the resident efsplug (efsplug.handoff), in the real kernel guest.

With `efsplug supervise` running, mount.efs sends it its command line; the supervisor
makes the tunnel, certificate and record, and mount.efs runs mount.nfs4. The mounts must
be the same as mount.efs makes alone: I/O lands in the right export, the endpoint sees
the right identity and access point, and a mount that fails leaves nothing behind.
"""

from __future__ import annotations

import secrets

import pytest

from efsbed import rpmform
from efsbed.bed import Bed
from efsbed.guestmount import NOTHING_LEFT, accepted_as, leftovers, stopped_part_way, write_and_find
from efsbed.procs import wait_until
from test_supervisor_guest import (  # noqa: F401
    PYTHON, STATE, configure, record_of, records, supervisors, tunnel_pids, umount,
)

pytestmark = pytest.mark.guest

SOCKET = "/run/efsplug/mount.sock"


def mount_v(bed: Bed, mountpoint: str, options: str):
    bed.run(["mkdir", "-p", mountpoint])
    return bed.run(["mount", "-t", "efs", "-v", bed.fs_id, mountpoint, "-o", options], timeout=60)


def test_mounts_prepared_by_the_supervisor(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    sup = supervisors()
    assert bed.run(["test", "-S", SOCKET]).rc == 0 and f"serving mount.efs at {SOCKET}" in sup.log()
    ap = bed.access_points[0]
    before = len(bed.endpoint.connection_events())
    tls = mount_v(bed, "/mnt/handed-tls", "tls")
    try:
        assert tls.rc == 0, tls.stderr
        assert f"prepared by efsplug pid {sup.pid}" in tls.stdout, tls.stdout
        write_and_find(bed, "/mnt/handed-tls", bed.export_dir)
        accepted_as(bed, before, key=None, access_point=None)
        # A release asked for a mount the kernel has (a confused or hostile caller) is refused.
        (name,) = bed.run(["sh", "-c", f"cd {STATE} && ls *.json"]).stdout.split()
        asked = bed.run([PYTHON, "-c", f"from efsplug import handoff; print(handoff.request_release({name!r}))"])
        assert asked.stdout.strip() == "False", asked.stderr
        write_and_find(bed, "/mnt/handed-tls", bed.export_dir)
        before = len(bed.endpoint.connection_events())
        iam = mount_v(bed, "/mnt/handed-ap", f"tls,iam,accesspoint={ap.id}")
        assert iam.rc == 0, iam.stderr
        assert f"prepared by efsplug pid {sup.pid}" in iam.stdout, iam.stdout
        write_and_find(bed, "/mnt/handed-ap", ap.export_dir)
        accepted_as(bed, before, key=bed.imds.role_credentials.access_key_id, access_point=ap.id)
        # The tunnels are the supervisor's children, and their records its to reap.
        for point in ("/mnt/handed-tls", "/mnt/handed-ap"):
            pid = record_of(bed, point)["tunnel"]["pid"]
            assert bed.run(["sh", "-c", f"ps -o ppid= -p {pid}"]).stdout.strip() == str(sup.pid)
    finally:
        for point in ("/mnt/handed-tls", "/mnt/handed-ap"):
            if bed.run(["mountpoint", "-q", point]).rc == 0:
                umount(bed, point)
    wait_until(lambda: not records(bed) and not tunnel_pids(bed), 20, "both reaped")


def test_a_handed_mount_that_fails_leaves_nothing(configure, supervisors, clean_guest: Bed) -> None:
    """The endpoint refuses an access point it does not know: mount.nfs4 fails after the
    supervisor made tunnel, certificate and record, and mount.efs releases them."""
    bed = clean_guest
    configure()
    sup = supervisors()
    res = mount_v(bed, "/mnt/handed-bad", "tls,iam,accesspoint=fsap-0123456789abcdef0")
    assert res.rc == 32, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mount.efs: mount.nfs4 failed"), res.stderr
    assert "prepared by efsplug" not in res.stdout
    nothing_running_left(bed)
    assert "Traceback" not in sup.log()


def nothing_running_left(bed: Bed) -> None:
    """NOTHING_LEFT but for the supervisor's own lock. The supervisor started the tunnel and
    stopped it when mount.efs asked (handoff.request_release), so it reaped it too: no
    stunnel is left, not even a zombie. (The supervisor may be reaping the failed mount's
    record itself at the same moment, past unmount_grace_period_sec: hence the bounded wait.)"""
    def stunnels() -> str:
        return bed.run(["sh", "-c", "ps -eo stat=,comm= | awk '$2 ~ /^stunnel/'"]).stdout

    try:
        wait_until(lambda: stunnels() == "" and leftovers(bed)["state"] == ["supervisor.lock"], 15,
                   "no stunnel left (not even a zombie), and no state but the supervisor's lock")
    except TimeoutError as exc:
        log = bed.run(["tail", "-n", "30", "/var/log/bed/efsplug-supervise.log"]).stdout
        ps = bed.run(["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null | grep -E 'stunnel|python'"]).stdout
        raise AssertionError(f"{exc}: stunnel processes (stat, name): {stunnels()!r}; left: {leftovers(bed)}\n"
                             f"the supervisor's log:\n{log}\nprocesses:\n{ps}") from None
    left = leftovers(bed)
    assert {k: v for k, v in left.items() if k != "state"} == {k: v for k, v in NOTHING_LEFT.items() if k != "state"}


def test_a_handed_mount_stopped_part_way_leaves_nothing(configure, supervisors, clean_guest: Bed) -> None:
    """SIGTERM while mount.nfs4 waits on a silent server: mount.efs releases what the
    supervisor made for it (tunnel, port, record, directory) and says so in one line."""
    bed = clean_guest
    configure()
    sup = supervisors()

    def made_by_the_supervisor() -> None:
        (made,) = records(bed)
        assert bed.run(["ps", "-o", "ppid=", "-p", str(made["tunnel"]["pid"])]).stdout.strip() == str(sup.pid)

    res = stopped_part_way(bed, "/mnt/handed-killed", "TERM", made_by_the_supervisor)
    assert res.rc == 32, res  # type: ignore[attr-defined]
    assert res.stderr.splitlines()[-1] == (  # type: ignore[attr-defined]
        "mount.efs: interrupted by SIGTERM; what the mount had made is removed")
    nothing_running_left(bed)


def test_mount_efs_as_the_rpm_installs_it_hands_off_and_mounts_alone(configure, supervisors, clean_guest: Bed) -> None:
    """The installed script (system Python, no site at start) as /sbin/mount.efs: handed to
    the supervisor it needs only the standard library; alone it adds site and mounts itself."""
    bed = clean_guest
    configure()
    installed = rpmform.install(bed.workdir / f"installed-{secrets.token_hex(3)}")
    bed.run(["mount", "--bind", str(installed), "/sbin/mount.efs"], check=True)
    try:
        sup = supervisors()
        handed = mount_v(bed, "/mnt/installed-handed", "tls")
        assert handed.rc == 0 and f"prepared by efsplug pid {sup.pid}" in handed.stdout, handed.stderr
        write_and_find(bed, "/mnt/installed-handed", bed.export_dir)
        umount(bed, "/mnt/installed-handed")
        bed.run(["mkdir", "-p", "/mnt/installed-alone"])
        alone = bed.run(["mount", "-t", "efs", "-v", bed.fs_id, "/mnt/installed-alone", "-o", "tls"], timeout=60,
                        env={"EFSPLUG_MOUNT_SOCKET": "/run/efsplug/no-resident-efsplug.sock"})
        assert alone.rc == 0 and "prepared by" not in alone.stdout, alone.stderr
        write_and_find(bed, "/mnt/installed-alone", bed.export_dir)
        umount(bed, "/mnt/installed-alone")
    finally:
        for point in ("/mnt/installed-handed", "/mnt/installed-alone"):
            if bed.run(["mountpoint", "-q", point]).rc == 0:
                umount(bed, point)
        bed.run(["umount", "/sbin/mount.efs"], check=True)
