"""efsplug.autostart on the host: when mount.efs starts efsplug-supervisor, and what it says
when it cannot.

No systemd runs on these machines (PID 1 is the sandbox's own init, testbed.md), so
systemctl is a stand-in script that records its arguments and answers as told; the
supervisor and agent locks are real flocks held by real lock holders. The kernel guest
(test_autostart_guest) runs the whole path: a real mount.efs, and a stand-in that starts
the real supervisor, which then serves the next mount.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import pytest

from efsplug.agent.instancelock import hold_instance_lock
from efsplug.autostart import UNIT, ensure_supervisor
from efsplug.supervisor.lock import SupervisorLock

FIX = f"run systemctl enable --now {UNIT} so IAM certificates are renewed and dead tunnels restarted"


class Host:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.agent_state = root / "ecs" / "efsplug-volumes.json"
        self.systemd = root / "run-systemd-system"
        self.systemd.mkdir()
        self.calls = root / "calls"
        self.systemctl = root / "systemctl"
        self.answer("exit 0")

    def answer(self, body: str) -> None:
        """The stand-in's behaviour after it recorded its arguments."""
        self.systemctl.write_text(f'#!/bin/sh\necho "$*" >> {self.calls}\n{body}\n')
        self.systemctl.chmod(0o755)

    def ensure(self, *, tunnel: bool = True, enabled: bool = True, timeout: Optional[float] = None) -> Optional[str]:
        extra = {} if timeout is None else {"timeout": timeout}
        return ensure_supervisor(self.state_dir, tunnel=tunnel, enabled=enabled, agent_state=self.agent_state,
                                 systemd_runtime=str(self.systemd), systemctl=[str(self.systemctl)], **extra)

    def recorded(self) -> List[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_starts_the_supervisor_when_nothing_supervises(host: Host) -> None:
    assert host.ensure() == f"started {UNIT}: no supervisor was running"
    assert host.recorded() == [f"start --no-block {UNIT}"]


@pytest.mark.parametrize("case", ["no tunnel", "disabled", "no systemd", "supervisor running", "agent running"])
def test_nothing_is_started_when(host: Host, case: str) -> None:
    held = []
    if case == "no systemd":
        host.systemd.rmdir()
    elif case == "supervisor running":
        lock = SupervisorLock(host.state_dir)
        assert lock.try_acquire()
        held.append(lock.close)
    elif case == "agent running":
        fd = hold_instance_lock(host.agent_state)
        held.append(lambda: os.close(fd))
    try:
        assert host.ensure(tunnel=case != "no tunnel", enabled=case != "disabled") is None
        assert host.recorded() == []
    finally:
        for release in held:
            release()
    # The same host with the reason gone does start it: the case above was the only obstacle.
    if case in ("supervisor running", "agent running"):
        assert host.ensure() is not None and host.recorded() == [f"start --no-block {UNIT}"]


def test_a_lock_file_nobody_holds_is_no_supervisor(host: Host) -> None:
    """A supervisor that died leaves its lock file: only a held lock counts."""
    lock = SupervisorLock(host.state_dir)
    assert lock.try_acquire()
    lock.close()
    assert (host.state_dir / "supervisor.lock").exists()
    assert host.ensure() == f"started {UNIT}: no supervisor was running"


def test_systemctl_refusing_is_one_warning_with_its_reason_and_the_fix(host: Host) -> None:
    host.answer(f'echo "Failed to start {UNIT}: Unit {UNIT} not found." >&2\nexit 5')
    assert host.ensure() == f"warning: cannot start {UNIT}: Failed to start {UNIT}: Unit {UNIT} not found.; {FIX}"


def test_systemctl_saying_nothing_is_named_by_its_status(host: Host) -> None:
    host.answer("exit 3")
    assert host.ensure() == f"warning: cannot start {UNIT}: exit status 3; {FIX}"


def test_a_long_answer_is_cut(host: Host) -> None:
    host.answer(f'printf "%0500d\\n" 0 >&2\nexit 1')
    said = host.ensure()
    assert said is not None and f": {'0' * 200}; {FIX}" in said and "0" * 201 not in said


def test_no_systemctl_is_a_warning(host: Host) -> None:
    host.systemctl.unlink()
    assert host.ensure() == f"warning: cannot start {UNIT}: no systemctl at {host.systemctl}; {FIX}"


def test_a_hung_systemctl_is_stopped_at_the_bound(host: Host) -> None:
    host.answer(f"echo $$ > {host.root / 'pid'}\nexec sleep 60")
    assert host.ensure(timeout=0.5) == f"warning: cannot start {UNIT}: systemctl did not answer within 0.5s; {FIX}"
    pid = int((host.root / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: nothing of it outlives mount.efs
