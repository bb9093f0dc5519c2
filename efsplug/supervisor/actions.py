"""What the supervisor does once a decision is made: restart, renew, unmount, reap.

A mixin of Supervisor (runner.py), split out to keep each file readable; it runs on the
supervisor's loop thread, except the jobs it hands to the executor (renewal, unmount),
whose results come back to the loop through _post().
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import List, Optional, Set, Tuple

from efsplug import sharing, state
from efsplug.state import MountRecord
from efsplug.supervisor import decisions as d
from efsplug.supervisor import tunnels
from efsplug.supervisor.renew import RenewalError, renew_certificate
from efsplug.tunnel import Tunnel, TunnelError
from efsplug.unmount import release, unmount_efs

log = logging.getLogger("efsplug.supervisor")
STUNNEL_NAMES = ("stunnel", "stunnel5", "stunnel4")  # as efsplug.mounttunnel looks for it


@dataclass
class Entry:
    key: str
    record: MountRecord
    tracking: d.Tracking
    alive: bool = False
    pidfd: Optional[int] = None
    wake_at: Optional[float] = None
    busy: Set[str] = field(default_factory=set)
    shown: Tuple[str, str] = ("", "")
    listen_misses: int = 0  # consecutive poll sweeps that did not find the tunnel listening


class ActionsMixin:
    """Needs from Supervisor: config, state_dir, policy, _clock, _environ, _entries, _by_tunnel, _mounts,
    _evaluate, _forget, _record_current, _watch_tunnel, _watch_tunnel_off, _submit, _post."""

    def _do_restart_tunnel(self, e: Entry, action: d.Action) -> None:
        now = self._clock()
        old = Tunnel.from_identity(e.record.tunnel) if e.record.tunnel else None
        try:
            if e.record.host_config is not None:
                # A shared process serves other tunnels too: never stopped for this one.
                identity = tunnels.serve_hosted(e.record, self.state_dir, self._stunnel_binary())
            else:
                if old is not None:  # alive but wedged: its pidfd must not count this as a death
                    self._watch_tunnel_off(e)
                    old.stop()
                identity = tunnels.start_tunnel(e.record, self.state_dir, self._stunnel_binary())
        except (TunnelError, OSError) as exc:
            e.tracking = d.after_restart(e.tracking, False, now, self.policy)
            log.error("cannot restart the tunnel of %s on port %s (%s): %s; retrying",
                      e.record.mountpoint, e.record.port, action.reason, exc)
            return
        e.record = replace(e.record, tunnel=identity)
        state.save(self.state_dir, e.record)
        self._watch_tunnel(e)
        e.tracking = d.after_restart(e.tracking, True, now, self.policy)
        log.warning("restarted the tunnel of %s on port %s (pid %d): %s",
                    e.record.mountpoint, e.record.port, identity.pid, action.reason)

    def _stunnel_binary(self) -> str:
        for name in ([self.config.efsplug.stunnel] if self.config.efsplug.stunnel else STUNNEL_NAMES):
            found = shutil.which(name)
            if found:
                return found
        return "stunnel"

    def _siblings(self, e: Entry) -> List[Entry]:
        """The other mounts through e's tunnel: they share its certificate file."""
        keys = self._by_tunnel.get(sharing.tunnel_key(e.record), ())
        return [self._entries[k] for k in keys if k != e.key and k in self._entries]

    def _do_renew_certificate(self, e: Entry, action: d.Action) -> None:
        # One renewal serves every mount of a shared tunnel (they share the credential source
        # too: it is part of the share key), so one credential fetch and one reload, not one each.
        if d.RENEW_CERT in e.busy or any(d.RENEW_CERT in o.busy for o in self._siblings(e)):
            return
        e.busy.add(d.RENEW_CERT)
        record, key = e.record, e.key
        job = self._submit(lambda: renew_certificate(record, state_dir=self.state_dir, config=self.config,
                                                     now=datetime.now(timezone.utc), environ=self._environ))
        job.add_done_callback(lambda fut: self._post(lambda: self._renewed(key, fut)))

    def _renewed(self, key: str, fut: "Future") -> None:
        e = self._entries.get(key)
        if e is None:
            return
        e.busy.discard(d.RENEW_CERT)
        now = self._clock()
        try:
            renewed = fut.result()
        except RenewalError as exc:
            first = e.tracking.revoked_since is None and e.tracking.renew_failures == 0
            e.tracking = d.after_renewal(e.tracking, False, now, self.policy, revoked=exc.revoked)
            if first:  # logged once; the back-off keeps the source from being hammered
                log.warning("cannot renew the certificate of %s: %s; retrying with back-off", e.record.mountpoint, exc)
        except Exception:
            log.exception("renewing the certificate of %s failed", e.record.mountpoint)
            e.tracking = d.after_renewal(e.tracking, False, now, self.policy, revoked=False)
        else:
            if e.tracking.revoked_since is not None:
                log.info("credentials of %s are back", e.record.mountpoint)
            siblings = self._siblings(e)
            for o in (e, *siblings):
                o.tracking = d.after_renewal(o.tracking, True, now, self.policy)
                o.record = replace(o.record, cert_not_before=renewed.cert_not_before,
                                   cert_not_after=renewed.cert_not_after, credential_expiry=renewed.credential_expiry)
                if (self.state_dir / o.key).exists():
                    state.save(self.state_dir, o.record)
            shared = f", shared with {', '.join(o.record.mountpoint for o in siblings)}" if siblings else ""
            log.info("renewed the certificate of %s (serial %x, valid until %s, tunnel %s%s)", e.record.mountpoint,
                     renewed.serial, renewed.cert_not_after.isoformat(), "reloaded" if renewed.reloaded else "not running",
                     shared)
            for o in siblings:
                self._evaluate(o)
        self._evaluate(e)

    def _do_unmount(self, e: Entry, action: d.Action) -> None:
        if d.UNMOUNT in e.busy:
            return
        e.busy.add(d.UNMOUNT)
        log.warning("unmounting %s%s: %s", e.record.mountpoint, " lazily" if action.lazy else "", action.reason)
        key, mountpoint = e.key, e.record.mountpoint
        job = self._submit(lambda: unmount_efs(mountpoint, state_dir=self.state_dir, lazy=action.lazy))
        job.add_done_callback(lambda fut: self._post(lambda: self._unmounted(key, fut)))

    def _unmounted(self, key: str, fut: "Future") -> None:
        e = self._entries.get(key)
        error = fut.exception()
        if error is not None:
            log.error("unmounting %s failed: %s", e.record.mountpoint if e else key, error)
        if e is not None:
            e.busy.discard(d.UNMOUNT)
            e.tracking = d.after_unmount(e.tracking, error is None)
            if not (self.state_dir / key).exists():
                self._forget(key)  # released with the unmount
                log.warning("reaped %s (%s, port %s): unmounted after the cleanup wait",
                            e.record.mountpoint, e.record.fs_id, e.record.port)
            else:
                self._evaluate(e)

    def _do_reap(self, e: Entry, action: d.Action) -> None:
        if not self._record_current(e):
            return  # released or rewritten by another process since it was loaded: not ours to reap
        self._watch_tunnel_off(e)
        try:
            done = release(e.record, state_dir=self.state_dir, mounts=self._mounts)
        except Exception as exc:
            log.error("cannot reap %s: %s", e.record.mountpoint, exc)
            e.tracking = replace(e.tracking, reaped=False, gone_since=self._clock())
            return
        if done:
            log.warning("reaped %s (%s, port %s): %s", e.record.mountpoint, e.record.fs_id, e.record.port, action.reason)
            self._forget(e.key)
        else:
            e.tracking = replace(e.tracking, reaped=False, gone_since=None)
            self._watch_tunnel(e)
