"""[cloudwatch-log] on the host against a real CloudWatch Logs API (moto in server mode), and
against a stalled one (a socket that accepts and never answers).

The sink in process; the real `mount.efs` (a mount that fails before NFS: the host has no NFS
server) and the real `efsplug agent` as processes. Network safety as in test_mount_host.py:
only loopback, IMDS disabled, the region in the config, moto's dummy keys in the environment.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from botocore.exceptions import ClientError

from efsbed import procs
from efsbed.agent_harness import EFSPLUG, PluginClient
from efsbed.aws import DUMMY_ENV, MotoServer, client
from efsbed.bed import MOUNT_EFS
from efsplug import cloudwatch as cw
from efsplug import logsink
from efsplug.config import parse_config

REGION = "eu-west-1"
FS = "fs-12345678"
CREDS = "/v2/credentials/7d1c5e0f-secret-path"
SAFE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
    **DUMMY_ENV,
}


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory, tag: str) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto"), tag=tag) as server:
        yield server


class StalledEndpoint:
    """Accepts connections and never answers; stop() closes them and the listener."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.held: List[socket.socket] = []
        self.accepted = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # stop() shut the listener down
            self.held.append(conn)
            self.accepted.set()

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._thread.join(10)
        self.listener.close()
        for conn in self.held:
            conn.close()

    def __enter__(self) -> "StalledEndpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def logs(moto: MotoServer):
    return client("logs", moto.endpoint_url, REGION)


def messages(moto: MotoServer, group: str, stream: str) -> List[str]:
    try:
        answer = logs(moto).get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            return []  # not made yet
        raise
    return [e["message"] for e in answer["events"]]


def retention(moto: MotoServer, group: str) -> Optional[int]:
    (found,) = [g for g in logs(moto).describe_log_groups(logGroupNamePrefix=group)["logGroups"]
                if g["logGroupName"] == group]
    return found.get("retentionInDays")


def unique_group() -> str:
    return f"/efsplug/test/{os.urandom(4).hex()}"


# --- the sink in process ---------------------------------------------------------------------

def test_events_arrive_with_the_retention_policy(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in DUMMY_ENV.items():  # botocore's default chain reads the process environment
        monkeypatch.setenv(key, value)
    template = unique_group() + "/{fs_id}"
    config = parse_config(f"[mount]\nregion = {REGION}\n[cloudwatch-log]\nenabled = true\n"
                          f"log_group_name = {template}\nretention_in_days = 30\n").config
    env = {"AWS_ENDPOINT_URL_LOGS": moto.endpoint_url, "AWS_EC2_METADATA_DISABLED": "true"}
    sink = logsink.start_sink(config, fs_id=FS, environ=env)
    assert sink is not None
    sink.emit("first line")
    sink.emit("awscredsuri=" + CREDS)
    report = sink.close(20)
    group = template.replace("{fs_id}", FS)
    assert (report.sent, report.missing, report.notes) == (2, 0, ())
    assert report.destination == f"{group} / {FS} - mount.log ({REGION})"
    assert messages(moto, group, f"{FS} - mount.log") == ["first line", "awscredsuri=<redacted>"]
    assert retention(moto, group) == 30


def test_a_stalled_endpoint_does_not_hold_the_sink_beyond_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in DUMMY_ENV.items():
        monkeypatch.setenv(key, value)
    config = parse_config(f"[mount]\nregion = {REGION}\n[cloudwatch-log]\nenabled = true\n").config
    with StalledEndpoint() as stalled:
        sink = logsink.start_sink(config, fs_id=FS, environ={"AWS_ENDPOINT_URL_LOGS": stalled.url,
                                                        "AWS_EC2_METADATA_DISABLED": "true"})
        assert sink is not None
        sink.emit("Successfully mounted")
        assert stalled.accepted.wait(20), "the sink never called the endpoint"
        started = time.monotonic()
        report = sink.close(1.0)
        took = time.monotonic() - started
    assert took < 1.5
    assert (report.sent, report.unsent) == (0, 1)
    assert "no answer within 1 s (CreateLogGroup in progress)" in (report.warning() or "")


# --- mount.efs ---------------------------------------------------------------------------------

def run_mount(tmp_path: Path, config_tail: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    """A mount that fails fast (the mount point is a file): exit 32 whatever CloudWatch does."""
    config = tmp_path / "efs-utils.conf"
    config.write_text(f"[mount]\nregion = {REGION}\n[efsplug]\nstate_dir = {tmp_path / 'state'}\n" + config_tail)
    (tmp_path / "home").mkdir(exist_ok=True)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    full_env = {**SAFE_ENV, "HOME": str(tmp_path / "home"), "EFSPLUG_CONFIG": str(config), **env}
    return subprocess.run([str(MOUNT_EFS), FS, str(not_a_dir), "-o", f"tls,iam,awscredsuri={CREDS}"],
                          env=full_env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_mount_failure_line_arrives(moto: MotoServer, tmp_path: Path) -> None:
    group = unique_group()
    tail = f"[cloudwatch-log]\nenabled = true\nlog_group_name = {group}\nretention_in_days = 14\n"
    for attempt in (1, 2):  # the second finds group and stream made (ResourceAlreadyExistsException)
        res = run_mount(tmp_path, tail, {"AWS_ENDPOINT_URL_LOGS": moto.endpoint_url})
        assert res.returncode == 32, res.stderr
        assert res.stderr.splitlines() == [f"mount.efs: mount point '{tmp_path / 'file'}' is not a directory; "
                                           "create it with mkdir -p"]
        got = messages(moto, group, f"{FS} - mount.log")
        assert len(got) == attempt
    assert got[0] == (f"Mount failed, {FS}:/ at {tmp_path / 'file'}: mount point '{tmp_path / 'file'}' is not a "
                      "directory; create it with mkdir -p (exit 32)")
    assert retention(moto, group) == 14


def test_mount_with_cloudwatch_unreachable_keeps_its_exit_code(tmp_path: Path) -> None:
    tail = "[cloudwatch-log]\nenabled = true\n"
    plain = run_mount(tmp_path, "", {})
    with StalledEndpoint() as stalled:
        started = time.monotonic()
        res = run_mount(tmp_path, tail, {"AWS_ENDPOINT_URL_LOGS": stalled.url})
        took = time.monotonic() - started
    assert res.returncode == plain.returncode == 32
    lines = res.stderr.splitlines()
    assert lines[0] == plain.stderr.strip()
    assert len(lines) == 2, res.stderr
    assert re.fullmatch(
        r"mount\.efs: warning: CloudWatch Logs: 1 of 1 event not delivered( to .*)? \((no answer within 3 s "
        r"\((setup|CreateLogGroup) in progress\)|CreateLogGroup: no answer from 127\.0\.0\.1:\d+ \(ReadTimeoutError\))\);"
        r" the mount is not affected", lines[1]), lines[1]
    assert took < logsink.FLUSH_TIMEOUT + 5, took  # the bounded flush, plus the process's own start
    assert "7d1c5e0f" not in res.stderr


# --- the agent ---------------------------------------------------------------------------------

def test_agent_requests_and_supervisor_go_to_the_agent_stream(moto: MotoServer, tmp_path: Path, tag: str) -> None:
    group = unique_group()
    config = tmp_path / "efs-utils.conf"
    config.write_text(f"[mount]\nregion = {REGION}\n[efsplug]\nstate_dir = {tmp_path / 'efs-state'}\n"
                      f"[cloudwatch-log]\nenabled = true\nlog_group_name = {group}\n")
    socket_path = tmp_path / "plugins" / "efs-cw.sock"
    argv = [str(EFSPLUG), "agent", "--socket", str(socket_path), "--state", str(tmp_path / "data" / "volumes.json"),
            "--volumes-root", str(tmp_path / "volumes"), "--config", str(config)]
    env = {**os.environ, **SAFE_ENV, "HOME": str(tmp_path), "AWS_ENDPOINT_URL_LOGS": moto.endpoint_url}
    agent = procs.start("agent", argv, tag=tag, log=tmp_path / "agent.log", env=env)
    log = tmp_path / "agent.log"
    stream = "default - efsplug-agent.log"  # no instance id: IMDS is off
    try:
        procs.wait_until(lambda: "serving" in log.read_text(), 20, "the agent to serve", process=agent)
        with PluginClient(socket_path) as c:
            assert c.call("Plugin.Activate").status == 200
            opts = {"type": "efs", "device": FS, "o": f"tls,iam,awscredsuri={CREDS}"}
            assert c.call("VolumeDriver.Create", {"Name": "cw1", "Opts": opts}).body == {"Err": ""}
            assert c.call("VolumeDriver.Remove", {"Name": "cw1"}).body == {"Err": ""}
        got = procs.wait_until(lambda: [m for m in messages(moto, group, stream) if "VolumeDriver.Remove" in m]
                               and messages(moto, group, stream), 20, "the Remove line in CloudWatch Logs",
                               process=agent)
    finally:
        agent.stop()
    assert any(m.startswith("endpoint=Plugin.Activate volume=- ") and m.endswith("outcome=ok") for m in got), got
    assert any(m.startswith("endpoint=VolumeDriver.Create volume=cw1 ") for m in got), got
    assert any(m.startswith("supervisor INFO supervising efs mounts under ") for m in got), got
    assert not any("7d1c5e0f" in m for m in messages(moto, group, stream))
    assert re.search(r"efsplug agent: CloudWatch Logs: (\d+) of \1 events delivered to ", log.read_text()), log.read_text()
