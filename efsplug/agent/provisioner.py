"""The plugin's access points on demand: made at Create, deleted at Remove (the I/O edge).

The region is found as for the volume's mounts (its `region=` option, AWS_REGION, the
config, instance metadata); the credentials are the host's (the agent's profile, else the
instance role). What to ask EFS for is efsplug.agent.provisioning's; how, efsplug.accesspoints'.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Protocol, Tuple

from efsplug.accesspoints import AccessPoints
from efsplug.agent import provisioning
from efsplug.agent.volumes import Volume, with_tls
from efsplug.config import Config
from efsplug.imds import InstanceMetadata
from efsplug.options import MountRequest, request_from_driver_opts


class Provisioner(Protocol):
    def create(self, volume: Volume) -> str: ...

    def delete(self, volume: Volume) -> None: ...


class AccessPointProvisioner:
    def __init__(self, config: Callable[[], Config], environ: Mapping[str, str] = os.environ) -> None:
        self._config, self._environ = config, environ

    def create(self, volume: Volume) -> str:
        """The volume's access point, adopted if one is tagged with its name, else made."""
        spec = volume.provision_spec
        assert spec is not None, "only provisioned volumes get an access point"
        aps, request = self._service(volume)
        existing = aps.list(request.fs_id)
        used = [ap["PosixUser"]["Gid"] for ap in existing if isinstance(ap.get("PosixUser"), dict)]
        return aps.create(provisioning.build_request(spec, fs_id=request.fs_id, volume=volume.name, used_gids=used))

    def delete(self, volume: Volume) -> None:
        if volume.access_point is None:
            return
        aps, request = self._service(volume)
        aps.delete(request.fs_id, volume.access_point)

    def _service(self, volume: Volume) -> Tuple[AccessPoints, MountRequest]:
        from efsplug.mount import find_region

        request = request_from_driver_opts(volume.device, with_tls(volume.options))  # as its mounts see it
        config = self._config()
        region = find_region(request, config, self._environ, InstanceMetadata.from_environment(self._environ))
        return AccessPoints(region), request
