"""The supervisor in the real kernel guest: tunnels killed under I/O, renewals, revocations,
reaping, cleanup waits, crashes and many mount cycles, against the bed's EFS."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import signal
import time
from typing import Callable, Dict, Iterator, List, Optional

import pytest
from cryptography import x509

from efsbed.bed import REPO, Bed
from efsbed.guestdaemons import GuestSupervisor
from efsbed.procs import wait_until
from efsplug.certificate import OID_CLIENT_AUTH
from efsplug.credentials import detail_tag
from efsplug.stunnel import TunnelSpec, render

pytestmark = pytest.mark.guest

EFSPLUG = str(REPO / ".venv" / "bin" / "efsplug")
PYTHON = str(REPO / ".venv" / "bin" / "python")
STATE = "/run/efs"
POLL = 1.0
SEP = "--efsplug-record--"


def guest_config(bed: Bed, mount: str = "", **watchdog: object) -> str:
    keys: Dict[str, object] = dict(poll_interval_sec=1, unmount_grace_period_sec=2, stunnel_health_check_enabled="false",
                                   cleanup_wait_sec=3600)
    keys.update(watchdog)
    return (f"[mount]\nstunnel_cafile = {bed.ca.cert_path}\n{mount}[mount-watchdog]\n"
            + "".join(f"{k} = {v}\n" for k, v in keys.items()))


@pytest.fixture
def configure(clean_guest: Bed) -> Iterator[Callable[..., None]]:
    bed = clean_guest
    yield lambda mount="", **w: bed.write_guest_config(guest_config(bed, mount, **w))
    bed.write_guest_config(f"[mount]\nstunnel_cafile = {bed.ca.cert_path}\n")


@pytest.fixture
def supervisors(clean_guest: Bed) -> Iterator[Callable[..., GuestSupervisor]]:
    started: List[GuestSupervisor] = []

    def start(argv: Optional[List[str]] = None, log: str = GuestSupervisor.LOG) -> GuestSupervisor:
        sup = GuestSupervisor(clean_guest, argv, log).start()
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.kill()
    # Safety net for a failed test ('[s]' keeps pkill from matching this very shell).
    clean_guest.run(["sh", "-c", "pkill -f '[s]tunnel.*/run/efs/'; rm -rf /run/efs"])


def records(bed: Bed) -> List[dict]:
    out = bed.run(["sh", "-c", f"for f in {STATE}/*.json; do [ -e \"$f\" ] && cat \"$f\" && echo {SEP}; done"]).stdout
    return [json.loads(chunk) for chunk in out.split(SEP) if chunk.strip()]


def record_of(bed: Bed, mountpoint: str) -> Optional[dict]:
    return next((r for r in records(bed) if r["mountpoint"] == mountpoint), None)


def tunnel_pids(bed: Bed) -> List[str]:
    return bed.run(["pgrep", "-f", f"stunnel.*{STATE}/"]).stdout.split()


def mounted(bed: Bed, mountpoint: str) -> bool:
    return f" {mountpoint} nfs4 " in bed.run(["cat", "/proc/mounts"]).stdout


def umount(bed: Bed, mountpoint: str, reaped: bool = True) -> None:
    """umount by hand; then (supervisor running) wait until it reaped the mount's leftovers."""
    assert bed.run(["umount", mountpoint], timeout=60).rc == 0
    if reaped:
        wait_until(lambda: record_of(bed, mountpoint) is None, 30, f"{mountpoint} reaped")


def mount(bed: Bed, mountpoint: str, options: str) -> None:
    res = bed.mount_efs(mountpoint, options)
    assert res.rc == 0, res.stderr


def status(bed: Bed) -> List[dict]:
    res = bed.run([EFSPLUG, "status", "--json"])
    assert res.rc == 0, res.stderr
    return json.loads(res.stdout)


def test_tunnel_killed_under_dd(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    sup = supervisors()
    mount(bed, "/mnt/supdd", "tls")
    try:
        bed.run(["dd", "if=/dev/urandom", "of=/tmp/sup-src", "bs=1M", "count=100"], timeout=120)
        want = bed.run(["sha256sum", "/tmp/sup-src"]).stdout.split()[0]
        old = record_of(bed, "/mnt/supdd")["tunnel"]["pid"]
        dd = bed.guest.spawn(["dd", "if=/tmp/sup-src", "of=/mnt/supdd/big", "bs=1M", "conv=fsync"], log="/tmp/sup-dd.log")
        target = bed.export_dir / "big"
        wait_until(lambda: target.exists() and target.stat().st_size > 10 << 20, 60, "dd under way", 0.05)
        assert bed.run(["kill", "-9", str(old)]).rc == 0
        killed = time.monotonic()
        fresh = wait_until(lambda: (r := record_of(bed, "/mnt/supdd")) and r["tunnel"]["pid"] != old and r, 30,
                           "tunnel restarted", 0.05)
        seen_after = time.monotonic() - killed
        wait_until(lambda: not bed.guest.kill(dd, 0), 300, "dd finished", 0.5)
        assert "100+0 records out" in bed.run(["cat", "/tmp/sup-dd.log"]).stdout
        assert hashlib.sha256(target.read_bytes()).hexdigest() == want
        assert fresh["port"] == record_of(bed, "/mnt/supdd")["port"]
        log = sup.log()
        assert "restarted the tunnel of /mnt/supdd" in log, log
        gap = _restart_gap(log)
        assert gap <= 2 * POLL, f"tunnel back {gap:.3f}s after it exited (log), {seen_after:.1f}s seen from the host"
    finally:
        umount(bed, "/mnt/supdd")
        bed.run(["rm", "-f", "/tmp/sup-src", "/tmp/sup-dd.log"])
        (bed.export_dir / "big").unlink(missing_ok=True)


def _restart_gap(log: str) -> float:
    """Seconds between 'tunnel ... exited' and 'restarted the tunnel' in the supervisor log."""
    stamps = {}
    for line in log.splitlines():
        m = re.match(r"efsplug supervise: (\d+\.\d+) ", line)
        if m and "exited" in line and "exited" not in stamps:
            stamps["exited"] = float(m.group(1))
        elif m and "restarted the tunnel" in line and "exited" in stamps:
            return float(m.group(1)) - stamps["exited"]
    raise AssertionError(f"no exit/restart pair in the log:\n{log}")


def _cert(bed: Bed, rec: dict) -> x509.Certificate:
    stem = rec["config_file"].rsplit("/", 1)[0]
    return x509.load_pem_x509_certificate(bed.run(["cat", f"{stem}/certificate.pem"]).stdout.encode())


def _fresh_connection_key_id(bed: Bed, port: int) -> str:
    """Open a new connection through the tunnel: the endpoint sees the certificate stunnel loaded."""
    before = len(bed.endpoint.connection_events())
    # A renewal's SIGHUP makes stunnel bind its port again: a connection in that moment is
    # refused (so the supervisor needs two missed probes in a row). Retried, bounded.
    code = (f"import socket,time\nend=time.monotonic()+10\nwhile True:\n"
            f"  try:\n    s=socket.create_connection(('127.0.0.1',{port})); break\n"
            f"  except ConnectionRefusedError:\n    assert time.monotonic()<end, 'refused for 10s'\n    time.sleep(0.05)\n"
            f"time.sleep(1.5); s.close()")
    res = bed.run(["python3", "-c", code], timeout=30)
    events = wait_until(lambda: bed.endpoint.connection_events()[before:], 20,
                        f"endpoint event (client: rc {res.rc} {res.stderr.strip()[-200:]})")
    assert events[-1]["event"] == "accepted", events
    return events[-1]["access_key_id"]


def test_certificates_renewed_under_io(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure(tls_cert_renewal_interval_sec=4)
    sup = supervisors()
    mount(bed, "/mnt/supiam", "tls,iam")
    try:
        rec = record_of(bed, "/mnt/supiam")
        tunnel = rec["tunnel"]["pid"]
        serials, signatures, key_ids = set(), set(), set()
        for i in range(3):
            bed.imds.rotate_role_credentials()  # so each renewal signs with a new key
            before = _cert(bed, rec).serial_number
            wait_until(lambda: _cert(bed, rec).serial_number != before, 30, f"renewal {i + 1}")
            cert = _cert(bed, rec)
            serials.add(cert.serial_number)
            signatures.add(cert.extensions.get_extension_for_oid(OID_CLIENT_AUTH).value.value)
            key_ids.add(_fresh_connection_key_id(bed, rec["port"]))
            data = secrets.token_hex(8)
            assert bed.run(["sh", "-c", f"echo {data} > /mnt/supiam/renew-{i}"], timeout=60).rc == 0
            assert (bed.export_dir / f"renew-{i}").read_text().strip() == data
        assert len(serials) == 3 and len(signatures) == 3
        assert len(key_ids) >= 2, "new TLS connections did not present the renewed certificates"
        assert record_of(bed, "/mnt/supiam")["tunnel"]["pid"] == tunnel  # reloaded, never restarted
        assert "tunnel reloaded" in sup.log()
    finally:
        umount(bed, "/mnt/supiam")
        for i in range(3):
            (bed.export_dir / f"renew-{i}").unlink(missing_ok=True)


def test_revoked_task_credentials(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure(tls_cert_renewal_interval_sec=3)
    rel_id = "sup-" + secrets.token_hex(6)
    bed.task_credentials.grant(rel_id)
    sup = supervisors()
    mount(bed, "/mnt/suptask", f"tls,iam,awscredsuri=/v2/credentials/{rel_id}")
    try:
        bed.task_credentials.revoke(rel_id)
        view = wait_until(lambda: [v for v in status(bed) if v["mountpoint"] == "/mnt/suptask"
                                   and v["state"] == "credentials-revoked"], 30, "credentials-revoked")
        # The URI fetches the task role's keys: status, its reason and the log show only a tag.
        assert view[0]["credential_source"] == f"awscredsuri {detail_tag(f'/v2/credentials/{rel_id}')}"
        shown = json.dumps(view) + bed.run([EFSPLUG, "status"]).stdout + sup.log()
        assert rel_id not in shown, shown
        # The measurement window itself. Renewal is due every 3 s, so retrying without back-off
        # would ask about 8 times in it; the back-off (10 s, then 20 s) asks at most twice.
        start = bed.task_credentials.requests(rel_id)
        time.sleep(25)
        made = bed.task_credentials.requests(rel_id) - start
        assert made <= 3, f"{made} credential requests in 25 s after revocation"
        assert mounted(bed, "/mnt/suptask")  # still mounted: cleanup_wait has not passed
    finally:
        umount(bed, "/mnt/suptask")


def test_umount_by_hand_reaps_and_frees_the_port(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure("port_range_lower_bound = 20300\nport_range_upper_bound = 20301\n", unmount_grace_period_sec=2)
    sup = supervisors()
    mount(bed, "/mnt/suphand", "tls")
    rec = record_of(bed, "/mnt/suphand")
    assert rec["port"] == 20300
    umount(bed, "/mnt/suphand")
    wait_until(lambda: not records(bed) and not tunnel_pids(bed), 20, "reaped")
    assert bed.run(["test", "-e", rec["config_file"].rsplit("/", 1)[0]]).rc != 0  # its dir (cert, config) is gone
    assert "reaped /mnt/suphand" in sup.log()
    mount(bed, "/mnt/suphand", "tls")  # the only port in the range is free again
    try:
        assert record_of(bed, "/mnt/suphand")["port"] == 20300
    finally:
        umount(bed, "/mnt/suphand")
        wait_until(lambda: not records(bed), 20, "reaped again")


REFS_SCRIPT = """
import logging, sys
from efsplug.config import load_config
from efsplug.supervisor.runner import Supervisor
logging.basicConfig(level=logging.INFO, format="efsplug supervise: %(created).3f %(levelname)s %(message)s")
def refs(mountpoint):
    with open("/tmp/sup-refs") as f:
        return int(f.read())
Supervisor(load_config().config, references=refs).run_forever()
"""


def test_unreferenced_volume_unmounted_after_cleanup_wait(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure(cleanup_wait_sec=3)
    bed.run(["sh", "-c", "echo 1 > /tmp/sup-refs"])
    sup = supervisors([PYTHON, "-c", REFS_SCRIPT], log="/var/log/bed/efsplug-refs.log")
    mount(bed, "/mnt/supvol", "tls")
    try:
        time.sleep(8)  # more than twice the cleanup wait, with a reference held
        assert mounted(bed, "/mnt/supvol") and record_of(bed, "/mnt/supvol")
        bed.run(["sh", "-c", "echo 0 > /tmp/sup-refs"])
        gone = lambda: not mounted(bed, "/mnt/supvol") and not records(bed) and not tunnel_pids(bed)  # noqa: E731
        deadline = time.monotonic() + 30
        while not gone():
            assert time.monotonic() < deadline, (
                f"not unmounted and reaped: mounted={mounted(bed, '/mnt/supvol')} records={records(bed)} "
                f"tunnels={tunnel_pids(bed)}\n{sup.log()}")
            time.sleep(0.2)  # polling the guest with a deadline
        assert "no Docker references" in sup.log()
    finally:
        if mounted(bed, "/mnt/supvol"):
            umount(bed, "/mnt/supvol")
        bed.run(["rm", "-f", "/tmp/sup-refs"])


def test_supervisor_crash_and_restart(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    orphan_dir = f"{STATE}/{bed.fs_id}.mnt-orphan.20399"
    first = supervisors()
    mount(bed, "/mnt/supcrash", "tls")
    try:
        rec = record_of(bed, "/mnt/supcrash")
        first.kill(signal.SIGKILL)
        # An orphan: a tunnel efsplug started (its layout, its config) that no record owns.
        orphan_conf = f"{orphan_dir}/stunnel.conf"
        text = bed.run(["cat", rec["config_file"]]).stdout.replace(f":{rec['port']}", ":20399")
        bed.run(["mkdir", "-p", orphan_dir])
        bed.guest.run(["tee", orphan_conf], input=text.encode(), check=True)
        bed.guest.spawn([rec["tunnel"]["cmdline"][0], orphan_conf], log="/tmp/sup-orphan.log")
        wait_until(lambda: len(tunnel_pids(bed)) == 2, 20, "orphan listening")
        second = supervisors()
        wait_until(lambda: tunnel_pids(bed) == [str(rec["tunnel"]["pid"])], 40, "orphan stopped")
        wait_until(lambda: "stopped orphan tunnel" in second.log(), 10, "orphan logged")  # logged once it is gone
        assert record_of(bed, "/mnt/supcrash")["tunnel"] == rec["tunnel"]  # the live mount untouched
        assert bed.run(["sh", "-c", "echo ok > /mnt/supcrash/crash"], timeout=60).rc == 0
        bed.run(["kill", "-9", str(rec["tunnel"]["pid"])])  # and supervised again
        wait_until(lambda: record_of(bed, "/mnt/supcrash")["tunnel"]["pid"] != rec["tunnel"]["pid"], 20, "restart")
    finally:
        umount(bed, "/mnt/supcrash")
        (bed.export_dir / "crash").unlink(missing_ok=True)
        bed.run(["rm", "-rf", orphan_dir, "/tmp/sup-orphan.log"])


def test_many_mount_cycles_leak_nothing(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure(unmount_grace_period_sec=0)
    supervisors()
    bed.run(["mkdir", "-p", "/mnt/supcycle"])
    # 30 cycles: CI's half hour has no room for more (200, 100, then 60 before); a leak of
    # anything per cycle still shows as 30 of it.
    loop = ("for i in $(seq 30); do mount -t efs %s /mnt/supcycle -o tls || exit 1; "
            "umount /mnt/supcycle || exit 2; done" % bed.fs_id)
    res = bed.run(["sh", "-c", loop], timeout=1500)
    assert res.rc == 0, res.stderr
    wait_until(lambda: not tunnel_pids(bed) and not records(bed), 60, "everything reaped")
    assert not mounted(bed, "/mnt/supcycle")
    left = bed.run(["sh", "-c", f"find {STATE} -mindepth 1 | sort"]).stdout.split()
    assert set(left) <= {f"{STATE}/privateKey.pem", f"{STATE}/supervisor.lock", f"{STATE}/ports"}, left
    listening = bed.run(["sh", "-c", "cat /proc/net/tcp"]).stdout
    ports = {int(line.split()[1].split(":")[1], 16) for line in listening.splitlines()[1:] if line.split()[3] == "0A"}
    assert not {p for p in ports if 20049 <= p < 21049}, ports


FAST_ORPHANS_SCRIPT = """
import logging
from efsplug.config import load_config
from efsplug.supervisor.runner import Supervisor
logging.basicConfig(level=logging.INFO, format="efsplug supervise: %(created).3f %(levelname)s %(message)s")
Supervisor(load_config().config, orphan_min_age=1.0, orphan_interval=0.5).run_forever()
"""
EFS_UTILS = "/var/run/efs"  # as amazon-efs-utils spells the directory it shares with efsplug
EFS_UTILS_CONFIG = """fips = no
foreground = yes
socket = l:SO_REUSEADDR=yes
socket = a:SO_BINDTODEVICE=lo
[efs]
client = yes
accept = 127.0.0.1:{port}
connect = {fs_id}.efs.us-east-1.amazonaws.com:2049
sslVersion = TLSv1.2
renegotiation = no
TIMEOUTbusy = 20
TIMEOUTclose = 0
TIMEOUTidle = 70
delay = yes
verify = 2
CAfile = {cafile}
checkHost = {fs_id}.efs.us-east-1.amazonaws.com
"""


def _listening(bed: Bed, port: int) -> bool:
    table = bed.run(["cat", "/proc/net/tcp"]).stdout.splitlines()[1:]
    return any(cols[1] == f"0100007F:{port:04X}" and cols[3] == "0A" for cols in (line.split() for line in table))


def test_efs_utils_tunnels_in_the_shared_state_dir_are_left_alone(configure, supervisors, clean_guest: Bed) -> None:
    """Installed over amazon-efs-utils: its tunnels (stunnel, and efs-proxy in 2.x/3.x) run on
    configs in the same /var/run/efs, with its state files; no efsplug sweep may stop them.
    efsplug's own orphan (its record deleted) is still stopped."""
    bed = clean_guest
    configure(stunnel_health_check_enabled="true")
    stunnel = bed.run(["sh", "-c", "command -v stunnel5 || command -v stunnel || command -v stunnel4"]).stdout.strip()
    bed.run(["mkdir", "-p", EFS_UTILS, "/tmp/efsutils-bin"])
    bed.run(["cp", stunnel, "/tmp/efsutils-bin/efs-proxy"])
    theirs: Dict[int, int] = {}  # pid -> port
    files = []
    for port, binary in ((21040, stunnel), (21041, "/tmp/efsutils-bin/efs-proxy")):
        base = f"{bed.fs_id}.mnt.efsutils{port}.{port}"
        conf = f"{EFS_UTILS}/stunnel-config.{base}"
        bed.guest.run(["tee", conf], input=EFS_UTILS_CONFIG.format(port=port, fs_id=bed.fs_id, cafile=bed.ca.cert_path).encode(), check=True)
        bed.run(["mkdir", "-p", f"{EFS_UTILS}/{base}+"])
        bed.guest.run(["tee", f"{EFS_UTILS}/{base}+/certificate.pem"], input=b"theirs\n", check=True)
        pid = bed.guest.spawn([binary, conf], log=f"/tmp/efsutils-{port}.log")
        theirs[pid] = port
        state = {"pid": pid, "cmd": [binary, conf], "files": [conf, f"{EFS_UTILS}/{base}+"],
                 "mountpoint": f"/mnt/efsutils{port}", "mount_time": time.time()}
        bed.guest.run(["tee", f"{EFS_UTILS}/{base}"], input=json.dumps(state).encode(), check=True)
        files += [conf, f"{EFS_UTILS}/{base}", f"{EFS_UTILS}/{base}+/certificate.pem"]
        wait_until(lambda port=port: _listening(bed, port), 20, f"efs-utils tunnel on {port}")
    sums = bed.run(["md5sum", *files]).stdout
    # efsplug's own orphan: its layout and its config, no record.
    ours = f"{STATE}/{bed.fs_id}.mnt-gone.20398"
    bed.run(["mkdir", "-p", ours])
    text = render(TunnelSpec(accept_port=20398, connect_host="127.0.0.1", connect_port=9, verify_level=0))
    bed.guest.run(["tee", f"{ours}/stunnel.conf"], input=text.encode(), check=True)
    orphan = bed.guest.spawn([stunnel, f"{ours}/stunnel.conf"], log="/tmp/sup-gone.log")
    wait_until(lambda: _listening(bed, 20398), 20, "efsplug's orphan listening")
    try:
        sup = supervisors([PYTHON, "-c", FAST_ORPHANS_SCRIPT], log="/var/log/bed/efsplug-orphans.log")
        wait_until(lambda: not bed.guest.kill(orphan, 0), 20, "efsplug's own orphan stopped")
        time.sleep(6)  # twelve more sweeps, past the minimum age many times over
        log = sup.log()
        for pid, port in theirs.items():
            assert bed.guest.kill(pid, 0), f"efs-utils tunnel pid {pid} was stopped:\n{log}"
            assert _listening(bed, port)
            # Said once (not once per sweep) of the stunnel; efs-proxy is no stunnel: not even looked at.
            assert log.count(f"leaving tunnel pid {pid} ") == (1 if port == 21040 else 0), log
        assert bed.run(["md5sum", *files]).stdout == sums  # their files untouched
        assert log.count("stopped orphan tunnel") == 1, log
        assert f"{bed.fs_id}.mnt-gone.20398" in log
    finally:
        for pid in theirs:
            bed.guest.kill(pid, signal.SIGKILL)
        bed.guest.kill(orphan, signal.SIGKILL)
        bed.run(["sh", "-c", f"rm -rf {EFS_UTILS}/*efsutils* /tmp/efsutils-bin /tmp/efsutils-*.log /tmp/sup-gone.log"])


BAD_RECORDS = {
    "fs-01234567.mnt-deep.json": b"[" * 30_000 + b"]" * 30_000,
    "fs-01234567.mnt-int.json": b'{"version": 1, "port": ' + b"9" * 50_000 + b"}",
    "fs-01234567.mnt-pid.json": json.dumps({"version": 1, "fs_id": "fs-01234567", "mountpoint": "/mnt/pid",
                                            "tunnel": {"pid": -4, "create_time": 1, "cmdline": []}}).encode(),
    "fs-01234567.mnt-bytes.json": b"\xff\xfe{",
}


def test_bad_records_stop_neither_supervision_nor_status(configure, supervisors, clean_guest: Bed) -> None:
    bed = clean_guest
    configure()
    bed.run(["mkdir", "-p", STATE])
    for name, raw in BAD_RECORDS.items():
        bed.guest.run(["tee", f"{STATE}/{name}"], input=raw, check=True)
    sup = supervisors()
    quarantined = lambda: bed.run(["sh", "-c", f"ls {STATE} | grep -c '\\.json\\.corrupt-'"]).stdout.strip()  # noqa: E731
    wait_until(lambda: quarantined() == str(len(BAD_RECORDS)), 20, "bad records quarantined")
    mount(bed, "/mnt/supbad", "tls")
    try:
        res = bed.run([EFSPLUG, "status"])
        assert res.rc == 0, res.stderr
        assert res.stdout.startswith("/mnt/supbad  ") and res.stdout.count("quarantined record: ") == 4, res.stdout
        old = record_of(bed, "/mnt/supbad")["tunnel"]["pid"]
        assert bed.run(["kill", "-9", str(old)]).rc == 0
        wait_until(lambda: record_of(bed, "/mnt/supbad")["tunnel"]["pid"] != old, 20, "tunnel restarted")
        assert bed.run(["sh", "-c", "echo ok > /mnt/supbad/bad-records"], timeout=60).rc == 0
        log = sup.log()
        for name in BAD_RECORDS:
            assert log.count(f"/{name}:") == 1, log  # reported once, mount events or not
        assert "Traceback" not in log, log
    finally:
        umount(bed, "/mnt/supbad")
        (bed.export_dir / "bad-records").unlink(missing_ok=True)
