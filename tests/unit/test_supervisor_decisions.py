"""The supervisor's pure decisions, rule by rule (no processes, no files)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from efsplug.config import parse_config
from efsplug.state import MountRecord
from efsplug.supervisor import decisions as d
from efsplug.supervisor.decisions import Observation, Policy, Tracking, decide

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
NOW = T0.timestamp()
POLICY = Policy(grace=30, settle=120, cleanup_wait=600, renewal_interval=3600, health_interval=300, check_interval=30)


def rec(**over) -> MountRecord:
    base = dict(fs_id="fs-0123456789abcdef0", mountpoint="/mnt/efs", port=20049, tls=True, mount_time=T0 - timedelta(hours=1))
    base.update(over)
    return MountRecord(**base)


def iam_rec(**over) -> MountRecord:
    issued = T0 - timedelta(minutes=10)
    fields = dict(iam=True, credential_source="awscredsuri:/v2/credentials/abc",
                  cert_not_before=issued - timedelta(minutes=15), cert_not_after=issued + timedelta(hours=3))
    fields.update(over)
    return rec(**fields)


def kinds(decision: d.Decision):
    return [(a.kind, a.lazy) for a in decision.actions]


MOUNTED = Observation(mounted=True)
SEEN = Tracking(seen_mounted=True)


# --- tunnel health ---------------------------------------------------------------------

@pytest.mark.parametrize("obs, expected, state", [
    (MOUNTED, [], d.OK),
    (replace(MOUNTED, tunnel_alive=False), [(d.RESTART_TUNNEL, False)], d.TUNNEL_RESTARTING),
    (replace(MOUNTED, tunnel_listening=False), [(d.RESTART_TUNNEL, False)], d.TUNNEL_RESTARTING),
    (replace(MOUNTED, tunnel_listening=True), [], d.OK),
    # The mount is gone but another mount's traffic flows through this tunnel: keep it alive.
    (Observation(mounted=False, port_users=("/mnt/other",), tunnel_alive=False), [(d.RESTART_TUNNEL, False)],
     d.TUNNEL_RESTARTING),
    (Observation(mounted=False, port_users=("/mnt/other",)), [], d.SHARED_TUNNEL),
])
def test_tunnel_health(obs, expected, state):
    decision = decide("k", rec(), obs, SEEN, NOW, POLICY)
    assert kinds(decision) == expected
    assert decision.tracking.state == state


def test_no_tunnel_rules_without_tls():
    decision = decide("k", rec(tls=False, port=None), replace(MOUNTED, tunnel_alive=False), SEEN, NOW, POLICY)
    assert decision.actions == [] and decision.wake_at is None


def test_failed_restart_backs_off_then_retries():
    track = d.after_restart(SEEN, False, NOW, POLICY)
    dead = replace(MOUNTED, tunnel_alive=False)
    waiting = decide("k", rec(), dead, track, NOW + 0.5, POLICY)
    assert waiting.actions == [] and waiting.wake_at == NOW + 1.0
    assert kinds(decide("k", rec(), dead, track, NOW + 1.0, POLICY)) == [(d.RESTART_TUNNEL, False)]
    track2 = d.after_restart(track, False, NOW + 1, POLICY)
    assert track2.next_restart_attempt == NOW + 3.0
    assert d.after_restart(track2, True, NOW + 3, POLICY).restart_failures == 0


def test_health_probe_is_scheduled():
    first = decide("k", rec(), MOUNTED, SEEN, NOW, POLICY)
    assert first.tracking.next_health == NOW + 300 and first.wake_at == NOW + 300
    probed = decide("k", rec(), replace(MOUNTED, tunnel_listening=True), first.tracking, NOW + 300, POLICY)
    assert probed.tracking.next_health == NOW + 600


# --- certificates and credentials ------------------------------------------------------

def test_renewal_time_is_the_interval_after_issue():
    r = iam_rec()
    assert d.renewal_time(r, POLICY) == (T0 - timedelta(minutes=10)).timestamp() + 3600


def test_renewal_well_before_credential_expiry():
    issued = (T0 - timedelta(minutes=10)).timestamp()
    r = iam_rec(credential_expiry=T0 + timedelta(minutes=5))  # 15 min after issue
    assert d.renewal_time(r, POLICY) == pytest.approx(issued + 600)  # two thirds of the way
    r = iam_rec(credential_expiry=T0 - timedelta(hours=1))  # already expired: at once
    assert d.renewal_time(r, POLICY) == issued


@pytest.mark.parametrize("record", [rec(), rec(iam=True), rec(access_point="fsap-0123456789abcdef0", tls=False)])
def test_no_renewal_without_a_certificate(record):
    assert d.renewal_time(record, POLICY) is None


def test_access_point_certificate_is_renewed_too():
    r = iam_rec(iam=False, access_point="fsap-0123456789abcdef0", credential_source=None)
    assert d.renewal_time(r, POLICY) is not None


def test_renew_when_due_and_sleep_until_then():
    r = iam_rec()
    due = d.renewal_time(r, POLICY)
    before = decide("k", r, MOUNTED, SEEN, due - 1, POLICY)
    assert before.actions == [] and before.wake_at == due
    assert kinds(decide("k", r, MOUNTED, SEEN, due, POLICY)) == [(d.RENEW_CERT, False)]


# The supervisor schedules on a monotonic clock (MONO below) and passes the wall clock
# beside it: the record's wall-clock times are placed on the monotonic axis.
MONO = 5000.0


def test_renewal_is_placed_on_the_monotonic_clock():
    r = iam_rec()
    due = d.renewal_time(r, POLICY)
    before = decide("k", r, MOUNTED, SEEN, MONO, POLICY, wall=due - 40)
    assert before.actions == [] and before.wake_at == MONO + 40
    assert kinds(decide("k", r, MOUNTED, SEEN, MONO + 40, POLICY, wall=due)) == [(d.RENEW_CERT, False)]


@pytest.mark.parametrize("step", [-3600.0, -1.0, 1.0, 3600.0])
def test_a_clock_step_moves_no_timer_of_the_supervisors_own(step: float):
    """The cleanup wait, the reaping grace and back-offs run on the monotonic clock: a wall
    clock stepped by an hour, either way, neither fires them early nor holds them back."""
    idle = Observation(mounted=True, references=0)
    waiting = decide("k", rec(), idle, SEEN, MONO, POLICY, wall=NOW)
    assert waiting.actions == [] and waiting.wake_at == MONO + POLICY.check_interval
    stepped = decide("k", rec(), idle, waiting.tracking, MONO + 599, POLICY, wall=NOW + 599 + step)
    assert stepped.actions == []
    assert kinds(decide("k", rec(), idle, stepped.tracking, MONO + 600, POLICY, wall=NOW + 600 + step)) == \
        [(d.UNMOUNT, False)]
    gone = decide("k", rec(), Observation(mounted=False), SEEN, MONO, POLICY, wall=NOW)
    assert gone.actions == [] and gone.wake_at == MONO + POLICY.grace
    assert decide("k", rec(), Observation(mounted=False), gone.tracking, MONO + 29, POLICY,
                  wall=NOW + 29 + step).actions == []


def test_a_mount_in_progress_settles_on_the_monotonic_clock():
    r = rec(mount_time=T0)  # mount.efs wrote the record at NOW (wall)
    first = decide("k", r, Observation(mounted=False), Tracking(), MONO, POLICY, wall=NOW)
    assert first.actions == [] and first.wake_at == MONO + POLICY.settle


def test_revoked_credentials_back_off_and_show():
    r = iam_rec(cert_not_before=T0 - timedelta(hours=4), cert_not_after=T0 + timedelta(minutes=1))
    track = SEEN
    attempts = []
    now = NOW
    while now < NOW + 3600:
        decision = decide("k", r, MOUNTED, track, now, POLICY)
        track = decision.tracking
        if any(a.kind == d.RENEW_CERT for a in decision.actions):
            attempts.append(now - NOW)
            track = d.after_renewal(track, False, now, POLICY)
        now += 1
    assert attempts[:5] == [0, 10, 30, 70, 150]  # exponential back-off: a bounded number of requests
    assert len(attempts) <= 10
    assert track.state == d.CREDENTIALS_REVOKED and "awscredsuri" in track.reason
    healed = d.after_renewal(track, True, now, POLICY)
    assert healed.revoked_since is None and healed.renew_failures == 0


def test_backoff_is_capped():
    assert d.backoff(50, 10, 1800) == 1800


# --- cleanup: task gone, unreferenced ---------------------------------------------------

def run_until(record, obs, track, start, end, step=1.0):
    now, actions = start, []
    while now <= end:
        decision = decide("k", record, obs, track, now, POLICY)
        track = decision.tracking
        actions += [(now - start, a) for a in decision.actions]
        now += step
    return actions, track


def test_unreferenced_volume_is_unmounted_after_cleanup_wait():
    obs = replace(MOUNTED, references=0)
    actions, track = run_until(rec(), obs, SEEN, NOW, NOW + 700)
    assert [(t, a.kind, a.lazy) for t, a in actions] == [(600, d.UNMOUNT, False)]
    assert "no Docker references" in actions[0][1].reason


def test_referenced_volume_is_never_unmounted_nor_reaped():
    actions, _ = run_until(rec(), replace(MOUNTED, references=2), SEEN, NOW, NOW + 5000, step=50)
    assert actions == []
    gone = Observation(mounted=False, references=1)
    actions, track = run_until(rec(), gone, SEEN, NOW, NOW + 5000, step=50)
    assert actions == [] and track.state == d.PENDING_REAP


def test_reference_taken_again_resets_the_wait():
    track = decide("k", rec(), replace(MOUNTED, references=0), SEEN, NOW, POLICY).tracking
    track = decide("k", rec(), replace(MOUNTED, references=1), track, NOW + 500, POLICY).tracking
    assert track.idle_since is None
    assert decide("k", rec(), replace(MOUNTED, references=0), track, NOW + 700, POLICY).actions == []


def test_vanished_netns_unmounts_lazily_after_cleanup_wait():
    r = rec(netns="/proc/4242/ns/net")
    actions, _ = run_until(r, replace(MOUNTED, netns_present=False), SEEN, NOW, NOW + 700)
    assert [(t, a.kind, a.lazy) for t, a in actions] == [(600, d.UNMOUNT, True)]
    assert "network namespace" in actions[0][1].reason


def test_revoked_task_credentials_mean_the_task_is_gone():
    r = iam_rec()
    track = replace(SEEN, revoked_since=NOW, next_renew_attempt=NOW + 10_000, renew_failures=1)
    actions, _ = run_until(r, MOUNTED, track, NOW, NOW + 700)
    assert [(t, a.kind) for t, a in actions] == [(600, d.UNMOUNT)]


def test_revoked_instance_role_is_not_a_task_ending():
    r = iam_rec(credential_source="instance")
    track = replace(SEEN, revoked_since=NOW, next_renew_attempt=NOW + 10_000, renew_failures=1)
    actions, track = run_until(r, MOUNTED, track, NOW, NOW + 700)
    assert actions == [] and track.state == d.CREDENTIALS_REVOKED


def test_failed_unmount_starts_the_wait_again():
    track = replace(SEEN, unmount_requested=True, idle_since=NOW)
    assert d.after_unmount(track, False).unmount_requested is False
    assert d.after_unmount(track, True) == track


def test_plain_host_mount_is_left_alone():
    actions, track = run_until(rec(), MOUNTED, SEEN, NOW, NOW + 5000, step=100)
    assert actions == [] and track.state == d.OK


# --- reaping ----------------------------------------------------------------------------

def test_mount_gone_is_reaped_after_grace_once():
    gone = Observation(mounted=False)
    actions, track = run_until(rec(), gone, SEEN, NOW, NOW + 100)
    assert [(t, a.kind) for t, a in actions] == [(30, d.REAP)]
    assert "grace 30s" in actions[0][1].reason and track.reaped


def test_mount_back_before_grace_is_kept():
    track = decide("k", rec(), Observation(mounted=False), SEEN, NOW, POLICY).tracking
    assert track.state == d.PENDING_REAP
    track = decide("k", rec(), MOUNTED, track, NOW + 10, POLICY).tracking
    assert track.gone_since is None
    assert decide("k", rec(), Observation(mounted=False), track, NOW + 35, POLICY).actions == []


def test_record_of_a_mount_in_progress_is_not_reaped():
    r = rec(mount_time=T0)
    actions, _ = run_until(r, Observation(mounted=False), Tracking(), NOW, NOW + 119)
    assert actions == []
    actions, _ = run_until(r, Observation(mounted=False), Tracking(), NOW, NOW + 125)
    assert [(t, a.kind) for t, a in actions] == [(120, d.REAP)]
    assert "stale record" in actions[0][1].reason


def test_stale_record_at_start_is_reaped_after_grace():
    actions, _ = run_until(rec(), Observation(mounted=False), Tracking(), NOW, NOW + 40)
    assert [(t, a.kind) for t, a in actions] == [(30, d.REAP)]


def test_tunnel_used_by_another_mount_is_not_reaped():
    obs = Observation(mounted=False, port_users=("/mnt/second",))
    actions, track = run_until(rec(), obs, SEEN, NOW, NOW + 1000, step=10)
    assert actions == [] and track.state == d.SHARED_TUNNEL
    actions, _ = run_until(rec(), Observation(mounted=False), track, NOW + 1000, NOW + 1040)
    assert [a.kind for _, a in actions] == [d.REAP]


def test_reaped_record_does_nothing_more():
    decision = decide("k", rec(), Observation(mounted=False), Tracking(reaped=True), NOW, POLICY)
    assert decision.actions == [] and decision.wake_at is None


# --- policy from configuration ---------------------------------------------------------

def test_policy_from_config():
    config = parse_config(
        "[mount-watchdog]\npoll_interval_sec = 2\nunmount_grace_period_sec = 5\n"
        "tls_cert_renewal_interval_sec = 7\nstunnel_health_check_enabled = false\n"
    ).config
    policy = d.policy_from(config, cleanup_wait_seconds=10)
    assert (policy.grace, policy.renewal_interval, policy.health_interval, policy.cleanup_wait) == (5, 7, None, 10)
    assert policy.check_interval == 2
    default = d.policy_from(parse_config("").config, cleanup_wait_seconds=3 * 3600)
    assert default.renewal_interval == 3600 and default.health_interval == 300 and default.check_interval == 60


def test_failure_that_is_not_a_revocation_backs_off_without_marking():
    track = d.after_renewal(SEEN, False, NOW, POLICY, revoked=False)
    assert track.revoked_since is None and track.next_renew_attempt == NOW + 10


def test_tunnel_the_kernel_is_still_connected_to_is_not_reaped():
    """After a umount leaves the table the NFS client still says goodbye through the tunnel."""
    gone = Observation(mounted=False, kernel_connected=True)
    decision = decide("k", rec(), gone, replace(SEEN, gone_since=NOW - 100), NOW, POLICY)
    assert decision.actions == [] and decision.wake_at == NOW + 1.0
    assert "still connected" in decision.tracking.reason
    closed = decide("k", rec(), Observation(mounted=False), decision.tracking, NOW + 1, POLICY)
    assert [a.kind for a in closed.actions] == [d.REAP]
