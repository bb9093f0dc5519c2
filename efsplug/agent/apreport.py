"""`efsplug status`: access points efsplug made whose volume this host no longer has.

A Create that was never retried after the agent died, a volume removed with onRemove=keep,
or a state file lost: the access point stays in EFS, tagged with its volume's name. The
agent remembers each file system it provisioned on (efsplug.agent.store.ProvisionedOn);
this lists their access points and names the ones no volume here holds. Reported, never
deleted: another host may have a volume of that name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping

from efsplug.accesspoints import AccessPoints
from efsplug.agent import provisioning
from efsplug.agent.provisioner import region_of
from efsplug.agent.store import CorruptState, Store
from efsplug.config import Config
from efsplug.errors import EfsplugError, shown
from efsplug.options import request_from_driver_opts
from efsplug.state import StateError

CALL_DEADLINE = 5.0  # per file system: status must answer even when EFS does not


def unowned_access_points(state_path: Path, config: Config, environ: Mapping[str, str] = os.environ) -> List[str]:
    """One line per access point without its volume, or per file system that could not be checked."""
    if not os.path.lexists(state_path):
        return []
    try:
        volumes, provisioned_on = Store(state_path).read()  # never quarantined from here
    except (CorruptState, StateError) as exc:
        return [f"access points: not checked, the agent state {state_path} is unusable ({exc})"]
    held = {name: v.access_point for name, v in volumes.items()}
    lines = []
    for entry in provisioned_on:
        request = request_from_driver_opts(entry.fs_id, "tls" + (f",region={entry.region}" if entry.region else ""))
        try:
            listed = AccessPoints(region_of(request, config, environ), call_deadline=CALL_DEADLINE).list(entry.fs_id)
        except EfsplugError as exc:
            lines.append(f"access points of {entry.fs_id}: not checked ({exc})")
            continue
        for ap in provisioning.without_volume(listed, held):
            lines.append(
                f"access point {shown(ap.get('AccessPointId'))} of {entry.fs_id} ({shown(provisioning.root_of(ap))}) "
                f"was made for volume {shown(provisioning.volume_of(ap))}, which this host does not have; create the "
                "volume again to adopt it, or delete the access point if no other host uses it")
    return lines
