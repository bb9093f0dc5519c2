"""What the supervisor should do about one mount, decided from facts alone (pure).

The runner gathers an Observation (kernel mount table, tunnel liveness, references,
network namespace) and keeps a Tracking per record (when things started, back-offs);
decide() turns them into actions with reasons, the updated tracking, and the time the
record next needs a look. Nothing here reads files, clocks or processes, so every rule
is table-tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import List, Optional, Tuple

from efsplug.certificate import NOT_BEFORE_SLACK
from efsplug.credentials import shown_source
from efsplug.state import MountRecord

RESTART_TUNNEL = "restart-tunnel"
RENEW_CERT = "renew-certificate"
UNMOUNT = "unmount"
REAP = "reap"

OK = "ok"
TUNNEL_RESTARTING = "tunnel-restarting"
CREDENTIALS_REVOKED = "credentials-revoked"
PENDING_REAP = "unmounted-pending-reap"
CLEANUP_PENDING = "cleanup-pending"  # task gone or volume unreferenced: waiting cleanup_wait
SHARED_TUNNEL = "tunnel-serves-other-mounts"  # its mount is gone, other mounts use the tunnel

# Credential sources that belong to one ECS task: their disappearance means the task is gone.
TASK_SOURCES = ("awscredsuri", "container")


@dataclass(frozen=True)
class Action:
    kind: str
    key: str
    reason: str
    lazy: bool = False  # UNMOUNT only: detach, the server can no longer answer


@dataclass(frozen=True)
class Policy:
    grace: float  # a mount that left the table keeps tunnel/state this long
    settle: float  # a record never seen mounted is a mount in progress this long after mount_time
    cleanup_wait: float  # task gone / unreferenced this long before unmounting
    renewal_interval: float  # renew a certificate at most this long after issuing it
    health_interval: Optional[float]  # probe that the tunnel listens; None: never
    check_interval: float  # how often references and the network namespace are looked at
    backoff_base: float = 10.0  # credential fetch failures
    backoff_max: float = 1800.0
    restart_backoff_base: float = 1.0
    restart_backoff_max: float = 60.0
    poll_interval: float = 1.0


@dataclass(frozen=True)
class Observation:
    mounted: bool  # the kernel shows an NFS mount at the record's mount point
    port_users: Tuple[str, ...] = ()  # mount points whose port= is this record's tunnel port
    tunnel_alive: bool = True
    tunnel_listening: Optional[bool] = None  # None: not probed this time
    netns_present: bool = True
    references: Optional[int] = None  # Docker references; None: not a Docker volume
    # The kernel still has a TCP connection to the tunnel: after an unmount is detached
    # from the table, the NFS client tears its session down through the tunnel.
    kernel_connected: bool = False


@dataclass(frozen=True)
class Tracking:
    seen_mounted: bool = False
    gone_since: Optional[float] = None
    idle_since: Optional[float] = None
    idle_reason: str = ""
    revoked_since: Optional[float] = None
    renew_failures: int = 0
    next_renew_attempt: Optional[float] = None
    restart_failures: int = 0
    next_restart_attempt: Optional[float] = None
    next_health: Optional[float] = None
    next_check: Optional[float] = None
    unmount_requested: bool = False
    reaped: bool = False
    state: str = OK
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    actions: List[Action] = field(default_factory=list)
    tracking: Tracking = field(default_factory=Tracking)
    wake_at: Optional[float] = None  # None: only events concern this record


def _ts(when: Optional[datetime]) -> Optional[float]:
    return None if when is None else when.timestamp()


def needs_certificate(record: MountRecord) -> bool:
    return record.tls and (record.iam or record.access_point is not None)


def renewal_time(record: MountRecord, policy: Policy) -> Optional[float]:
    """When the certificate should be replaced: renewal_interval after issue, and never
    later than two thirds of the way to the earlier of certificate and credential expiry."""
    if not needs_certificate(record) or record.cert_not_before is None or record.cert_not_after is None:
        return None
    issued = _ts(record.cert_not_before + NOT_BEFORE_SLACK)
    deadline = _ts(record.cert_not_after)
    expiry = _ts(record.credential_expiry)
    if expiry is not None:
        deadline = min(deadline, expiry)
    assert issued is not None and deadline is not None
    if deadline <= issued:
        return issued
    return min(issued + policy.renewal_interval, issued + (deadline - issued) * 2 / 3)


def source_kind(record: MountRecord) -> Optional[str]:
    return record.credential_source.partition(":")[0] if record.credential_source else None


def backoff(failures: int, base: float, cap: float) -> float:
    return min(base * 2 ** max(failures - 1, 0), cap)


def _earliest(*times: Optional[float]) -> Optional[float]:
    present = [t for t in times if t is not None]
    return min(present) if present else None


def decide(key: str, record: MountRecord, obs: Observation, track: Tracking, now: float, policy: Policy,
           wall: Optional[float] = None) -> Decision:
    """What to do about one mount. now is the scheduler's clock (monotonic in the supervisor,
    so a clock step cannot fire or stall its timers); wall, the wall clock at the same moment,
    places the record's own times (certificate, mount time) on it. None: now is the wall clock."""
    to_now = 0.0 if wall is None else now - wall
    if track.reaped:
        return Decision([], track, None)
    if obs.mounted:
        track = replace(track, seen_mounted=True)
    refs_held = obs.references is not None and obs.references > 0
    next_check = now + policy.check_interval if (obs.references is not None or record.netns) else None
    track = replace(track, next_check=next_check)
    if not obs.mounted and not obs.port_users:
        return _gone(key, record, track, now, policy, refs_held, obs.kernel_connected, to_now)
    track = replace(track, gone_since=None)
    actions: List[Action] = []
    wakes: List[Optional[float]] = [next_check]
    state, reason = (OK, "") if obs.mounted else (SHARED_TUNNEL, "kept: " + ", ".join(obs.port_users) + " use it")

    if record.tls and record.port is not None:
        broken = None
        if not obs.tunnel_alive:
            broken = "tunnel process is gone"
        elif obs.tunnel_listening is False:
            broken = f"tunnel does not listen on 127.0.0.1:{record.port}"
        if broken is not None:
            state, reason = TUNNEL_RESTARTING, broken
            if track.next_restart_attempt is None or now >= track.next_restart_attempt:
                actions.append(Action(RESTART_TUNNEL, key, broken))
            else:
                wakes.append(track.next_restart_attempt)
        else:
            track = replace(track, restart_failures=0, next_restart_attempt=None)
        if policy.health_interval is not None:
            if obs.tunnel_listening is not None or track.next_health is None:
                track = replace(track, next_health=now + policy.health_interval)
            wakes.append(track.next_health)

    renew_at = renewal_time(record, policy)
    if renew_at is not None:
        renew_at += to_now
        due = max(renew_at, track.next_renew_attempt or renew_at)
        if now >= due:
            actions.append(Action(RENEW_CERT, key, "certificate renewal due" if track.revoked_since is None
                                  else "retrying credentials after back-off"))
        else:
            wakes.append(due)
    if track.revoked_since is not None:
        state, reason = CREDENTIALS_REVOKED, f"credential source {shown_source(record.credential_source)} is gone"

    task_gone = None
    if record.netns and not obs.netns_present:
        task_gone = f"network namespace {record.netns} is gone"
    elif track.revoked_since is not None and source_kind(record) in TASK_SOURCES:
        task_gone = f"task credentials {shown_source(record.credential_source)} were removed"
    idle = None if refs_held else (task_gone or ("no Docker references" if obs.references == 0 else None))
    if idle is None or not obs.mounted:
        track = replace(track, idle_since=None, idle_reason="", unmount_requested=False)
    else:
        if track.idle_since is None:
            track = replace(track, idle_since=now, idle_reason=idle)
        until = track.idle_since + policy.cleanup_wait
        if now >= until and not track.unmount_requested:
            lazy = bool(record.netns) and not obs.netns_present
            actions.append(Action(UNMOUNT, key, f"{idle} for {policy.cleanup_wait:g}s (cleanup wait)", lazy=lazy))
            track = replace(track, unmount_requested=True)
        elif now < until:
            wakes.append(until)
        if state == OK:
            state, reason = CLEANUP_PENDING, idle
    return Decision(actions, replace(track, state=state, reason=reason), _earliest(*wakes))


def _gone(key: str, record: MountRecord, track: Tracking, now: float, policy: Policy, refs_held: bool,
          kernel_connected: bool = False, to_now: float = 0.0) -> Decision:
    """The record's mount left the table and no mount uses its tunnel: reap after the grace."""
    gone_since = track.gone_since if track.gone_since is not None else now
    track = replace(track, gone_since=gone_since, state=PENDING_REAP, reason="not in the mount table")
    if refs_held:
        # A volume Docker still references is never reaped, even if unmounted behind its back.
        return Decision([], replace(track, reason="not mounted, but Docker still references it"), track.next_check)
    due = gone_since + policy.grace
    started = _ts(record.mount_time)
    if not track.seen_mounted and started is not None:
        due = max(due, started + to_now + policy.settle)  # maybe mount.nfs4 is still running
    if now < due:
        return Decision([], track, due)
    if kernel_connected:
        # Stopping the tunnel now would hang the NFS client's teardown (and every later
        # mount of the same server that the kernel puts on that client): look again soon.
        return Decision([], replace(track, reason="the kernel is still connected to the tunnel"),
                        now + policy.poll_interval)
    if track.seen_mounted:
        why = f"mount left the mount table {now - gone_since:.0f}s ago (grace {policy.grace:g}s)"
    else:
        why = "stale record: not mounted and no mount uses its tunnel"
    return Decision([Action(REAP, key, why)], replace(track, reaped=True), None)


# --- outcomes the runner reports back -------------------------------------------------------

def after_restart(track: Tracking, ok: bool, now: float, policy: Policy) -> Tracking:
    if ok:
        return replace(track, restart_failures=0, next_restart_attempt=None, state=OK, reason="")
    failures = track.restart_failures + 1
    wait = backoff(failures, policy.restart_backoff_base, policy.restart_backoff_max)
    return replace(track, restart_failures=failures, next_restart_attempt=now + wait)


def after_renewal(track: Tracking, ok: bool, now: float, policy: Policy, *, revoked: bool = True) -> Tracking:
    """Success clears any revocation; failure backs off exponentially, and marks the
    credentials revoked when their source no longer gives any (revoked=True)."""
    if ok:
        return replace(track, renew_failures=0, next_renew_attempt=None, revoked_since=None)
    failures = track.renew_failures + 1
    wait = backoff(failures, policy.backoff_base, policy.backoff_max)
    since = track.revoked_since if track.revoked_since is not None else (now if revoked else None)
    return replace(track, renew_failures=failures, next_renew_attempt=now + wait, revoked_since=since)


def after_unmount(track: Tracking, ok: bool) -> Tracking:
    return track if ok else replace(track, unmount_requested=False, idle_since=None)


def settle_time(retry_count: int, retry_timeout: float) -> float:
    """Longest a mount.efs can take between writing the record and the kernel mount."""
    return retry_count * (retry_timeout + 5.0) + 30.0


def policy_from(config, cleanup_wait_seconds: float) -> Policy:
    w = config.watchdog
    renewal = float(w.tls_cert_renewal_interval_sec) if w.tls_cert_renewal_interval_sec else w.tls_cert_renewal_interval_min * 60.0
    poll = float(w.poll_interval_sec)
    return Policy(
        grace=float(w.unmount_grace_period_sec),
        settle=settle_time(config.mount.retry_nfs_mount_command_count, config.mount.retry_nfs_mount_command_timeout_sec),
        cleanup_wait=cleanup_wait_seconds,
        renewal_interval=renewal,
        health_interval=w.stunnel_health_check_interval_min * 60.0 if w.stunnel_health_check_enabled else None,
        # References and namespaces only matter once cleanup_wait has passed: look often
        # enough to be late by at most ~5% of it, never more often than the poll interval.
        check_interval=max(poll, min(cleanup_wait_seconds / 20.0, 60.0)),
        backoff_base=max(poll, 10.0),
        poll_interval=poll,
        restart_backoff_base=min(poll, 1.0),
    )

