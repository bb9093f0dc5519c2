"""HelperMounter on the host with a stand-in mount(8): the helper's last word as the Err, a
mount that hangs stopped with its helper (and nothing else), and a daemon left behind by a
helper not holding up a mount that finished. (The real `mount -t nfs4` runs in the guest.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator, List

import psutil
import pytest

from efsplug.agent.mounter import HelperMounter
from efsplug.agent.othertypes import HelperMissing, TypedMount
from efsplug.errors import MountFailure


@pytest.fixture
def pids(tmp_path: Path) -> Iterator[Path]:
    """A file the stand-in writes its children's pids to; whatever still runs is stopped after."""
    path = tmp_path / "pids"
    path.write_text("")
    yield path
    for pid in _read(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read(path: Path) -> List[int]:
    return [int(word) for word in path.read_text().split()]


def mounter(tmp_path: Path, script: str, timeout: float = 30.0) -> HelperMounter:
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    for name, body in (("mount", script), ("mount.nfs4", "exit 0\n")):
        (sbin / name).write_text("#!/bin/sh\n" + body)
        os.chmod(sbin / name, 0o755)
    return HelperMounter(mount=str(sbin / "mount"), helper_dirs=[str(sbin)], mount_timeout=timeout)


def request(tmp_path: Path) -> TypedMount:
    target = tmp_path / "target"
    target.mkdir()
    return TypedMount("nfs4", "203.0.113.49:/", "vers=4.1", str(target))


def test_a_failed_mount_is_the_helpers_last_line(tmp_path: Path) -> None:
    m = mounter(tmp_path, 'echo "$@" > "$(dirname "$0")/argv"\n'
                          'echo "mount.nfs4: trying" >&2\necho "mount.nfs4: access denied by server" >&2\nexit 32\n')
    with pytest.raises(MountFailure) as err:
        m.mount(request(tmp_path))
    assert str(err.value) == "mount -t nfs4 '203.0.113.49:/' failed: mount.nfs4: access denied by server"
    assert (tmp_path / "sbin" / "argv").read_text() == f"-t nfs4 -o vers=4.1 203.0.113.49:/ {tmp_path}/target\n"


def test_a_hanging_mount_is_stopped_with_its_helper_and_nothing_else(tmp_path: Path, pids: Path) -> None:
    # The "helper" stays in mount's process group; the "daemon" has a session of its own, as
    # a helper's proxy does: it is not ours to stop.
    m = mounter(tmp_path, f"sleep 301 & echo $! >> {pids}\nsetsid sleep 302 </dev/null >/dev/null 2>&1 &\n"
                          f"echo $! >> {pids}\nwait\n", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(MountFailure, match=r"^mount -t nfs4 '203.0.113.49:/' did not finish within 0.5s and was "
                                           r"stopped; check that the server is reachable from this host$"):
        m.mount(request(tmp_path))
    assert time.monotonic() - started < 10
    helper, daemon = _read(pids)
    assert not psutil.pid_exists(helper) or psutil.Process(helper).status() == psutil.STATUS_ZOMBIE
    assert psutil.Process(daemon).is_running() and psutil.Process(daemon).status() != psutil.STATUS_ZOMBIE


def test_a_daemon_holding_the_helpers_output_does_not_hold_up_the_mount(tmp_path: Path, pids: Path) -> None:
    m = mounter(tmp_path, f"setsid sleep 303 & echo $! >> {pids}\nexit 0\n")  # inherits stdout and stderr
    started = time.monotonic()
    m.mount(request(tmp_path))
    assert time.monotonic() - started < 10
    assert psutil.Process(_read(pids)[0]).is_running()


def test_a_missing_helper_stops_the_mount_before_mount_runs(tmp_path: Path) -> None:
    m = mounter(tmp_path, f"touch {tmp_path}/ran\n")
    (tmp_path / "sbin" / "mount.nfs4").unlink()
    with pytest.raises(HelperMissing, match="needs the mount.nfs4 helper, which is not installed"):
        m.mount(request(tmp_path))
    assert not (tmp_path / "ran").exists()
