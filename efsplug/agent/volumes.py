"""Volume records and the decisions about them (pure), plus per-volume locks.

A Volume is immutable: every change builds a new one, so a reader holding a snapshot
never sees a half-made change and never needs a lock.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, Mapping, Tuple, Union

from efsplug.agent.othertypes import FS_TYPE, TypedMount, check_type, typed_mount
from efsplug.errors import UsageError, shown
from efsplug.options import MountRequest, request_from_driver_opts

DRIVER_OPTS = ("type", "device", "o")

# efs: efsplug's own mount (tunnel, records, supervision); any other type: `mount -t <type>`.
MountSpec = Union[MountRequest, TypedMount]

Refs = Tuple[Tuple[str, int], ...]  # (mount ID, count), sorted by ID


@dataclass(frozen=True)
class Volume:
    name: str
    device: str  # as given: fs-id[:/path] for efs, what `mount -t <fs_type>` takes otherwise
    options: str  # the `o=` string as given (may name a credentials URI: never logged)
    mountpoint: str
    created_at: str  # RFC 3339, what `docker volume inspect` shows
    mounted: bool = False  # the agent made the kernel mount and has not unmounted it
    refs: Refs = ()
    fs_type: str = FS_TYPE  # the `type=` option; state files from before it existed are efs

    @property
    def ref_total(self) -> int:
        return sum(count for _, count in self.refs)

    def refs_of(self, mount_id: str) -> int:
        return dict(self.refs).get(mount_id, 0)

    def request(self) -> MountSpec:
        """The validated mount at this volume's mountpoint."""
        if self.fs_type != FS_TYPE:
            return typed_mount(self.fs_type, self.device, self.options, self.mountpoint)
        return replace(request_from_driver_opts(self.device, self.options), mountpoint=self.mountpoint)

    def status(self) -> Dict[str, object]:
        """What `docker volume inspect` shows under Status: nothing secret (never the options)."""
        if self.fs_type != FS_TYPE:
            return {"Type": self.fs_type, "Device": self.device, "Mounted": self.mounted, "References": self.ref_total}
        parsed = request_from_driver_opts(self.device, self.options)
        status: Dict[str, object] = {
            "FileSystemId": parsed.fs_id, "Path": parsed.path, "Mounted": self.mounted, "References": self.ref_total,
        }
        if parsed.accesspoint:
            status["AccessPoint"] = parsed.accesspoint
        return status


def validate_driver_opts(opts: Mapping[str, str]) -> Tuple[str, str, str]:
    """(type, device, o) from Docker's driver options: efs ones checked by the mount helper's
    own parser, the other types' as mount(8) arguments. Installed helpers are not checked here."""
    unknown = sorted(k for k in opts if k not in DRIVER_OPTS)
    if unknown:
        raise UsageError(f"volume option {shown(unknown[0])} is not supported; use type=, device= and o=")
    fs_type = check_type(opts.get("type", FS_TYPE))
    device, o = opts.get("device", ""), opts.get("o", "")
    if fs_type == FS_TYPE:
        request_from_driver_opts(device, o)  # UsageError names the bad option
    else:
        typed_mount(fs_type, device, o)
    return fs_type, device, o


def new_volume(name: str, opts: Mapping[str, str], root: Path, created_at: str) -> Volume:
    fs_type, device, o = validate_driver_opts(opts)
    return Volume(name=name, device=device, options=o, mountpoint=str(root / name), created_at=created_at,
                  fs_type=fs_type)


def same_definition(a: Volume, b: Volume) -> bool:
    return (a.fs_type, a.device, a.options, a.mountpoint) == (b.fs_type, b.device, b.options, b.mountpoint)


def _with_refs(volume: Volume, counts: Dict[str, int]) -> Volume:
    return replace(volume, refs=tuple(sorted((k, v) for k, v in counts.items() if v > 0)))


def needs_mount(volume: Volume, kernel_mounted: bool) -> bool:
    """Mount when we have not, or when our mount vanished (reboot, someone's umount)."""
    return not (volume.mounted and kernel_mounted)


def mounted_with(volume: Volume, mount_id: str) -> Volume:
    """After a successful Mount for mount_id: one more reference (the same ID counts twice)."""
    counts = dict(volume.refs)
    counts[mount_id] = counts.get(mount_id, 0) + 1
    return replace(_with_refs(volume, counts), mounted=True)


def unmount_step(volume: Volume, mount_id: str) -> Tuple[Volume, bool]:
    """(volume after Unmount of mount_id, whether the kernel mount must go now).

    An unknown ID changes nothing and succeeds: Docker may repeat an Unmount, or send
    one for a mount this agent never saw (it restarted, or the Mount failed).
    """
    counts = dict(volume.refs)
    if counts.get(mount_id, 0) <= 0:
        return volume, False
    counts[mount_id] -= 1
    after = _with_refs(volume, counts)
    return after, after.ref_total == 0 and after.mounted


def unmounted(volume: Volume) -> Volume:
    return replace(volume, mounted=False, refs=())


class LockTable:
    """One lock per volume name, created on demand and dropped when nobody holds or waits.

    The table's own lock guards only the dictionary (microseconds, never across I/O), so
    different volumes proceed in parallel; a name's lock orders that volume's requests.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: Dict[str, Tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(name, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[name] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                _, users = self._locks[name]
                if users == 1:
                    del self._locks[name]
                else:
                    self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)

