"""Network namespaces: run a child process (tunnel, mount.nfs4) inside the task's namespace.

setns(CLONE_NEWNET) moves only the calling thread. In a forked child, between fork and
exec, that thread is the whole process, so the child enters the namespace in a preexec
function; the namespace file is opened (and errors reported) in the parent, before the fork.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

from efsplug.errors import MountFailure, shown

TYPE_CHECKING = False  # typing is not imported at run time: mount.efs pays for every import
if TYPE_CHECKING:
    from typing import Callable, Iterator, Optional

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


def netns_path(netns: str) -> str:
    """A namespace given as a path (/proc/<pid>/ns/net) or an `ip netns` name."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its CLONE_NEW* type (Linux >= 4.11)


def check_namespace(netns: str) -> None:
    """Fail early, with the fix, when netns= does not name a network namespace.

    Asks the kernel (NS_GET_NSTYPE) rather than reading the fd's link: an `ip netns`
    file is a bind mount whose link reads as its path, not "net:[...]".
    """
    with opened(netns) as fd:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = None
    if kind != CLONE_NEWNET:
        raise MountFailure(f"netns {shown(netns)} is not a network namespace; pass /proc/<pid>/ns/net or an ip-netns name")


def open_namespace(netns: str) -> int:
    """The namespace file, open (close it). Only a regular file is opened (a namespace file
    is one), and without blocking: opening a FIFO would hang the mount (and the volume's
    lock) forever, and opening some devices has effects of its own (a watchdog starts)."""
    path = netns_path(netns)
    hint = "pass the task's namespace, e.g. /proc/<pid>/ns/net of its pause container"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise MountFailure(f"netns {shown(netns)} is not a network namespace; {hint}")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise MountFailure(f"netns {path}: {exc.strerror}; {hint}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped after the check above
        os.close(fd)
        raise MountFailure(f"netns {shown(netns)} is not a network namespace; {hint}")
    return fd


@contextlib.contextmanager
def opened(netns: str) -> Iterator[int]:
    fd = open_namespace(netns)
    try:
        yield fd
    finally:
        os.close(fd)


def setns_function() -> Callable[[int, int], None]:
    """setns(2): os.setns on Python >= 3.12, else libc through ctypes (resolved before any fork)."""
    if hasattr(os, "setns"):
        return os.setns  # type: ignore[attr-defined]
    import ctypes  # here: only namespace mounts need it, and mount.efs imports this module

    libc_setns = ctypes.CDLL(None, use_errno=True).setns

    def setns(fd: int, nstype: int) -> None:
        if libc_setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return setns


def preexec_entering(fd: Optional[int]) -> Optional[Callable[[], None]]:
    """A preexec_fn that enters the namespace open at fd; None when there is none."""
    if fd is None:
        return None
    setns = setns_function()

    def enter() -> None:
        setns(fd, CLONE_NEWNET)

    return enter
