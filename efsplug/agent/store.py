"""The agent's durable state: every volume, in one versioned JSON file.

Written with fsutil.atomic_write (temp file, fsync, rename, fsync dir) before any answer
goes back to Docker. A file that cannot be used is moved aside with a timestamp and the
agent starts empty instead of crash-looping (the reference plugin exits on every start).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from efsplug.agent.othertypes import FS_TYPE, TYPES
from efsplug.agent.provisioning import PROVISION_OPTS
from efsplug.agent.protocol import VOLUME_NAME_RE, MOUNT_ID_RE
from efsplug.agent.volumes import Volume
from efsplug.errors import EfsplugError
from efsplug.fsutil import atomic_write
from efsplug.optionvalues import REGION_RE
from efsplug.state import StateError, parse_json, read_bounded

ACCESS_POINT_RE = re.compile(r"fsap-[0-9a-f]{17}")
FS_ID_RE = re.compile(r"fs-[0-9a-f]{8,40}")
MAX_PROVISIONED_ON = 1000  # file systems; each costs a DescribeAccessPoints in `efsplug status`

FORMAT_VERSION = 1
MAX_STATE_BYTES = 32 * 1024 * 1024  # some 50,000 volumes; a bigger file is not ours
DEFAULT_STATE_PATH = Path("/var/lib/ecs/data/efsplug-volumes.json")
FILE_MODE = 0o600  # holds credentials URIs
DIR_MODE = 0o700


class StateWriteError(EfsplugError):
    """The state could not be made durable: the change is refused, Docker sees why."""


class CorruptState(ValueError):
    """The state file's content is unusable; the message says why (no values echoed)."""


@dataclass(frozen=True, order=True)
class ProvisionedOn:
    """A file system (and the region its volume named, "" for the host's) this agent has made
    access points on: remembered before the first CreateAccessPoint there, and never
    forgotten, so `efsplug status` can find access points whose volume is gone."""

    fs_id: str
    region: str = ""


@dataclass(frozen=True)
class Loaded:
    volumes: Dict[str, Volume]
    quarantined: Optional[Path] = None  # where an unusable file was moved
    problem: Optional[str] = None
    provisioned_on: Tuple[ProvisionedOn, ...] = ()


def encode(volumes: Mapping[str, Volume], provisioned_on: Tuple[ProvisionedOn, ...] = ()) -> bytes:
    body: Dict[str, Any] = {
        "version": FORMAT_VERSION,
        "volumes": {name: _volume_dict(v) for name, v in sorted(volumes.items())},
    }
    if provisioned_on:  # absent until the first access point: older files stay as they were
        body["provisioned_on"] = [asdict(p) for p in sorted(set(provisioned_on))]
    return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


def _volume_dict(volume: Volume) -> Dict[str, Any]:
    data = asdict(volume)
    data["refs"] = dict(volume.refs)
    data["provision"] = dict(volume.provision)
    del data["name"]  # the key
    return data


def decode(raw: bytes) -> Dict[str, Volume]:
    """The volumes in raw; CorruptState (nothing else) for anything unusable."""
    return decode_all(raw)[0]


def decode_all(raw: bytes) -> Tuple[Dict[str, Volume], Tuple[ProvisionedOn, ...]]:
    """The volumes and the file systems provisioned on; CorruptState for anything unusable."""
    try:
        data = parse_json(raw)  # bounded nesting and numbers: a hostile file cannot exhaust us
    except StateError as exc:
        raise CorruptState(str(exc)) from None
    if not isinstance(data, dict) or not isinstance(data.get("volumes"), dict):
        raise CorruptState("not an object with 'volumes'")
    version = data.get("version")
    if version != FORMAT_VERSION:
        shown_version = version if isinstance(version, int) else "missing or not a number"
        raise CorruptState(f"format version {shown_version} is not {FORMAT_VERSION} (written by another efsplug version?)")
    volumes = {name: _volume(name, item) for name, item in data["volumes"].items()}
    return volumes, _provisioned_on(data.get("provisioned_on", []))


def _provisioned_on(items: object) -> Tuple[ProvisionedOn, ...]:
    if not isinstance(items, list) or len(items) > MAX_PROVISIONED_ON:
        raise CorruptState(f"'provisioned_on' must be a list of at most {MAX_PROVISIONED_ON} file systems")
    found = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("fs_id"), str) and FS_ID_RE.fullmatch(item["fs_id"])
                and isinstance(item.get("region", ""), str)
                and (item.get("region", "") == "" or REGION_RE.fullmatch(item["region"]))):
            raise CorruptState("'provisioned_on' holds an entry that is not a file system id and region")
        found.append(ProvisionedOn(item["fs_id"], item.get("region", "")))
    return tuple(sorted(set(found)))


def _volume(name: str, item: object) -> Volume:
    if not isinstance(name, str) or not VOLUME_NAME_RE.fullmatch(name):
        raise CorruptState("a volume name is invalid")
    if not isinstance(item, dict):
        raise CorruptState(f"volume {name}: not an object")
    for key in ("device", "options", "mountpoint", "created_at"):
        if not isinstance(item.get(key), str):
            raise CorruptState(f"volume {name}: '{key}' is missing or not a string")
    refs = item.get("refs", {})
    if not isinstance(refs, dict) or not all(
        isinstance(k, str) and MOUNT_ID_RE.fullmatch(k) and isinstance(v, int) and v > 0 for k, v in refs.items()
    ):
        raise CorruptState(f"volume {name}: 'refs' must map mount IDs to positive counts")
    if not isinstance(item.get("mounted", False), bool):
        raise CorruptState(f"volume {name}: 'mounted' is not true/false")
    fs_type = item.get("fs_type", FS_TYPE)  # absent in files written before other types existed
    if fs_type not in TYPES:
        raise CorruptState(f"volume {name}: 'fs_type' is not one of {', '.join(TYPES)}")
    provision = item.get("provision") or {}  # absent in files written before access points on demand
    if not isinstance(provision, dict) or not all(
            k in PROVISION_OPTS and isinstance(v, str) and len(v) <= 256 for k, v in provision.items()):
        raise CorruptState(f"volume {name}: 'provision' must map provisioning options to strings")
    access_point = item.get("access_point")
    if access_point is not None and not (isinstance(access_point, str) and ACCESS_POINT_RE.fullmatch(access_point)):
        raise CorruptState(f"volume {name}: 'access_point' is not an access point id")
    return Volume(
        name=name, device=item["device"], options=item["options"], mountpoint=item["mountpoint"],
        created_at=item["created_at"], mounted=item.get("mounted", False), refs=tuple(sorted(refs.items())),
        fs_type=fs_type, provision=tuple(sorted(provision.items())), access_point=access_point,
    )


class Store:
    def __init__(self, path: Path = DEFAULT_STATE_PATH) -> None:
        self.path = Path(path)

    def load(self, now: Optional[datetime] = None) -> Loaded:
        """Volumes from the file; an unusable file is quarantined and the state starts empty."""
        if not os.path.lexists(self.path):
            return Loaded({})
        try:
            volumes, provisioned_on = self.read()
            return Loaded(volumes, provisioned_on=provisioned_on)
        except (CorruptState, StateError) as exc:
            return Loaded({}, self._quarantine(now or datetime.now(timezone.utc)), str(exc))

    def read(self) -> Tuple[Dict[str, Volume], Tuple[ProvisionedOn, ...]]:
        """The file's volumes and provisioned file systems, changing nothing (efsplug status
        reads it too); CorruptState or StateError if it is unusable."""
        # Bounded, never blocking (a FIFO), never following a symlink.
        return decode_all(read_bounded(self.path, MAX_STATE_BYTES))

    def _quarantine(self, when: datetime) -> Path:
        stamp = when.strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        os.replace(self.path, target)
        return target

    def save(self, volumes: Mapping[str, Volume], provisioned_on: Tuple[ProvisionedOn, ...] = ()) -> None:
        """Durable before it returns (fsync of the file and of the directory)."""
        try:
            if not self.path.parent.is_dir():
                # Create only what is missing; an existing directory (/var/lib/ecs/data) keeps its mode.
                self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            atomic_write(self.path, encode(volumes, provisioned_on), FILE_MODE)
        except OSError as exc:
            raise StateWriteError(
                f"cannot write the agent state {self.path}: {exc.strerror or exc}; free space or fix permissions"
            ) from None

    def quarantined_files(self) -> List[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.corrupt-*"))
