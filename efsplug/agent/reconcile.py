"""Start-up reconciliation of the agent's state with the kernel's mount table (pure).

The kernel is the truth. A restart of the agent must never unmount anything, so this
only corrects the records: a vanished mount (reboot, an operator's umount) is marked
unmounted and mounted again on the next Mount; a mount made just before a crash, whose
record was not yet written, is adopted; mounts under the volumes root that no volume
knows are reported and left alone.

An efs volume counts as mounted only with an NFS mount at its mountpoint (what efsplug
makes); another type's helper decides its file system type (S3 Files mounts show as nfs4
today), so for those any mount at the volume's own mountpoint counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, List, Mapping

from efsplug.agent.othertypes import FS_TYPE
from efsplug.agent.volumes import Volume, unmounted
from efsplug.mounttable import KernelMount


@dataclass(frozen=True)
class Reconciled:
    volumes: Dict[str, Volume]
    notes: List[str] = field(default_factory=list)  # one line each, for the log
    changed: bool = False  # the state must be written again


def reconcile(volumes: Mapping[str, Volume], mounts: Iterable[KernelMount], volumes_root: Path) -> Reconciled:
    table = list(mounts)
    nfs_points = {os.path.normpath(m.mountpoint) for m in table if m.is_nfs}
    any_points = {os.path.normpath(m.mountpoint) for m in table}
    out: Dict[str, Volume] = {}
    notes: List[str] = []
    changed = False
    for name, volume in sorted(volumes.items()):
        in_kernel = os.path.normpath(volume.mountpoint) in (nfs_points if volume.fs_type == FS_TYPE else any_points)
        if volume.mounted and not in_kernel:
            notes.append(f"volume {name}: its mount is gone (reboot or umount); the next Mount mounts it again")
            volume = unmounted(volume)
            changed = True
        elif in_kernel and not volume.mounted:
            notes.append(f"volume {name}: mounted but not recorded (agent stopped mid-Mount); adopted")
            volume = replace(volume, mounted=True)
            changed = True
        out[name] = volume
    known = {os.path.normpath(v.mountpoint) for v in volumes.values()}
    root = os.path.normpath(str(volumes_root))
    for point in sorted(nfs_points - known):
        if point.startswith(root + os.sep):
            notes.append(f"unknown NFS mount {point} under the volumes root: left alone")
    return Reconciled(out, notes, changed)
