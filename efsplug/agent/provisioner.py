"""The plugin's access points on demand: made at Create, deleted at Remove (the I/O edge).

The region is found as for the volume's mounts (its `region=` option, AWS_REGION, the
config, instance metadata); the credentials are the host's (the agent's profile, else the
instance role). What to ask EFS for is efsplug.agent.provisioning's; how, efsplug.accesspoints'.

onRemove=deleteData deletes the access point's root directory through a mount of the file
system's root (the volume's own options, without the access point), as the EFS CSI driver
does; never when another access point's root directory is the same or lies under it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Tuple

from efsplug.accesspoints import AccessPointError, AccessPoints
from efsplug.agent import provisioning
from efsplug.agent.volumes import Volume, with_tls
from efsplug.config import Config
from efsplug.errors import EfsplugError, shown
from efsplug.imds import InstanceMetadata
from efsplug.options import MountRequest, request_from_driver_opts

DELETING_DIR = "deleting"  # under the state dir: where a volume's file system root is mounted to delete its data


class Provisioner(Protocol):
    def create(self, volume: Volume) -> str: ...

    def delete(self, volume: Volume, *, data: bool = False) -> None: ...


class RootMounter(Protocol):
    """What deleting data needs of the plugin's EfsMounter."""

    def mount(self, request: Any) -> None: ...

    def unmount(self, mountpoint: str) -> None: ...

    def is_mounted(self, mountpoint: str) -> bool: ...


class AccessPointProvisioner:
    def __init__(self, config: Callable[[], Config], environ: Mapping[str, str] = os.environ, *,
                 mounter: Optional[RootMounter] = None) -> None:
        self._config, self._environ, self._mounter = config, environ, mounter

    def create(self, volume: Volume) -> str:
        """The volume's access point, adopted if one is tagged with its name, else made."""
        spec = volume.provision_spec
        assert spec is not None, "only provisioned volumes get an access point"
        aps, request = self._service(volume)
        existing = aps.list(request.fs_id)
        used = [ap["PosixUser"]["Gid"] for ap in existing if isinstance(ap.get("PosixUser"), dict)]
        return aps.create(provisioning.build_request(spec, fs_id=request.fs_id, volume=volume.name, used_gids=used))

    def delete(self, volume: Volume, *, data: bool = False) -> None:
        """Delete the volume's access point; with data, its root directory first (a retried
        Remove finds the access point gone and the data with it)."""
        if volume.access_point is None:
            return
        aps, request = self._service(volume)
        if data:
            described = aps.describe(request.fs_id, volume.access_point)
            if described is not None:
                refused = provisioning.data_shared_with(described, aps.list(request.fs_id))
                if refused is not None:
                    raise AccessPointError(
                        f"volume {shown(volume.name)}: the data under {shown(provisioning.root_of(described))} was "
                        f"kept because {refused}; delete it by hand, or use onRemove=deleteAccessPoint")
                self._delete_data(volume, request, provisioning.root_of(described))
        aps.delete(request.fs_id, volume.access_point)

    def _delete_data(self, volume: Volume, request: MountRequest, root: str) -> None:
        if self._mounter is None:
            raise AccessPointError(f"volume {shown(volume.name)}: this agent cannot mount to delete data; "
                                   "use onRemove=deleteAccessPoint")
        # One fixed place per volume: a retry after a crash finds (and unmounts) what it left.
        parent = Path(self._config().efsplug.state_dir) / DELETING_DIR
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # As the kernel names it: the state dir is /var/run/efs, and /var/run is a symlink to /run.
        mountpoint = Path(os.path.realpath(parent)) / volume.name
        mountpoint.mkdir(mode=0o700, exist_ok=True)
        try:
            if self._mounter.is_mounted(str(mountpoint)):
                self._mounter.unmount(str(mountpoint))
            self._mounter.mount(replace(request, path="/", mountpoint=str(mountpoint)))
        except EfsplugError as exc:
            _remove_dir(mountpoint)
            raise AccessPointError(f"volume {shown(volume.name)}: its data was kept: the file system's root could not "
                                   f"be mounted to delete it ({exc})") from None
        try:
            target = mountpoint / root.lstrip("/")
            try:
                shutil.rmtree(target)  # fd-based on Linux: never follows a symlink out of the tree
            except FileNotFoundError:
                pass  # never used, or deleted by a Remove that then failed
            except OSError as exc:
                raise AccessPointError(f"volume {shown(volume.name)}: could not delete its data under {shown(root)} "
                                       f"({exc.strerror or exc}); fix the permissions or delete it by hand, then "
                                       "remove the volume again") from None
        finally:
            self._mounter.unmount(str(mountpoint))
            _remove_dir(mountpoint)

    def _service(self, volume: Volume) -> Tuple[AccessPoints, MountRequest]:
        request = request_from_driver_opts(volume.device, with_tls(volume.options))  # as its mounts see it
        return AccessPoints(region_of(request, self._config(), self._environ)), request


def _remove_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # still mounted (an unmount that failed says so itself) or already gone


def region_of(request: MountRequest, config: Config, environ: Mapping[str, str]) -> str:
    """The region the EFS API is called in for request's file system: as its mounts find it."""
    from efsplug.mount import find_region

    return find_region(request, config, environ, InstanceMetadata.from_environment(environ))
