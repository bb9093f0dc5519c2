"""The kernel mount: mount.nfs4 (inside the task's network namespace when asked), with retries.

EFS answers a fresh TLS connection with "Connection reset by peer" while a mount target
warms up, and an access point's IAM decision can take a moment to propagate ("access
denied"), so those two, and only those, are retried with back-off.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from efsplug.errors import MountFailure
from efsplug.netns import opened, preexec_entering

MOUNT_NFS4 = "/sbin/mount.nfs4"  # mount(8) may run helpers with a minimal PATH


@dataclass(frozen=True)
class NfsMount:
    source: str  # 127.0.0.1:/path through a tunnel, or <dns name or ip>:/path without TLS
    mountpoint: str
    options: str
    netns: Optional[str] = None
    flags: Sequence[str] = ()  # mount(8) flags passed on: -n, -s, -v
    access_point: Optional[str] = None


def retryable(stderr: str, *, access_point: bool) -> bool:
    text = stderr.lower()
    return "connection reset by peer" in text or (access_point and "access denied" in text)


def explain(stderr: str, mount: NfsMount) -> str:
    """mount.nfs4's last line, plus what an operator should check for the failures we know."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    text = stderr.lower()
    if "no such device" in text:
        hint = "this kernel has no NFS client; load the nfs module (modprobe nfs)"
    elif "access denied" in text and mount.access_point:
        hint = f"check that access point {mount.access_point} exists and the IAM policy allows ClientMount"
    elif "access denied" in text:
        hint = "check the file system policy, and that the path exists on the file system"
    elif "timed out" in text or "connection refused" in text:
        hint = "check that the mount target's security group allows TCP 2049 from this host"
    elif "does not exist" in text and "mount point" in text:
        hint = f"create the mount point first: mkdir -p {mount.mountpoint}"
    else:
        hint = "see the kernel log (dmesg) for details"
    return f"mount.nfs4 failed: {last}; {hint}"


def mount_nfs(mount: NfsMount, *, attempts: int, attempt_timeout: float, verbose: bool = False) -> None:
    """Run mount.nfs4, retrying retryable failures up to attempts times in all."""
    argv: List[str] = [MOUNT_NFS4, mount.source, mount.mountpoint, *mount.flags, "-o", mount.options]
    delay = 0.5
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            with contextlib.ExitStack() as stack:
                ns_fd = stack.enter_context(opened(mount.netns)) if mount.netns else None
                done = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=attempt_timeout,
                    preexec_fn=preexec_entering(ns_fd),
                )
        except subprocess.TimeoutExpired:
            raise MountFailure(
                f"mount.nfs4 did not finish within {attempt_timeout:g}s; the server is not answering: check the "
                "tunnel and that the mount target's security group allows TCP 2049"
            ) from None
        except FileNotFoundError:
            raise MountFailure("mount.nfs4 not found; install nfs-utils (nfs-common on Debian)") from None
        if done.returncode == 0:
            return
        if attempt == attempts or not retryable(done.stderr, access_point=bool(mount.access_point)):
            raise MountFailure(explain(done.stderr, mount))
        if verbose:
            print(f"mount.efs: retrying mount.nfs4 ({done.stderr.strip()})")
        time.sleep(delay)  # back-off: the server told us to come back, there is no event to wait on
        delay = min(delay * 2, 5.0)
