"""Exactly one supervisor per state directory: an flock on <state_dir>/supervisor.lock.

The agent supervises in process and `efsplug supervise` runs standalone; whichever comes
second blocks in flock() (no polling) and takes over the moment the first one exits,
crash included, because the kernel drops the lock with the holder's file.
The holder writes its pid in the file, and on a second line what it runs with (one line
of JSON, for `efsplug status`): written with the lock, it always describes the holder.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Callable, Optional

from efsplug.fsutil import ensure_dir

LOCK_NAME = "supervisor.lock"
_MAX_READ = 64 * 1024


class SupervisorLock:
    def __init__(self, state_dir: Path, dir_mode: int = 0o750, about: str = "") -> None:
        assert "\n" not in about
        self.about = about
        self.path = ensure_dir(state_dir, dir_mode) / LOCK_NAME
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.acquired = threading.Event()
        self._waiter: Optional[threading.Thread] = None

    def try_acquire(self) -> bool:
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._mark()
        return True

    def acquire_in_background(self, on_acquired: Callable[[], None]) -> None:
        """Block in flock() on a helper thread; call on_acquired once the lock is ours.

        close() cancels the wait: a lock granted to a closed file is dropped at once.
        """
        fd = self._fd

        def wait() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
            except OSError:
                return  # closed under us: we are shutting down
            if self._fd == fd:
                self._mark()
                on_acquired()

        self._waiter = threading.Thread(target=wait, name="efsplug-supervisor-lock", daemon=True)
        self._waiter.start()

    def _mark(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        lines = [str(os.getpid())] + ([self.about] if self.about else [])
        os.pwrite(self._fd, ("\n".join(lines) + "\n").encode(), 0)
        self.acquired.set()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self.acquired.clear()


def lock_held(path: Path) -> bool:
    """True if a process holds an flock on path. Probed with a shared lock, dropped at once:
    a supervisor taking it meanwhile only waits in flock(), as it would for its peer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def supervised(state_dir: Path) -> bool:
    """True if a supervisor holds <state_dir>'s lock."""
    return lock_held(Path(state_dir) / LOCK_NAME)


def holder_about(state_dir: Path) -> Optional[str]:
    """The second line of the lock file (what its holder runs with), or None."""
    try:
        with open(Path(state_dir) / LOCK_NAME, "rb") as f:
            lines = f.read(_MAX_READ).decode("utf-8", "replace").split("\n")
    except OSError:
        return None
    return lines[1] if len(lines) > 2 and lines[1] else None
