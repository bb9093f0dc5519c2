"""The kernel mount: mount.nfs4 (inside the task's network namespace when asked), with retries.

EFS answers a fresh TLS connection with "Connection reset by peer" while a mount target
warms up, and an access point's IAM decision can take a moment to propagate ("access
denied"), so those two, and only those, are retried with back-off.

Through a tunnel, mount.nfs4 alone cannot say why a mount fails; the tunnel's log can
(efsplug.tunnellog). While mount.nfs4 runs, that log is watched so a mount the server
keeps refusing fails in about a second instead of at the timeout.

mount.efs imports this module even when a resident efsplug prepared its mount, so it
imports little: no subprocess (efsplug.spawn), typing, re or collections.
"""

from __future__ import annotations

import os
import sys
import time

from efsplug.errors import MountFailure
from efsplug.interrupt import Interrupted
from efsplug.spawn import Child

TYPE_CHECKING = False  # typing is not imported at run time: mount.efs pays for every import
if TYPE_CHECKING:
    from typing import List, Optional, Sequence, Tuple

    from efsplug.tunnellog import TunnelVerdict

MOUNT_NFS4 = "/sbin/mount.nfs4"  # mount(8) may run helpers with a minimal PATH
_POLL_MAX = 0.1


class NfsMount:
    """One mount.nfs4 run to make. A plain class, not a dataclass or named tuple: mount.efs
    imports this module even when a resident efsplug prepared its mount, and dataclasses,
    typing or collections alone would cost it milliseconds."""

    __slots__ = ("source", "mountpoint", "options", "netns", "flags", "access_point", "tunnel_log",
                 "tunnel_service", "target", "identity")

    def __init__(self, source: str, mountpoint: str, options: str, netns: Optional[str] = None,
                 flags: Sequence[str] = (), access_point: Optional[str] = None, tunnel_log: Optional[str] = None,
                 tunnel_service: Optional[str] = None, target: str = "the mount target",
                 identity: Optional[str] = None) -> None:
        self.source = source  # 127.0.0.1:/path through a tunnel, or <dns name or ip>:/path without TLS
        self.mountpoint, self.options, self.netns = mountpoint, options, netns
        self.flags = tuple(flags)  # mount(8) flags passed on: -n, -s, -v
        self.access_point = access_point
        self.tunnel_log = tunnel_log  # the tunnel's log, when mounting through one
        self.tunnel_service = tunnel_service  # its section's name when that log is a shared process's
        self.target = target  # where the tunnel connects, for messages
        self.identity = identity  # "IAM identity <source> (access key <id>)"; never a secret

    def __repr__(self) -> str:
        return f"NfsMount({', '.join(f'{name}={getattr(self, name)!r}' for name in self.__slots__)})"


def retryable(stderr: str, *, access_point: bool) -> bool:
    text = stderr.lower()
    return "connection reset by peer" in text or (access_point and "access denied" in text)


def explain(stderr: str, mount: NfsMount) -> str:
    """mount.nfs4's last line, plus what an operator should check for the failures we know."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    text = stderr.lower()
    if "no such device" in text:
        hint = "this kernel has no NFS client; load the nfs module (modprobe nfs)"
    elif "access denied" in text and mount.identity:
        where = f"access point {mount.access_point}" if mount.access_point else "the file system"
        hint = (f"the server refused {mount.identity}; check that the credentials are valid and current and "
                f"that the file system policy allows them to mount {where}")
    elif "access denied" in text and mount.access_point:
        hint = f"check that access point {mount.access_point} exists and the IAM policy allows ClientMount"
    elif "access denied" in text:
        hint = ("the file system policy may require IAM authorization (mount with -o tls,iam); also check "
                "that the path exists on the file system")
    elif "timed out" in text or "connection refused" in text:
        hint = "check that the mount target's security group allows TCP 2049 from this host"
    elif "does not exist" in text and "mount point" in text:
        hint = f"create the mount point first: mkdir -p {mount.mountpoint}"
    else:
        hint = "see the kernel log (dmesg) for details"
    return f"mount.nfs4 failed: {last}; {hint}"


def _tunnel_verdict(mount: NfsMount, since: int) -> TunnelVerdict:
    from efsplug.tunnellog import verdict_since  # re and all: only once mount.nfs4 takes a while

    return verdict_since(mount, since)


def _diagnosis(verdict: TunnelVerdict, mount: NfsMount) -> Optional[str]:
    from efsplug.tunnellog import tunnel_diagnosis

    return tunnel_diagnosis(verdict, mount)


def _log_size(mount: NfsMount) -> int:
    try:
        return os.stat(mount.tunnel_log).st_size if mount.tunnel_log else 0
    except OSError:
        return 0


class AttemptTimedOut(MountFailure):
    """One mount.nfs4 run did not finish in time: a stalled mount target may recover, so it is retried."""


def _run_attempt(argv: List[str], mount: NfsMount, timeout: float) -> Tuple[int, str, str]:
    """One mount.nfs4 run, (status, stdout, stderr); stopped early when the tunnel shows the
    server refusing us."""
    since = _log_size(mount)
    if mount.netns:
        from efsplug.netns import opened

        with opened(mount.netns) as ns_fd:
            child = Child(argv, netns_fd=ns_fd)
    else:
        child = Child(argv)
    deadline = time.monotonic() + timeout
    delay = 0.02
    try:
        while True:
            remaining = deadline - time.monotonic()
            done = child.wait(max(0.0, min(delay, remaining)))
            if done is not None:
                return done
            verdict = _tunnel_verdict(mount, since)
            if verdict.hopeless:
                raise MountFailure(_diagnosis(verdict, mount) or "the server refused every connection")
            if remaining <= 0:
                cause = _diagnosis(verdict, mount)
                raise AttemptTimedOut(cause or (
                    f"mount.nfs4 did not finish within {timeout:g}s; the server is not answering: check the "
                    "tunnel and that the mount target's security group allows TCP 2049"
                ))
            delay = min(delay * 2, _POLL_MAX)
    finally:
        child.kill()  # if it still runs: mount.nfs4 holds no state of its own, the kernel drops the attempt


def mount_nfs(mount: NfsMount, *, attempts: int, attempt_timeout: float, verbose: bool = False) -> None:
    """Run mount.nfs4, retrying retryable failures and timed-out attempts up to attempts times in all.

    A timed-out attempt is retried as efs-utils retries it: a mount target that stalls for
    longer than one attempt and then recovers still gets mounted, on the same tunnel.
    """
    argv: List[str] = [MOUNT_NFS4, mount.source, mount.mountpoint, *mount.flags, "-o", mount.options]
    delay = 0.5
    attempts = max(attempts, 1)
    for attempt in range(1, attempts + 1):
        try:
            done = _run_attempt(argv, mount, attempt_timeout)
        except FileNotFoundError:
            raise MountFailure("mount.nfs4 not found; install nfs-utils (nfs-common on Debian)") from None
        except AttemptTimedOut as exc:
            if attempt == attempts:
                raise MountFailure(f"{exc} (after {attempts} attempts)") from None
            if verbose:
                print(f"mount.efs: retrying mount.nfs4 (attempt {attempt} timed out after {attempt_timeout:g}s)")
            continue  # the attempt itself waited: no back-off on top
        status, _, stderr = done
        if status == 0:
            return
        if attempt == attempts or not retryable(stderr, access_point=bool(mount.access_point)):
            cause = _diagnosis(_tunnel_verdict(mount, 0), mount)
            raise MountFailure(cause or explain(stderr, mount))
        if verbose:
            print(f"mount.efs: retrying mount.nfs4 ({stderr.strip()})")
        time.sleep(delay)  # back-off: the server told us to come back, there is no event to wait on
        delay = min(delay * 2, 5.0)


def finish_mount(mount: NfsMount, *, attempts: int, attempt_timeout: float, verbose: bool,
                 port: Optional[int]) -> None:
    """mount_nfs for a prepared mount, as mount.efs runs it (also for a mount a resident efsplug
    prepared, without importing the rest of the mount machinery).

    A signal (Interrupted) may land after mount.nfs4 made the mount: the kernel decides. A
    made mount keeps its tunnel and record (stopping them would hang it); else the
    Interrupted goes on, and the caller undoes what was prepared.
    """
    try:
        mount_nfs(mount, attempts=attempts, attempt_timeout=attempt_timeout, verbose=verbose)
    except Interrupted:
        if port is not None and mounted_through(mount.mountpoint, port):
            print(f"mount.efs: a signal arrived after {mount.mountpoint} was mounted; the mount is kept",
                  file=sys.stderr)
            return
        raise


def mounted_through(mountpoint: str, port: int) -> bool:
    from efsplug.mounttable import read_mounts

    return any(m.mountpoint == os.path.normpath(mountpoint) and m.is_nfs and m.port == port for m in read_mounts())
