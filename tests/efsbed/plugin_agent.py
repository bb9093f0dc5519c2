"""`efsplug agent` with its defaults, running inside the bed's kernel guest (tests and demo)."""

from __future__ import annotations

import json
import signal
import time
from typing import Dict, Optional

from efsbed.bed import REPO, Bed

STATE = "/var/lib/ecs/data/efsplug-volumes.json"
AGENT_LOG = "/var/log/bed/efsplug-agent.log"


class GuestAgent:
    """`efsplug agent` with its defaults, spawned inside the guest."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        self.pid: Optional[int] = None

    def start(self, timeout: float = 60) -> None:
        self.bed.run(["rm", "-f", AGENT_LOG])
        self.pid = self.bed.guest.spawn([str(REPO / ".venv" / "bin" / "efsplug"), "agent"], log=AGENT_LOG)
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
