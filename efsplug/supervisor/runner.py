"""The Supervisor: one event loop that looks after every efs mount of this host.

It sleeps in epoll until something happens: the mount table changed (mountinfo reports
POLLPRI), a tunnel exited (its pidfd became readable), a timer of one mount is due
(renewal, health probe, cleanup wait, grace period), or a background job finished.
Only the mounts concerned are looked at, so the steady-state cost does not grow with
the number of mounts. What to do is decided by decisions.decide (pure); this module
observes and acts.

    sup = Supervisor(config, references=volumes.references)   # the agent
    sup.start(); ...; sup.stop()
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import queue
import select
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple

from efsplug import state
from efsplug.config import Config
from efsplug.ecsconfig import ecs_config_path, load_ecs_config
from efsplug.fsutil import is_temp_name
from efsplug.mounttable import MOUNTINFO, KernelMount, MountTableWatch, ports_in_use, read_mounts
from efsplug.netns import netns_path
from efsplug.state import StateError
from efsplug.supervisor import cleanup
from efsplug.supervisor import decisions as d
from efsplug.supervisor import orphans, tunnels
from efsplug.supervisor.actions import ActionsMixin, Entry as _Entry
from efsplug.supervisor.lock import SupervisorLock
from efsplug.supervisor.statusfile import STATUS_FILE, MountStatus, write_status
from efsplug.unmount import kernel_connected, mount_dir

log = logging.getLogger("efsplug.supervisor")
References = Callable[[str], Optional[int]]
ORPHAN_MIN_AGE = 10.0  # mount.efs saves the record right after its tunnel listens
ORPHAN_SCAN_INTERVAL = 300.0  # without health checks, orphans are still looked for


class Supervisor(ActionsMixin):
    def __init__(
        self,
        config: Config,
        *,
        references: Optional[References] = None,
        environ: Optional[Mapping[str, str]] = None,
        clock: Callable[[], float] = time.time,
        mount_reader: Optional[Callable[[], List[KernelMount]]] = None,
        orphan_min_age: float = ORPHAN_MIN_AGE,
        orphan_interval: Optional[float] = None,  # default: the health check interval, else 300 s
    ) -> None:
        self.config = config
        self.state_dir = Path(config.efsplug.state_dir)
        self._references = references
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self.cleanup_wait = cleanup.cleanup_wait(
            config, self._environ, load_ecs_config(ecs_config_path(self._environ), cleanup.NAMES))
        self.policy = d.policy_from(config, self.cleanup_wait.seconds)
        self._read_mounts = mount_reader or (lambda: read_mounts(MOUNTINFO))
        self._sweeper = orphans.Sweeper(
            self.state_dir, min_age=orphan_min_age, read_mounts=self._read_mounts,
            interval=orphan_interval or self.policy.health_interval or ORPHAN_SCAN_INTERVAL)
        self._entries: Dict[str, _Entry] = {}
        self._by_fd: Dict[int, str] = {}
        self._timers: List[Tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._orphan_due: Optional[float] = None
        self._listen_due: Optional[float] = None  # next sweep of "does every tunnel still listen?"
        self._mounts: List[KernelMount] = []
        self._nfs: Set[str] = set()
        self._ports: Dict[int, List[str]] = {}
        self._results: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._notified: Set[str] = set()
        self._rescan_requested = False
        self._notify_lock = threading.Lock()
        self._stop = threading.Event()
        self.supervising = threading.Event()  # set while this one holds the lock
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: Optional[threading.Thread] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        # Wedge probes share /proc reads for a while; health checks are minutes apart anyway.
        health = self.policy.health_interval or 300.0
        self._probe = tunnels.ListenProbe(ttl=max(float(config.watchdog.poll_interval_sec), health / 30.0))

    # --- public API ----------------------------------------------------------------------
    def start(self) -> None:
        """Supervise on a background thread (waits for the lock there if need be)."""
        self._thread = threading.Thread(target=self.run_forever, name="efsplug-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def rescan(self) -> None:
        """Re-read the mount table and the state directory now (as after a mount event)."""
        self._rescan_requested = True
        self._wake()

    def notify(self, mountpoint: str) -> None:
        """Look at mountpoint now (e.g. its Docker references changed)."""
        with self._notify_lock:
            self._notified.add(os.path.normpath(mountpoint))
        self._wake()

    def run_forever(self) -> None:
        lock = SupervisorLock(self.state_dir, self.config.default.state_file_dir_mode, self.cleanup_wait.to_json())
        try:
            if not lock.try_acquire():
                log.info("another supervisor holds %s; waiting to take over", lock.path)
                lock.acquire_in_background(self._wake)
                while not self._stop.is_set() and not lock.acquired.is_set():
                    select.select([self._wake_r], [], [])
                    self._drain_wake()
                if self._stop.is_set():
                    return
            self.supervising.set()
            log.info("supervising efs mounts under %s; cleanup wait %s", self.state_dir, self.cleanup_wait.describe())
            for note in self.cleanup_wait.notes:
                log.warning("%s", note)
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="efsplug-supervisor-job")
            self._loop()
        finally:
            self.supervising.clear()
            lock.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            tunnels.pidfds_close({k: e.pidfd for k, e in self._entries.items() if e.pidfd is not None})
            self._by_fd.clear()

    # --- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        with MountTableWatch() as watch, select.epoll() as ep:
            self._epoll = ep
            ep.register(watch.fileno(), select.EPOLLPRI | select.EPOLLERR)
            ep.register(self._wake_r, select.EPOLLIN)
            dirty: Set[str] = set()
            self._mount_table_changed(dirty)  # reconciliation: the whole picture, once
            self._scan_orphans(self._clock())
            self._evaluate_all(dirty)
            if self.policy.health_interval is not None:
                self._listen_due = self._clock() + self.policy.poll_interval
            while not self._stop.is_set():
                events = ep.poll(self._timeout())
                fds = {fd for fd, _ in events}
                dirty = set()
                if self._wake_r in fds:
                    self._drain_wake()  # first: whatever asked for a wake-up is visible below
                if self._rescan_requested or watch.fileno() in fds:
                    self._rescan_requested = False
                    self._mount_table_changed(dirty)
                self._take_notified(dirty)
                for fd in fds:
                    if fd in self._by_fd:
                        self._tunnel_exited(self._by_fd[fd], dirty)
                while True:
                    try:
                        finished = self._results.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        finished()
                    except Exception:
                        log.exception("handling a finished job failed")
                self._due_timers(dirty)
                self._evaluate_all(dirty)

    def _timeout(self) -> float:
        candidates = (self._timers[0][0] if self._timers else None, self._orphan_due, self._listen_due)
        nxt = min([t for t in candidates if t is not None], default=None)
        if nxt is None:
            return -1
        return min(max(nxt - self._clock(), 0.0), 3600.0)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (pipe full) or shut down

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _take_notified(self, dirty: Set[str]) -> None:
        with self._notify_lock:
            points, self._notified = self._notified, set()
        if not points:
            return
        for e in self._entries.values():
            if os.path.normpath(e.record.mountpoint) in points:
                dirty.add(e.key)

    def _due_timers(self, dirty: Set[str]) -> None:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            when, _, key = heapq.heappop(self._timers)
            e = self._entries.get(key)
            if e is not None and e.wake_at == when:
                e.wake_at = None
                dirty.add(key)
        if self._orphan_due is not None and self._orphan_due <= now:
            self._scan_orphans(now)
        if self._listen_due is not None and self._listen_due <= now:
            self._sweep_listeners(now, dirty)

    def _scan_orphans(self, now: float) -> None:
        known = [e.record.tunnel for e in self._entries.values() if e.record.tunnel is not None]
        self._orphan_due = self._sweeper.sweep(known, now)

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

    def _schedule(self, e: _Entry, when: Optional[float]) -> None:
        if when is not None:
            # Coalesce timers on the poll-interval grid: what falls due within one interval
            # is handled in one wake-up, sharing its reads of /proc.
            grid = float(self.config.watchdog.poll_interval_sec)
            when = math.ceil(when / grid) * grid
        e.wake_at = when
        if when is not None:
            heapq.heappush(self._timers, (when, next(self._seq), e.key))

    # --- observing -----------------------------------------------------------------------
    def _mount_table_changed(self, dirty: Set[str]) -> None:
        """Re-read the table and the state dir's names; mark the records whose view changed."""
        self._mounts = self._read_mounts()
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
        try:
            names = {n for n in os.listdir(self.state_dir) if n.endswith(state.SUFFIX) and not is_temp_name(n)}
        except FileNotFoundError:
            names = set()
        for key in set(self._entries) - names:
            self._forget(key)  # released by someone else (the agent, efsplug unmount)
        now = self._clock()
        for key in sorted(names - set(self._entries)):
            try:
                record = state.load(self.state_dir / key)
            except StateError as exc:
                log.warning("ignoring %s", exc)
                continue
            spread = (zlib.crc32(key.encode()) % 1000) / 1000.0 * (self.policy.health_interval or 0.0)
            e = _Entry(key, record, d.Tracking(next_health=now + spread if self.policy.health_interval else None))
            if not (mount_dir(record, self.state_dir) / STATUS_FILE).exists():
                e.shown = (d.OK, "")  # nothing to correct: an "ok" mount needs no status file
            self._entries[key] = e
            self._watch_tunnel(e)
            dirty.add(key)

    def _watch_tunnel(self, e: _Entry) -> None:
        self._watch_tunnel_off(e)
        fd = tunnels.open_pidfd(e.record.tunnel) if e.record.tunnel else None
        e.alive = fd is not None
        if fd is not None:
            e.pidfd = fd
            self._by_fd[fd] = e.key
            self._epoll.register(fd, select.EPOLLIN)

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
            self._watch_tunnel_off(e)

    def _observe(self, e: _Entry, now: float) -> d.Observation:
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
        users = tuple(self._ports.get(r.port, ())) if r.port else ()
        connected = False
        if not mounted and not users and e.alive and r.tunnel and r.port:
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

    # --- deciding and acting ---------------------------------------------------------------
    def _evaluate_all(self, keys: Set[str]) -> None:
        for key in sorted(keys):
            e = self._entries.get(key)
            if e is None:
                continue
            try:
                self._evaluate(e)
            except Exception:  # one mount's trouble must not stop the supervision of the others
                log.exception("supervising %s failed; looking again later", e.record.mountpoint)
                self._schedule(e, self._clock() + self.policy.check_interval)

    def _evaluate(self, e: _Entry) -> None:
        now = self._clock()
        obs = self._observe(e, now)
        if not obs.mounted and not obs.port_users and not (self.state_dir / e.key).exists():
            self._forget(e.key)  # released meanwhile by whoever unmounted it
            return
        decision = d.decide(e.key, e.record, obs, e.tracking, now, self.policy)
        e.tracking = decision.tracking
        for action in decision.actions:
            if action.kind == d.RESTART_TUNNEL and d.UNMOUNT in e.busy:
                continue  # the unmount stops the tunnel on purpose
            getattr(self, "_do_" + action.kind.replace("-", "_"))(e, action)
            if e.key not in self._entries:
                return
        self._publish(e)
        self._schedule(e, decision.wake_at)

    def _publish(self, e: _Entry) -> None:
        shown = (e.tracking.state, e.tracking.reason)
        if shown == e.shown:
            return
        e.shown = shown
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_status(mount_dir(e.record, self.state_dir), MountStatus(shown[0], shown[1], since, os.getpid()))

    def _watch_tunnel_off(self, e: _Entry) -> None:
        if e.pidfd is not None:
            self._epoll.unregister(e.pidfd)
            self._by_fd.pop(e.pidfd, None)
            os.close(e.pidfd)
            e.pidfd, e.alive = None, False

    def _submit(self, fn: Callable[[], object]) -> "Future":
        assert self._executor is not None
        return self._executor.submit(fn)

    def _post(self, fn: Callable[[], None]) -> None:
        self._results.put(fn)
        self._wake()
