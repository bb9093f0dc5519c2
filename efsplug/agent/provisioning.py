"""Access points on demand for Docker/ECS volumes: what to ask EFS for (pure).

`docker volume create -d amazon-ecs-volume-plugin -o type=efs -o device=fs-… -o
provision=accesspoint …` (and ECS `driverOpts`) gives the volume an access point of its
own: a POSIX user every request is squashed to, and a root directory under a base path,
created on first use with the owner and mode asked for. Remove deletes the access point
and, if asked, its directory. This module turns the driver options into a ProvisionSpec
and a concrete AccessPointRequest (the GID chosen from a range, the directory named from
a pattern); the EFS calls are efsplug.accesspoints', the volume bookkeeping the plugin's.

Driver options (all but `provision` optional):
  provision=accesspoint      give the volume its own access point
  uid=<n>, gid=<n>           the POSIX user of every request (default: gid from gidRange, uid = gid)
  gidRange=<lo>-<hi>         allocate the lowest GID no access point of the file system uses
                             (default 50000-59999, as inclusive bounds)
  rootOwner=<uid>:<gid>      owner of the root directory when EFS creates it (default: the POSIX user)
  rootMode=<octal>           its permissions (default 0750)
  basePath=<path>            where root directories go (default /)
  rootName=<pattern>         the root directory's name: {volume}, {uid}, {gid} (default {volume})
  onRemove=<what>            deleteAccessPoint (default: the data stays), deleteData (the
                             directory too), keep (nothing is deleted)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Tuple

from efsplug.errors import UsageError, shown

PROVISION_OPTS = ("provision", "uid", "gid", "gidRange", "rootOwner", "rootMode", "basePath", "rootName", "onRemove")
DEFAULT_GID_RANGE = (50000, 59999)
DEFAULT_MODE = "0750"
ON_REMOVE = ("deleteAccessPoint", "deleteData", "keep")
MAX_ID = 4294967294  # EFS: 0..2^32-2
MAX_PATH = 100  # EFS: a root directory path of at most 100 characters
VOLUME_TAG = "efsplug:volume"
_NUMBER = re.compile(r"0|[1-9][0-9]{0,9}")
_MODE = re.compile(r"0?[0-7]{3}")
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PLACEHOLDER = re.compile(r"\{([a-z]*)\}")


@dataclass(frozen=True)
class ProvisionSpec:
    """What the volume's driver options ask for; validated, not yet resolved to numbers."""

    uid: Optional[int] = None
    gid: Optional[int] = None
    gid_range: Tuple[int, int] = DEFAULT_GID_RANGE
    root_owner: Optional[Tuple[int, int]] = None
    root_mode: str = DEFAULT_MODE
    base_path: str = "/"
    root_name: str = "{volume}"
    on_remove: str = "deleteAccessPoint"


@dataclass(frozen=True)
class AccessPointRequest:
    """One CreateAccessPoint call, idempotent by its client token."""

    fs_id: str
    volume: str
    uid: int
    gid: int
    path: str
    owner_uid: int
    owner_gid: int
    mode: str
    client_token: str

    def api_arguments(self) -> dict:
        return {
            "ClientToken": self.client_token,
            "FileSystemId": self.fs_id,
            "PosixUser": {"Uid": self.uid, "Gid": self.gid},
            "RootDirectory": {"Path": self.path, "CreationInfo": {
                "OwnerUid": self.owner_uid, "OwnerGid": self.owner_gid, "Permissions": self.mode}},
            "Tags": tags(self.volume),
        }


def parse(opts: Mapping[str, str]) -> Optional[ProvisionSpec]:
    """The spec if the options ask for an access point (None if not); UsageError naming the option."""
    given = {k: v for k, v in opts.items() if k in PROVISION_OPTS}
    if not given:
        return None
    if given.get("provision") != "accesspoint":
        if "provision" in given:
            raise UsageError(f"volume option provision={shown(given['provision'])} is not supported; "
                             "use provision=accesspoint")
        other = sorted(given)[0]
        raise UsageError(f"volume option {other}= needs provision=accesspoint")
    spec = ProvisionSpec(
        uid=_id(given, "uid"),
        gid=_id(given, "gid"),
        gid_range=_range(given["gidRange"]) if "gidRange" in given else DEFAULT_GID_RANGE,
        root_owner=_owner(given["rootOwner"]) if "rootOwner" in given else None,
        root_mode=_mode(given.get("rootMode", DEFAULT_MODE)),
        base_path=_base_path(given.get("basePath", "/")),
        root_name=_pattern(given.get("rootName", "{volume}")),
        on_remove=_on_remove(given.get("onRemove", "deleteAccessPoint")),
    )
    if spec.uid is not None and spec.gid is None:
        raise UsageError("volume option uid= needs gid= too (or leave both out to allocate from gidRange)")
    if spec.gid is not None and "gidRange" in given:
        raise UsageError("volume options gid= and gidRange= exclude each other; keep one")
    return spec


def build_request(spec: ProvisionSpec, *, fs_id: str, volume: str, used_gids: Iterable[int]) -> AccessPointRequest:
    """The CreateAccessPoint call for volume: GID allocated if none was given, directory named."""
    gid = spec.gid if spec.gid is not None else allocate_gid(spec.gid_range, used_gids)
    uid = spec.uid if spec.uid is not None else gid
    owner_uid, owner_gid = spec.root_owner if spec.root_owner is not None else (uid, gid)
    return AccessPointRequest(
        fs_id=fs_id, volume=volume, uid=uid, gid=gid, path=root_directory(spec, volume, uid, gid),
        owner_uid=owner_uid, owner_gid=owner_gid, mode=spec.root_mode, client_token=client_token(fs_id, volume),
    )


def allocate_gid(gid_range: Tuple[int, int], used: Iterable[int]) -> int:
    """The lowest GID in the (inclusive) range that no access point of the file system uses."""
    taken = set(used)
    low, high = gid_range
    for gid in range(low, high + 1):
        if gid not in taken:
            return gid
    raise UsageError(f"GID range {low}-{high} is exhausted: every GID is used by an access point of the file "
                     "system; widen gidRange= or delete unused access points")


def root_directory(spec: ProvisionSpec, volume: str, uid: int, gid: int) -> str:
    name = _PLACEHOLDER.sub(lambda m: {"volume": volume, "uid": str(uid), "gid": str(gid)}[m.group(1)], spec.root_name)
    if not _COMPONENT.fullmatch(name):
        raise UsageError(f"root directory name {shown(name)} (from rootName= and the volume name) must be letters, "
                         "digits, '_', '.' or '-'")
    path = spec.base_path.rstrip("/") + "/" + name
    if len(path) > MAX_PATH:
        raise UsageError(f"root directory {shown(path)} is longer than EFS allows ({MAX_PATH} characters); "
                         "shorten basePath= or rootName=")
    return path


def client_token(fs_id: str, volume: str) -> str:
    """The same for every Create of this volume on this file system: retries and restarts
    get the one access point back instead of a second one (EFS: at most 64 characters)."""
    return "efsplug-" + hashlib.sha256(f"{fs_id}\0{volume}".encode()).hexdigest()[:40]


def tags(volume: str) -> List[dict]:
    """Name the volume on its access point: how a restarted agent finds (and adopts) it."""
    return [{"Key": VOLUME_TAG, "Value": volume}, {"Key": "Name", "Value": f"efsplug {volume}"[:256]}]


def volume_of(access_point: Mapping[str, object]) -> Optional[str]:
    """The volume an access point (a DescribeAccessPoints entry) was made for, from its tags."""
    for tag in access_point.get("Tags") or []:  # type: ignore[union-attr]
        if isinstance(tag, dict) and tag.get("Key") == VOLUME_TAG and isinstance(tag.get("Value"), str):
            return tag["Value"]
    return None


def without_volume(access_points: Iterable[Mapping[str, object]],
                   held: Mapping[str, Optional[str]]) -> List[Mapping[str, object]]:
    """The access points efsplug made (tagged with a volume) that no volume here holds;
    held maps each volume's name to its access point."""
    return [ap for ap in access_points
            if volume_of(ap) is not None and held.get(volume_of(ap) or "") != ap.get("AccessPointId")]


def root_of(access_point: Mapping[str, object]) -> str:
    """An access point's root directory (a DescribeAccessPoints entry); "/" if it names none."""
    root = access_point.get("RootDirectory")
    path = root.get("Path") if isinstance(root, dict) else None
    return "/" + "/".join(p for p in path.split("/") if p) if isinstance(path, str) else "/"


def data_shared_with(ours: Mapping[str, object], others: Iterable[Mapping[str, object]]) -> Optional[str]:
    """Why ours' root directory must not be deleted (None: it may be): it is the file system's
    root, or another access point's root directory is it or lies under it (that access point's
    data would go too)."""
    root = root_of(ours)
    if root == "/":
        return "its root directory is the file system's root"
    for other in others:
        if other.get("AccessPointId") == ours.get("AccessPointId"):
            continue
        theirs = root_of(other)
        if theirs == root or theirs.startswith(root + "/"):
            return f"access point {shown(other.get('AccessPointId'))} uses {shown(theirs)}"
    return None


def _id(opts: Mapping[str, str], name: str) -> Optional[int]:
    if name not in opts:
        return None
    value = opts[name]
    if not _NUMBER.fullmatch(value) or int(value) > MAX_ID:
        raise UsageError(f"volume option {name}={shown(value)} must be a number from 0 to {MAX_ID}")
    return int(value)


def _range(value: str) -> Tuple[int, int]:
    low, sep, high = value.partition("-")
    if not sep or not _NUMBER.fullmatch(low) or not _NUMBER.fullmatch(high) or not int(low) <= int(high) <= MAX_ID:
        raise UsageError(f"volume option gidRange={shown(value)} must be <low>-<high>, numbers with low <= high")
    return int(low), int(high)


def _owner(value: str) -> Tuple[int, int]:
    uid, sep, gid = value.partition(":")
    if not sep or not _NUMBER.fullmatch(uid) or not _NUMBER.fullmatch(gid) or max(int(uid), int(gid)) > MAX_ID:
        raise UsageError(f"volume option rootOwner={shown(value)} must be <uid>:<gid>")
    return int(uid), int(gid)


def _mode(value: str) -> str:
    if not _MODE.fullmatch(value):
        raise UsageError(f"volume option rootMode={shown(value)} must be octal permissions such as 0750")
    return value.rjust(4, "0")


def _base_path(value: str) -> str:
    parts = value.split("/")
    if not value.startswith("/") or not all(_COMPONENT.fullmatch(p) for p in parts[1:] if p) \
            or any(p in (".", "..") for p in parts):
        raise UsageError(f"volume option basePath={shown(value)} must be an absolute path of plain names")
    return "/" + "/".join(p for p in parts if p)


def _pattern(value: str) -> str:
    for name in _PLACEHOLDER.findall(value):
        if name not in ("volume", "uid", "gid"):
            raise UsageError(f"volume option rootName={shown(value)}: unknown placeholder {{{name}}}; "
                             "use {volume}, {uid} or {gid}")
    if not value or "/" in value:
        raise UsageError(f"volume option rootName={shown(value)} must be one directory name")
    return value


def _on_remove(value: str) -> str:
    if value not in ON_REMOVE:
        raise UsageError(f"volume option onRemove={shown(value)} must be one of {', '.join(ON_REMOVE)}")
    return value
