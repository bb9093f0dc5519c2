"""Mounts that share one tunnel.

Two mounts of the same file system through the same access point, with the same IAM
identity, in the same network namespace and with the same TLS settings would get the
same stunnel configuration and the same certificate: the second one joins the first
one's tunnel (no new process, port or certificate). The kernel then also shares one NFS
client, and so one TLS connection, between them.

share_key() says what must match (pure). join() finds a live tunnel with that key and
saves the new mount's record against it while holding the tunnel's port lock, the lock
unmount.release() holds while it decides whether anyone else still uses a tunnel: a
tunnel is never stopped under a mount that has just joined it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

from efsplug import ports, state
from efsplug.state import MountRecord
from efsplug.tunnel import Tunnel, listening_on

KEY_VERSION = "1"  # part of the key: a change of what is compared never matches old records


def share_key(*, fs_id: str, access_point: Optional[str], region: str, netns: Optional[str], iam: bool,
              credential_source: Optional[str], tunnel: dict) -> str:
    """A digest of everything that makes two tunnels interchangeable.

    tunnel: the stunnel settings other than the local port and per-mount paths. The
    credential source is compared as persisted (an ECS credentials URI is one task's:
    two tasks never share a tunnel even when they run as the same role).
    """
    what = {"v": KEY_VERSION, "fs": fs_id, "ap": access_point, "region": region, "netns": netns, "iam": iam,
            "creds": credential_source, "tunnel": tunnel}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def tunnel_key(record: MountRecord) -> Optional[Tuple[int, str]]:
    """The tunnel record's mount goes through: its port and config file; None without one."""
    if record.port is None or record.config_file is None:
        return None
    return record.port, record.config_file


def same_tunnel(a: MountRecord, b: MountRecord) -> bool:
    """a and b are served by one tunnel process (the same port and config file)."""
    key = tunnel_key(a)
    return key is not None and key == tunnel_key(b)


def siblings(record: MountRecord, records: Iterable[MountRecord]) -> List[MountRecord]:
    """The other records whose mounts go through record's tunnel."""
    name = state.file_name(record)
    return [r for r in records if same_tunnel(r, record) and state.file_name(r) != name]


def candidates(key: str, records: Iterable[MountRecord], mountpoint: str) -> List[MountRecord]:
    """Records of live-looking tunnels with this key; not one for the same mount point
    (its record would share this mount's file name)."""
    here = os.path.normpath(mountpoint)
    return [r for r in records
            if r.share_key == key and r.tunnel is not None and r.port is not None and r.config_file is not None
            and os.path.normpath(r.mountpoint) != here]


def join(state_dir: Path, key: str, new: MountRecord, make_dir: Callable[[MountRecord], Path],
         when: datetime) -> Optional[MountRecord]:
    """Save new as a mount through a live tunnel with key; None if there is none to join.

    new carries the mount's own fields; port, tunnel, config file and certificate times
    come from the tunnel's record. make_dir makes the mount's own directory (the
    supervisor's status file for it lives there). A tunnel whose port lock is held is
    being stopped or joined right now: it is passed over, never waited for.
    """
    records, _problems = state.load_all(state_dir)
    for found in candidates(key, records, new.mountpoint):
        assert found.port is not None and found.tunnel is not None
        hold = ports.hold_port(Path(state_dir) / "ports", found.port)
        if hold is None:
            continue
        with hold:
            try:
                current = state.load(state.record_path(state_dir, found))
            except state.StateError:
                continue  # released (or spoilt) since the directory was read
            tunnel = Tunnel.from_identity(current.tunnel) if current.tunnel and current == found else None
            if tunnel is None or not listening_on(tunnel.pid, found.port):
                continue  # restarting or gone: the supervisor's business, not a tunnel to join
            record = replace(
                new, port=found.port, tunnel=found.tunnel, config_file=found.config_file, share_key=key,
                host_config=found.host_config, version=found.version,
                cert_not_before=found.cert_not_before, cert_not_after=found.cert_not_after,
                credential_expiry=found.credential_expiry, mount_time=when, files_created=[],
            )
            own_dir = make_dir(record)
            record = replace(record, files_created=[str(own_dir)])
            try:
                state.save(state_dir, record)
            except BaseException:
                shutil.rmtree(own_dir, ignore_errors=True)
                raise
            return record
    return None
