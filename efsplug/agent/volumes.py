"""Volume records and the decisions about them (pure), plus per-volume locks.

A Volume is immutable: every change builds a new one, so a reader holding a snapshot
never sees a half-made change and never needs a lock.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

from efsplug.agent import provisioning
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
    # provision=accesspoint and its options (efsplug.agent.provisioning), sorted; () if none
    provision: Tuple[Tuple[str, str], ...] = ()
    access_point: Optional[str] = None  # the access point made (or adopted) for this volume

    @property
    def provision_spec(self) -> Optional[provisioning.ProvisionSpec]:
        return provisioning.parse(dict(self.provision)) if self.provision else None

    def efs_options(self) -> str:
        """The `o=` string mounts use: a provisioned access point joins it as `accesspoint=`,
        with `tls` (EFS requires it), exactly as if it had been given."""
        if self.access_point is None:
            return self.options
        return with_tls(self.options) + f",accesspoint={self.access_point}"

    @property
    def ref_total(self) -> int:
        return sum(count for _, count in self.refs)

    def refs_of(self, mount_id: str) -> int:
        return dict(self.refs).get(mount_id, 0)

    def request(self) -> MountSpec:
        """The validated mount at this volume's mountpoint."""
        if self.fs_type != FS_TYPE:
            return typed_mount(self.fs_type, self.device, self.options, self.mountpoint)
        return replace(request_from_driver_opts(self.device, self.efs_options()), mountpoint=self.mountpoint)

    def status(self) -> Dict[str, object]:
        """What `docker volume inspect` shows under Status: nothing secret (never the options)."""
        if self.fs_type != FS_TYPE:
            return {"Type": self.fs_type, "Device": self.device, "Mounted": self.mounted, "References": self.ref_total}
        parsed = request_from_driver_opts(self.device, self.efs_options())
        status: Dict[str, object] = {
            "FileSystemId": parsed.fs_id, "Path": parsed.path, "Mounted": self.mounted, "References": self.ref_total,
        }
        if parsed.accesspoint:
            status["AccessPoint"] = parsed.accesspoint
        if self.provision:
            status["Provisioned"] = dict(self.provision)
        return status


def validate_driver_opts(opts: Mapping[str, str]) -> Tuple[str, str, str]:
    """(type, device, o) from Docker's driver options: efs ones checked by the mount helper's
    own parser, the other types' as mount(8) arguments. Installed helpers are not checked here."""
    unknown = sorted(k for k in opts if k not in DRIVER_OPTS + provisioning.PROVISION_OPTS)
    if unknown:
        raise UsageError(f"volume option {shown(unknown[0])} is not supported; use type=, device= and o=, "
                         "and provision=accesspoint with its options")
    fs_type = check_type(opts.get("type", FS_TYPE))
    device, o = opts.get("device", ""), opts.get("o", "")
    spec = provisioning.parse(opts)
    if fs_type == FS_TYPE:
        # UsageError names the bad option; a provisioned volume's mounts add tls themselves
        request = request_from_driver_opts(device, o if spec is None else with_tls(o))
        if spec is not None:
            _check_provisioned(request, spec)
    else:
        if spec is not None:
            raise UsageError("provision=accesspoint is for type=efs volumes only")
        typed_mount(fs_type, device, o)
    return fs_type, device, o


def with_tls(o: str) -> str:
    """o with `tls` first if it is not there: EFS serves access points over TLS only."""
    given = [part for part in o.split(",") if part]
    return ",".join(([] if "tls" in given else ["tls"]) + given)


def _check_provisioned(request: MountRequest, spec: provisioning.ProvisionSpec) -> None:
    if request.accesspoint:
        raise UsageError("volume options accesspoint= (in o=) and provision=accesspoint exclude each other; keep one")
    if request.path not in ("", "/"):
        raise UsageError(f"device= names the path {shown(request.path)}, but a provisioned access point chooses its "
                         "own root directory; use basePath= and rootName=")


def new_volume(name: str, opts: Mapping[str, str], root: Path, created_at: str) -> Volume:
    fs_type, device, o = validate_driver_opts(opts)
    provision = tuple(sorted((k, v) for k, v in opts.items() if k in provisioning.PROVISION_OPTS))
    return Volume(name=name, device=device, options=o, mountpoint=str(root / name), created_at=created_at,
                  fs_type=fs_type, provision=provision)


def same_definition(a: Volume, b: Volume) -> bool:
    return (a.fs_type, a.device, a.options, a.mountpoint, a.provision) == \
        (b.fs_type, b.device, b.options, b.mountpoint, b.provision)


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

