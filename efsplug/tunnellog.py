"""What a tunnel's log says about a mount's connections (stunnel's own words, pure).

Through a tunnel, mount.nfs4 alone cannot say why a mount fails: the kernel sees its
connections to 127.0.0.1 closed and keeps reconnecting until the attempt times out. The
tunnel's log can: it records whether the mount target was unreachable, failed the
certificate check, or accepted TLS and then closed every connection unanswered (the
mount target refusing the IAM identity). efsplug.nfs reads it while mount.nfs4 runs; the
doctor reads it for a mount that failed.

Imported only once mount.nfs4 has run for a moment (or failed): a mount that succeeds at
once never pays for `re` and `collections`.
"""

from __future__ import annotations

import re
from collections import namedtuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

    from efsplug.nfs import NfsMount

# Connections the server closed right after our first bytes, with no answer and no
# connection answered in between: a refusal, not a warming-up mount target.
REFUSALS_BEFORE_GIVING_UP = 12
_LOG_TAIL_BYTES = 64 * 1024

_CLOSED = re.compile(r"Connection [a-z/]+: (\d+) byte\(s\) sent to TLS, (\d+) byte\(s\) sent to socket")
_CONNECT_FAILED = re.compile(r"s_connect: connect (\S+: .+)")  # not "s_connect: connected <ip>"
_CERT_PROBLEM = re.compile(r"(CERT: .*|Rejected by CERT.*|certificate verify failed.*)")
_CONNECTION = re.compile(r"(?:^|\s)LOG[0-7]\[([0-9]+)\]: ")  # the connection a line is about ("[ui]": none)
_TLS_ALERT = re.compile(r"SSL_connect: .*?:([^:]+)$")


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


def verdict_since(mount: NfsMount, since: int) -> TunnelVerdict:
    """The verdict over what the tunnel logged after offset since (this attempt only)."""
    if mount.tunnel_log is None:
        return TunnelVerdict()
    try:
        with open(mount.tunnel_log, "rb") as f:
            f.seek(max(since, f.seek(0, 2) - _LOG_TAIL_BYTES))
            return read_tunnel_log(f.read().decode(errors="replace"), mount.tunnel_service)
    except OSError:
        return TunnelVerdict()
