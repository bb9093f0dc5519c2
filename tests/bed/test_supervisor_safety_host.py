"""The supervisor on the host, on what it must never do: stop a tunnel it cannot prove it
started (amazon-efs-utils' tunnels share the state directory).

Real stunnel processes, pidfds and files; the NFS part of the mount table is a stand-in
(see test_supervisor_host.py, whose helpers these are).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import List

import pytest

from efsbed.procs import wait_until
from efsplug import state
from efsplug.ports import reserve_port
from efsplug.stunnel import TunnelSpec, render
from efsplug.tunnel import Tunnel, listening_on
from test_supervisor_host import (  # noqa: F401 - fixtures
    FS_ID, LOWER, STUNNEL, UPPER, Table, config_for, make_mount, state_dir, supervisors)

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
