"""procinfo reads what psutil would, for the identities records hold (the pids are real)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from efsplug import procinfo
from efsplug.tunnel import TunnelIdentity


@pytest.mark.parametrize("pid", [1, os.getpid()])
def test_start_time_and_command_line_equal_psutil(pid: int) -> None:
    found = procinfo.facts(pid)
    process = psutil.Process(pid)
    assert found is not None and not found.zombie
    assert found.create_time == pytest.approx(process.create_time(), abs=0.005)
    assert list(found.cmdline) == process.cmdline()


def test_an_identity_taken_here_matches_psutil_and_a_restart_does_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        identity = TunnelIdentity.of(child.pid)
        assert identity.matches(psutil.Process(child.pid)) and identity.running()
        other = TunnelIdentity(child.pid, identity.create_time + 1.0, identity.cmdline)  # a recycled pid
        assert not other.running()
    finally:
        child.stdin.close()
        child.wait()
    assert not identity.running()


def test_a_zombie_is_not_running_and_a_missing_pid_has_no_facts() -> None:
    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        facts = procinfo.facts(child.pid)
        assert facts is not None and facts.zombie
        with pytest.raises(psutil.NoSuchProcess):
            TunnelIdentity.of(child.pid)
    finally:
        child.wait()
    assert procinfo.facts(child.pid) is None
