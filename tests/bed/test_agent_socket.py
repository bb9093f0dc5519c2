"""The agent on its real unix socket, driven with dockerd's request shapes.

The agent runs as a process for everything that does not mount (host has no NFS), and in
process with a scripted mounter for Mount/Unmount and the concurrency rules.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from efsbed import procs
from efsbed.agent_harness import (
    EFSPLUG, AgentProcess, FakeMounter, PluginClient, plugin_with, serve_in_process, start_agent,
)
from efsplug.agent.protocol import CONTENT_TYPE, ENDPOINTS, MAX_BODY

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


# ---- bounds: body framing, time, connections, shutdown, logging (issue 11) -----------------

CHUNKED_HEAD = b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
MiB = 1024 * 1024


def proc_status(pid: int) -> Tuple[int, int]:
    """(threads, RSS in KiB) of pid, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def read_to_eof(s: socket.socket, timeout: float) -> bytes:
    """Everything until the agent closes; pytest.fail if it has not within timeout."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the agent kept the connection open for {timeout} s; got {b''.join(chunks)[:200]!r}")
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def split_reply(reply: bytes) -> Tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), reply[:200]
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_chunk_size_that_is_not_plain_hex_is_a_400_and_nothing_more_is_read(agent: AgentProcess) -> None:
    """int(size, 16) took '-100000' (and '+a', '0x1f', '1_0', ' 5'): a negative size passed the
    body limit and read(-n) read until EOF, hundreds of MiB into the agent's memory."""
    _, rss0 = proc_status(agent.proc.pid)
    for size in (b"-100000", b"0x10", b"+10", b" 10", b"1_0", b"fffffffff"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(agent.socket_path))
            s.sendall(CHUNKED_HEAD + size + b"\r\n")
            sent = [0]

            def stream() -> None:  # what a client with a huge "negative" chunk would go on sending
                try:
                    while sent[0] < 64 * MiB:
                        s.sendall(b"x" * 65536)
                        sent[0] += 65536
                except OSError:
                    pass  # the agent closed: what we wanted

            streamer = threading.Thread(target=stream, daemon=True)
            streamer.start()
            status, body = split_reply(read_to_eof(s, 15))
            streamer.join(15)
        print(f"chunk size {size!r}: {status} after the client sent {sent[0] // 1024} KiB")
        assert (status, body["Err"]) == (400, f"chunk size '{size.decode()}' is not 1 to 8 hex digits")
        assert sent[0] < 20 * MiB  # the agent drains at most 16 MiB for 2 s before it closes
    _, rss = proc_status(agent.proc.pid)
    print(f"agent RSS {rss0} KiB before, {rss} KiB after")
    assert rss < rss0 + 50 * 1024
    with socket.socket(socket.AF_UNIX) as s:  # chunks add up to the Content-Length limit
        s.connect(str(agent.socket_path))
        s.sendall(CHUNKED_HEAD + b"80000\r\n" + b" " * 0x80000 + b"\r\n80001\r\n")
        status, body = split_reply(read_to_eof(s, 15))
    assert status == 413 and body["Err"].startswith(f"request body over {MAX_BODY} bytes")
    with PluginClient(agent.socket_path) as c:
        assert c.call("VolumeDriver.List", {}).status == 200


def test_a_silent_or_trickling_client_is_cut_at_the_request_deadline(agent: AgentProcess) -> None:
    """10 s for head and body in all, not per read: a client that sends nothing, or a byte
    every quarter second, pinned a thread for as long as it liked (300 s a read)."""
    silent = socket.socket(socket.AF_UNIX)
    trickler = socket.socket(socket.AF_UNIX)
    stop = threading.Event()

    def trickle() -> None:
        try:
            for byte in b"POST /VolumeDriver.List HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{}\n":
                trickler.sendall(bytes([byte]))
                if stop.wait(0.25):  # the client's pace, not the agent's
                    return
        except OSError:
            pass

    try:
        started = time.monotonic()
        silent.connect(str(agent.socket_path))
        trickler.connect(str(agent.socket_path))
        pacer = threading.Thread(target=trickle, daemon=True)
        pacer.start()
        with PluginClient(agent.socket_path) as c:  # others are served meanwhile
            assert c.call("VolumeDriver.List", {}).status == 200
        assert read_to_eof(silent, 20) == b""  # no request, no answer
        silent_s = time.monotonic() - started
        status, body = split_reply(read_to_eof(trickler, 20))
        trickle_s = time.monotonic() - started
    finally:
        stop.set()
        silent.close()
        trickler.close()
    print(f"silent client cut after {silent_s:.2f} s, trickling client after {trickle_s:.2f} s ({status})")
    assert 9.5 < silent_s < 12.5 and 9.5 < trickle_s < 12.5
    assert (status, body["Err"]) == (408, "request not complete within 10 s; send it at once")
    assert 'outcome=error err="request not complete within 10 s' in agent.log()


def call_like_dockerd(socket_path: Path, endpoint: str, within: float = 30.0) -> Tuple[dict, int]:
    """dockerd's plugin client: a connection error is retried with back-off for up to 30 s.
    Returns the answer and the number of attempts."""
    deadline = time.monotonic() + within
    attempts = 0
    while True:
        attempts += 1
        try:
            with PluginClient(socket_path, timeout=10) as c:
                return c.call(endpoint, {}).body, attempts
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(min(0.05 * 2 ** attempts, 1.0))  # the client's back-off


def test_500_silent_clients_hold_at_most_64_threads_and_a_request_still_gets_in(agent: AgentProcess) -> None:
    """Every connection had its own thread, for as long as it stayed silent (300 s a read).
    Now: at most 64 connections are served; more are closed at once, without a thread; at
    the cap a connection silent for 1 s gives way to a new one, so a well-formed request
    is answered while the silent ones still hold their slots; each is cut 10 s after it
    connected, and the threads go back to the baseline."""
    pid = agent.proc.pid
    threads0, _ = proc_status(pid)
    clients: List[socket.socket] = []
    peak = threads0

    def open_clients() -> List[socket.socket]:
        ready = select.select(clients, [], [], 0)[0]
        return [s for s in clients if s not in ready or s.recv(1, socket.MSG_PEEK) != b""]

    try:
        started = time.monotonic()
        for i in range(500):
            s = socket.socket(socket.AF_UNIX)
            clients.append(s)
            s.connect(str(agent.socket_path))  # blocking: waits while the listen backlog is full
            if i % 25 == 0:
                peak = max(peak, proc_status(pid)[0])
        procs.wait_until(lambda: len(open_clients()) <= 64, 10, "the agent to close connections over its cap")
        peak = max(peak, proc_status(pid)[0])
        held = len(open_clients())
        print(f"500 silent clients connected in {time.monotonic() - started:.2f} s: {held} held, "
              f"{500 - held} closed at once; agent threads {threads0} before, peak {peak}")
        assert held == 64 and peak <= threads0 + 64 + 2  # + a cut connection's thread on its way out
        asked = time.monotonic()
        answer, attempts = call_like_dockerd(agent.socket_path, "Plugin.Activate")
        answered_s = time.monotonic() - asked
        print(f"Plugin.Activate answered {answered_s:.2f} s after it was asked ({attempts} attempt(s)), "
              f"{asked - started:.2f} s after the silent clients began to connect")
        assert answer == {"Implements": ["VolumeDriver"]}
        assert asked - started + answered_s < 9  # before any silent client's 10 s were up
        procs.wait_until(lambda: not open_clients(), 20, "the silent clients to be cut")
        cut_s = time.monotonic() - started
        procs.wait_until(lambda: proc_status(pid)[0] <= threads0, 10, "the agent's threads to end")
        print(f"all silent clients cut {cut_s:.2f} s after the first connected; threads back to {proc_status(pid)[0]}")
    finally:
        for s in clients:
            s.close()
    assert "connection(s) (64 connections busy); closed at once, dockerd retries" in agent.log()


def test_sigterm_does_not_wait_for_a_client_that_never_sends_its_body(agent: AgentProcess) -> None:
    """Its request counted as running, so shutdown waited 150 s for it: past systemd's
    stop timeout (90 s), which then SIGKILLed the agent."""
    promised = socket.socket(socket.AF_UNIX)
    idle = PluginClient(agent.socket_path)
    silent = socket.socket(socket.AF_UNIX)
    try:
        promised.connect(str(agent.socket_path))
        promised.sendall(b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"Name\":")
        assert idle.call("VolumeDriver.List", {}).status == 200  # then kept alive, idle
        silent.connect(str(agent.socket_path))
        with PluginClient(agent.socket_path) as c:  # the partial request has reached the agent
            assert c.call("VolumeDriver.List", {}).status == 200
        started = time.monotonic()
        os.kill(agent.proc.pid, signal.SIGTERM)
        assert agent.proc.popen.wait(10) == 0
        stopped_s = time.monotonic() - started
        assert read_to_eof(promised, 5) == b""  # closed unanswered: never dispatched
    finally:
        promised.close()
        idle.close()
        silent.close()
    print(f"agent stopped {stopped_s:.2f} s after SIGTERM")
    assert stopped_s < 3.0 and "stopped; mounts left in place" in agent.log()


def test_shutdown_cuts_readers_at_once_and_drains_a_mount_in_flight(tmp_path: Path) -> None:
    gate = threading.Event()
    mounter = FakeMounter(gate=gate)
    plugin = plugin_with(tmp_path, mounter)
    sock = tmp_path / "p.sock"
    answers: dict = {}

    def mount() -> None:
        with PluginClient(sock, timeout=60) as c:
            answers["mount"] = c.call("VolumeDriver.Mount", {"Name": "v1", "ID": A}).body

    with serve_in_process(plugin, sock) as server:
        with PluginClient(sock) as c:
            c.call("VolumeDriver.Create", {"Name": "v1", "Opts": ECS_OPTS})
        mounting = threading.Thread(target=mount)
        mounting.start()
        reader = socket.socket(socket.AF_UNIX)
        try:
            assert mounter.entered.acquire(timeout=10)
            reader.connect(str(sock))
            reader.sendall(b"POST /VolumeDriver.Remove HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
            with PluginClient(sock) as c:  # the partial request has reached the server
                assert c.call("VolumeDriver.List", {}).status == 200
            started = time.monotonic()
            server.shutdown()
            assert read_to_eof(reader, 5) == b""
            cut_s = time.monotonic() - started
            assert server.wait_idle(0.5) is False  # the mount still runs: it is waited for
            gate.set()
            assert server.wait_idle(10) is True
        finally:
            gate.set()
            reader.close()
            mounting.join(30)
    print(f"reader cut {cut_s:.2f} s after shutdown; the mount in flight was answered {answers['mount']}")
    assert cut_s < 2.0
    assert answers["mount"] == {"Mountpoint": str(tmp_path / "volumes" / "v1"), "Err": ""}
    assert plugin.volumes["v1"].mounted is True and "v1" in plugin.volumes  # Remove was never run


def test_control_characters_and_huge_paths_are_logged_escaped_and_bounded(agent: AgentProcess) -> None:
    requests = [
        b"/VolumeDriver.\x1b[31mEvil\x07" + b"A" * 60_000,  # under http.server's 64 KiB line limit: logged whole
        b"/VolumeDriver.\x1b]0;pwned\x07\x00\x7f\x85",
        b"/VolumeDriver." + b"B" * 1000,
    ]
    for target in requests:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(agent.socket_path))
            s.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\n{}\n")
            status, body = split_reply(read_to_eof(s, 15))
        print(f"{target[:30]!r}... ({len(target)} bytes): {status} {body['Err'][:60]}")
        assert status in (400, 404, 414) and "\x1b" not in body["Err"]
    with PluginClient(agent.socket_path) as c:
        assert c.call("VolumeDriver.List", {}).status == 200
    log = agent.log()
    lines = [line for line in log.splitlines() if "VolumeDriver.\\x1b" in line or "VolumeDriver.BBB" in line]
    for line in lines:
        print(line)
    assert len(lines) == 3
    assert all(line.isprintable() and len(line) < 500 for line in log.splitlines())
    assert lines[0].startswith("endpoint=VolumeDriver.\\x1b[31mEvil\\x07AAAA") and "AAA... volume=-" in lines[0]
    assert lines[1].startswith("endpoint=VolumeDriver.\\x1b]0;pwned\\x07\\x00\\x7f\\x85 volume=-")
    assert lines[2].startswith("endpoint=VolumeDriver." + "B" * (200 - 3 - len("VolumeDriver.")) + "... volume=-")


# ---- malformed input, generated: the agent never dies, stays bounded, serves on --------------

_ENDPOINTS = list(ENDPOINTS)
_LATIN1 = st.characters(max_codepoint=0xFF)
_paths = st.one_of(  # one_of picks a branch evenly: the endpoints' branch is listed thrice
    *[st.sampled_from(_ENDPOINTS + ["/VolumeDriver.Nope", "/", "*", "", "http://plugin/Plugin.Activate", "/Plugin.Activate?x=1"])] * 3,
    st.text(_LATIN1, max_size=300).map(lambda t: "/" + t),
    st.builds(lambda n, c: "/VolumeDriver." + c * n, st.integers(1, 70_000), st.sampled_from(["A", "\x1b", "\x00", "%", "\x85"])),
)
_header_values = st.one_of(
    st.sampled_from(["0", "3", "5", "-1", "+3", "0x10", " 3", "1048577", "9" * 30, "chunked", "gzip, chunked", "chunked, chunked",
                     "close", "keep-alive", "100-continue", "5, 6", "3, 3", ""]),
    st.text(_LATIN1, max_size=60),
    st.integers(1, 70_000).map(lambda n: "v" * n),
)
_headers = st.lists(st.tuples(
    st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect", "Accept", "X-Junk",
                     "content-length", "Host", "Accept", "X-Junk"] * 3 + ["Bad Name", "", ":", " folded"]),
    _header_values), max_size=80)
_bodies = st.one_of(
    st.sampled_from([b"", b"{}", b"{}\n", b'{"Name":', b"[]", b"null", b"42", b'"x"', b'{"Name":5}', b'{"Name":"v1"}\n',
                     b'{"Name":"' + b"x" * 300 + b'"}', b'{"Name":"v","Opts":[1]}', b'{"Name":"v","ID":{}}', b"\xff\xfe",
                     b'{"Name":"v","Opts":{"type":"efs","device":"fs-12345678","o":"iam,awscredsuri=/v2/credentials/s3cr3t"}}',
                     b'{"Name":"v","ID":"' + b"a" * 64 + b'"}', b"[" * 50_000, b'{"Name":"v","x":' + b"9" * 100_000 + b"}"]),
    st.binary(max_size=2000),
)
_chunk_sizes = st.sampled_from(["%x", "%X", "-%x", "+%x", "0x%x", " %x", "%x ", "%09x", "%x;ext=1", "%x\x00", "%x_0", "ffffffffff%x"])


_json_values = st.recursive(
    # No valid Create can come of these (no type, device or option values): a Mount here would be real.
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | st.just("v1"),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["Name", "Opts", "ID", "type", "device", "o"]) | st.text(max_size=10), inner, max_size=5),
    max_leaves=20)


@st.composite
def malformed_streams(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=4096))  # plain garbage
    if kind <= 4:  # well framed, to a real endpoint: the body is what is wrong
        body = draw(st.one_of(_bodies, _json_values.map(lambda v: json.dumps(v).encode()),
                              st.dictionaries(st.sampled_from(["Name", "Opts", "ID"]), _json_values, min_size=1)
                              .map(lambda v: json.dumps(v).encode())))
        return (f"POST {draw(st.sampled_from(_ENDPOINTS))} HTTP/1.1\r\nHost: plugin\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    # Weighted towards requests that frame well enough to reach the plugin's decoding.
    method = draw(st.sampled_from(["POST"] * 10 + ["GET", "PUT", "DELETE", "HEAD", "BREW", "post", "", "PO ST", "POST\x00"]))
    version = draw(st.sampled_from(["HTTP/1.1"] * 10 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", "", "HTTP/x", "http/1.1"]))
    headers = draw(_headers) if draw(st.booleans()) else [("Host", "plugin")]
    body = draw(_bodies)
    framing = draw(st.sampled_from(["length"] * 3 + ["chunked"] * 2 + ["none"]))  # none: the body reads as the next request
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        pieces, rest = [], body
        while rest:
            n = draw(st.integers(1, max(1, len(rest))))
            pieces.append((draw(_chunk_sizes) % n).encode("latin-1") + b"\r\n" + rest[:n] + b"\r\n")
            rest = rest[n:]
        body = b"".join(pieces) + (b"0\r\n\r\n" if draw(st.booleans()) else b"")
    head = f"{method} {draw(_paths)} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    data = head.encode("latin-1") + body
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # truncated anywhere
    if draw(st.integers(0, 3)) == 0:  # pipelined: a good request right behind the bad one
        data += b"POST /VolumeDriver.List HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{}\n"
    return data


def test_generated_malformed_requests_never_kill_grow_or_wedge_the_agent(agent: AgentProcess) -> None:
    pid = agent.proc.pid
    with PluginClient(agent.socket_path) as c:  # warm up: imports and caches before the baseline
        c.call("VolumeDriver.List", {})
    threads0, rss0 = proc_status(pid)
    seen: Dict[str, int] = {}
    worst = {"rss": rss0, "threads": threads0, "examples": 0}

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(malformed_streams(), st.booleans())
    def exchange(data: bytes, read_answer: bool) -> None:
        worst["examples"] += 1
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(agent.socket_path))

            def send() -> None:  # from a thread: the agent may stop reading part way
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)  # end of input: the agent need not wait for the rest
                except OSError:
                    pass

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            reply = read_to_eof(s, 20) if read_answer else b""
            sender.join(20)
        status = reply[9:12].decode("latin-1") if reply else "closed"
        seen[status] = seen.get(status, 0) + 1
        assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:200]
        assert agent.proc.alive(), agent.proc.log_tail()
        with PluginClient(agent.socket_path, timeout=10) as c:
            r = c.post_raw("/Plugin.Activate", b"")
            assert (r.status, r.body) == (200, {"Implements": ["VolumeDriver"]})
            assert c.call("VolumeDriver.List", {}).body == {"Volumes": [], "Err": ""}
        procs.wait_until(lambda: proc_status(pid)[0] <= threads0, 10, "the agent's connection threads to end")
        threads, rss = proc_status(pid)
        worst["rss"], worst["threads"] = max(worst["rss"], rss), max(worst["threads"], threads)
        assert rss < rss0 + 50 * 1024

    started = time.monotonic()
    exchange()
    print(f"{worst['examples']} generated streams in {time.monotonic() - started:.1f} s; answers {dict(sorted(seen.items()))}; "
          f"agent RSS {rss0} KiB at start, at most {worst['rss']} KiB; threads {threads0}, at most {worst['threads']} after an example")
    log = agent.log()
    assert all(line.isprintable() and len(line) < 1000 for line in log.splitlines())
    assert "s3cr3t" not in log and "connection failed" not in log and "Traceback" not in log
