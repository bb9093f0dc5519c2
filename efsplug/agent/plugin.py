"""The endpoint logic: Create validates, Mount/Unmount count references per mount ID.

Concurrency without a global lock:
- every change to a volume happens under that volume's own lock (LockTable), so two
  volumes mount in parallel while requests on one volume stay ordered;
- the set of volumes is an immutable snapshot, replaced (never edited) after the state
  file is written; Get, List and Path read whatever snapshot is current and never wait;
- writing the state file is serialized by a commit lock held only for the write itself
  (one fsync), never across a mount.
"""

from __future__ import annotations

import os
import threading
import sys
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Tuple

from efsplug.agent import protocol
from efsplug.agent.mounter import EfsMounter, HelperMounter, Mounter, TypeMounter
from efsplug.agent.othertypes import FS_TYPE
from efsplug.agent.protocol import CreateRequest, MountIdRequest, NameRequest, ProtocolError
from efsplug.agent.provisioner import AccessPointProvisioner, Provisioner
from efsplug.agent.store import ProvisionedOn, Store
from efsplug.agent.volumes import (
    LockTable, Volume, mounted_with, new_volume, same_definition, unmount_step, unmounted, with_tls,
)
from efsplug.config import load_config
from efsplug.errors import EfsplugError, UsageError, shown
from efsplug.options import request_from_driver_opts

MOUNTPOINT_MODE = 0o700
ROOT_MODE = 0o700


@dataclass(frozen=True)
class Answer:
    status: int  # HTTP status
    body: Dict[str, Any]
    volume: str = ""  # for the log line
    err: str = ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Plugin:
    def __init__(
        self,
        store: Store,
        volumes_root: Path,
        *,
        mounter: Optional[Mounter] = None,
        type_mounter: Optional[TypeMounter] = None,
        provisioner: Optional[Provisioner] = None,
        initial: Mapping[str, Volume] = MappingProxyType({}),
        provisioned_on: Tuple[ProvisionedOn, ...] = (),
        clock: Callable[[], str] = _now,
    ) -> None:
        self.store = store
        self.volumes_root = Path(volumes_root)
        self.mounter: Mounter = mounter if mounter is not None else EfsMounter()  # type=efs
        self.type_mounter: TypeMounter = type_mounter if type_mounter is not None else HelperMounter()  # the rest
        # Access points on demand (provision=accesspoint): EFS's API with the host's credentials.
        self.provisioner: Provisioner = provisioner if provisioner is not None else AccessPointProvisioner(
            getattr(self.mounter, "config", lambda: load_config().config), mounter=self.mounter)
        self._clock = clock
        self._volumes: Mapping[str, Volume] = MappingProxyType(dict(initial))
        self._provisioned_on: Tuple[ProvisionedOn, ...] = tuple(provisioned_on)
        self._locks = LockTable()
        self._commit_lock = threading.Lock()
        # Told the mountpoint after every change (the supervisor re-checks that mount).
        self.on_change: Optional[Callable[[str], None]] = None

    # ---- reads: never wait ------------------------------------------------------------

    @property
    def volumes(self) -> Mapping[str, Volume]:
        return self._volumes  # an immutable snapshot; replaced as a whole on every change

    def references(self, mountpoint: str) -> Optional[int]:
        """Docker references of the volume at mountpoint; None if no volume lives there."""
        wanted = os.path.normpath(mountpoint)
        for volume in self._volumes.values():
            if os.path.normpath(volume.mountpoint) == wanted:
                return volume.ref_total
        return None

    def _existing(self, name: str) -> Volume:
        volume = self._volumes.get(name)
        if volume is None:
            raise UsageError(f"volume {shown(name)} not found; create it with docker volume create")
        return volume

    def _mounter(self, volume: Volume) -> Mounter:
        return self.mounter if volume.fs_type == FS_TYPE else self.type_mounter

    # ---- dispatch -----------------------------------------------------------------

    def handle(self, endpoint: str, body: bytes) -> Answer:
        """Decode, run, encode; every failure becomes an Err (the agent itself carries on)."""
        try:
            request = protocol.decode(endpoint, body)
        except ProtocolError as exc:
            status = 404 if endpoint not in protocol.ENDPOINTS else 400
            return Answer(status, protocol.error(str(exc)), err=str(exc))
        name = getattr(request, "name", "")
        try:
            return Answer(200, self._dispatch(endpoint, request), volume=name)
        except EfsplugError as exc:
            return Answer(200, self._error_body(endpoint, str(exc)), volume=name, err=str(exc))
        except Exception as exc:  # a bug: Docker gets one line, the journal where it happened
            # Frames only: the exception's message may quote the request (a credentials URI).
            frames = "".join(traceback.format_tb(exc.__traceback__))
            print(f"internal error ({type(exc).__name__}) handling {endpoint[:100]!r}:\n{frames}", file=sys.stderr,
                  flush=True)
            text = f"internal error ({type(exc).__name__}) in the efsplug agent; see its log"
            return Answer(500, protocol.error(text), volume=name, err=text)

    @staticmethod
    def _error_body(endpoint: str, err: str) -> Dict[str, Any]:
        if endpoint in (protocol.MOUNT, protocol.PATH):
            return protocol.mountpoint("", err)
        return protocol.error(err)

    def _dispatch(self, endpoint: str, request: object) -> Dict[str, Any]:
        if endpoint == protocol.ACTIVATE:
            return protocol.activate()
        if endpoint == protocol.CAPABILITIES:
            return protocol.capabilities()
        if endpoint == protocol.LIST:
            return protocol.volume_list(
                [{"Name": v.name, "Mountpoint": v.mountpoint} for v in self._volumes.values()]
            )
        if endpoint == protocol.CREATE:
            assert isinstance(request, CreateRequest)
            self.create(request.name, request.opts)
            return protocol.error("")
        assert isinstance(request, (NameRequest, MountIdRequest))
        if endpoint == protocol.GET:
            v = self._existing(request.name)
            return protocol.volume(v.name, v.mountpoint, v.created_at, v.status())
        if endpoint == protocol.PATH:
            return protocol.mountpoint(self._existing(request.name).mountpoint)
        if endpoint == protocol.REMOVE:
            self.remove(request.name)
            return protocol.error("")
        assert isinstance(request, MountIdRequest)
        if endpoint == protocol.MOUNT:
            return protocol.mountpoint(self.mount(request.name, request.id))
        self.unmount(request.name, request.id)
        return protocol.error("")

    # ---- changes: under the volume's lock -------------------------------------------

    def create(self, name: str, opts: Mapping[str, str]) -> None:
        """Validate and record; no mount. The same definition again is a success (ECS retries)."""
        volume = new_volume(name, opts, self.volumes_root, self._clock())  # validation needs no lock
        if volume.fs_type != FS_TYPE:
            self.type_mounter.require_helper(volume.fs_type)  # `docker volume create` says what is missing
        with self._locks.hold(name):
            existing = self._volumes.get(name)
            if existing is not None:
                if same_definition(existing, volume):
                    return
                raise UsageError(
                    f"volume {shown(name)} already exists with different options; remove it or choose another name"
                )
            if volume.provision:
                self._remember_file_system(volume)  # before EFS makes anything there
                # Made (or adopted: a retry after a crash before the commit) before the volume
                # is recorded; if recording fails, deleted again: a failed Create leaves nothing.
                volume = replace(volume, access_point=self.provisioner.create(volume))
                try:
                    self._commit(name, volume)
                except BaseException:
                    self._delete_access_point_quietly(volume)
                    raise
                return
            self._commit(name, volume)

    def _remember_file_system(self, volume: Volume) -> None:
        request = request_from_driver_opts(volume.device, with_tls(volume.options))  # as its mounts will see it
        entry = ProvisionedOn(request.fs_id, request.region or "")
        with self._commit_lock:
            if entry in self._provisioned_on:
                return
            remembered = tuple(sorted(self._provisioned_on + (entry,)))
            self.store.save(self._volumes, remembered)
            self._provisioned_on = remembered

    def _delete_access_point_quietly(self, volume: Volume) -> None:
        try:
            self.provisioner.delete(volume)
        except Exception as exc:
            print(f"create {volume.name}: could not delete access point {volume.access_point}: {exc}", flush=True)

    def mount(self, name: str, mount_id: str) -> str:
        with self._locks.hold(name):
            volume = self._existing(name)
            # The kernel decides, not our record: after a reboot the record says mounted
            # but nothing is; after a crash between mount and commit it is the reverse.
            made = not self._mounter(volume).is_mounted(volume.mountpoint)
            if made:
                self._mount_now(volume)
            try:
                self._commit(name, mounted_with(volume, mount_id))
            except BaseException:
                if made:
                    self._unmount_quietly(volume)  # Docker gets an Err: nobody will use this mount
                raise
            return volume.mountpoint

    def _mount_now(self, volume: Volume) -> None:
        request = volume.request()  # validated again: the state file could be edited
        self._ensure_dir(Path(volume.mountpoint))
        self._mounter(volume).mount(request)

    def _ensure_dir(self, mountpoint: Path) -> None:
        if not self.volumes_root.is_dir():
            self.volumes_root.mkdir(mode=ROOT_MODE, parents=True, exist_ok=True)
        try:
            os.mkdir(mountpoint, MOUNTPOINT_MODE)
        except FileExistsError:
            pass
        os.chmod(mountpoint, MOUNTPOINT_MODE)

    def unmount(self, name: str, mount_id: str) -> None:
        with self._locks.hold(name):
            volume = self._volumes.get(name)
            if volume is None:
                return  # nothing of ours: success, as for an unknown ID
            after, last = unmount_step(volume, mount_id)
            if after is volume:
                return
            if last:
                try:
                    self._mounter(volume).unmount(volume.mountpoint)
                except BaseException:
                    self._commit(name, after)  # the reference is gone; Remove still unmounts
                    raise
                after = unmounted(after)
            self._commit(name, after)

    def remove(self, name: str) -> None:
        """Forget the volume; a mounted one is unmounted first. Unknown names succeed (retries)."""
        with self._locks.hold(name):
            volume = self._volumes.get(name)
            if volume is None:
                return
            # Docker removes only volumes no container uses: remaining references are stale.
            mounter = self._mounter(volume)
            if volume.mounted or mounter.is_mounted(volume.mountpoint):
                mounter.unmount(volume.mountpoint)
            # The directory goes before the volume: forgotten first, a crash in between left
            # it for ever (the retried Remove finds no volume); gone first, a Mount makes it again.
            try:
                os.rmdir(volume.mountpoint)
            except FileNotFoundError:
                pass
            except OSError as exc:  # not empty or still busy: keep it, say so
                print(f"remove {name}: mountpoint kept ({exc.strerror})", flush=True)
            spec = volume.provision_spec
            if volume.access_point and spec is not None and spec.on_remove != "keep":
                # fails: the volume stays, for Remove to be retried
                self.provisioner.delete(volume, data=spec.on_remove == "deleteData")
            self._commit(name, None)

    def release_leftovers(self) -> List[str]:
        """Before serving: for each volume not mounted now, release what a killed agent's
        Mount or Unmount of it left (tunnel, record, per-mount directory and certificate).
        Nothing mounted is touched. One line per volume concerned, for the log."""
        notes = []
        for volume in self._volumes.values():
            release = getattr(self._mounter(volume), "release_leftovers", None)  # efs only: the others own nothing
            if volume.mounted or release is None:
                continue
            try:
                released = release(volume.mountpoint)
            except Exception as exc:  # one volume's trouble must not stop the agent from serving
                notes.append(f"volume {volume.name}: could not release what an interrupted request left: {exc}")
                continue
            if released:
                notes.append(f"volume {volume.name}: released what an interrupted request left: {', '.join(released)}")
        return notes

    def _unmount_quietly(self, volume: Volume) -> None:
        try:
            self._mounter(volume).unmount(volume.mountpoint)
        except Exception as exc:
            print(f"mount {volume.name}: could not undo the mount: {exc}", flush=True)

    def _commit(self, name: str, volume: Optional[Volume]) -> None:
        """Write the state with name changed, then publish the new snapshot."""
        with self._commit_lock:
            before = self._volumes.get(name)
            changed: MutableMapping[str, Volume] = dict(self._volumes)
            if volume is None:
                changed.pop(name, None)
            else:
                changed[name] = volume
            self.store.save(changed, self._provisioned_on)  # durable before anyone sees it
            self._volumes = MappingProxyType(dict(changed))
        subject = volume or before
        if self.on_change is not None and subject is not None:
            self.on_change(subject.mountpoint)
