"""`efsplug agent` making access points on demand, over its socket, against moto (the bed's
EFS API): Create makes or adopts the volume's access point, Remove deletes it, a retried
Create and an agent restarted after a kill make no second one. The mounts through such
an access point need the kernel guest."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from efsbed import procs
from efsbed.agent_harness import EFSPLUG, AgentProcess, PluginClient, start_agent
from efsbed.aws import DUMMY_ENV, MotoServer, client
from efsbed.faulty import HoldingProxy
from efsplug.agent import provisioning

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto"), tag=procs.new_tag()) as server:
        yield server


@pytest.fixture
def fs_id(moto: MotoServer) -> str:
    return client("efs", moto.endpoint_url, REGION).create_file_system(CreationToken=secrets.token_hex(8))[
        "FileSystemId"]


@pytest.fixture
def env(moto: MotoServer) -> Dict[str, str]:
    return {**os.environ, **DUMMY_ENV, "AWS_REGION": REGION, "AWS_ENDPOINT_URL_EFS": moto.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@pytest.fixture
def tag() -> Iterator[str]:
    t = procs.new_tag()
    yield t
    for p in procs.tagged_processes(t):
        p.kill()


def volume_aps(moto: MotoServer, fs_id: str, volume: str) -> List[dict]:
    aps = client("efs", moto.endpoint_url, REGION).describe_access_points(FileSystemId=fs_id)["AccessPoints"]
    return [ap for ap in aps if provisioning.volume_of(ap) == volume]


def opts(fs_id: str, **more: str) -> Dict[str, str]:
    # o without tls: a provisioned volume's mounts add it (EFS serves access points over TLS only)
    return {"type": "efs", "device": fs_id, "o": "iam", "provision": "accesspoint", **more}


def test_create_get_remove_over_the_socket(moto: MotoServer, fs_id: str, env: Dict[str, str], tmp_path: Path,
                                           tag: str) -> None:
    agent = start_agent(tmp_path, tag=tag, env=env)
    try:
        with PluginClient(agent.socket_path) as c:
            assert c.call("VolumeDriver.Get", {"Name": "ecs-web-1-data-ab"}).body["Err"] != ""  # dockerd asks first
            assert c.call("VolumeDriver.Create", {"Name": "ecs-web-1-data-ab", "Opts": opts(fs_id)}).body == {"Err": ""}
            (made,) = volume_aps(moto, fs_id, "ecs-web-1-data-ab")
            assert made["RootDirectory"]["Path"] == "/ecs-web-1-data-ab" and made["PosixUser"]["Gid"] == 50000
            status = c.call("VolumeDriver.Get", {"Name": "ecs-web-1-data-ab"}).body["Volume"]["Status"]
            assert status["AccessPoint"] == made["AccessPointId"]
            assert c.call("VolumeDriver.Create", {"Name": "ecs-web-1-data-ab", "Opts": opts(fs_id)}).body == {"Err": ""}
            assert len(volume_aps(moto, fs_id, "ecs-web-1-data-ab")) == 1  # a retried Create makes no second
            assert c.call("VolumeDriver.Remove", {"Name": "ecs-web-1-data-ab"}).body == {"Err": ""}
            assert volume_aps(moto, fs_id, "ecs-web-1-data-ab") == []  # task-scoped: nothing left
    finally:
        agent.proc.stop()


def test_an_access_point_left_by_a_killed_agent_is_adopted(moto: MotoServer, fs_id: str, env: Dict[str, str],
                                                            tmp_path: Path, tag: str) -> None:
    # What an agent SIGKILLed right after CreateAccessPoint leaves: the access point, tagged with
    # the volume, and no record of it in the agent's state.
    spec = provisioning.parse({"provision": "accesspoint"})
    left = client("efs", moto.endpoint_url, REGION).create_access_point(
        **provisioning.build_request(spec, fs_id=fs_id, volume="v-crashed", used_gids=[]).api_arguments())
    agent = start_agent(tmp_path, tag=tag, env=env, name="agent1")
    try:
        with PluginClient(agent.socket_path) as c:  # dockerd (or ECS) retries the Create
            assert c.call("VolumeDriver.Create", {"Name": "v-crashed", "Opts": opts(fs_id)}).body == {"Err": ""}
            status = c.call("VolumeDriver.Get", {"Name": "v-crashed"}).body["Volume"]["Status"]
        assert status["AccessPoint"] == left["AccessPointId"]
        assert [ap["AccessPointId"] for ap in volume_aps(moto, fs_id, "v-crashed")] == [left["AccessPointId"]]
        os.kill(agent.proc.pid, signal.SIGKILL)  # and again, after the state was written
        agent.proc.popen.wait(10)
    finally:
        agent.proc.stop()
    second = start_agent(tmp_path, tag=tag, env=env, name="agent2")
    try:
        with PluginClient(second.socket_path) as c:
            assert c.call("VolumeDriver.Remove", {"Name": "v-crashed"}).body == {"Err": ""}
        assert volume_aps(moto, fs_id, "v-crashed") == []
    finally:
        second.proc.stop()


def test_an_agent_killed_right_after_create_access_point_ends_with_one(moto: MotoServer, fs_id: str,
                                                                       env: Dict[str, str], tmp_path: Path,
                                                                       tag: str) -> None:
    # EFS makes the access point; the agent is SIGKILLed before it hears the answer.
    with HoldingProxy(moto.endpoint_url, hold=("POST", "/2015-02-01/access-points")) as efs:
        agent = start_agent(tmp_path, tag=tag, env={**env, "AWS_ENDPOINT_URL_EFS": efs.url}, name="agent1")
        try:
            outcome: List[BaseException] = []
            create = threading.Thread(target=_call_expecting_no_answer, daemon=True, args=(
                agent.socket_path, {"Name": "v-killed", "Opts": opts(fs_id)}, outcome))
            create.start()
            assert efs.held.wait(30), "the agent never called CreateAccessPoint"
            os.kill(agent.proc.pid, signal.SIGKILL)
            agent.proc.popen.wait(10)
            create.join(10)
            assert outcome and not create.is_alive()  # the Create got no answer: dockerd retries it
        finally:
            agent.proc.stop()
    (made,) = volume_aps(moto, fs_id, "v-killed")
    assert json.loads(efs.held_answer or b"{}")["AccessPointId"] == made["AccessPointId"]
    second = start_agent(tmp_path, tag=tag, env=env, name="agent2")
    try:
        with PluginClient(second.socket_path) as c:
            assert c.call("VolumeDriver.Create", {"Name": "v-killed", "Opts": opts(fs_id)}).body == {"Err": ""}
            assert c.call("VolumeDriver.Get", {"Name": "v-killed"}).body["Volume"]["Status"]["AccessPoint"] == \
                made["AccessPointId"]
            assert [ap["AccessPointId"] for ap in volume_aps(moto, fs_id, "v-killed")] == [made["AccessPointId"]]
            assert c.call("VolumeDriver.Remove", {"Name": "v-killed"}).body == {"Err": ""}
        assert volume_aps(moto, fs_id, "v-killed") == []
    finally:
        second.proc.stop()


def _call_expecting_no_answer(socket_path: Path, payload: dict, outcome: List[BaseException]) -> None:
    try:
        with PluginClient(socket_path, timeout=60) as c:
            c.call("VolumeDriver.Create", payload)
    except BaseException as e:  # the agent died mid-request: the connection ends unanswered
        outcome.append(e)


def test_a_refused_create_is_one_err_and_records_nothing(moto: MotoServer, env: Dict[str, str], tmp_path: Path,
                                                         tag: str) -> None:
    agent = start_agent(tmp_path, tag=tag, env=env)
    try:
        with PluginClient(agent.socket_path) as c:
            err = c.call("VolumeDriver.Create", {"Name": "v", "Opts": opts("fs-0000000000000000a")}).body["Err"]
            assert "FileSystemNotFound" in err and "does not exist in region us-east-1" in err and "\n" not in err
            assert c.call("VolumeDriver.List", {}).body["Volumes"] == []
    finally:
        agent.proc.stop()


def test_status_names_access_points_whose_volume_this_host_lost(moto: MotoServer, fs_id: str, env: Dict[str, str],
                                                                tmp_path: Path, tag: str) -> None:
    agent = start_agent(tmp_path, tag=tag, env=env)
    try:
        with PluginClient(agent.socket_path) as c:
            assert c.call("VolumeDriver.Create", {"Name": "kept", "Opts": opts(fs_id)}).body == {"Err": ""}
            assert c.call("VolumeDriver.Create", {"Name": "left", "Opts": opts(fs_id, onRemove="keep")}).body == \
                {"Err": ""}
            assert c.call("VolumeDriver.Remove", {"Name": "left"}).body == {"Err": ""}
    finally:
        agent.proc.stop()
    (left,) = volume_aps(moto, fs_id, "left")
    (kept,) = volume_aps(moto, fs_id, "kept")
    status_env = {**env, "EFSPLUG_CONFIG": str(tmp_path / "efs-utils.conf")}
    argv = [str(EFSPLUG), "status", "--agent-state", str(agent.state_path)]
    out = subprocess.run(argv, env=status_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("access point")]
    assert lines == [f"access point '{left['AccessPointId']}' of {fs_id} ('/left') was made for volume 'left', which "
                     "this host does not have; create the volume again to adopt it, or delete the access point if "
                     "no other host uses it"]
    assert kept["AccessPointId"] not in out.stdout  # its volume holds it
    # EFS unreachable: status still answers, naming what it could not check
    down = subprocess.run(argv, env={**status_env, "AWS_ENDPOINT_URL_EFS": "http://127.0.0.1:9"}, capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 0 and f"access points of {fs_id}: not checked (" in down.stdout, down.stdout


def test_delete_data_refuses_a_directory_another_access_point_uses(moto: MotoServer, fs_id: str,
                                                                   env: Dict[str, str], tmp_path: Path,
                                                                   tag: str) -> None:
    agent = start_agent(tmp_path, tag=tag, env=env)
    try:
        with PluginClient(agent.socket_path) as c:
            for name in ("one", "two"):  # rootName without {volume}: both get /team
                assert c.call("VolumeDriver.Create", {"Name": name, "Opts": opts(
                    fs_id, rootName="team", onRemove="deleteData")}).body == {"Err": ""}
            (two,) = volume_aps(moto, fs_id, "two")
            err = c.call("VolumeDriver.Remove", {"Name": "one"}).body["Err"]
            assert err == (f"volume 'one': the data under '/team' was kept because access point "
                           f"'{two['AccessPointId']}' uses '/team'; delete it by hand, or use "
                           "onRemove=deleteAccessPoint")
            assert len(volume_aps(moto, fs_id, "one")) == 1  # nothing deleted: Remove can be retried
            assert [v["Name"] for v in c.call("VolumeDriver.List", {}).body["Volumes"]] == ["one", "two"]
    finally:
        agent.proc.stop()
    assert not (tmp_path / "efs-state" / "deleting").exists()  # refused before anything was mounted
