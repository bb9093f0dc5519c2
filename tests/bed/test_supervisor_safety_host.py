"""The supervisor on the host, on what it must never do: stop a tunnel it cannot prove it
started (amazon-efs-utils' tunnels share the state directory), stop one whose record
another process saved a moment ago, act on a record that was rewritten, or stop
supervising because one record file is bad. And if its thread dies, its owner learns.

Real stunnel processes, pidfds and files; the NFS part of the mount table is a stand-in
(see test_supervisor_host.py, whose helpers these are).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List

import pytest

from efsbed import procs
from efsbed.procs import wait_until
from efsplug import state
from efsplug.ports import reserve_port
from efsplug.stunnel import TunnelSpec, render
from efsplug.supervisor.runner import Supervisor
from efsplug.tunnel import Tunnel, TunnelIdentity, listening_on
from efsplug.unmount import mount_dir
from test_supervisor_host import (  # noqa: F401 - fixtures
    FS_ID, LOWER, STUNNEL, UPPER, Table, config_for, current, make_mount, state_dir, supervisors)

pytestmark = pytest.mark.skipif(shutil.which(STUNNEL) is None, reason="stunnel is not installed")

# What amazon-efs-utils writes for a TLS mount (its stunnel-config.<fs>.<mnt>.<port>): no efsplug marker.
EFS_UTILS_CONFIG = """fips = no
foreground = yes
socket = l:SO_REUSEADDR=yes
socket = a:SO_BINDTODEVICE=lo
[efs]
client = yes
accept = 127.0.0.1:{port}
connect = 127.0.0.1:9
sslVersion = TLSv1.2
renegotiation = no
TIMEOUTbusy = 20
TIMEOUTclose = 0
TIMEOUTidle = 70
delay = yes
verify = 0
"""
FAST = dict(orphan_min_age=0.5, orphan_interval=0.2)  # a sweep every 0.2 s


def free_port(state_dir: Path) -> int:
    with reserve_port(state_dir / "ports", LOWER, UPPER) as reservation:
        return reservation.port


def launch(config: Path, port: int) -> Tunnel:
    return Tunnel.launch(config, port, stunnel_binary=STUNNEL)


def marked(port: int) -> str:
    return render(TunnelSpec(accept_port=port, connect_host="127.0.0.1", connect_port=9, verify_level=0))


def test_only_tunnels_efsplug_provably_started_are_stopped(state_dir: Path, supervisors, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="efsplug.supervisor")
    foreign: List[Tunnel] = []
    # amazon-efs-utils: config, state file and certificate directory side by side in the state dir
    port = free_port(state_dir)
    base = f"{FS_ID}.mnt.efsutils.{port}"
    (state_dir / f"stunnel-config.{base}").write_text(EFS_UTILS_CONFIG.format(port=port))
    (state_dir / base).write_text(json.dumps({"pid": 1, "cmd": ["stunnel", f"stunnel-config.{base}"], "files": []}))
    (state_dir / f"{base}+").mkdir()
    (state_dir / f"{base}+" / "certificate.pem").write_text("theirs")
    foreign.append(launch(state_dir / f"stunnel-config.{base}", port))
    # Look-alikes, each short of proof: efsplug's layout without its marker; its marker
    # outside its layout; its layout reached through a symlink.
    port = free_port(state_dir)
    unmarked = state_dir / f"{FS_ID}.mnt-unmarked.{port}"
    unmarked.mkdir()
    (unmarked / "stunnel.conf").write_text(EFS_UTILS_CONFIG.format(port=port))
    foreign.append(launch(unmarked / "stunnel.conf", port))
    port = free_port(state_dir)
    (state_dir / "orphan").mkdir()
    (state_dir / "orphan" / "stunnel.conf").write_text(marked(port))
    foreign.append(launch(state_dir / "orphan" / "stunnel.conf", port))
    port = free_port(state_dir)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "stunnel.conf").write_text(marked(port))
    (state_dir / f"{FS_ID}.mnt-link.{port}").symlink_to(tmp_path / "elsewhere")
    foreign.append(launch(state_dir / f"{FS_ID}.mnt-link.{port}" / "stunnel.conf", port))
    # efsplug's own orphan: a tunnel it started whose record was deleted.
    orphan = make_mount(state_dir, "/mnt/orphan")
    state.record_path(state_dir, orphan).unlink()

    supervisors(config_for(state_dir, stunnel_health_check_enabled="true"), mount_reader=Table(), **FAST)
    wait_until(lambda: Tunnel.from_identity(orphan.tunnel) is None, 10, "efsplug's own orphan stopped")
    time.sleep(1.5)  # seven more sweeps: the point is what they do not do
    for tunnel in foreign:
        assert Tunnel.from_identity(tunnel.identity) is not None, f"{tunnel.identity.cmdline} was stopped"
        assert listening_on(tunnel.pid, int(open(tunnel.identity.cmdline[1]).read().split("127.0.0.1:")[1].split()[0]))
    assert (state_dir / base).exists() and (state_dir / f"{base}+" / "certificate.pem").read_text() == "theirs"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("stopped orphan tunnel" in m for m in messages) == 1
    for tunnel in foreign:  # said once each, not once per sweep
        assert sum(f"leaving tunnel pid {tunnel.pid} " in m for m in messages) == 1, messages
    for tunnel in foreign:
        tunnel.stop()


def test_a_record_another_process_saves_is_seen_before_the_orphan_sweep(state_dir: Path, supervisors) -> None:
    """mount.efs in another process has its tunnel and record while mount.nfs4 still runs:
    no mount-table event tells the supervisor, yet its sweeps must not take the tunnel."""
    table = Table()
    sup = supervisors(config_for(state_dir), mount_reader=table, **FAST)
    wait_until(sup.supervising.is_set, 10, "supervising")
    record = make_mount(state_dir, "/mnt/slow", age=timedelta(0))
    time.sleep(2.0)  # four minimum ages, ten sweeps
    assert Tunnel.from_identity(record.tunnel) is not None, "the tunnel of a mount in progress was stopped"
    assert state.record_path(state_dir, record).exists()
    table.mount("/mnt/slow", record.port)  # mount.nfs4 is done
    sup.rescan()
    os.kill(record.tunnel.pid, signal.SIGKILL)  # and it is supervised
    wait_until(lambda: current(state_dir, record).tunnel != record.tunnel, 10, "tunnel restarted")


def test_a_rewritten_record_is_not_reaped_on_the_old_ones_view(state_dir: Path, supervisors) -> None:
    """Unmounted, then mounted again at once by another process with the same record name
    (same port: the old tunnel is gone), and mount.nfs4 still running when the grace of the
    old mount ends: the reap must not take the new mount's record, directory and tunnel."""
    table = Table()
    first = make_mount(state_dir, "/mnt/again")
    table.mount("/mnt/again", first.port)
    sup = supervisors(config_for(state_dir, unmount_grace_period_sec=1), mount_reader=table)
    wait_until(sup.supervising.is_set, 10, "supervising")
    table.umount("/mnt/again")
    sup.rescan()
    Tunnel.from_identity(first.tunnel).stop()
    tunnel = launch(Path(first.config_file), first.port)
    second = replace(first, tunnel=TunnelIdentity.of(tunnel.pid), mount_time=datetime.now(timezone.utc))
    state.save(state_dir, second)
    time.sleep(2.5)  # past the old mount's grace
    assert current(state_dir, second) == second
    assert mount_dir(second, state_dir).is_dir() and Tunnel.from_identity(second.tunnel) is not None
    table.mount("/mnt/again", second.port)
    sup.rescan()
    os.kill(second.tunnel.pid, signal.SIGKILL)
    wait_until(lambda: current(state_dir, second).tunnel not in (first.tunnel, second.tunnel), 10, "supervised")


BAD_RECORDS = {
    "fs-01234567.mnt-deep.json": b"[" * 30_000 + b"]" * 30_000,
    "fs-01234567.mnt-int.json": b'{"version": 1, "port": ' + b"9" * 50_000 + b"}",
    "fs-01234567.mnt-pid.json": json.dumps({"version": 1, "fs_id": "fs-01234567", "mountpoint": "/mnt/pid",
                                            "tunnel": {"pid": 10**30, "create_time": 1, "cmdline": []}}).encode(),
    "fs-01234567.mnt-port.json": json.dumps({"version": 1, "fs_id": "fs-01234567", "mountpoint": "/mnt/p",
                                             "port": -5}).encode(),
    "fs-01234567.mnt-types.json": json.dumps({"version": 1, "fs_id": ["x"], "mountpoint": {"a": 1}}).encode(),
    "fs-01234567.mnt-bytes.json": b"\xff\xfe{",
}


def test_bad_records_are_quarantined_once_and_the_others_stay_supervised(
        state_dir: Path, supervisors, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="efsplug.supervisor")
    table = Table()
    good = make_mount(state_dir, "/mnt/good")
    table.mount("/mnt/good", good.port)
    spoilt = make_mount(state_dir, "/mnt/spoilt")  # its record goes bad; its tunnel may still serve a mount
    state.record_path(state_dir, spoilt).write_bytes(b"{" * 20)
    for name, raw in BAD_RECORDS.items():
        (state_dir / name).write_bytes(raw)
    newer = state_dir / "fs-01234567.mnt-newer.json"
    newer.write_text(json.dumps({"version": state.RECORD_VERSION + 1, "fs_id": "fs-01234567", "mountpoint": "/mnt/newer"}))
    os.mkfifo(state_dir / "fs-01234567.mnt-fifo.json")
    sup = supervisors(config_for(state_dir), mount_reader=table, orphan_min_age=0, orphan_interval=0.2)
    wait_until(sup.supervising.is_set, 10, "supervising")
    for _ in range(3):  # mount-table events: nothing is reported twice
        table.mount("/mnt/other", 1)
        sup.rescan()
        table.umount("/mnt/other")
        sup.rescan()
    os.kill(good.tunnel.pid, signal.SIGKILL)
    wait_until(lambda: current(state_dir, good).tunnel != good.tunnel, 10, "the good mount's tunnel restarted")
    time.sleep(1.0)  # five orphan sweeps
    assert sup.running() and not sup.failed.is_set()
    assert Tunnel.from_identity(spoilt.tunnel) is not None, "a tunnel whose record went bad was stopped"
    quarantined = sorted(p.name.split(".corrupt-")[0] for p in state.quarantined_files(state_dir))
    assert quarantined == sorted([*BAD_RECORDS, state.file_name(spoilt)])
    assert newer.exists() and (state_dir / "fs-01234567.mnt-fifo.json").exists()  # not corrupt: left in place
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for name in [*BAD_RECORDS, state.file_name(spoilt), newer.name, "fs-01234567.mnt-fifo.json"]:
        assert sum(f"/{name}:" in m for m in warnings) == 1, (name, warnings)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_dead_supervisor_thread_is_reported(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "efs"
    not_a_directory.write_text("")
    died = threading.Event()
    sup = Supervisor(config_for(not_a_directory), environ={}, on_failure=died.set)
    sup.start()
    assert died.wait(10) and sup.failed.is_set() and isinstance(sup.error, OSError)
    sup.stop()
    stopped = Supervisor(config_for(tmp_path / "fine"), environ={}, on_failure=died.clear)
    stopped.start()
    wait_until(stopped.supervising.is_set, 10, "supervising")
    stopped.stop()  # a stop is not a death
    assert not stopped.failed.is_set() and died.is_set()


def test_the_agent_exits_when_its_supervisor_dies(tmp_path: Path) -> None:
    (tmp_path / "efs").write_text("")  # the state dir is a file: the supervisor thread dies at once
    (tmp_path / "efs-utils.conf").write_text(f"[efsplug]\nstate_dir = {tmp_path / 'efs'}\n")
    argv = [sys.executable, "-m", "efsplug.cli", "agent", "--socket", str(tmp_path / "plugins" / "t.sock"),
            "--state", str(tmp_path / "data" / "volumes.json"), "--volumes-root", str(tmp_path / "volumes"),
            "--config", str(tmp_path / "efs-utils.conf")]
    agent = procs.start("agent", argv, tag=procs.new_tag(), log=tmp_path / "agent.log")
    try:
        assert agent.popen.wait(30) == 1
    finally:
        agent.stop()
    log = (tmp_path / "agent.log").read_text()
    assert "efsplug agent: the supervisor died" in log, log
    assert not (tmp_path / "plugins" / "t.sock").exists()
