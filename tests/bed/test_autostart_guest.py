"""mount.efs starts the supervisor (efsplug.autostart), in the real kernel guest.

No systemd runs in the guest (its init is the bed's own) nor on the host, so
/usr/bin/systemctl is bind-mounted over by a stand-in that records its arguments and,
for the one job mount.efs queues, does what systemd would: starts `efsplug supervise`.
Everything else is real: mount.efs mounts through a real tunnel, the supervisor it got
started takes the lock, prepares the next mount (efsplug.handoff) and reaps both.
"""

from __future__ import annotations

import secrets
from typing import Iterator, List, Optional

import pytest

from efsbed.bed import Bed
from efsbed.guestmount import write_and_find
from efsbed.procs import wait_until
from test_supervisor_guest import EFSPLUG, configure, record_of, records, tunnel_pids, umount  # noqa: F401

pytestmark = pytest.mark.guest

IS_ACTIVE = "is-active --quiet amazon-ecs-volume-plugin.service"
START = "start --no-block --job-mode=fail efsplug-supervisor.service"


class Systemd:
    """The stand-in systemctl, bound over the guest's, and /run/systemd/system (sd_booted)."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        self.dir = bed.workdir / f"systemd-{secrets.token_hex(3)}"
        self.dir.mkdir()
        self.calls, self.pidfile, self.log_path = self.dir / "calls", self.dir / "supervisor.pid", self.dir / "sup.log"
        script = self.dir / "systemctl"
        # setsid without job control execs in place: $! is the supervisor's own pid.
        script.write_text(
            f'#!/bin/sh\necho "$*" >> {self.calls}\n'
            f'if [ "$*" = "{IS_ACTIVE}" ]; then exit 3; fi\n'  # the agent's unit: inactive
            f'if [ "$*" = "{START}" ]; then\n'
            f"  setsid {EFSPLUG} supervise -v > {self.log_path} 2>&1 < /dev/null &\n"
            f"  echo $! > {self.pidfile}\n  exit 0\nfi\nexit 1\n")
        script.chmod(0o755)
        bed.run(["mkdir", "-p", "/run/systemd/system"], check=True)
        bed.run(["mount", "--bind", str(script), "/usr/bin/systemctl"], check=True)

    def recorded(self) -> List[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def supervisor_pid(self) -> Optional[int]:
        text = self.pidfile.read_text().strip() if self.pidfile.exists() else ""
        return int(text) if text else None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        """The supervisor it started (by its pid, SIGKILL, waited for), then the stand-in and the directory."""
        pid = self.supervisor_pid()
        try:
            if pid is not None:
                self.bed.run(["kill", "-9", str(pid)])
                wait_until(lambda: self.bed.run(["kill", "-0", str(pid)]).rc != 0, 30, "supervisor gone")
        finally:  # whatever happened above, no later test may meet the stand-in
            self.bed.run(["umount", "/usr/bin/systemctl"], check=True)
            self.bed.run(["rm", "-rf", "/run/systemd"], check=True)


@pytest.fixture
def systemd(clean_guest: Bed) -> Iterator[Systemd]:
    stand_in = Systemd(clean_guest)
    try:
        yield stand_in
    finally:
        stand_in.stop()


def mount_v(bed: Bed, mountpoint: str, options: str, alone: bool = False):
    bed.run(["mkdir", "-p", mountpoint])
    env = {"EFSPLUG_MOUNT_SOCKET": "/run/efsplug/no-resident-efsplug.sock"} if alone else None
    return bed.run(["mount", "-t", "efs", "-v", bed.fs_id, mountpoint, "-o", options], timeout=60, env=env)


def test_the_first_mount_starts_the_supervisor_which_serves_and_reaps_the_next(
        configure, systemd: Systemd, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    points = ["/mnt/auto-first", "/mnt/auto-second", "/mnt/auto-third"]
    try:
        first = mount_v(bed, points[0], "tls")
        assert first.rc == 0, first.stderr
        assert "mount.efs: started efsplug-supervisor.service: no supervisor was running" in first.stdout, first.stdout
        assert systemd.recorded() == [IS_ACTIVE, START]
        wait_until(lambda: "supervising" in systemd.log(), 60, "the started supervisor supervising")
        pid = systemd.supervisor_pid()
        # The next mount is prepared by the supervisor mount.efs started: warm, and no second start.
        second = mount_v(bed, points[1], "tls")
        assert second.rc == 0 and f"prepared by efsplug pid {pid}" in second.stdout, second.stdout + second.stderr
        # A mount made alone while it runs: it holds the lock, so nothing is started again.
        third = mount_v(bed, points[2], "tls", alone=True)
        assert third.rc == 0 and "prepared by" not in third.stdout and "started" not in third.stdout, third.stdout
        assert systemd.recorded() == [IS_ACTIVE, START]
        for point in points:
            write_and_find(bed, point, bed.export_dir)
        # It supervises the first mount too: kill its tunnel and it is restarted.
        old = record_of(bed, points[0])["tunnel"]["pid"]
        bed.run(["kill", "-9", str(old)], check=True)
        wait_until(lambda: (record_of(bed, points[0]) or {}).get("tunnel", {}).get("pid") not in (None, old), 30,
                   "the first mount's tunnel restarted")
        write_and_find(bed, points[0], bed.export_dir)
    finally:
        for point in points:
            if bed.run(["mountpoint", "-q", point]).rc == 0:
                umount(bed, point, reaped=False)
    wait_until(lambda: not records(bed) and not tunnel_pids(bed), 30, "all three reaped by the started supervisor")
    assert "Traceback" not in systemd.log()


def test_nothing_is_started_for_a_failed_mount_or_when_disabled(
        configure, systemd: Systemd, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    failed = mount_v(bed, "/mnt/auto-failed", "tls,iam,accesspoint=fsap-0123456789abcdef0")  # unknown to the endpoint
    assert failed.rc == 32 and len(failed.stderr.splitlines()) == 1, failed.stderr
    assert systemd.recorded() == []
    configure(enabled="false")
    disabled = mount_v(bed, "/mnt/auto-disabled", "tls")
    try:
        assert disabled.rc == 0 and "started" not in disabled.stdout, disabled.stderr
        assert systemd.recorded() == []
    finally:
        umount(bed, "/mnt/auto-disabled", reaped=False)
    assert systemd.supervisor_pid() is None and systemd.log() == ""
