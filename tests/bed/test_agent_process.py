"""`efsplug agent` as a process: one per state file, and signals that must not stop it."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import pytest

from efsbed import procs
from efsbed.agent_harness import EFSPLUG, AgentProcess, PluginClient, start_agent


@pytest.fixture
def agent(tmp_path: Path, tag: str) -> Iterator[AgentProcess]:
    """An agent of this test alone (conftest's module `tag` checks that none outlives the module)."""
    a = start_agent(tmp_path, tag=tag)
    try:
        yield a
    finally:
        a.proc.stop()


def test_a_second_agent_on_the_same_state_file_refuses_and_touches_nothing(
        agent: AgentProcess, tmp_path: Path, tag: str) -> None:
    """Even on another socket: two agents on one state file would overwrite each other's volumes."""
    with PluginClient(agent.socket_path) as c:
        assert c.call("VolumeDriver.Create", {"Name": "kept", "Opts": {"device": "fs-12345678", "o": "tls"}}).status == 200
    before = agent.state_path.read_bytes()
    other_socket = tmp_path / "plugins" / "other.sock"
    argv = [str(EFSPLUG), "agent", "--socket", str(other_socket), "--state", str(agent.state_path),
            "--volumes-root", str(tmp_path / "volumes"), "--no-supervisor"]
    proc = procs.start("agent-dup", argv, tag=tag, log=tmp_path / "dup.log")
    try:
        assert proc.popen.wait(30) == 1
    finally:
        proc.stop()
    lines = (tmp_path / "dup.log").read_text().splitlines()
    assert lines == [f"efsplug agent: another efsplug agent (pid {agent.proc.pid}) already uses the state file "
                     f"{agent.state_path}; stop it first (systemctl stop amazon-ecs-volume-plugin) or pass another --state"]
    assert not other_socket.exists() and agent.state_path.read_bytes() == before
    with PluginClient(agent.socket_path) as c:
        assert [v["Name"] for v in c.call("VolumeDriver.List", {}).body["Volumes"]] == ["kept"]


def test_the_lock_goes_with_the_agent_even_after_kill_9(agent: AgentProcess, tmp_path: Path, tag: str) -> None:
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.popen.wait(30)
    again = start_agent(tmp_path, tag=tag, name="agent-again")
    try:
        with PluginClient(again.socket_path) as c:
            assert c.call("VolumeDriver.List", {}).status == 200
    finally:
        again.proc.stop()


def test_sighup_is_logged_and_ignored(agent: AgentProcess) -> None:
    os.kill(agent.proc.pid, signal.SIGHUP)
    procs.wait_until(lambda: "SIGHUP ignored" in agent.log(), 20, "the agent to log the SIGHUP", process=agent.proc)
    with PluginClient(agent.socket_path) as c:
        assert c.call("VolumeDriver.List", {}).status == 200
    assert agent.proc.alive()
