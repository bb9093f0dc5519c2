"""The Supervisor: one event loop that looks after every efs mount of this host.

It sleeps in epoll until something happens: the mount table changed (mountinfo reports
POLLPRI), a tunnel exited (its pidfd became readable), a timer of one mount is due
(renewal, health probe, cleanup wait, grace period), or a background job finished.
Only the mounts concerned are looked at, so the steady-state cost does not grow with
the number of mounts. What to do is decided by decisions.decide (pure); observe.py
gathers the facts, actions.py acts, orphans.py looks for tunnels nobody owns.

One mount's trouble never stops the others: every step of the loop is guarded, and a
failure is logged once and supervision goes on. Should the thread die all the same,
`failed` is set (and on_failure called), so the agent exits for systemd to restart it
instead of serving on without a supervisor.

    sup = Supervisor(config, references=volumes.references, on_failure=stopping.set)   # the agent
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
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from efsplug.config import Config
from efsplug.ecsconfig import ecs_config_path, load_ecs_config
from efsplug.mounttable import MOUNTINFO, KernelMount, MountTableWatch, read_mounts
from efsplug.supervisor import cleanup
from efsplug.supervisor import decisions as d
from efsplug.supervisor import orphans, tunnels
from efsplug.supervisor.actions import ActionsMixin, Entry as _Entry
from efsplug.supervisor.lock import SupervisorLock
from efsplug.supervisor.observe import ObserveMixin
from efsplug.supervisor.records import RecordDir
from efsplug.supervisor.statusfile import MountStatus, write_status
from efsplug.unmount import mount_dir

log = logging.getLogger("efsplug.supervisor")
References = Callable[[str], Optional[int]]
ORPHAN_MIN_AGE = 10.0  # mount.efs saves the record right after its tunnel listens
ORPHAN_SCAN_INTERVAL = 300.0  # without health checks, orphans are still looked for


class Supervisor(ObserveMixin, ActionsMixin):
    def __init__(
        self,
        config: Config,
        *,
        references: Optional[References] = None,
        environ: Optional[Mapping[str, str]] = None,
        clock: Callable[[], float] = time.monotonic,  # the timers' clock: no clock step moves it
        wall_clock: Callable[[], float] = time.time,  # for the times records and files carry
        mount_reader: Optional[Callable[[], List[KernelMount]]] = None,
        orphan_min_age: float = ORPHAN_MIN_AGE,
        orphan_interval: Optional[float] = None,  # default: the health check interval, else 300 s
        on_failure: Optional[Callable[[], None]] = None,
    ) -> None:
        self.config = config
        self.state_dir = Path(config.efsplug.state_dir)
        self._references = references
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._wall = wall_clock
        self.cleanup_wait = cleanup.cleanup_wait(
            config, self._environ, load_ecs_config(ecs_config_path(self._environ), cleanup.NAMES))
        self.policy = d.policy_from(config, self.cleanup_wait.seconds)
        self._read_mounts = mount_reader or (lambda: read_mounts(MOUNTINFO))
        self._records = RecordDir(self.state_dir)
        self._sweeper = orphans.Sweeper(
            self.state_dir, min_age=orphan_min_age, read_mounts=self._read_mounts,
            interval=orphan_interval or self.policy.health_interval or ORPHAN_SCAN_INTERVAL)
        self._entries: Dict[str, _Entry] = {}
        self._by_tunnel: Dict[Tuple[int, str], Set[str]] = {}
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
        self._again: Set[str] = set()  # entries (re)loaded outside the loop's own passes: look at them next
        self._failures: Set[str] = set()  # loop steps that failed, each logged once
        self._rescan_requested = False
        self._notify_lock = threading.Lock()
        self._stop = threading.Event()
        self.supervising = threading.Event()  # set while this one holds the lock
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: Optional[threading.Thread] = None
        self.failed = threading.Event()  # the supervising thread died (not stopped)
        self.error: Optional[BaseException] = None
        self._on_failure = on_failure
        self._executor: Optional[ThreadPoolExecutor] = None
        # Wedge probes share /proc reads for a while; health checks are minutes apart anyway.
        health = self.policy.health_interval or 300.0
        self._probe = tunnels.ListenProbe(ttl=max(float(config.watchdog.poll_interval_sec), health / 30.0))

    # --- public API ----------------------------------------------------------------------
    def start(self) -> None:
        """Supervise on a background thread (waits for the lock there if need be)."""
        self._thread = threading.Thread(target=self._run_thread, name="efsplug-supervisor", daemon=True)
        self._thread.start()

    def _run_thread(self) -> None:
        try:
            self.run_forever()
        except BaseException as exc:  # noqa: B036 - whatever it was, the owner must learn of it
            self.error = exc
            log.critical("the supervisor stopped on an internal error; mounts are not supervised", exc_info=True)
        finally:
            if not self._stop.is_set():
                self.failed.set()
                if self._on_failure is not None:
                    self._on_failure()

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
            self._guarded("looking for orphan tunnels", self._scan_orphans, self._clock(), dirty)
            self._evaluate_all(dirty)
            if self.policy.health_interval is not None:
                self._listen_due = self._clock() + self.policy.poll_interval
            while not self._stop.is_set():
                events = ep.poll(self._timeout())
                fds = {fd for fd, _ in events}
                dirty, self._again = self._again, set()
                if self._wake_r in fds:
                    self._drain_wake()  # first: whatever asked for a wake-up is visible below
                if self._rescan_requested or watch.fileno() in fds:
                    self._rescan_requested = False
                    self._guarded("reading the mount table and the records", self._mount_table_changed, dirty)
                self._guarded("taking notifications", self._take_notified, dirty)
                for fd in fds:
                    if fd in self._by_fd:
                        self._pidfd_ready(fd, dirty)
                while True:
                    try:
                        finished = self._results.get_nowait()
                    except queue.Empty:
                        break
                    self._guarded("handling a finished job", finished)
                self._due_timers(dirty)
                self._evaluate_all(dirty)
                if self._again:
                    self._wake()  # loaded while deciding (a reap found its record rewritten)

    def _guarded(self, what: str, step: Callable[..., Any], *args: Any) -> None:
        """One step of the loop; a failure is logged (once per distinct error) and the loop goes on."""
        try:
            step(*args)
        except Exception as exc:
            text = f"{what}: {type(exc).__name__}: {exc}"[:300]
            if text not in self._failures:
                if len(self._failures) >= 100:
                    self._failures.clear()
                self._failures.add(text)
                log.exception("%s failed; supervision goes on", what)

    def _pidfd_ready(self, fd: int, dirty: Set[str]) -> None:
        key = self._by_fd[fd]
        self._guarded(f"handling the exit of the tunnel of {key}", self._tunnel_exited, key, dirty)
        if self._by_fd.get(fd) == key and select.select([fd], [], [], 0)[0]:
            # It failed half way: stop watching this pidfd, or epoll reports it forever.
            e = self._entries.get(key)
            if e is not None:
                self._guarded("closing a pidfd", self._watch_tunnel_off, e)
                dirty.add(key)

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
            self._guarded("looking for orphan tunnels", self._scan_orphans, now, dirty)
        if self._listen_due is not None and self._listen_due <= now:
            self._listen_due = now + self.policy.poll_interval  # a failed sweep must not be due forever
            self._guarded("checking that tunnels listen", self._sweep_listeners, now, dirty)

    def _scan_orphans(self, now: float, dirty: Set[str]) -> None:
        self._orphan_due = now + self._sweeper.interval  # a failed sweep must not be due forever
        self._sync_records(dirty)  # records any process wrote meanwhile are known before deciding
        known = [e.record.tunnel for e in self._entries.values() if e.record.tunnel is not None]
        wall = self._wall()  # the sweeper ages shared-process sections by their links' wall-clock mtimes
        self._orphan_due = now + (self._sweeper.sweep(known, wall) - wall)

    def _schedule(self, e: _Entry, when: Optional[float]) -> None:
        if when is not None:
            # Coalesce timers on the poll-interval grid: what falls due within one interval
            # is handled in one wake-up, sharing its reads of /proc.
            grid = float(self.config.watchdog.poll_interval_sec)
            when = math.ceil(when / grid) * grid
        e.wake_at = when
        if when is not None:
            heapq.heappush(self._timers, (when, next(self._seq), e.key))

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
        decision = d.decide(e.key, e.record, obs, e.tracking, now, self.policy, wall=self._wall())
        e.tracking = decision.tracking
        for action in decision.actions:
            if action.kind == d.RESTART_TUNNEL and d.UNMOUNT in e.busy:
                continue  # the unmount stops the tunnel on purpose
            getattr(self, "_do_" + action.kind.replace("-", "_"))(e, action)
            if self._entries.get(e.key) is not e:
                return  # forgotten, or replaced by a rewritten record
        self._publish(e)
        self._schedule(e, decision.wake_at)

    def _publish(self, e: _Entry) -> None:
        shown = (e.tracking.state, e.tracking.reason)
        if shown == e.shown:
            return
        e.shown = shown
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_status(mount_dir(e.record, self.state_dir), MountStatus(shown[0], shown[1], since, os.getpid()))

    def _submit(self, fn: Callable[[], object]) -> "Future":
        assert self._executor is not None
        return self._executor.submit(fn)

    def _post(self, fn: Callable[[], None]) -> None:
        self._results.put(fn)
        self._wake()
