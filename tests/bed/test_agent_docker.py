"""The agent serving a real dockerd inside the kernel guest, mounting the bed's EFS through
TLS + IAM + an access point, driven exactly as plain `docker` and the ECS agent drive it;
and a type=nfs4 volume, mounted with `mount -t nfs4` straight from the bed's NFS server."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from efsbed.bed import NFS_IP, Bed
from efsbed.docker import IMAGE, SEED, GuestDocker
from efsbed.guestdaemons import GuestAgent, serving_agent

pytestmark = pytest.mark.guest

DRIVER = "amazon-ecs-volume-plugin"
ROOT = "/var/lib/ecs/volumes"


@pytest.fixture(scope="module")
def agent(bed: Bed, docker: GuestDocker) -> Iterator[GuestAgent]:
    with serving_agent(bed) as a:
        yield a


def nfs_mounts(bed: Bed) -> List[str]:
    """Lines of /proc/mounts for NFS mounts under the volumes root."""
    text = bed.run(["cat", "/proc/mounts"]).stdout
    return [line for line in text.splitlines() if f" {ROOT}/" in line and " nfs4 " in line]


def tunnels(bed: Bed) -> List[str]:
    return bed.run(["pgrep", "-f", "stunnel.*/run/efs/"]).stdout.split()


def wait_for_file(path: Path, timeout: float = 60) -> str:
    """A container's one-line write, once it is whole: NFS shows the file (created empty by
    the shell's redirection) before the line written into it arrives."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} never appeared whole"
        time.sleep(0.1)  # polling the host export for a container's write, bounded
    return path.read_text()


@pytest.fixture
def export_of_ap(bed: Bed) -> Iterator[Path]:
    """The first access point's export directory, empty for the test and emptied after it.

    Empty before, too: Docker copies the image's files only into an empty volume, and
    other guest tests write into this export.
    """
    export = bed.access_points[0].export_dir
    _empty(export)
    yield export
    _empty(export)


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def test_docker_volume_lifecycle_through_tls_iam_access_point(
    clean_guest: Bed, docker: GuestDocker, agent: GuestAgent, export_of_ap: Path
) -> None:
    bed = clean_guest
    ap = bed.access_points[0]
    res = docker.docker("volume", "create", "-d", DRIVER, "-o", "type=efs", "-o", f"device={bed.fs_id}",
                        "-o", f"o=tls,iam,accesspoint={ap.id}", "vol1")
    assert res.rc == 0, res.stderr
    assert nfs_mounts(bed) == []  # Create does not mount
    listed = docker.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}", check=True).stdout.split("\n")
    assert f"{DRIVER} vol1" in listed
    inspected = json.loads(docker.docker("volume", "inspect", "vol1", check=True).stdout)[0]
    assert (inspected["Driver"], inspected["Mountpoint"]) == (DRIVER, f"{ROOT}/vol1")
    assert inspected["Status"]["AccessPoint"] == ap.id and inspected["Status"]["FileSystemId"] == bed.fs_id

    # Copying mount: the image's /data content lands in the empty volume, then the write.
    run = docker.docker("run", "--rm", "--network", "none", "-v", "vol1:/data", IMAGE,
                        "sh", "-c", "echo written-by-a-container > /data/f; ls /data")
    assert run.rc == 0, run.stderr
    assert (export_of_ap / "f").read_text() == "written-by-a-container\n"
    assert (export_of_ap / SEED).read_text() == "from the image\n"
    run = docker.docker("run", "--rm", "--network", "none", "-v", "vol1:/data:nocopy", IMAGE,
                        "sh", "-c", "cat /data/f; echo nocopy > /data/g")
    assert (run.rc, run.stdout) == (0, "written-by-a-container\n"), run.stderr
    assert (export_of_ap / "g").read_text() == "nocopy\n"

    # docker cp mounts the volume of a stopped container (a Mount with an ID seen before).
    docker.docker("create", "--name", "cpbox", "--network", "none", "-v", "vol1:/data:nocopy", IMAGE, "true", check=True)
    try:
        docker.docker("cp", "cpbox:/data/f", "/tmp/f-copied", check=True)
        assert bed.run(["cat", "/tmp/f-copied"]).stdout == "written-by-a-container\n"
    finally:
        docker.docker("rm", "-f", "cpbox")
    assert nfs_mounts(bed) == [] and tunnels(bed) == []  # every Unmount arrived and the last one unmounted
    assert agent.state()["vol1"]["refs"] == {}

    assert docker.docker("volume", "rm", "vol1").rc == 0
    assert "vol1" not in docker.docker("volume", "ls", "-q", check=True).stdout.split()
    log = agent.log()
    # run (copying: two pairs), run :nocopy (one pair), docker cp (one pair)
    mounts = [line for line in log.splitlines() if "ount volume=vol1" in line]
    assert [line.split()[0] for line in mounts] == ["endpoint=VolumeDriver.Mount", "endpoint=VolumeDriver.Unmount"] * 4
    assert all(line.endswith("outcome=ok") for line in mounts), log
    assert "supervisor INFO supervising efs mounts" in log  # the supervisor runs in the agent


def test_a_bad_option_fails_docker_volume_create_with_our_err(
    clean_guest: Bed, docker: GuestDocker, agent: GuestAgent
) -> None:
    res = docker.docker("volume", "create", "-d", DRIVER, "-o", "type=efs", "-o", f"device={clean_guest.fs_id}",
                        "-o", "o=iam,accesspoint=fsap-0123456789abcdef0", "badvol")
    assert res.rc != 0
    assert "option 'iam' requires 'tls'; add tls to -o" in res.stderr
    assert "badvol" not in docker.docker("volume", "ls", "-q").stdout.split()


def test_the_ecs_sequence_two_containers_share_the_volume(
    clean_guest: Bed, docker: GuestDocker, agent: GuestAgent, export_of_ap: Path
) -> None:
    bed = clean_guest
    ap = bed.access_points[0]
    rel_id = secrets.token_hex(8)
    bed.task_credentials.grant(rel_id)
    name = f"ecs-web-3-data-{secrets.token_hex(10)}"  # as the ECS agent names task volumes
    # The task's "pause" container provides the netns the ECS agent names. --network host
    # because a netns of its own could not reach the bed's endpoint: the path is still a
    # real container's /proc/<pid>/ns/net, entered by the tunnel and mount.nfs4.
    docker.run_detached("pause", ["--network", "host"], ["sleep", "3600"])
    try:
        pid = docker.docker("inspect", "-f", "{{.State.Pid}}", "pause", check=True).stdout.strip()
        o = f"tls,iam,awscredsuri=/v2/credentials/{rel_id},accesspoint={ap.id},netns=/proc/{pid}/ns/net"
        docker.docker("volume", "create", "-d", DRIVER, "-o", "type=efs", "-o", f"device={bed.fs_id}",
                      "-o", f"o={o}", name, check=True)
        for c in ("c1", "c2"):
            docker.run_detached(c, ["--network", "none", "-v", f"{name}:/data"],
                                ["sh", "-c", f"echo {c} > /data/{c}; exec sleep 3600"])
        for c in ("c1", "c2"):
            assert wait_for_file(export_of_ap / c) == f"{c}\n"
        assert len(nfs_mounts(bed)) == 1 and len(tunnels(bed)) == 1
        assert bed.task_credentials.requests(rel_id) >= 1  # the IAM identity came from the task's URI
        assert sum(agent.state()[name]["refs"].values()) == 2

        docker.docker("stop", "-t", "1", "c1", check=True)
        assert len(nfs_mounts(bed)) == 1 and len(tunnels(bed)) == 1  # c2 still uses it
        docker.docker("stop", "-t", "1", "c2", check=True)
        assert nfs_mounts(bed) == [] and tunnels(bed) == []  # last Unmount: mount and tunnel gone
        assert bed.run(["sh", "-c", "ls /run/efs/*.json 2>/dev/null"]).stdout == ""

        docker.docker("rm", "c1", "c2", check=True)
        assert docker.docker("volume", "rm", name).rc == 0
        assert name not in agent.state()
    finally:
        docker.docker("rm", "-f", "c1", "c2", "pause")
        bed.task_credentials.revoke(rel_id)


def test_kill_9_of_the_agent_leaves_live_mounts_untouched(
    clean_guest: Bed, docker: GuestDocker, agent: GuestAgent, export_of_ap: Path
) -> None:
    bed = clean_guest
    ap = bed.access_points[0]
    docker.docker("volume", "create", "-d", DRIVER, "-o", "type=efs", "-o", f"device={bed.fs_id}",
                  "-o", f"o=tls,iam,accesspoint={ap.id}", "survivor", check=True)
    try:
        docker.run_detached("holder", ["--network", "none", "-v", "survivor:/data:nocopy"], ["sleep", "3600"])
        before, tunnels_before = nfs_mounts(bed), tunnels(bed)
        assert len(before) == 1 and len(tunnels_before) == 1
        agent.stop(signal.SIGKILL)
        agent.start()
        assert nfs_mounts(bed) == before and tunnels(bed) == tunnels_before  # same mount, same stunnel pid
        assert "its mount is gone" not in agent.log() and "adopted" not in agent.log()
        saved = agent.state()["survivor"]
        assert saved["mounted"] is True and sum(saved["refs"].values()) == 1
        res = docker.docker("exec", "holder", "sh", "-c", "echo after-restart > /data/after")
        assert res.rc == 0, res.stderr
        assert (export_of_ap / "after").read_text() == "after-restart\n"
        docker.docker("stop", "-t", "1", "holder", check=True)  # Unmount reaches the new agent
        assert nfs_mounts(bed) == [] and tunnels(bed) == []
    finally:
        docker.docker("rm", "-f", "holder")
        docker.docker("volume", "rm", "survivor")



def test_a_type_nfs4_volume_mounts_the_nfs_server_directly(
    clean_guest: Bed, docker: GuestDocker, agent: GuestAgent
) -> None:
    bed = clean_guest
    name, marker = f"plain-{secrets.token_hex(4)}", f"via-nfs4-{secrets.token_hex(4)}"
    written = bed.export_dir / marker  # the root export, as the host sees it
    try:
        res = docker.docker("volume", "create", "--driver", DRIVER, "--opt", "type=nfs4",
                            "--opt", f"device={NFS_IP}:/", "--opt", "o=vers=4.1,port=2049", name)
        assert res.rc == 0, res.stderr
        inspected = json.loads(docker.docker("volume", "inspect", name, check=True).stdout)[0]
        assert inspected["Status"] == {"Type": "nfs4", "Device": f"{NFS_IP}:/", "Mounted": False, "References": 0}

        docker.run_detached("plainbox", ["--network", "none", "-v", f"{name}:/data"],
                            ["sh", "-c", f"echo through-plain-nfs > /data/{marker}; exec sleep 3600"])
        assert wait_for_file(written) == "through-plain-nfs\n"
        mounts = nfs_mounts(bed)
        assert len(mounts) == 1 and mounts[0].startswith(f"{NFS_IP}:/ {ROOT}/{name} nfs4 "), mounts
        assert f"addr={NFS_IP}" in mounts[0]
        # efsplug made the kernel mount and nothing else: no tunnel, no state record.
        assert tunnels(bed) == [] and bed.run(["pgrep", "-x", "stunnel"]).stdout == ""
        assert bed.run(["sh", "-c", "ls /run/efs/*.json 2>/dev/null"]).stdout == ""
        saved = agent.state()[name]
        assert (saved["fs_type"], saved["mounted"], sum(saved["refs"].values())) == ("nfs4", True, 1)

        docker.docker("stop", "-t", "1", "plainbox", check=True)  # the last Unmount unmounts
        assert nfs_mounts(bed) == [] and agent.state()[name]["mounted"] is False
        docker.docker("rm", "plainbox", check=True)
        assert docker.docker("volume", "rm", name).rc == 0
        assert name not in agent.state() and nfs_mounts(bed) == []
        assert written.read_text() == "through-plain-nfs\n"  # unmounting keeps the data, of course
    finally:
        docker.docker("rm", "-f", "plainbox")
        docker.docker("volume", "rm", name)
        written.unlink(missing_ok=True)


def test_type_s3files_without_its_helper_fails_docker_volume_create_with_our_err(
    clean_guest: Bed, docker: GuestDocker, agent: GuestAgent
) -> None:
    res = docker.docker("volume", "create", "-d", DRIVER, "-o", "type=s3files",
                        "-o", "device=fs-0123456789abcdef0", "s3vol")
    assert res.rc != 0
    assert ("type=s3files needs the mount.s3files helper, which is not installed (looked in /sbin, /usr/sbin, "
            "/bin, /usr/bin); install the S3 Files mount helper (amazon-efs-utils 3.x ships it) or use type=efs"
            ) in res.stderr, res.stderr
    assert "s3vol" not in docker.docker("volume", "ls", "-q").stdout.split()
    assert "s3vol" not in agent.state()
