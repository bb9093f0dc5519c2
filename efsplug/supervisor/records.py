"""The supervisor's view of the record directory: which records are there, which are new or
rewritten since it last looked, and which are bad.

Any process writes records (mount.efs, the agent, `efsplug unmount`), and nothing tells
the supervisor, so it looks again before every decision that could stop a tunnel (the
orphan sweep, a reap) as well as on mount-table events. One stat per record tells a
rewritten record from one already held (atomic writes replace the inode), so looking
again costs a directory listing and N stats, and only new or changed files are parsed.

A bad record is reported once: a corrupt one is quarantined (moved aside, where a person
can read it and no reader trips over it again); one that is not corrupt (written by a
newer efsplug, unreadable) is left in place and remembered until the file changes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Dict, List, Set, Tuple

from efsplug import state
from efsplug.fsutil import is_temp_name
from efsplug.state import MountRecord, StateError

log = logging.getLogger("efsplug.supervisor")
Stamp = Tuple[int, int, int]  # inode, mtime (ns), size
_UNSTATABLE: Stamp = (-1, -1, -1)


@dataclass(frozen=True)
class Loaded:
    key: str  # the record's file name
    record: MountRecord


@dataclass
class Scan:
    present: Set[str] = field(default_factory=set)  # usable records on disk now
    loaded: List[Loaded] = field(default_factory=list)  # of those: new or rewritten (parsed now)


def _stamp(path: Path) -> Tuple[int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_ino, st.st_mtime_ns, st.st_size


class RecordDir:
    def __init__(self, state_dir: Path, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.state_dir = Path(state_dir)
        self._now = now
        self._held: Dict[str, Stamp] = {}  # key -> the file version the supervisor holds
        self._bad: Dict[str, Stamp] = {}  # key -> the file version already reported as bad

    def scan(self, held: Collection[str]) -> Scan:
        """Every usable record's key; records new or rewritten since the last scan, or not in
        held (the keys the caller holds an entry for), loaded."""
        scan = Scan()
        try:
            names = sorted(n for n in os.listdir(self.state_dir) if n.endswith(state.SUFFIX) and not is_temp_name(n))
        except FileNotFoundError:
            names = []
        for key in names:
            path = self.state_dir / key
            try:
                stamp = _stamp(path)  # before reading: a rewrite after it is seen next time
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as exc:
                if self._bad.get(key) != _UNSTATABLE:
                    self._report(key, StateError(f"{path}: cannot stat: {exc.strerror}", corrupt=False), _UNSTATABLE)
                continue
            if self._held.get(key) == stamp and key in held:
                scan.present.add(key)
                continue
            if self._bad.get(key) == stamp:
                continue  # reported already; looked at again once the file changes
            try:
                record = state.load(path)
            except StateError as exc:
                self._held.pop(key, None)
                self._report(key, exc, stamp)
                continue
            self._held[key] = stamp
            self._bad.pop(key, None)
            scan.present.add(key)
            scan.loaded.append(Loaded(key, record))
        listed = set(names)
        for table in (self._held, self._bad):
            for key in set(table) - listed:
                del table[key]
        return scan

    def reload_later(self, key: str) -> None:
        """The caller could not take the record now: hand it out again at the next scan."""
        self._held.pop(key, None)

    def _report(self, key: str, exc: StateError, stamp: Stamp) -> None:
        if exc.corrupt:
            try:
                if _stamp(self.state_dir / key) != stamp:
                    return  # rewritten since it was read: judged afresh at the next scan
                moved = state.quarantine(self.state_dir / key, self._now())
            except FileNotFoundError:
                return  # removed meanwhile: nothing left to report
            except OSError as err:
                log.warning("ignoring %s (cannot move it aside: %s); its mount is not supervised", exc, err.strerror)
            else:
                log.warning("quarantined %s: moved to %s; its mount is not supervised and its tunnel is "
                            "left running", exc, moved.name)
                return
        else:
            log.warning("ignoring %s", exc)
        self._bad[key] = stamp
