"""What the supervisor looks at: the mount table, the record directory, its tunnels.

A mixin of Supervisor (runner.py), split out to keep each file readable; everything here
runs on the supervisor's loop thread and only gathers facts (and keeps the per-record
entries in step with the record directory). Deciding is decisions.py, acting actions.py.
"""

from __future__ import annotations

import logging
import os
import select
import zlib
from typing import Dict, List, Optional, Set, Tuple

from efsplug.mounttable import KernelMount, ports_in_use
from efsplug.state import MountRecord
from efsplug.netns import netns_path
from efsplug.sharing import tunnel_key
from efsplug.supervisor import decisions as d
from efsplug.supervisor import tunnels
from efsplug.supervisor.actions import Entry
from efsplug.supervisor.records import RecordDir
from efsplug.supervisor.statusfile import STATUS_FILE
from efsplug.unmount import kernel_connected, mount_dir

log = logging.getLogger("efsplug.supervisor")


class ObserveMixin:
    """Needs from Supervisor: state_dir, policy, _clock, _entries, _by_fd, _epoll, _mounts, _nfs,
    _ports, _records, _read_mounts, _references, _probe, _listen_due, _again."""

    _entries: Dict[str, Entry]
    _by_tunnel: Dict[Tuple[int, str], Set[str]]  # (port, tunnel config) -> keys of the records using it
    _records: RecordDir
    _again: Set[str]

    def _mount_table_changed(self, dirty: Set[str]) -> None:
        """Re-read the table and the record directory; mark the records whose view changed."""
        self._mounts: List[KernelMount] = self._read_mounts()
        nfs = {os.path.normpath(m.mountpoint) for m in self._mounts if m.is_nfs}
        ports = ports_in_use(self._mounts)
        changed_points = nfs ^ self._nfs
        changed_ports = {p for p in set(ports) | set(self._ports) if ports.get(p) != self._ports.get(p)}
        self._nfs, self._ports = nfs, ports
        self._sync_records(dirty)
        for e in self._entries.values():
            if os.path.normpath(e.record.mountpoint) in changed_points or e.record.port in changed_ports:
                dirty.add(e.key)

    def _sync_records(self, dirty: Set[str]) -> None:
        """Bring the entries in step with the record directory as it is now.

        Called on mount-table events and right before every decision that could stop a
        tunnel: a record another process wrote (a mount in progress) is known by then.
        """
        scan = self._records.scan(self._entries.keys())
        for key in set(self._entries) - scan.present:
            self._forget(key)  # released by someone else (the agent, efsplug unmount), or gone bad
        now = self._clock()
        for loaded in scan.loaded:
            key, record = loaded.key, loaded.record
            old = self._entries.get(key)
            if old is not None:
                if old.record == record:
                    continue  # our own save read back
                if old.busy:
                    self._records.reload_later(key)  # a job still works on the old one
                    continue
                log.info("record %s was rewritten (%s): supervising it afresh", key, record.mountpoint)
                self._forget(key)
            spread = (zlib.crc32(key.encode()) % 1000) / 1000.0 * (self.policy.health_interval or 0.0)
            e = Entry(key, record, d.Tracking(next_health=now + spread if self.policy.health_interval else None))
            if not (mount_dir(record, self.state_dir) / STATUS_FILE).exists():
                e.shown = (d.OK, "")  # nothing to correct: an "ok" mount needs no status file
            self._entries[key] = e
            tunnel = tunnel_key(record)
            if tunnel is not None:
                self._by_tunnel.setdefault(tunnel, set()).add(key)
            self._watch_tunnel(e)
            dirty.add(key)

    def _record_current(self, e: Entry) -> bool:
        """Re-read the record directory; True if e still holds its record's current version.

        Before a reap: the file may have been released or rewritten by another process
        since the entry was loaded, and then the entry's view must not be acted on.
        """
        self._sync_records(self._again)
        return self._entries.get(e.key) is e

    def _watch_tunnel(self, e: Entry) -> None:
        self._watch_tunnel_off(e)
        fd = tunnels.open_pidfd(e.record.tunnel) if e.record.tunnel else None
        e.alive = fd is not None
        if fd is not None:
            e.pidfd = fd
            self._by_fd[fd] = e.key
            self._epoll.register(fd, select.EPOLLIN)

    def _watch_tunnel_off(self, e: Entry) -> None:
        if e.pidfd is not None:
            fd, e.pidfd, e.alive = e.pidfd, None, False
            self._by_fd.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            finally:
                os.close(fd)

    def _tunnel_exited(self, key: str, dirty: Set[str]) -> None:
        e = self._entries[key]
        assert e.record.tunnel is not None and e.pidfd is not None
        if not select.select([e.pidfd], [], [], 0)[0]:
            return  # fd number reused this round by a fresh pidfd: that tunnel lives
        self._watch_tunnel_off(e)
        tunnels.reap_child(e.record.tunnel.pid)
        # After an unmount the tunnel is stopped on purpose (unmount.release): not news.
        mountpoint = os.path.normpath(e.record.mountpoint)
        mounted = any(m.is_nfs and os.path.normpath(m.mountpoint) == mountpoint for m in self._read_mounts())  # fresh: rare
        (log.warning if mounted else log.info)(
            "tunnel of %s (port %s, pid %d) exited", e.record.mountpoint, e.record.port, e.record.tunnel.pid)
        dirty.add(key)

    def _forget(self, key: str) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            tunnel = tunnel_key(e.record)
            users = self._by_tunnel.get(tunnel) if tunnel is not None else None
            if users is not None:
                users.discard(key)
                if not users:
                    del self._by_tunnel[tunnel]
            self._watch_tunnel_off(e)

    def _sweep_listeners(self, now: float, dirty: Set[str]) -> None:
        """Every poll interval: does each live tunnel still listen? A wedged one is restarted
        within two intervals. Two misses in a row are needed, so the moment a reload (SIGHUP)
        re-binds the port never gets a healthy tunnel restarted."""
        self._listen_due = now + self.policy.poll_interval
        self._probe.new_sweep()
        for e in self._entries.values():
            r = e.record
            if not (e.alive and r.tls and r.port and r.tunnel) or e.busy:
                continue
            if self._probe.still_listening(r.tunnel.pid, r.port):
                e.listen_misses = 0
                continue
            e.listen_misses += 1
            if e.listen_misses >= 2:
                dirty.add(e.key)

    def _observe(self, e: Entry, now: float) -> d.Observation:
        r, t = e.record, e.tracking
        listening = None
        probe_due = t.next_health is None or now >= t.next_health or e.listen_misses >= 2
        if self.policy.health_interval is not None and e.alive and r.port and r.tunnel and probe_due:
            listening = self._probe.listening(r.tunnel.pid, r.port)  # confirms with a fresh read
            e.listen_misses = 0 if listening else e.listen_misses
        refs: Optional[int] = None
        if self._references is not None:
            try:
                refs = self._references(r.mountpoint)
            except Exception:  # the agent's bookkeeping failed: assume referenced, reap nothing
                log.exception("references(%s) failed", r.mountpoint)
                refs = 1
        mounted = os.path.normpath(r.mountpoint) in self._nfs
        # Other records using this tunnel keep it (and count its users); this record goes,
        # alone, when its own mount has gone.
        together = self._by_tunnel.get(tunnel_key(r), ())
        shared = {os.path.normpath(self._entries[k].record.mountpoint) for k in together if k != e.key}
        users = tuple(self._ports.get(r.port, ())) if r.port and not shared else ()
        connected = False
        if not mounted and not users and not shared and e.alive and r.tunnel and r.port:
            connected = kernel_connected(r.tunnel.pid, r.port)  # only on the way out
        return d.Observation(
            mounted=mounted,
            port_users=users,
            kernel_connected=connected,
            tunnel_alive=e.alive,
            tunnel_listening=listening,
            netns_present=not r.netns or os.path.exists(netns_path(r.netns)),
            references=refs,
        )


