"""efsplug's daemons (`efsplug agent`, `efsplug supervise`) inside the bed's kernel guest, for tests and the demo."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from typing import Dict, Iterator, List, Mapping, Optional

from efsbed.bed import REPO, Bed
from efsbed.procs import wait_until

STATE = "/var/lib/ecs/data/efsplug-volumes.json"
AGENT_LOG = "/var/log/bed/efsplug-agent.log"
EFSPLUG = str(REPO / ".venv" / "bin" / "efsplug")
PLUGIN_SOCKET = "/run/docker/plugins/amazon-ecs-volume-plugin.sock"


class GuestAgent:
    """`efsplug agent` with its defaults, spawned inside the guest."""

    def __init__(self, bed: Bed, env: Optional[Mapping[str, str]] = None) -> None:
        self.bed = bed
        self.env = env  # added to the guest's environment
        self.pid: Optional[int] = None

    def start(self, timeout: float = 60) -> None:
        self.bed.run(["rm", "-f", AGENT_LOG])
        self.pid = self.bed.guest.spawn([str(REPO / ".venv" / "bin" / "efsplug"), "agent"], log=AGENT_LOG, env=self.env)
        deadline = time.monotonic() + timeout
        while "serving" not in self.log():
            assert self.bed.guest.kill(self.pid, 0), f"the agent exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"the agent did not serve within {timeout}s:\n{self.log()}"
            time.sleep(0.1)  # polling the guest for the agent's first line, bounded

    def log(self) -> str:
        return self.bed.run(["cat", AGENT_LOG]).stdout

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.pid is None:
            return
        self.bed.guest.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while self.bed.guest.kill(self.pid, 0):
            assert time.monotonic() < deadline, "the agent did not exit"
            time.sleep(0.1)  # waiting for the exit, bounded
        self.pid = None

    def state(self) -> Dict[str, dict]:
        return json.loads(self.bed.run(["cat", STATE]).stdout)["volumes"]


@contextlib.contextmanager
def serving_agent(bed: Bed, env: Optional[Mapping[str, str]] = None) -> Iterator[GuestAgent]:
    """The agent serving its plugin socket; afterwards its state, volumes and socket are gone."""
    agent = GuestAgent(bed, env)
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()
        bed.run(["rm", "-rf", "/var/lib/ecs", PLUGIN_SOCKET])


class GuestSupervisor:
    """`efsplug supervise -v` spawned in the guest; kill() waits for it to be gone."""

    LOG = "/var/log/bed/efsplug-supervise.log"

    def __init__(self, bed: Bed, argv: Optional[List[str]] = None, log: str = "") -> None:
        self.bed, self.argv, self.log_path = bed, argv or [EFSPLUG, "supervise", "-v"], log or self.LOG
        self.pid: Optional[int] = None

    def start(self) -> "GuestSupervisor":
        self.bed.run(["rm", "-f", self.log_path])
        self.pid = self.bed.guest.spawn(self.argv, log=self.log_path)
        wait_until(lambda: "supervising" in self.log() or not self.bed.guest.kill(self.pid, 0), 60, "supervisor start")
        assert "supervising" in self.log(), self.log()
        return self

    def log(self) -> str:
        return self.bed.run(["cat", self.log_path]).stdout

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.pid is not None:
            self.bed.guest.kill(self.pid, sig)
            wait_until(lambda: not self.bed.guest.kill(self.pid, 0), 30, "supervisor exit")
            self.pid = None
