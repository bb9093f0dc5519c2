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
from efsplug.autostart import AGENT_UNIT, UNIT, SystemPaths, ensure_supervisor
from efsplug.supervisor.lock import SupervisorLock

FIX = f"run systemctl enable --now {UNIT} so IAM certificates are renewed and dead tunnels restarted"
IS_ACTIVE = f"is-active --quiet {AGENT_UNIT}"
START = f"start --no-block --job-mode=fail {UNIT}"


class Host:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.calls = root / "calls"
        self.systemctl = root / "systemctl"
        self.paths = SystemPaths(systemd_runtime=str(root / "run-systemd-system"), systemctl=(str(self.systemctl),),
                                 agent_state=root / "ecs" / "efsplug-volumes.json",
                                 agent_wanted=str(root / "multi-user.target.wants" / AGENT_UNIT))
        os.mkdir(self.paths.systemd_runtime)
        self.answer()

    def answer(self, is_active: str = "exit 3", start: str = "exit 0") -> None:
        """The stand-in: it records its arguments, then answers each command as told
        (is-active: 3 is "inactive", what systemctl says of a stopped unit)."""
        self.systemctl.write_text(f'#!/bin/sh\necho "$*" >> {self.calls}\n'
                                  f'case "$1" in is-active) {is_active} ;; start) {start} ;; esac\nexit 99\n')
        self.systemctl.chmod(0o755)

    def ensure(self, *, tunnel: bool = True, enabled: bool = True, timeout: Optional[float] = None) -> Optional[str]:
        extra = {} if timeout is None else {"timeout": timeout}
        return ensure_supervisor(self.state_dir, tunnel=tunnel, enabled=enabled, paths=self.paths, **extra)

    def recorded(self) -> List[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_starts_the_supervisor_when_nothing_supervises(host: Host) -> None:
    assert host.ensure() == f"started {UNIT}: no supervisor was running"
    assert host.recorded() == [IS_ACTIVE, START]


@pytest.mark.parametrize("case", ["no tunnel", "disabled", "no systemd", "supervisor running", "agent running",
                                  "agent enabled", "agent active"])
def test_nothing_is_started_when(host: Host, case: str) -> None:
    undo = []
    if case == "no systemd":
        os.rmdir(host.paths.systemd_runtime)
    elif case == "supervisor running":
        lock = SupervisorLock(host.state_dir)
        assert lock.try_acquire()
        undo.append(lock.close)
    elif case == "agent running":
        assert host.paths.agent_state is not None
        fd = hold_instance_lock(host.paths.agent_state)
        undo.append(lambda: os.close(fd))
    elif case == "agent enabled":  # what `systemctl enable` leaves: a symlink to the unit
        wanted = Path(host.paths.agent_wanted)
        wanted.parent.mkdir()
        wanted.symlink_to(f"/etc/systemd/system/{AGENT_UNIT}")
        undo.append(wanted.unlink)
    elif case == "agent active":
        host.answer(is_active="exit 0")
        undo.append(host.answer)
    try:
        assert host.ensure(tunnel=case != "no tunnel", enabled=case != "disabled") is None
        assert START not in host.recorded()
    finally:
        for step in undo:
            step()
    # The same host with the reason gone does start it: the case above was the only obstacle.
    if case not in ("no tunnel", "disabled", "no systemd"):
        assert host.ensure() is not None and host.recorded()[-1] == START


def test_a_lock_file_nobody_holds_is_no_supervisor(host: Host) -> None:
    """A supervisor that died leaves its lock file: only a held lock counts."""
    lock = SupervisorLock(host.state_dir)
    assert lock.try_acquire()
    lock.close()
    assert (host.state_dir / "supervisor.lock").exists()
    assert host.ensure() == f"started {UNIT}: no supervisor was running"


def test_systemctl_refusing_is_one_warning_with_its_reason_and_the_fix(host: Host) -> None:
    """What systemd says when the start would reverse a queued start of the agent (--job-mode=fail)."""
    said = (f"Failed to start {UNIT}: Transaction for {UNIT}/start is destructive "
            f"({AGENT_UNIT} has 'start' job queued, but 'stop' is included in transaction).")
    host.answer(start=f'echo "{said}" >&2; exit 1')
    assert host.ensure() == f"warning: cannot start {UNIT}: {said}; {FIX}"


def test_systemctl_saying_nothing_is_named_by_its_status(host: Host) -> None:
    host.answer(start="exit 3")
    assert host.ensure() == f"warning: cannot start {UNIT}: exit status 3; {FIX}"


def test_a_long_answer_is_cut(host: Host) -> None:
    host.answer(start='printf "%0500d\\n" 0 >&2; exit 1')
    said = host.ensure()
    assert said is not None and f": {'0' * 300}; {FIX}" in said and "0" * 301 not in said


def test_no_systemctl_is_a_warning(host: Host) -> None:
    host.systemctl.unlink()
    assert host.ensure() == f"warning: cannot start {UNIT}: no systemctl at {host.systemctl}; {FIX}"


@pytest.mark.parametrize("step", ["is-active", "start"])
def test_a_hung_systemctl_is_stopped_at_the_bound(host: Host, step: str) -> None:
    hang = f"echo $$ > {host.root / 'pid'}; exec sleep 60"
    host.answer(**{step.replace("-", "_"): hang})
    assert host.ensure(timeout=0.5) == f"warning: cannot start {UNIT}: systemctl did not answer within 0.5s; {FIX}"
    pid = int((host.root / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: nothing of it outlives mount.efs
