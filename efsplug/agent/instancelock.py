"""One agent per state file: an exclusive flock on `<state file>.lock`, held for life.

Two agents on one state file would each write their own view of the volumes over the
other's and unmount each other's mounts. The second one to start refuses, in one line
naming the holder's pid; the kernel drops the lock when the holder exits, crash included,
so there is never a stale lock to clean up by hand.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from efsplug.errors import EfsplugError

DIR_MODE = 0o700
_MAX_PID_TEXT = 32


class AgentAlreadyRunning(EfsplugError):
    pass


def lock_path(state_path: Path) -> Path:
    return Path(state_path).with_name(Path(state_path).name + ".lock")


def hold_instance_lock(state_path: Path) -> int:
    """Take the lock or raise AgentAlreadyRunning; returns the descriptor (keep it open)."""
    path = lock_path(state_path)
    if not path.parent.is_dir():
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, _MAX_PID_TEXT, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "another process"
        raise AgentAlreadyRunning(
            f"another efsplug agent ({who}) already uses the state file {state_path}; stop it first "
            "(systemctl stop amazon-ecs-volume-plugin) or pass another --state"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
