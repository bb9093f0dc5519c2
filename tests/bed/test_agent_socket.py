"""The agent on its real unix socket, driven with dockerd's request shapes.

The agent runs as a process for everything that does not mount (host has no NFS), and in
process with a scripted mounter for Mount/Unmount and the concurrency rules.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from efsbed import procs
from efsbed.agent_harness import (
    EFSPLUG, AgentProcess, FakeMounter, PluginClient, plugin_with, serve_in_process, start_agent,
)
from efsplug.agent.protocol import CONTENT_TYPE, MAX_BODY

FS, AP = "fs-0123456789abcdef0", "fsap-0123456789abcdef0"
CREDS = "/v2/credentials/7d1c5e0f-secret-path"
ECS_OPTS = {"type": "efs", "device": FS, "o": f"tls,iam,awscredsuri={CREDS},accesspoint={AP}"}
A, B = "a" * 64, "b" * 64


@pytest.fixture
def tag() -> Iterator[str]:
    t = procs.new_tag()
    yield t
    for p in procs.tagged_processes(t):  # a failed test must not leave an agent behind
        p.kill()


@pytest.fixture
def agent(tmp_path: Path, tag: str) -> Iterator[AgentProcess]:
    a = start_agent(tmp_path, tag=tag)
    try:
        yield a
    finally:
        a.proc.stop()


def test_every_endpoint_with_dockerds_bodies(agent: AgentProcess) -> None:
    mode = os.stat(agent.socket_path)
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o660
    assert (mode.st_uid, mode.st_gid) == (0, 0)
    with PluginClient(agent.socket_path) as c:  # one kept-alive connection, as dockerd
        r = c.post_raw("/Plugin.Activate", b"")
        assert (r.status, r.body, r.content_type) == (200, {"Implements": ["VolumeDriver"]}, CONTENT_TYPE)
        assert c.call("VolumeDriver.Capabilities", {}).body == {"Capabilities": {"Scope": "local"}}
        # docker volume create: Capabilities, Get (an Err for a new name), Create
        assert c.call("VolumeDriver.Get", {"Name": "v1"}).body["Err"].startswith("volume 'v1' not found")
        assert c.call("VolumeDriver.Create", {"Name": "v1", "Opts": ECS_OPTS}).body == {"Err": ""}
        vol = c.call("VolumeDriver.Get", {"Name": "v1"}).body["Volume"]
        mountpoint = str(agent.socket_path.parents[1] / "volumes" / "v1")
        assert (vol["Name"], vol["Mountpoint"], vol["Status"]["AccessPoint"]) == ("v1", mountpoint, AP)
        assert vol["CreatedAt"].endswith("Z")
        assert c.call("VolumeDriver.Path", {"Name": "v1"}).body == {"Mountpoint": mountpoint, "Err": ""}
        assert c.call("VolumeDriver.List", {}).body == {"Volumes": [{"Name": "v1", "Mountpoint": mountpoint}], "Err": ""}
        assert c.call("VolumeDriver.Unmount", {"Name": "v1", "ID": A}).body == {"Err": ""}  # unknown ID
        # docker run --volume-driver: "Opts": null
        assert c.call("VolumeDriver.Create", {"Name": "v2", "Opts": None}).body["Err"] == (
            "volume option 'device' is missing; add -o device=fs-<id>[:/path]")
        # docker volume rm: Get, Get, Remove
        assert c.call("VolumeDriver.Remove", {"Name": "v1"}).body == {"Err": ""}
        assert c.call("VolumeDriver.List", {}).body == {"Volumes": [], "Err": ""}
    log = agent.log()
    assert "endpoint=VolumeDriver.Create volume=v1 duration_ms=" in log and "outcome=ok" in log
    assert "endpoint=VolumeDriver.Create volume=v2" in log and "outcome=error err=\"volume option 'device'" in log
    assert CREDS not in log and "secret-path" not in log  # the credentials URI is never logged
    assert f"supervising efs mounts under {agent.socket_path.parents[1] / 'efs-state'}" in log


@pytest.mark.parametrize(
    "endpoint, body, status, err",
    [
        ("/VolumeDriver.Get", b'{"Name": "v1"', 400, "request body is not valid JSON; send a JSON object"),
        ("/VolumeDriver.Nope", b"{}\n", 404, "unknown endpoint '/VolumeDriver.Nope'; this plugin implements VolumeDriver"),
        ("/VolumeDriver.Create", b'{"Name":"v3","Opts":{"type":"efs","device":"fs-12345678","o":"tls,accesspoint=ap"}}\n',
         200, "option 'accesspoint' value 'ap' is invalid; use fsap- followed by 17 lowercase hex digits"),
        ("/VolumeDriver.Mount", b'{"Name":"v1","ID":"x y"}\n', 400, "mount ID 'x y' is invalid; send the \"ID\" Docker assigned"),
    ],
)
def test_bad_requests_get_a_json_err(agent: AgentProcess, endpoint: str, body: bytes, status: int, err: str) -> None:
    with PluginClient(agent.socket_path) as c:
        r = c.post_raw(endpoint, body)
        assert (r.status, r.body.get("Err")) == (status, err)
        assert c.call("VolumeDriver.List", {}).status == 200  # same connection, still served


def test_oversized_body_and_other_methods_are_refused_and_the_agent_serves_on(agent: AgentProcess) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(agent.socket_path))
        s.sendall(b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        s.sendall(b"{" + b" " * 65536)  # the start of a huge body; the agent answers without reading it
        reply = s.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["Err"].startswith("request body over 1048576 bytes")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(agent.socket_path))
        s.sendall(b"GET /VolumeDriver.List HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 405") and b"the plugin protocol uses POST" in reply
    with socket.socket(socket.AF_UNIX) as s:  # chunked bodies are accepted too
        s.connect(str(agent.socket_path))
        s.sendall(b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  b"5\r\n{\"Nam\r\n9\r\ne\":\"v1\"}\n\r\n0\r\n\r\n")
        reply = s.makefile("rb").read()
    assert b"volume 'v1' not found" in reply
    with PluginClient(agent.socket_path) as c:
        assert c.call("VolumeDriver.Capabilities", {}).status == 200


def test_kill_9_and_restart_keeps_the_state_and_replaces_the_stale_socket(tmp_path: Path, tag: str) -> None:
    first = start_agent(tmp_path, tag=tag, name="agent1")
    try:
        with PluginClient(first.socket_path) as c:
            for name in ("v1", "v2"):
                assert c.call("VolumeDriver.Create", {"Name": name, "Opts": ECS_OPTS}).body == {"Err": ""}
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.popen.wait(10)
    finally:
        first.proc.stop()
    assert first.socket_path.is_socket()  # left behind by the killed agent
    second = start_agent(tmp_path, tag=tag, name="agent2")
    try:
        with PluginClient(second.socket_path) as c:
            names = [v["Name"] for v in c.call("VolumeDriver.List", {}).body["Volumes"]]
            assert names == ["v1", "v2"]
            assert c.call("VolumeDriver.Get", {"Name": "v2"}).body["Err"] == ""
    finally:
        second.proc.stop()


def test_a_second_agent_on_a_live_socket_refuses_to_start(agent: AgentProcess, tmp_path: Path, tag: str) -> None:
    argv = [str(EFSPLUG), "agent", "--socket", str(agent.socket_path),
            "--state", str(tmp_path / "other.json"), "--volumes-root", str(tmp_path / "other"), "--no-supervisor"]
    proc = procs.start("agent-dup", argv, tag=tag, log=tmp_path / "dup.log")
    try:
        assert proc.popen.wait(30) == 1
    finally:
        proc.stop()
    assert "another process serves" in (tmp_path / "dup.log").read_text()
    with PluginClient(agent.socket_path) as c:
        assert c.call("VolumeDriver.List", {}).status == 200


def test_sigterm_removes_the_socket_and_leaves_mounts(agent: AgentProcess) -> None:
    os.kill(agent.proc.pid, signal.SIGTERM)
    assert agent.proc.popen.wait(30) == 0
    assert not agent.socket_path.exists()
    assert "stopped; mounts left in place" in agent.log()


def test_corrupt_state_is_quarantined_and_the_agent_serves(tmp_path: Path, tag: str) -> None:
    state = tmp_path / "data" / "volumes.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"version": 1, "volumes": {"v1": {"device": ')
    agent = start_agent(tmp_path, tag=tag)
    try:
        quarantined = list(state.parent.glob("volumes.json.corrupt-*"))
        assert len(quarantined) == 1 and quarantined[0].read_text().startswith('{"version": 1')
        assert "was unusable (not valid JSON" in agent.log()
        with PluginClient(agent.socket_path) as c:
            assert c.call("VolumeDriver.List", {}).body == {"Volumes": [], "Err": ""}
            assert c.call("VolumeDriver.Create", {"Name": "v1", "Opts": ECS_OPTS}).body == {"Err": ""}
        assert json.loads(state.read_text())["version"] == 1
    finally:
        agent.proc.stop()


def test_a_recorded_mount_that_vanished_is_reconciled_at_start(tmp_path: Path, tag: str) -> None:
    state = tmp_path / "data" / "volumes.json"
    state.parent.mkdir(parents=True)
    volume = {"device": FS, "options": "tls", "mountpoint": str(tmp_path / "volumes" / "v1"),
              "created_at": "2024-01-01T00:00:00Z", "mounted": True, "refs": {A: 1}}
    state.write_text(json.dumps({"version": 1, "volumes": {"v1": volume}}))
    agent = start_agent(tmp_path, tag=tag)
    try:
        assert "volume v1: its mount is gone" in agent.log()
        saved = json.loads(state.read_text())["volumes"]["v1"]
        assert (saved["mounted"], saved["refs"]) == (False, {})
    finally:
        agent.proc.stop()


def test_a_cleanup_wait_set_only_in_ecs_config_is_in_force(tmp_path: Path, tag: str) -> None:
    """Operators set the wait in ecs.config, as the ECS docs say; systemd does not put that
    file in the agent's environment, so the agent reads it. `efsplug status`, run without
    the agent's environment, shows the wait in force and where it came from."""
    secret = "hunter2-registry-token"
    ecs_config = tmp_path / "ecs.config"
    ecs_config.write_text(f'ECS_CLUSTER=prod\nECS_ENGINE_AUTH_DATA={{"auth":"{secret}"}}\n'
                          "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION=5s\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION") and k != "EFSPLUG_ECS_CONFIG"}
    agent = start_agent(tmp_path, tag=tag, env={**env, "EFSPLUG_ECS_CONFIG": str(ecs_config)})
    try:
        source = f"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION in {ecs_config} line 3"
        procs.wait_until(lambda: f"cleanup wait 5s ({source})" in agent.log(), 20, "the supervisor to start",
                         process=agent.proc)
        res = subprocess.run([str(EFSPLUG), "status"], env={**env, "EFSPLUG_CONFIG": str(tmp_path / "efs-utils.conf")},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ["no efs mounts", f"cleanup wait: 5s ({source})"]
        assert secret not in res.stdout + res.stderr + agent.log()
    finally:
        agent.proc.stop()


# ---- in process, with a scripted mounter: Mount/Unmount and the concurrency rules --------

def test_mount_and_unmount_over_the_socket(tmp_path: Path) -> None:
    mounter = FakeMounter()
    plugin = plugin_with(tmp_path, mounter)
    with serve_in_process(plugin, tmp_path / "p.sock"), PluginClient(tmp_path / "p.sock") as c:
        c.call("VolumeDriver.Create", {"Name": "v1", "Opts": ECS_OPTS})
        mp = str(tmp_path / "volumes" / "v1")
        # docker run -v v1:/data on an image with /data: two Mount/Unmount pairs
        for mount_id in (A, B):
            assert c.call("VolumeDriver.Mount", {"Name": "v1", "ID": mount_id}).body == {"Mountpoint": mp, "Err": ""}
            assert c.call("VolumeDriver.Unmount", {"Name": "v1", "ID": mount_id}).body == {"Err": ""}
        assert [kind for kind, _ in mounter.calls] == ["mount", "unmount", "mount", "unmount"]
        mounter.fail_with = "mount.nfs4 timed out; check that the security group allows port 2049"
        assert c.call("VolumeDriver.Mount", {"Name": "v1", "ID": A}).body == {"Mountpoint": "", "Err": mounter.fail_with}


def test_two_creates_of_one_name_race_and_exactly_one_wins(tmp_path: Path) -> None:
    plugin = plugin_with(tmp_path, FakeMounter())
    variants = [dict(ECS_OPTS, o="tls"), dict(ECS_OPTS, o="tls,iam")] * 4
    barrier = threading.Barrier(len(variants))
    results: List[object] = [None] * len(variants)

    def create(i: int) -> None:
        with PluginClient(tmp_path / "p.sock") as c:
            c.call("VolumeDriver.Capabilities", {})  # connected before the race starts
            barrier.wait(10)
            results[i] = c.call("VolumeDriver.Create", {"Name": "race", "Opts": variants[i]}).body["Err"]

    with serve_in_process(plugin, tmp_path / "p.sock"):
        threads = [threading.Thread(target=create, args=(i,)) for i in range(len(variants))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    winner = plugin.volumes["race"].options
    for variant, err in zip(variants, results):
        expected = "" if variant["o"] == winner else "volume 'race' already exists with different options; remove it or choose another name"
        assert err == expected
    saved = json.loads(plugin.store.path.read_text())["volumes"]
    assert list(saved) == ["race"] and saved["race"]["options"] == winner


def test_reads_and_other_volumes_never_wait_for_a_mount_in_flight(tmp_path: Path) -> None:
    gate = threading.Event()
    mounter = FakeMounter(gate=gate)
    plugin = plugin_with(tmp_path, mounter)
    sock = tmp_path / "p.sock"
    answers: dict = {}

    def request(key: str, endpoint: str, payload: dict) -> None:
        with PluginClient(sock, timeout=60) as c:
            answers[key] = c.call(endpoint, payload).body

    with serve_in_process(plugin, sock):
        with PluginClient(sock) as c:
            for name in ("slow", "other"):
                c.call("VolumeDriver.Create", {"Name": name, "Opts": ECS_OPTS})
        workers = [
            threading.Thread(target=request, args=("slow", "VolumeDriver.Mount", {"Name": "slow", "ID": A})),
            threading.Thread(target=request, args=("other", "VolumeDriver.Mount", {"Name": "other", "ID": A})),
        ]
        for w in workers:
            w.start()
        try:
            # Both volumes' mounts are in the mounter at once: no global lock.
            assert mounter.entered.acquire(timeout=10) and mounter.entered.acquire(timeout=10)
            unmount = threading.Thread(target=request, args=("unmount", "VolumeDriver.Unmount", {"Name": "slow", "ID": A}))
            unmount.start()
            with PluginClient(sock) as c:
                started = time.monotonic()
                assert c.call("VolumeDriver.Get", {"Name": "slow"}).body["Volume"]["Status"]["Mounted"] is False
                assert len(c.call("VolumeDriver.List", {}).body["Volumes"]) == 2
                assert c.call("VolumeDriver.Path", {"Name": "slow"}).body["Err"] == ""
                assert time.monotonic() - started < 2.0  # answered while both mounts are held
            assert "slow" not in answers and "unmount" not in answers  # one volume's requests stay ordered
        finally:
            gate.set()
            for w in workers:
                w.join(30)
        unmount.join(30)
    assert answers["slow"]["Err"] == "" and answers["unmount"] == {"Err": ""}
    assert [kind for kind, p in mounter.calls if p.endswith("slow")] == ["mount", "unmount"]
    assert plugin.volumes["slow"].mounted is False and plugin.volumes["other"].mounted is True
