"""procinfo reads what psutil would, for the identities records hold (the pids are real)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from typing import Iterator

import psutil
import pytest

from efsplug import procinfo
from efsplug.tunnel import TunnelIdentity


@contextlib.contextmanager
def running_child() -> Iterator[subprocess.Popen]:
    """A child that has run its own code (right after fork+exec its /proc cmdline can still
    read empty, and an identity taken then names no process); ended and reaped on exit."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"
        yield child
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()


@pytest.mark.parametrize("pid", [1, os.getpid()])
def test_start_time_and_command_line_equal_psutil(pid: int) -> None:
    # psutil adds the boot time it read last; read it afresh so both sides use one reading
    # of btime, which a clock step can move by a second between two reads.
    psutil_boot = psutil.boot_time()
    process = psutil.Process(pid)
    found = procinfo.facts(pid)
    assert found is not None and not found.zombie
    ticks = os.sysconf("SC_CLK_TCK")
    assert found.start_ticks / ticks == pytest.approx(process.create_time() - psutil_boot, abs=0.005)
    assert found.create_time == pytest.approx(procinfo.boot_time() + found.start_ticks / ticks, abs=1e-6)
    assert list(found.cmdline) == process.cmdline()


def test_boot_id_is_the_kernels() -> None:
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert procinfo.boot_id() == f.read().strip() != ""


def test_an_identity_survives_a_clock_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """btime moves when the wall clock is stepped (the CI failure: two reads one second
    apart); an identity taken before the step must still name its process after it."""
    with running_child() as child:
        identity = TunnelIdentity.of(child.pid)
        monkeypatch.setattr(procinfo, "_boot_time", procinfo.boot_time() + 1.0)
        assert abs(TunnelIdentity.of(child.pid).create_time - identity.create_time - 1.0) < 1e-6
        assert identity.running() and identity.owns_pid()
        recycled = dataclasses.replace(identity, start_ticks=identity.start_ticks + 1)
        assert not recycled.running() and not recycled.owns_pid()
        other_boot = dataclasses.replace(identity, boot_id="00000000-0000-0000-0000-000000000000")
        assert not other_boot.running()


def test_an_identity_without_start_ticks_compares_by_create_time() -> None:
    """Records written before start_ticks existed still name their tunnel."""
    with running_child() as child:
        taken = TunnelIdentity.of(child.pid)
        old = TunnelIdentity(child.pid, taken.create_time, taken.cmdline)
        assert old.running()
        assert not TunnelIdentity(child.pid, taken.create_time + 1.0, taken.cmdline).running()


def test_an_identity_taken_here_matches_psutil_and_a_restart_does_not() -> None:
    with running_child() as child:
        identity = TunnelIdentity.of(child.pid)
        assert identity.matches(psutil.Process(child.pid)) and identity.running()
        other = dataclasses.replace(identity, start_ticks=identity.start_ticks + 100)  # a recycled pid
        assert not other.running()
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


def test_seconds_running_is_counted_by_the_boot_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Orphan tunnels are aged by it: a wall-clock step must not make a new tunnel look old."""
    with running_child() as child:
        ticks = procinfo.facts(child.pid).start_ticks
        first = procinfo.seconds_running(ticks)
        assert 0.0 <= first < 30.0
        monkeypatch.setattr(procinfo, "_boot_time", procinfo.boot_time() - 3600.0)  # as after a step
        assert first <= procinfo.seconds_running(ticks) < first + 30.0
        assert procinfo.seconds_running(None) == 0.0
