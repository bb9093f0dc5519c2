"""Access points on demand, for real: the agent in the kernel guest makes them in the bed's
EFS API (moto) with the instance role, a real dockerd and the ECS agent's request
sequences use them, and the bed's endpoint serves each from its own root directory with
every request squashed to its POSIX user, as EFS does."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from efsbed.aws import client
from efsbed.bed import Bed
from efsbed.docker import IMAGE, GuestDocker
from efsbed.guestdaemons import PLUGIN_SOCKET, REPO, GuestAgent, serving_agent
from efsplug.agent import provisioning

pytestmark = pytest.mark.guest

DRIVER = "amazon-ecs-volume-plugin"
ROOT = "/var/lib/ecs/volumes"
GIDS = "61000-61099"  # none of the bed's seeded access points (1000) is in it


@pytest.fixture(scope="module")
def agent(bed: Bed, docker: GuestDocker) -> Iterator[GuestAgent]:
    with serving_agent(bed, bed.efs_api_env()) as a:  # the EFS API: the bed's moto, from the guest
        yield a


def volume_aps(bed: Bed, volume: str) -> List[dict]:
    aps = client("efs", bed.moto.endpoint_url, bed.region).describe_access_points(FileSystemId=bed.fs_id)
    return [ap for ap in aps["AccessPoints"] if provisioning.volume_of(ap) == volume]


def create_opts(base: str, **more: str) -> List[str]:
    opts = {"type": "efs", "device": "", "o": "tls,iam", "provision": "accesspoint", "gidRange": GIDS,
            "basePath": base, **more}
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def owner_and_mode(path: Path) -> tuple:
    st = path.stat()
    return st.st_uid, st.st_gid, oct(st.st_mode & 0o777)


def test_two_provisioned_volumes_are_isolated_and_rm_deletes_what_it_says(
    clean_guest: Bed, docker: GuestDocker, agent: GuestAgent
) -> None:
    bed = clean_guest
    base = f"/prov-{secrets.token_hex(4)}"
    names = {"keepdata": "deleteAccessPoint", "dropdata": "deleteData"}
    try:
        for name, on_remove in names.items():
            res = docker.docker("volume", "create", "-d", DRIVER, *create_opts(base, onRemove=on_remove, device=bed.fs_id),
                                name)
            assert res.rc == 0, res.stderr + agent.log()
        aps = {name: volume_aps(bed, name) for name in names}
        assert [len(found) for found in aps.values()] == [1, 1], aps
        made = {name: found[0] for name, found in aps.items()}
        assert sorted(ap["PosixUser"]["Gid"] for ap in made.values()) == [61000, 61001]  # the lowest free, each
        assert {ap["RootDirectory"]["Path"] for ap in made.values()} == {f"{base}/keepdata", f"{base}/dropdata"}

        for name in names:
            # :nocopy: a copying mount would also give the root directory the image's /data mode
            run = docker.docker("run", "--rm", "--network", "none", "-v", f"{name}:/data:nocopy", IMAGE,
                                "sh", "-c", f"echo written-to-{name} > /data/{name}; ls -A /data")
            assert run.rc == 0, run.stderr
            assert run.stdout.split() == [name]  # its own files only, never the other's
        for name, ap in made.items():
            uid, gid = ap["PosixUser"]["Uid"], ap["PosixUser"]["Gid"]
            root = bed.export_dir / ap["RootDirectory"]["Path"].lstrip("/")
            assert (root / name).read_text() == f"written-to-{name}\n"
            assert owner_and_mode(root) == (uid, gid, "0o750")  # made by EFS with the requested owner and mode
            assert owner_and_mode(root / name)[:2] == (uid, gid)  # the container's root was squashed to the user
        inspected = json.loads(docker.docker("volume", "inspect", "keepdata", check=True).stdout)[0]
        assert inspected["Status"]["AccessPoint"] == made["keepdata"]["AccessPointId"]

        for name in names:
            res = docker.docker("volume", "rm", name)
            assert res.rc == 0, res.stderr + agent.log()[-3000:]
            assert volume_aps(bed, name) == []  # the access point went with the volume
        assert (bed.export_dir / base.lstrip("/") / "keepdata" / "keepdata").read_text() == "written-to-keepdata\n"
        assert not (bed.export_dir / base.lstrip("/") / "dropdata").exists()  # onRemove=deleteData
        assert bed.run(["sh", "-c", "ls -A /run/efs/deleting 2>/dev/null"]).stdout == ""  # its mount went too
    finally:
        for name in names:
            docker.docker("volume", "rm", name)


def replay(bed: Bed, steps: List[list]) -> List[Dict]:
    """The requests, over the agent's socket from inside the guest, as dockerd sends them."""
    res = bed.run([str(REPO / ".venv" / "bin" / "python"), "-m", "efsbed.plugin_replay", PLUGIN_SOCKET, json.dumps(steps)],
                  env={"PYTHONPATH": str(REPO / "tests")}, timeout=300)
    assert res.rc == 0, res.stderr
    return json.loads(res.stdout)


def mount_id() -> str:
    return secrets.token_hex(32)  # dockerd's: random per container mount point


def test_ecs_task_and_shared_volumes_over_the_socket(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    base = f"/ecs-{secrets.token_hex(4)}"
    opts = {"type": "efs", "device": bed.fs_id, "o": "tls,iam", "provision": "accesspoint", "gidRange": GIDS,
            "basePath": base}
    task_volume = f"ecs-web-5-data-{secrets.token_hex(10)}"  # scope task: the ECS agent's name
    shared = f"shared-{secrets.token_hex(4)}"  # scope shared: the name as given, outliving tasks
    try:
        replay_task_and_shared(bed, agent, opts, task_volume, shared)
    finally:  # whatever failed: no volume, mount or access point outlives the test
        replay(bed, [["VolumeDriver.Remove", {"Name": task_volume}], ["VolumeDriver.Remove", {"Name": shared}]])


def replay_task_and_shared(bed: Bed, agent: GuestAgent, opts: Dict[str, str], task_volume: str, shared: str) -> None:
    c1, c2 = mount_id(), mount_id()
    # Task start: dockerd's Get (not found) and Create, then each container's Mount.
    answers = replay(bed, [["VolumeDriver.Get", {"Name": task_volume}],
                           ["VolumeDriver.Create", {"Name": task_volume, "Opts": opts}],
                           ["VolumeDriver.Mount", {"Name": task_volume, "ID": c1}],
                           ["VolumeDriver.Mount", {"Name": task_volume, "ID": c2}]])
    assert answers[0]["body"]["Err"] != "" and answers[1]["body"] == {"Err": ""}, answers
    mountpoint = answers[2]["body"]["Mountpoint"]
    assert mountpoint == f"{ROOT}/{task_volume}" and answers[3]["body"]["Mountpoint"] == mountpoint, answers
    (ap,) = volume_aps(bed, task_volume)
    bed.run(["sh", "-c", f"echo task-data > {mountpoint}/f"], check=True)
    assert (bed.export_dir / ap["RootDirectory"]["Path"].lstrip("/") / "f").read_text() == "task-data\n"
    # Task end: each container's Unmount; after the cleanup wait, `docker volume rm`: Get, Get, Remove.
    answers = replay(bed, [["VolumeDriver.Unmount", {"Name": task_volume, "ID": c1}],
                           ["VolumeDriver.Unmount", {"Name": task_volume, "ID": c2}],
                           ["VolumeDriver.Get", {"Name": task_volume}],
                           ["VolumeDriver.Get", {"Name": task_volume}],
                           ["VolumeDriver.Remove", {"Name": task_volume}]])
    assert [a["body"].get("Err") for a in answers] == [""] * 5, answers
    assert volume_aps(bed, task_volume) == [] and task_volume not in agent.state()  # nothing left behind
    assert f" {mountpoint} " not in bed.run(["cat", "/proc/mounts"]).stdout

    t1, t2 = mount_id(), mount_id()
    answers = replay(bed, [["VolumeDriver.Get", {"Name": shared}],
                           ["VolumeDriver.Create", {"Name": shared, "Opts": opts}],
                           ["VolumeDriver.Mount", {"Name": shared, "ID": t1}]])
    assert answers[1]["body"] == {"Err": ""}, answers
    shared_mountpoint = answers[2]["body"]["Mountpoint"]
    bed.run(["sh", "-c", f"echo first-task > {shared_mountpoint}/f"], check=True)
    replay(bed, [["VolumeDriver.Unmount", {"Name": shared, "ID": t1}]])
    # The second task finds the volume (Get answers it: no Create) and mounts it again.
    answers = replay(bed, [["VolumeDriver.Get", {"Name": shared}],
                           ["VolumeDriver.Mount", {"Name": shared, "ID": t2}]])
    assert answers[0]["body"]["Volume"]["Status"]["AccessPoint"] == volume_aps(bed, shared)[0]["AccessPointId"]
    assert bed.run(["cat", f"{shared_mountpoint}/f"]).stdout == "first-task\n"  # the first task's data
    answers = replay(bed, [["VolumeDriver.Unmount", {"Name": shared, "ID": t2}]])
    assert answers[0]["body"] == {"Err": ""} and len(volume_aps(bed, shared)) == 1  # never removed by ECS
    assert replay(bed, [["VolumeDriver.Remove", {"Name": shared}]])[0]["body"] == {"Err": ""}  # the operator's rm
    assert volume_aps(bed, shared) == []
