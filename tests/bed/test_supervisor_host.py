"""The supervisor on the host with real stunnel processes and a stand-in mount table.

The host kernel has no NFS client, so the NFS part of the mount table is synthetic here
(a list the test edits, then rescan()); tunnels, pidfds, locks, files and the real
/proc/self/mountinfo watch are all real. The kernel-guest tests cover real mounts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List, Optional

import psutil
import pytest

from efsbed import procs
from efsbed.procs import wait_until
from efsplug import state
from efsplug.config import parse_config
from efsplug.mounttable import KernelMount, MountTableWatch
from efsplug.ports import port_is_listening, reserve_port
from efsplug.state import MountRecord
from efsplug.stunnel import TunnelSpec
from efsplug.supervisor import decisions as d
from efsplug.supervisor.runner import Supervisor
from efsplug.supervisor.statusfile import read_status
from efsplug.tunnel import Tunnel, TunnelIdentity, listening_on
from efsplug.unmount import kernel_connected, mount_dir, release

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4"
LOWER, UPPER = 43049, 44049  # away from the ranges other suites use
FS_ID = "fs-0123456789abcdef0"

pytestmark = pytest.mark.skipif(shutil.which(STUNNEL) is None, reason="stunnel is not installed")


class Table:
    """The NFS mounts the supervisor is shown: edit, then call sup.rescan()."""

    def __init__(self) -> None:
        self.mounts: List[KernelMount] = []

    def mount(self, mountpoint: str, port: int) -> None:
        opts = f"rw,relatime,rw,vers=4.1,port={port},addr=127.0.0.1"
        self.mounts.append(KernelMount(len(self.mounts) + 100, mountpoint, "nfs4", "127.0.0.1:/", opts, port))

    def umount(self, mountpoint: str) -> None:
        self.mounts = [m for m in self.mounts if m.mountpoint != mountpoint]

    def __call__(self) -> List[KernelMount]:
        return list(self.mounts)


@pytest.fixture
def state_dir(tmp_path):
    directory = tmp_path / "efs"
    directory.mkdir()
    yield directory
    # Nothing may outlive the test: stop any tunnel still running a config under it.
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if len(cmd) == 2 and cmd[1].startswith(str(directory)):
            p.kill()
            p.wait(5)


def config_for(state_dir: Path, **watchdog: object):
    keys = dict(poll_interval_sec=1, unmount_grace_period_sec=1, stunnel_health_check_enabled="false")
    keys.update(watchdog)
    text = f"[efsplug]\nstate_dir = {state_dir}\nstunnel = {STUNNEL}\n[mount-watchdog]\n"
    text += "".join(f"{k} = {v}\n" for k, v in keys.items())
    return parse_config(text).config


def make_mount(state_dir: Path, mountpoint: str, *, age: timedelta = timedelta(hours=1), upstream: int = 9,
               **over) -> MountRecord:
    """What mount_efs leaves behind for one TLS mount: a tunnel, its dir and its record."""
    with reserve_port(state_dir / "ports", LOWER, UPPER) as reservation:
        record = MountRecord(fs_id=FS_ID, mountpoint=mountpoint, port=reservation.port, tls=True, region="us-east-1",
                             mount_time=datetime.now(timezone.utc) - age, **over)
        directory = mount_dir(record, state_dir)
        directory.mkdir(mode=0o700)
        spec = TunnelSpec(accept_port=reservation.port, connect_host="127.0.0.1", connect_port=upstream, verify_level=0)
        tunnel = Tunnel.start(spec, config_path=directory / "stunnel.conf", stunnel_binary=STUNNEL)
    # Taken again now: Tunnel.start may read the command line before exec finished.
    record = replace(record, tunnel=TunnelIdentity.of(tunnel.pid), config_file=str(directory / "stunnel.conf"),
                     files_created=[str(directory)])
    state.save(state_dir, record)
    return record


@pytest.fixture
def supervisors():
    started: List[Supervisor] = []

    def start(config, **kw) -> Supervisor:
        sup = Supervisor(config, environ=kw.pop("environ", {}), **kw)
        sup.start()
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.stop()
        assert not sup.running()


def current(state_dir: Path, record: MountRecord) -> MountRecord:
    return state.load(state.record_path(state_dir, record))


def test_mount_table_watch_wakes_on_a_real_mount(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    with MountTableWatch() as watch:
        assert watch.wait(0) is False
        subprocess.run(["mount", "-t", "tmpfs", "efsplug-test", str(target)], check=True)
        try:
            assert watch.wait(5) is True
            assert any(m.mountpoint == str(target) and m.fstype == "tmpfs" for m in watch.read())
            assert watch.wait(0) is False  # each change is reported once
        finally:
            subprocess.run(["umount", str(target)], check=True)
        assert watch.wait(5) is True


def test_killed_tunnel_comes_back_on_the_same_port(state_dir, supervisors):
    table = Table()
    record = make_mount(state_dir, "/mnt/a")
    table.mount("/mnt/a", record.port)
    sup = supervisors(config_for(state_dir), mount_reader=table)
    wait_until(sup.supervising.is_set, 10, "supervising")
    old = record.tunnel
    os.kill(old.pid, signal.SIGKILL)
    killed = time.monotonic()
    fresh = wait_until(lambda: (r := current(state_dir, record)).tunnel != old and r.tunnel, 10, "restart")
    took = time.monotonic() - killed
    assert took < 2.0, f"restart took {took:.2f}s, more than two poll intervals"
    assert listening_on(fresh.pid, record.port)
    assert fresh.cmdline == old.cmdline  # same stunnel, same config file
    assert shown_state(state_dir, record) == d.OK


def test_wedged_tunnel_is_restarted_within_two_poll_intervals(state_dir, supervisors):
    """A live stunnel that stopped listening on its port (here: reloaded onto another port,
    as a botched reload would leave it) is found by the per-poll sweep and restarted."""
    table = Table()
    record = make_mount(state_dir, "/mnt/w")
    table.mount("/mnt/w", record.port)
    sup = supervisors(config_for(state_dir, stunnel_health_check_enabled="true"), mount_reader=table)
    wait_until(sup.supervising.is_set, 10, "supervising")
    config = Path(record.config_file)
    original = config.read_text()
    elsewhere = record.port + 1 if record.port + 1 < UPPER else record.port - 1
    config.write_text(original.replace(f"accept = 127.0.0.1:{record.port}", f"accept = 127.0.0.1:{elsewhere}"))
    Tunnel.from_identity(record.tunnel).reload()  # waits for stunnel's handler: an early SIGHUP kills it
    wait_until(lambda: listening_on(record.tunnel.pid, elsewhere), 10, "the tunnel moved off its port")
    wedged = time.monotonic()
    config.write_text(original)  # what the restart will use
    assert psutil.pid_exists(record.tunnel.pid) and not listening_on(record.tunnel.pid, record.port)
    fresh = wait_until(lambda: (r := current(state_dir, record)).tunnel != record.tunnel and r.tunnel, 10, "restart")
    took = time.monotonic() - wedged
    assert took < 2.5, f"wedged tunnel restarted after {took:.2f}s; poll interval is 1s"
    assert listening_on(fresh.pid, record.port)
    assert not psutil.pid_exists(record.tunnel.pid), "the wedged process must be stopped, not left behind"
    assert shown_state(state_dir, record) == d.OK


def test_a_reload_is_not_mistaken_for_a_wedge(state_dir, supervisors):
    """SIGHUP re-binds the listening socket; the sweep must not restart a healthy tunnel."""
    table = Table()
    record = make_mount(state_dir, "/mnt/r")
    table.mount("/mnt/r", record.port)
    sup = supervisors(config_for(state_dir, stunnel_health_check_enabled="true"), mount_reader=table)
    wait_until(sup.supervising.is_set, 10, "supervising")
    tunnel = Tunnel.from_identity(record.tunnel)
    assert tunnel is not None
    for _ in range(5):
        # As the supervisor reloads: a SIGHUP before stunnel installs its handler kills it.
        tunnel.reload()
        wait_until(lambda: listening_on(record.tunnel.pid, record.port), 5, "listening after reload")
    deadline = time.monotonic() + 3.0  # three sweeps
    while time.monotonic() < deadline:
        assert current(state_dir, record).tunnel == record.tunnel, "a reloaded tunnel was restarted"
        time.sleep(0.1)  # observing for a fixed window is the point of this test


def shown_state(state_dir: Path, record: MountRecord) -> Optional[str]:
    """What status shows: the supervisor writes a status file only once a mount is not ok."""
    if not mount_dir(record, state_dir).exists():
        return None
    status = read_status(mount_dir(record, state_dir))
    return d.OK if status is None else status.state


def test_pid_reuse_cannot_fool_it(state_dir, supervisors):
    """A record whose pid now belongs to another program: the tunnel is started, the other left alone."""
    table = Table()
    record = make_mount(state_dir, "/mnt/reuse")
    Tunnel.from_identity(record.tunnel).stop()
    impostor = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tag=procs.new_tag())
    try:
        fake = replace(record.tunnel, pid=impostor.pid)
        record = replace(record, tunnel=fake)
        state.save(state_dir, record)
        table.mount("/mnt/reuse", record.port)
        supervisors(config_for(state_dir), mount_reader=table)
        wait_until(lambda: current(state_dir, record).tunnel.pid != impostor.pid, 10, "tunnel restarted")
        assert impostor.alive(), "the process that reused the pid was signalled"
        assert listening_on(current(state_dir, record).tunnel.pid, record.port)
    finally:
        impostor.stop()


def test_reconciliation_after_a_crash(state_dir, supervisors):
    table = Table()
    live = make_mount(state_dir, "/mnt/live")
    dead = make_mount(state_dir, "/mnt/deadtunnel")
    stale = make_mount(state_dir, "/mnt/stale")
    Tunnel.from_identity(dead.tunnel).stop()  # crashed with its supervisor
    table.mount("/mnt/live", live.port)
    table.mount("/mnt/deadtunnel", dead.port)
    # An orphan: a tunnel efsplug started (its layout, its config) that no record knows.
    orphan_dir = state_dir / f"{FS_ID}.mnt-orphan.{LOWER - 1}"
    orphan_dir.mkdir()
    orphan = Tunnel.start(TunnelSpec(accept_port=LOWER - 1, connect_host="127.0.0.1", connect_port=9, verify_level=0),
                          config_path=orphan_dir / "stunnel.conf", stunnel_binary=STUNNEL)
    sup = supervisors(config_for(state_dir, unmount_grace_period_sec=0), mount_reader=table, orphan_min_age=0)
    wait_until(lambda: not orphan.alive(), 10, "orphan stopped")
    wait_until(lambda: not state.record_path(state_dir, stale).exists(), 10, "stale record reaped")
    assert not mount_dir(stale, state_dir).exists() and not Tunnel.from_identity(stale.tunnel)
    assert not port_is_listening(stale.port)  # its port is free for the next mount
    wait_until(lambda: current(state_dir, dead).tunnel != dead.tunnel, 10, "tunnel back for a live mount")
    assert current(state_dir, live).tunnel == live.tunnel  # untouched
    assert sup.supervising.is_set()


def test_exactly_one_supervisor_and_takeover(state_dir, supervisors, tmp_path):
    cfg_file = tmp_path / "efs-utils.conf"
    cfg_file.write_text(f"[efsplug]\nstate_dir = {state_dir}\n[mount-watchdog]\nstunnel_health_check_enabled = false\n")
    other = procs.start("supervise", [sys.executable, "-m", "efsplug.cli", "supervise", "--config", str(cfg_file)],
                        tag=procs.new_tag(), log=tmp_path / "supervise.log")
    try:
        wait_until(lambda: (state_dir / "supervisor.lock").exists() and _locked(state_dir), 20, "standalone holds lock")
        sup = supervisors(config_for(state_dir))
        time.sleep(0.5)  # give it a chance to (wrongly) start supervising
        assert not sup.supervising.is_set()
        os.kill(other.pid, signal.SIGKILL)  # a crash: the kernel drops its lock
        wait_until(sup.supervising.is_set, 5, "takeover")
    finally:
        other.stop()
    second = supervisors(config_for(state_dir))
    assert not second.supervising.wait(0.3)
    sup.stop()
    wait_until(second.supervising.is_set, 5, "second takes over after a clean stop")


def _locked(state_dir: Path) -> bool:
    from efsplug.supervisor.lock import supervised

    return supervised(state_dir)


def test_mount_gone_is_reaped_after_grace_but_a_shared_tunnel_is_kept(state_dir, supervisors):
    table = Table()
    first = make_mount(state_dir, "/mnt/first")
    second = make_mount(state_dir, "/mnt/second")
    table.mount("/mnt/first", first.port)
    table.mount("/mnt/second", first.port)  # the kernel put it on the first mount's client
    sup = supervisors(config_for(state_dir, unmount_grace_period_sec=1), mount_reader=table)
    wait_until(sup.supervising.is_set, 10, "supervising")
    table.umount("/mnt/first")
    sup.rescan()
    wait_until(lambda: shown_state(state_dir, first) == d.SHARED_TUNNEL, 5, "shared")
    time.sleep(1.5)  # past the grace period: the tunnel /mnt/second uses must survive it
    assert Tunnel.from_identity(first.tunnel) is not None
    assert state.record_path(state_dir, first).exists()
    table.umount("/mnt/second")
    sup.rescan()
    for r in (first, second):
        wait_until(lambda r=r: not state.record_path(state_dir, r).exists(), 10, f"{r.mountpoint} reaped")
        assert Tunnel.from_identity(r.tunnel) is None and not mount_dir(r, state_dir).exists()


def test_release_keeps_a_tunnel_another_mount_uses(state_dir):
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(4)  # accepts (in the backlog) and holds, so stunnel keeps the connection
    first = make_mount(state_dir, "/mnt/one", upstream=upstream.getsockname()[1])
    shared = [KernelMount(1, "/mnt/two", "nfs4", "127.0.0.1:/", f"rw,port={first.port},addr=127.0.0.1", first.port)]
    assert release(first, state_dir=state_dir, mounts=shared) is False
    assert Tunnel.from_identity(first.tunnel) is not None and state.record_path(state_dir, first).exists()
    with socket.create_connection(("127.0.0.1", first.port)):  # like the NFS client's connection
        wait_until(lambda: kernel_connected(first.tunnel.pid, first.port), 5, "connection seen")
        assert release(first, state_dir=state_dir, mounts=[]) is False
        assert Tunnel.from_identity(first.tunnel) is not None
    wait_until(lambda: not kernel_connected(first.tunnel.pid, first.port), 5, "connection closed")
    assert release(first, state_dir=state_dir, mounts=[]) is True
    assert Tunnel.from_identity(first.tunnel) is None and not mount_dir(first, state_dir).exists()
    upstream.close()


def test_release_after_umount_waits_for_the_kernel_to_hang_up(state_dir):
    """Right after umount the NFS client closes its connection a moment later: wait for it, bounded."""
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(4)
    first = make_mount(state_dir, "/mnt/one", upstream=upstream.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", first.port))  # like the NFS client's connection
    wait_until(lambda: kernel_connected(first.tunnel.pid, first.port), 5, "connection seen")
    # Outlasting the wait: kept for the supervisor, as before.
    assert release(first, state_dir=state_dir, mounts=[], teardown_wait=0.2) is False
    assert Tunnel.from_identity(first.tunnel) is not None
    # Hanging up while release waits (a timer, as the kernel does it on its own schedule).
    timer = threading.Timer(0.3, client.close)
    timer.start()
    try:
        assert release(first, state_dir=state_dir, mounts=[], teardown_wait=10.0) is True
    finally:
        timer.cancel()
        client.close()
        upstream.close()
    assert Tunnel.from_identity(first.tunnel) is None and not state.record_path(state_dir, first).exists()


@pytest.mark.parametrize("refs, unmounted", [(0, True), (1, False)])
def test_unreferenced_volume_unmounted_after_cleanup_wait(state_dir, supervisors, refs, unmounted):
    table = Table()
    record = make_mount(state_dir, "/mnt/vol")
    table.mount("/mnt/vol", record.port)
    supervisors(config_for(state_dir, cleanup_wait_sec=1), mount_reader=table, references=lambda mp: refs)
    gone = lambda: not state.record_path(state_dir, record).exists()  # noqa: E731
    if unmounted:
        wait_until(gone, 10, "unmounted and reaped")
        assert Tunnel.from_identity(record.tunnel) is None
    else:
        time.sleep(2.5)  # two and a half cleanup waits: still there
        assert not gone() and Tunnel.from_identity(record.tunnel) is not None
        assert shown_state(state_dir, record) == d.OK


@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_a_wall_clock_step_neither_cuts_the_cleanup_wait_short_nor_holds_it(state_dir, supervisors, step):
    """A VM's clock stepped an hour (chrony's makestep, a resume) right after the volume went
    idle: the cleanup wait runs on the monotonic clock, so the idle volume is unmounted
    neither at once nor an hour late."""
    table = Table()
    record = make_mount(state_dir, "/mnt/vol")
    table.mount("/mnt/vol", record.port)
    asked = threading.Event()
    stepped = {"by": 0.0}

    def references(mountpoint: str) -> int:
        asked.set()
        return 0

    supervisors(config_for(state_dir, cleanup_wait_sec=3), mount_reader=table, references=references,
                wall_clock=lambda: time.time() + stepped["by"])
    assert asked.wait(10), "the supervisor never asked for the volume's references"
    idle_from = time.monotonic()
    stepped["by"] = step
    wait_until(lambda: not state.record_path(state_dir, record).exists(), 15, "unmounted after the cleanup wait")
    assert time.monotonic() - idle_from >= 2.0, "unmounted before its 3 s cleanup wait ran out"


def test_renewal_and_revocation_with_a_profile(state_dir, supervisors, tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text("[p]\naws_access_key_id = AKIAEXAMPLEEXAMPLE12\naws_secret_access_key = c2VjcmV0c2VjcmV0\n")
    environ = {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    now = datetime.now(timezone.utc)
    record = make_mount(state_dir, "/mnt/iam", iam=True, credential_source="profile:p",
                        cert_not_before=now - timedelta(minutes=15), cert_not_after=now + timedelta(hours=3))
    certificate = mount_dir(record, state_dir) / "certificate.pem"
    table = Table()
    table.mount("/mnt/iam", record.port)
    supervisors(config_for(state_dir, tls_cert_renewal_interval_sec=1), mount_reader=table, environ=environ)
    serials = set()

    def renewed_three_times():
        if certificate.exists():
            from cryptography import x509
            serials.add(x509.load_pem_x509_certificate(certificate.read_bytes()).serial_number)
        return len(serials) >= 3

    wait_until(renewed_three_times, 15, "three renewals")
    assert current(state_dir, record).tunnel == record.tunnel  # reloaded in place, never restarted
    # stunnel re-binds its port while it reloads: listening again a moment later.
    wait_until(lambda: listening_on(record.tunnel.pid, record.port), 5, "listening after reload")
    creds.unlink()
    wait_until(lambda: shown_state(state_dir, record) == d.CREDENTIALS_REVOKED, 15, "revoked")
    assert "profile:p" in read_status(mount_dir(record, state_dir)).reason
    assert "c2VjcmV0" not in (mount_dir(record, state_dir) / "supervisor.json").read_text()


def test_one_renewal_serves_every_mount_of_a_shared_tunnel(state_dir, supervisors, tmp_path, caplog):
    creds = tmp_path / "credentials"
    creds.write_text("[p]\naws_access_key_id = AKIAEXAMPLEEXAMPLE12\naws_secret_access_key = c2VjcmV0c2VjcmV0\n")
    environ = {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    issued = datetime.now(timezone.utc) - timedelta(hours=2)  # both due at once: the interval is an hour
    first = make_mount(state_dir, "/mnt/iam-a", iam=True, credential_source="profile:p",
                       cert_not_before=issued, cert_not_after=issued + timedelta(hours=3))
    second = replace(first, mountpoint="/mnt/iam-b", files_created=[])  # joined first's tunnel
    mount_dir(second, state_dir).mkdir(mode=0o700)
    second = replace(second, files_created=[str(mount_dir(second, state_dir))])
    state.save(state_dir, second)
    table = Table()
    table.mount("/mnt/iam-a", first.port)
    table.mount("/mnt/iam-b", first.port)
    caplog.set_level("INFO", logger="efsplug.supervisor")
    supervisors(config_for(state_dir, tls_cert_renewal_interval_sec=3600), mount_reader=table, environ=environ)
    wait_until(lambda: all(current(state_dir, r).cert_not_before != issued for r in (first, second)), 15,
               "both records renewed")
    renewals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("renewed the certificate")]
    assert len(renewals) == 1, renewals
    assert "shared with /mnt/iam-" in renewals[0]
    assert current(state_dir, first).cert_not_after == current(state_dir, second).cert_not_after
    assert current(state_dir, first).tunnel == first.tunnel  # reloaded in place
