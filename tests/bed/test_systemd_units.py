"""The packaged agent unit started for real by systemd as PID 1 in the kernel guest.

The unit file is the one in systemd/, installed as the RPM installs it; the only change
is a drop-in pointing ExecStart at this checkout's venv (the guest's /usr/bin is the
host's, read-only), which is how an operator overrides a vendor unit too.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from efsbed.bed import REPO, Bed
from efsbed.guestmount import kernel_mounts, mounted, task_netns
from efsbed.procs import wait_until

pytestmark = pytest.mark.guest

UNIT = "amazon-ecs-volume-plugin"
SOCKET = f"/run/docker/plugins/{UNIT}.sock"
EFSPLUG = REPO / ".venv" / "bin" / "efsplug"
CALL = (  # a dockerd-shaped request from inside the guest, answered as JSON on stdout
    "import json,sys\n"
    "from efsbed.agent_harness import PluginClient\n"
    "with PluginClient(sys.argv[1]) as c:\n"
    "    r = c.call(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)\n"
    "print(json.dumps({'status': r.status, 'body': r.body, 'type': r.content_type}))\n"
)


@pytest.fixture(scope="module")
def systemd_bed(tmp_path_factory):
    bed = Bed(tmp_path_factory.mktemp("systemd-bed"), guest_systemd=True)
    bed.start()
    try:
        assert bed.run(["systemctl", "is-system-running", "--wait"], timeout=120).stdout.strip() == "running"
        unit_dir = "/etc/systemd/system"
        unit_text = (REPO / "systemd" / f"{UNIT}.service").read_text()
        bed.run(["tee", f"{unit_dir}/{UNIT}.service"], input=unit_text.encode(), check=True)
        bed.run(["mkdir", "-p", f"{unit_dir}/{UNIT}.service.d"], check=True)
        dropin = f"[Service]\nExecStart=\nExecStart={EFSPLUG} agent\nEnvironment=PYTHONPATH={REPO / 'tests'}\n"
        bed.run(["tee", f"{unit_dir}/{UNIT}.service.d/checkout.conf"], input=dropin.encode(), check=True)
        bed.run(["systemctl", "daemon-reload"], check=True)
        yield bed
    finally:
        bed.stop()


def call(bed: Bed, endpoint: str, payload=None) -> dict:
    argv = [str(REPO / ".venv" / "bin" / "python"), "-c", CALL, SOCKET, endpoint]
    if payload is not None:
        argv.append(json.dumps(payload))
    result = bed.run(argv, env={"PYTHONPATH": str(REPO / "tests")}, timeout=120)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def tunnel_pids(bed: Bed) -> list:
    return sorted(bed.run(["pgrep", "-f", "stunnel.*/run/efs/"]).stdout.split())


def test_unit_starts_serves_and_restarts_without_touching_a_live_mount(systemd_bed):
    bed = systemd_bed
    assert bed.run(["systemctl", "start", UNIT], timeout=60).rc == 0
    assert bed.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active"
    mode = bed.run(["stat", "-c", "%a %U:%G", SOCKET]).stdout.split()
    assert mode == ["660", "root:root"]

    activate = call(bed, "Plugin.Activate")
    assert activate["status"] == 200 and activate["body"] == {"Implements": ["VolumeDriver"]}
    assert activate["type"].startswith("application/vnd.docker.plugins.v1")

    ap = bed.access_points[0]
    name = f"ecs-demo-1-data-{uuid.uuid4().hex[:8]}"
    opts = {"type": "efs", "device": bed.fs_id, "o": f"tls,iam,accesspoint={ap.id}"}
    assert call(bed, "VolumeDriver.Create", {"Name": name, "Opts": opts})["body"]["Err"] == ""
    mounted = call(bed, "VolumeDriver.Mount", {"Name": name, "ID": "a" * 64})["body"]
    assert mounted["Err"] == "", mounted
    mountpoint = mounted["Mountpoint"]
    before = tunnel_pids(bed)
    assert before, "no tunnel after Mount"

    assert bed.run(["systemctl", "restart", UNIT], timeout=60).rc == 0
    assert bed.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active"
    assert mountpoint in bed.run(["cat", "/proc/mounts"]).stdout
    assert tunnel_pids(bed) == before, "restarting the unit touched the tunnel"
    marker = f"after-restart-{uuid.uuid4().hex[:6]}"
    assert bed.run(["sh", "-c", f"echo {marker} > {mountpoint}/{marker}"], timeout=30).rc == 0
    assert (ap.export_dir / marker).read_text() == f"{marker}\n"

    # The restarted agent knows the volume and its reference: Unmount and Remove work.
    assert call(bed, "VolumeDriver.Unmount", {"Name": name, "ID": "a" * 64})["body"]["Err"] == ""
    assert mountpoint not in bed.run(["cat", "/proc/mounts"]).stdout
    assert call(bed, "VolumeDriver.Remove", {"Name": name})["body"]["Err"] == ""

    assert bed.run(["systemctl", "stop", UNIT], timeout=60).rc == 0
    assert bed.run(["test", "-e", SOCKET]).rc != 0, "clean shutdown must remove the socket"


ECS_CONFIG = "/etc/ecs/ecs.config"


def test_cleanup_wait_set_only_in_ecs_config_reaps_a_gone_task_mount(systemd_bed):
    """ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION=5s where operators set it, for the ECS agent:
    the unit's agent (nothing in its environment) unmounts a mount whose task network
    namespace is gone after 5 s, not after the 3 h default."""
    bed = systemd_bed
    bed.write_guest_config(f"[mount]\nstunnel_cafile = {bed.ca.cert_path}\n"
                           "[mount-watchdog]\npoll_interval_sec = 1\nunmount_grace_period_sec = 2\n")
    bed.run(["mkdir", "-p", "/etc/ecs"], check=True)
    bed.run(["tee", ECS_CONFIG], input=b"ECS_CLUSTER=efsbed\nECS_ENGINE_TASK_CLEANUP_WAIT_DURATION=5s\n", check=True)
    environment = bed.run(["systemctl", "show", UNIT, "-p", "Environment"]).stdout
    assert "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION" not in environment, environment
    try:
        assert bed.run(["systemctl", "start", UNIT], timeout=60).rc == 0
        status = bed.run([str(EFSPLUG), "status"], timeout=60).stdout
        assert "cleanup wait: 5s (ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION in /etc/ecs/ecs.config line 2)" in status, status
        with task_netns(bed, "efsecs1") as netns:
            mounted(bed, "/mnt/task", f"tls,netns={netns}")
            gone_at = time.monotonic()
            bed.run(["ip", "netns", "del", "efsecs1"], check=True)  # the task stopped
            wait_until(lambda: "/mnt/task" not in kernel_mounts(bed), 90, "the gone task's mount unmounted")
            waited = time.monotonic() - gone_at
        journal = bed.run(["journalctl", "-u", UNIT, "--no-pager", "-o", "cat"]).stdout
        assert "network namespace /var/run/netns/efsecs1 is gone for 5s (cleanup wait)" in journal, journal
        assert waited >= 5, f"unmounted {waited:.1f}s after the task went: before the cleanup wait"
    finally:
        bed.run(["systemctl", "stop", UNIT], timeout=60)
        bed.run(["rm", "-f", ECS_CONFIG])
        bed.run(["sh", "-c", "pkill -f '[s]tunnel.*/run/efs/'; umount -l /mnt/task; rm -rf /run/efs"])
        bed.write_guest_config(f"[mount]\nstunnel_cafile = {bed.ca.cert_path}\n")
