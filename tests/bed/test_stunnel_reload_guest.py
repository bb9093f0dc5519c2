"""What a one-process-many-services tunnel design would rely on, proven in the kernel guest
before relying on it (issue 12): one stunnel serving several services, reloaded with
SIGHUP to add and remove services while a live NFS mount through another of its services
carries a 120 MiB write, leaves that mount's connection alone (no reconnect, no error,
the right bytes), and each reload makes the added service listen and the removed one
stop. stunnel re-binds every listening socket on a reload: the test also shows that a
live service's port listens again at once.

This is a fact about stunnel 5.68 and the kernel's NFS client, not about efsplug's code
(which runs one stunnel per tunnel today); efsplug's own reload (certificate renewal) is
proven by test_supervisor_guest.py.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import List

import pytest

from efsbed.bed import Bed
from efsbed.procs import wait_until

pytestmark = pytest.mark.guest

CONF = "/run/reload-proof/stunnel.conf"
LOG = "/var/log/bed/reload-proof-stunnel.log"
MNT = "/mnt/reload-proof"
LIVE_PORT, OTHER_PORTS = 20901, (20902, 20903)


def config(bed: Bed, ports: List[int]) -> str:
    lines = ["foreground = yes", "pid =", "socket = l:SO_REUSEADDR=yes"]
    for port in ports:
        lines += [f"[efs-{port}]", "client = yes", f"accept = 127.0.0.1:{port}", f"connect = {bed.dns_name}:2049",
                  "sslVersionMin = TLSv1.2", "verify = 2", f"CAfile = {bed.ca.cert_path}", f"checkHost = {bed.dns_name}",
                  "TIMEOUTclose = 0", "TIMEOUTidle = 86400", "delay = yes"]
    return "\n".join(lines) + "\n"


def listening(bed: Bed) -> List[int]:
    out = bed.run(["ss", "-Hltn", "( sport >= :20901 and sport <= :20903 )"]).stdout
    return sorted(int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", out))


def connects(bed: Bed) -> int:
    """How many times the NFS client connected its transport for the mount (mountstats)."""
    stats = bed.run(["cat", "/proc/self/mountstats"]).stdout
    section = stats.split(f"mounted on {MNT} with fstype nfs4")[1].split("device ")[0]
    xprt = re.search(r"xprt:\s+tcp\s+\d+\s+\d+\s+(\d+)", section)
    assert xprt, section
    return int(xprt.group(1))


def test_a_sighup_that_adds_and_removes_services_leaves_a_live_mount_alone(clean_guest: Bed) -> None:
    bed = clean_guest
    bed.run(["mkdir", "-p", "/run/reload-proof", MNT], check=True)
    bed.run(["tee", CONF], input=config(bed, [LIVE_PORT]).encode(), check=True)
    pid = bed.guest.spawn(["stunnel4", CONF], log=LOG)
    name = "reload-proof.bin"
    try:
        wait_until(lambda: listening(bed) == [LIVE_PORT], 30, "stunnel to listen")
        bed.run(["mount", "-t", "nfs4", "-o", f"vers=4.1,port={LIVE_PORT},hard,timeo=600", "127.0.0.1:/", MNT],
                check=True, timeout=90)
        before = connects(bed)
        writer = bed.guest.spawn(["sh", "-c", f"dd if=/dev/urandom of={MNT}/{name} bs=1M count=120 conv=fsync && "
                                        "echo WRITTEN"], log="/var/log/bed/reload-proof-dd.log")
        reloads = under_io = 0
        for other in OTHER_PORTS * 2:  # add a service, then take it away, twice over
            under_io += bed.guest.kill(writer, 0)
            bed.run(["tee", CONF], input=config(bed, [LIVE_PORT, other]).encode(), check=True)
            bed.guest.kill(pid, 1)
            wait_until(lambda: listening(bed) == sorted([LIVE_PORT, other]), 30, f"service {other} to listen")
            bed.run(["tee", CONF], input=config(bed, [LIVE_PORT]).encode(), check=True)
            bed.guest.kill(pid, 1)
            wait_until(lambda: listening(bed) == [LIVE_PORT], 30, f"service {other} to go")
            reloads += 2
        wait_until(lambda: "WRITTEN" in bed.run(["cat", "/var/log/bed/reload-proof-dd.log"]).stdout
                   or not bed.guest.kill(writer, 0), 120, "the write to finish")
        assert "WRITTEN" in bed.run(["cat", "/var/log/bed/reload-proof-dd.log"]).stdout, \
            bed.run(["cat", "/var/log/bed/reload-proof-dd.log"]).stdout
        guest_sum = bed.run(["sha256sum", f"{MNT}/{name}"], timeout=120).stdout.split()[0]
        assert hashlib.sha256((bed.export_dir / name).read_bytes()).hexdigest() == guest_sum
        assert reloads == 8 and under_io >= 2, f"only {under_io} of 4 rounds ran while the write did"
        assert connects(bed) == before  # never reconnected: the live connection was left alone
        assert bed.guest.kill(pid, 0)  # one process throughout
        log = bed.run(["cat", LOG]).stdout
        assert log.count("Reloading configuration") >= 4 or log.count("Configuration successful") >= 5, log[-2000:]
    finally:
        bed.run(["umount", "-l", MNT])
        bed.guest.kill(pid, 9)
        deadline = time.monotonic() + 30
        while bed.guest.kill(pid, 0) and time.monotonic() < deadline:
            time.sleep(0.1)  # waiting for the kill, bounded
        (bed.export_dir / name).unlink(missing_ok=True)
