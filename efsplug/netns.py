"""Network namespaces: run a child process (tunnel, mount.nfs4) inside the task's namespace.

setns(2) for a network namespace changes only the calling thread, so it is done in the
forked child just before exec (preexec), where there is exactly one thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable, Optional

from efsplug.errors import MountFailure

CLONE_NEWNET = 0x40000000


def check_namespace(path: str) -> None:
    """Fail early, with the fix, when a netns= path is not a network namespace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountFailure(
            f"netns {path}: {exc.strerror}; pass the task's namespace, e.g. /proc/<pid>/ns/net of its pause container"
        ) from None
    try:
        _setns_check(fd)
    finally:
        os.close(fd)


def _setns_check(fd: int) -> None:
    # A namespace file is a nsfs inode; anything else is refused by the kernel at setns time,
    # which in a preexec would only surface as an opaque exec failure. Compare the link text.
    target = os.readlink(f"/proc/self/fd/{fd}")
    if not target.startswith("net:["):
        raise MountFailure(f"netns: {target} is not a network namespace; pass /proc/<pid>/ns/net or /var/run/netns/<name>")


def enter(path: str) -> None:
    """Move the calling (single-threaded) process into the network namespace at path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, CLONE_NEWNET)  # Python >= 3.12
            return
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def preexec_for(path: Optional[str]) -> Optional[Callable[[], None]]:
    """A preexec_fn for subprocess that enters path, or None without a namespace."""
    if not path:
        return None
    _libc()  # load libc before fork: nothing should be resolved in the child

    def _enter() -> None:
        enter(path)

    return _enter


_LIBC: Optional[ctypes.CDLL] = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC
