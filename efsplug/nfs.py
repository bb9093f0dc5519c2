"""The kernel mount: mount.nfs4 (inside the task's network namespace when asked), with retries.

EFS answers a fresh TLS connection with "Connection reset by peer" while a mount target
warms up, and an access point's IAM decision can take a moment to propagate ("access
denied"), so those two, and only those, are retried with back-off.

Through a tunnel, mount.nfs4 alone cannot say why a mount fails: the kernel sees its
connections to 127.0.0.1 closed and keeps reconnecting until the attempt times out. The
tunnel's log can: it records whether the mount target was unreachable, failed the
certificate check, or accepted TLS and then closed every connection unanswered (the
mount target refusing the IAM identity). While mount.nfs4 runs, that log is watched so a
mount the server keeps refusing fails in about a second instead of at the timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections import namedtuple

from efsplug.errors import MountFailure
from efsplug.interrupt import Interrupted
from efsplug.netns import opened, preexec_entering

TYPE_CHECKING = False  # typing is not imported at run time: mount.efs pays for every import
if TYPE_CHECKING:
    from typing import List, Optional, Sequence

MOUNT_NFS4 = "/sbin/mount.nfs4"  # mount(8) may run helpers with a minimal PATH
# Connections the server closed right after our first bytes, with no answer and no
# connection answered in between: a refusal, not a warming-up mount target.
REFUSALS_BEFORE_GIVING_UP = 12
_POLL_MAX = 0.1
_LOG_TAIL_BYTES = 64 * 1024

_CLOSED = re.compile(r"Connection [a-z/]+: (\d+) byte\(s\) sent to TLS, (\d+) byte\(s\) sent to socket")
_CONNECT_FAILED = re.compile(r"s_connect: connect (\S+: .+)")  # not "s_connect: connected <ip>"
_CERT_PROBLEM = re.compile(r"(CERT: .*|Rejected by CERT.*|certificate verify failed.*)")
_CONNECTION = re.compile(r"(?:^|\s)LOG[0-7]\[([0-9]+)\]: ")  # the connection a line is about ("[ui]": none)
_TLS_ALERT = re.compile(r"SSL_connect: .*?:([^:]+)$")


# Named tuples, not dataclasses or typing.NamedTuple: mount.efs imports this module even
# when a resident efsplug prepared its mount, and dataclasses or typing alone cost it
# milliseconds.
class NfsMount(namedtuple("NfsMount", [
    "source",  # str: 127.0.0.1:/path through a tunnel, or <dns name or ip>:/path without TLS
    "mountpoint", "options",  # str
    "netns",  # Optional[str]
    "flags",  # Sequence[str]: mount(8) flags passed on: -n, -s, -v
    "access_point",  # Optional[str]
    "tunnel_log",  # Optional[str]: the tunnel's log, when mounting through one
    "tunnel_service",  # Optional[str]: its section's name when that log is a shared process's
    "target",  # str: where the tunnel connects, for messages
    "identity",  # Optional[str]: "IAM identity <source> (access key <id>)"; never a secret
], defaults=(None, (), None, None, None, "the mount target", None))):
    __slots__ = ()


class TunnelVerdict(namedtuple("TunnelVerdict", [
    "refused",  # int: closed by the server after the handshake, without an answer
    "failed",  # closed before any byte went through: unreachable, or the handshake failed
    "answered",  # connections that carried replies: the server does talk to us
    "connect_error", "cert_error", "tls_error",  # Optional[str]: the first reason of each kind
], defaults=(0, 0, 0, None, None, None))):
    """What the tunnel's log says about the connections made so far (pure)."""

    __slots__ = ()

    @property
    def hopeless(self) -> bool:
        return self.answered == 0 and self.refused + self.failed >= REFUSALS_BEFORE_GIVING_UP


def read_tunnel_log(text: str, service: Optional[str] = None) -> TunnelVerdict:
    """Count stunnel's per-connection outcomes; keep the first reason of each kind.

    service: in a log shared by several tunnels (tunnel_process = shared), only the
    connections that section accepted count; stunnel numbers connections per process.
    """
    counts = {"refused": 0, "failed": 0, "answered": 0}
    reasons: dict = {}
    lines = text.splitlines()
    if service is not None:
        accepted = f"]: Service [{service}] accepted connection"
        ours = {m.group(1) for line in lines if accepted in line and (m := _CONNECTION.search(line))}
        lines = [line for line in lines if (m := _CONNECTION.search(line)) and m.group(1) in ours]
    for line in lines:
        line = line.rstrip()
        closed = _CLOSED.search(line)
        if closed:
            to_tls, to_socket = int(closed.group(1)), int(closed.group(2))
            counts["answered" if to_socket else ("refused" if to_tls else "failed")] += 1
            continue
        for kind, pattern in (("connect_error", _CONNECT_FAILED), ("cert_error", _CERT_PROBLEM),
                              ("tls_error", _TLS_ALERT)):
            found = pattern.search(line)
            if found:
                reasons.setdefault(kind, found.group(1).strip())
                break
    return TunnelVerdict(**counts, **reasons)


def tunnel_diagnosis(verdict: TunnelVerdict, mount: NfsMount) -> Optional[str]:
    """The cause an operator can act on, from the tunnel's point of view; None if it saw none."""
    if verdict.answered:
        return None  # the server talks to us: the NFS layer's own error is the one to show
    if verdict.cert_error:
        return (
            f"the TLS tunnel rejected {mount.target}'s certificate ({verdict.cert_error}); check stunnel_cafile "
            "in efs-utils.conf (or cafile=) and that the file system's DNS name matches the certificate"
        )
    if verdict.refused:
        who = mount.identity or "this client (no IAM identity was sent)"
        where = f"access point {mount.access_point}" if mount.access_point else "the file system"
        return (
            f"the mount target {mount.target} refused {who}: it closed the TLS connection unanswered "
            f"{verdict.refused} times; check that the credentials are valid and current and that the "
            f"file system policy allows them to mount {where}"
        )
    if verdict.connect_error:
        return (
            f"the TLS tunnel cannot reach {mount.target} port 2049 ({verdict.connect_error}); check that the "
            "mount target's security group allows TCP 2049 from this host"
        )
    if verdict.tls_error:
        return (
            f"the TLS handshake with {mount.target} failed ({verdict.tls_error}); check the tunnel settings "
            "(stunnel_cafile, verify, ocsp) in efs-utils.conf"
        )
    return None


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
    """The verdict over what the tunnel logged after offset since (this attempt only)."""
    if mount.tunnel_log is None:
        return TunnelVerdict()
    try:
        with open(mount.tunnel_log, "rb") as f:
            f.seek(max(since, f.seek(0, 2) - _LOG_TAIL_BYTES))
            return read_tunnel_log(f.read().decode(errors="replace"), mount.tunnel_service)
    except OSError:
        return TunnelVerdict()


def _log_size(mount: NfsMount) -> int:
    try:
        return os.stat(mount.tunnel_log).st_size if mount.tunnel_log else 0
    except OSError:
        return 0


class AttemptTimedOut(MountFailure):
    """One mount.nfs4 run did not finish in time: a stalled mount target may recover, so it is retried."""


def _run_attempt(argv: List[str], mount: NfsMount, timeout: float) -> "subprocess.CompletedProcess[str]":
    """One mount.nfs4 run; stopped early when the tunnel shows the server refusing us."""
    since = _log_size(mount)
    with contextlib.ExitStack() as stack:
        ns_fd = stack.enter_context(opened(mount.netns)) if mount.netns else None
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=preexec_entering(ns_fd),
        )
    deadline = time.monotonic() + timeout
    delay = 0.02
    try:
        while True:
            remaining = deadline - time.monotonic()
            try:
                out, err = proc.communicate(timeout=max(0.0, min(delay, remaining)))
                return subprocess.CompletedProcess(argv, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                pass
            verdict = _tunnel_verdict(mount, since)
            if verdict.hopeless:
                raise MountFailure(tunnel_diagnosis(verdict, mount) or "the server refused every connection")
            if remaining <= 0:
                cause = tunnel_diagnosis(verdict, mount)
                raise AttemptTimedOut(cause or (
                    f"mount.nfs4 did not finish within {timeout:g}s; the server is not answering: check the "
                    "tunnel and that the mount target's security group allows TCP 2049"
                ))
            delay = min(delay * 2, _POLL_MAX)
    finally:
        if proc.poll() is None:
            proc.kill()  # mount.nfs4 holds no state of its own: the kernel drops the attempt
            proc.communicate()


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
        if done.returncode == 0:
            return
        if attempt == attempts or not retryable(done.stderr, access_point=bool(mount.access_point)):
            cause = tunnel_diagnosis(_tunnel_verdict(mount, 0), mount)
            raise MountFailure(cause or explain(done.stderr, mount))
        if verbose:
            print(f"mount.efs: retrying mount.nfs4 ({done.stderr.strip()})")
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
        if port is not None and _mounted_through(mount.mountpoint, port):
            print(f"mount.efs: a signal arrived after {mount.mountpoint} was mounted; the mount is kept",
                  file=sys.stderr)
            return
        raise


def _mounted_through(mountpoint: str, port: int) -> bool:
    from efsplug.mounttable import read_mounts

    return any(m.mountpoint == os.path.normpath(mountpoint) and m.is_nfs and m.port == port for m in read_mounts())
