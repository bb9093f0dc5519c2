"""What the plugin does to the kernel: mount, unmount, and ask whether a path is mounted.

Two kinds: EfsMounter for type=efs (the mount helper's library, in process: tunnel, records,
supervision) and HelperMounter for the other types (`mount -t <type>`, the type's own
helper; efsplug owns nothing but the kernel mount). Protocol tests inject others.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any, List, Optional, Protocol, Sequence, Tuple

from efsplug.agent.othertypes import HELPER_DIRS, MOUNT, TypedMount, mount_argv, require_helper
from efsplug.config import Config, load_config
from efsplug.errors import MountFailure, shown
from efsplug.mount import mount_efs
from efsplug.options import MountRequest
from efsplug.unmount import is_mounted, release_leftovers, umount, unmount_efs


class Mounter(Protocol):
    def mount(self, request: Any) -> None:
        """Mount request (the volume's request()) at request.mountpoint, or raise EfsplugError
        (nothing left behind)."""

    def unmount(self, mountpoint: str) -> None:
        """Take the mount down with what was made for it; raise EfsplugError if it stays."""

    def is_mounted(self, mountpoint: str) -> bool:
        """True if the kernel shows a mount at mountpoint (never touches the server)."""


class TypeMounter(Mounter, Protocol):
    def require_helper(self, fs_type: str) -> None:
        """Raise EfsplugError naming the package when mount.<fs_type> is not installed."""


class EfsMounter:
    """The real thing: efsplug.mount.mount_efs and efsplug.unmount.unmount_efs, in process."""

    def __init__(self, config_path: Optional[Path] = None, unmount_timeout: float = 30.0) -> None:
        self.config_path = config_path
        self.unmount_timeout = unmount_timeout

    def config(self) -> Config:
        # Read per call: an operator's edit of efs-utils.conf applies to the next mount,
        # as it does for mount.efs, without restarting the agent.
        return load_config(self.config_path).config

    def mount(self, request: MountRequest) -> None:
        mount_efs(request, self.config())

    def unmount(self, mountpoint: str) -> None:
        # Not lazy first: a plain umount that finishes is the clean case; unmount_efs falls
        # back to a lazy one when the server cannot answer (the task's netns is gone).
        unmount_efs(mountpoint, state_dir=Path(self.config().efsplug.state_dir), timeout=self.unmount_timeout)

    def is_mounted(self, mountpoint: str) -> bool:
        return is_mounted(mountpoint)

    def release_leftovers(self, mountpoint: str) -> List[str]:
        """Nothing mounted at mountpoint: release the tunnel, record and per-mount directory
        that a killed agent's Mount or Unmount of it left (what was released, for the log)."""
        return release_leftovers(mountpoint, state_dir=Path(self.config().efsplug.state_dir))


# Under Docker's 2-minute Mount timeout, so Docker hears our Err rather than its own; an
# unreachable NFS server keeps mount.nfs retrying for 2 minutes by default.
MOUNT_TIMEOUT = 90.0
GROUP_EXIT_WAIT = 5.0  # how long killed helpers may take to be gone before the cleanup check


class HelperMounter:
    """type=nfs, nfs4, s3files: `mount -t <type> -o <o> <device> <target>`, as the ECS plugin does.

    Only the kernel mount is efsplug's: no tunnel, no record, nothing for the supervisor.
    Whatever the helper starts (the S3 Files helper's proxy) stays the helper's business.
    """

    def __init__(self, *, mount: str = MOUNT, helper_dirs: Sequence[str] = HELPER_DIRS,
                 mount_timeout: float = MOUNT_TIMEOUT, unmount_timeout: float = 30.0) -> None:
        self.mount_binary = mount
        self.helper_dirs = tuple(helper_dirs)
        self.mount_timeout = mount_timeout
        self.unmount_timeout = unmount_timeout

    def require_helper(self, fs_type: str) -> None:
        require_helper(fs_type, self.helper_dirs)

    def mount(self, request: TypedMount) -> None:
        self.require_helper(request.fs_type)  # again: it may have been removed since Create
        argv = mount_argv(request, self.mount_binary)
        try:
            rc, stderr = run_bounded(argv, self.mount_timeout)
        except FileNotFoundError:
            raise MountFailure(f"{self.mount_binary} not found; install util-linux") from None
        if rc == 0:
            return
        self._undo(request.mountpoint)
        if rc is None:
            raise MountFailure(
                f"mount -t {request.fs_type} {shown(request.device)} did not finish within {self.mount_timeout:g}s "
                "and was stopped; check that the server is reachable from this host"
            )
        raise MountFailure(f"mount -t {request.fs_type} {shown(request.device)} failed: {last_line(stderr, rc)}")

    def _undo(self, mountpoint: str) -> None:
        # The plugin mounts only where nothing is mounted: a mount here now is this attempt's
        # (a helper stopped after mount(2) succeeded). Lazy: its server may not answer.
        if is_mounted(mountpoint):
            umount(mountpoint, lazy=True, timeout=self.unmount_timeout)

    def unmount(self, mountpoint: str) -> None:
        # Only the kernel mount: no record or tunnel of efsplug's exists for these types.
        if is_mounted(mountpoint):
            umount(mountpoint, timeout=self.unmount_timeout)

    def is_mounted(self, mountpoint: str) -> bool:
        return is_mounted(mountpoint)


def run_bounded(argv: Sequence[str], timeout: float) -> Tuple[Optional[int], str]:
    """(exit status, stderr) of argv; status None if it ran past timeout and was killed.

    Output goes to files, not pipes: a helper that leaves a daemon behind holding its
    stdout would keep a pipe open, and waiting for the pipe's end would wait for the daemon.
    The command runs in a process group of its own, so a timeout stops mount(8) and the
    helper it runs, and nothing else; a daemon the helper put in its own session stays.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            _wait_group_gone(proc.pid, GROUP_EXIT_WAIT)
            rc = None
        return rc, _tail(err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Bounded wait until no process of the group is left (a helper mid-mount(2) finishes
    dying before anyone judges whether it left a mount)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # pragma: no cover - the group's ids were reused by another user
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)  # back-off: the kernel gives no event for a group's last exit
        delay = min(delay * 2, 0.1)


def _tail(f: "IO[bytes]", limit: int = 4096) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - limit))
    return f.read().decode("utf-8", "replace")


def last_line(stderr: str, rc: int) -> str:
    """The helper's last word, printable and bounded; its exit status if it said nothing."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return f"exit status {rc}"
    return "".join(ch if ch.isprintable() else "?" for ch in lines[-1])[:300]
