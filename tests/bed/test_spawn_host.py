"""efsplug.spawn with real children: output and status captured, waits bounded, killed
children reaped, nothing leaked, and a child started inside another network namespace
while the caller's thread stays where it was."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from efsplug.spawn import MAX_OUTPUT, Child


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def leaked(before: set) -> set:
    """Descriptors opened since `before` and still open. Only new ones count: another
    test's server thread may close one of its own meanwhile."""
    return open_fds() - before


def gone(pid: int) -> bool:
    """Reaped: not even a zombie of ours is left to wait for."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_status_and_both_streams_are_captured() -> None:
    before = open_fds()
    child = Child(["/bin/sh", "-c", "echo out; echo err >&2; read x; echo \"stdin:$x\"; exit 3"])
    assert child.wait(30) == (3, "out\nstdin:\n", "err\n")  # stdin is /dev/null: read gets EOF
    assert gone(child.pid) and not leaked(before)
    child.kill()  # after the exit: nothing to do, and no error
    assert child.returncode == 3


def test_a_child_still_running_is_none_then_killed_and_reaped() -> None:
    before = open_fds()
    child = Child(["/bin/sleep", "60"])
    assert child.wait(0.05) is None
    assert child.wait(0) is None
    child.kill()
    assert child.returncode == -9 and gone(child.pid) and not leaked(before)


def test_a_child_killed_by_a_signal_has_a_negative_status() -> None:
    child = Child(["/bin/sh", "-c", "kill -TERM $$"])
    assert child.wait(30) == (-15, "", "")


def test_output_past_the_bound_is_dropped_and_never_blocks_the_child() -> None:
    size = 4 * MAX_OUTPUT  # more than a pipe holds: the child finishes only if it is read
    child = Child(["/bin/sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo done >&2"])
    status, out, err = child.wait(30) or (None, "", "")
    assert status == 0 and out == "x" * MAX_OUTPUT and err == "done\n"


def test_a_missing_program_raises_and_leaks_nothing(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(FileNotFoundError):
        Child([str(tmp_path / "mount.nfs4")])
    assert not leaked(before)


@pytest.fixture
def other_netns() -> Iterator[str]:
    """A network namespace held by a process of ours (stopped by pid after)."""
    holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "echo in; exec sleep 300"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"in\n"  # unshare has run
        path = f"/proc/{holder.pid}/ns/net"
        assert os.readlink(path) != os.readlink("/proc/self/ns/net")
        yield path
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_child_starts_in_the_namespace_and_the_caller_stays(other_netns: str) -> None:
    ours = os.readlink("/proc/self/ns/net")
    before = open_fds()
    fd = os.open(other_netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        child = Child(["/bin/readlink", "/proc/self/ns/net"], netns_fd=fd)
    finally:
        os.close(fd)
    status, out, _ = child.wait(30) or (None, "", "")
    assert status == 0 and out.strip() == os.readlink(other_netns) != ours
    assert os.readlink(f"/proc/self/task/{threading.get_native_id()}/ns/net") == ours
    assert not leaked(before)


def test_a_namespace_that_cannot_be_entered_fails_in_the_caller(tmp_path: Path) -> None:
    not_a_namespace = tmp_path / "plain"
    not_a_namespace.write_text("")
    fd = os.open(not_a_namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError):
            Child(["/bin/true"], netns_fd=fd)
    finally:
        os.close(fd)
