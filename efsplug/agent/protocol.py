"""The Docker volume plugin wire format: request bodies in, answers out (pure).

dockerd sends no Content-Type, ends bodies with a newline, sends `"Opts": null` for a
volume made implicitly by `docker run --volume-driver`, and shows a non-empty `Err`
verbatim to the user. Everything here is decoding and encoding; no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from efsplug.errors import EfsplugError, shown

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 1024 * 1024
MAX_NUMBER_DIGITS = 40

ACTIVATE = "/Plugin.Activate"
CREATE = "/VolumeDriver.Create"
REMOVE = "/VolumeDriver.Remove"
MOUNT = "/VolumeDriver.Mount"
UNMOUNT = "/VolumeDriver.Unmount"
PATH = "/VolumeDriver.Path"
GET = "/VolumeDriver.Get"
LIST = "/VolumeDriver.List"
CAPABILITIES = "/VolumeDriver.Capabilities"
ENDPOINTS = (ACTIVATE, CREATE, REMOVE, MOUNT, UNMOUNT, PATH, GET, LIST, CAPABILITIES)

# Docker's own rule for named volumes; it also makes the name a safe path component
# (no '/', cannot be '.' or '..') under the volumes root.
VOLUME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
# Docker sends 64 hex digits; accept any short printable token so a future format works.
MOUNT_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class ProtocolError(EfsplugError):
    """A request the plugin cannot decode; its text is the Err the caller sees."""


@dataclass(frozen=True)
class Empty:
    """Activate, List and Capabilities carry nothing we use."""


@dataclass(frozen=True)
class NameRequest:
    """Remove, Path and Get."""

    name: str


@dataclass(frozen=True)
class CreateRequest:
    name: str
    opts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MountIdRequest:
    """Mount and Unmount: the volume and the per-container-mount ID."""

    name: str
    id: str


Request = Union[Empty, NameRequest, CreateRequest, MountIdRequest]


def decode(endpoint: str, body: bytes) -> Request:
    """The typed request for endpoint; ProtocolError for anything malformed."""
    if endpoint not in ENDPOINTS:
        raise ProtocolError(f"unknown endpoint {shown(endpoint)}; this plugin implements VolumeDriver")
    if endpoint in (ACTIVATE, LIST, CAPABILITIES):
        return Empty()  # bodies are empty or {}; nothing in them matters
    data = _json_object(body)
    name = _name(data.get("Name"))
    if endpoint == CREATE:
        return CreateRequest(name, _opts(data.get("Opts")))
    if endpoint in (MOUNT, UNMOUNT):
        return MountIdRequest(name, _mount_id(data.get("ID")))
    return NameRequest(name)


def _json_object(body: bytes) -> Dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"), parse_int=_bounded_int) if body.strip() else {}
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("request body is not valid JSON; send a JSON object") from None
    except RecursionError:  # "[[[[...": json gives up at the recursion limit, not with a ValueError
        raise ProtocolError("request body nests JSON too deeply; send a flat JSON object") from None
    if not isinstance(data, dict):
        raise ProtocolError("request body is not a JSON object; send {\"Name\": ...}")
    return data


def _bounded_int(text: str) -> int:
    # Docker sends no numbers. int() of a long digit string is quadratic where Python has no
    # digit limit (3.9 before 3.9.14): a 1 MiB number held the interpreter for 4 s.
    if len(text) > MAX_NUMBER_DIGITS:
        raise ProtocolError(f"request body has a number over {MAX_NUMBER_DIGITS} digits; Docker sends none")
    return int(text)


def _name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError("volume name is missing; send \"Name\"")
    if not VOLUME_NAME_RE.fullmatch(value):
        raise ProtocolError(
            f"volume name {shown(value)} is invalid; use up to 200 letters, digits and _.- starting with a letter or digit"
        )
    return value


def _mount_id(value: object) -> str:
    if value is None:
        raise ProtocolError("mount ID is missing; send the \"ID\" Docker assigned")
    if not isinstance(value, str) or not MOUNT_ID_RE.fullmatch(value):
        raise ProtocolError(f"mount ID {shown(value)} is invalid; send the \"ID\" Docker assigned")
    return value


def _opts(value: object) -> Dict[str, str]:
    if value is None:
        return {}  # docker run --volume-driver: the volume arrives without options
    if not isinstance(value, dict):
        raise ProtocolError("volume options are not a JSON object; send \"Opts\": {\"key\": \"value\"}")
    out: Dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(item, str):
            raise ProtocolError(f"volume option {shown(key)} is not a string; pass -o {key}=<value>")
        out[str(key)] = item
    return out


# --- answers ----------------------------------------------------------------------------

def encode(answer: Mapping[str, Any]) -> bytes:
    return (json.dumps(answer, separators=(",", ":")) + "\n").encode()


def error(err: str) -> Dict[str, Any]:
    return {"Err": err}


def activate() -> Dict[str, Any]:
    return {"Implements": ["VolumeDriver"]}


def capabilities() -> Dict[str, Any]:
    # local: the mount lives on this host; Docker must not assume other hosts see it.
    return {"Capabilities": {"Scope": "local"}}


def mountpoint(path: str, err: str = "") -> Dict[str, Any]:
    return {"Mountpoint": path, "Err": err}


def volume(name: str, path: str, created_at: str, status: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    return {"Volume": {"Name": name, "Mountpoint": path, "CreatedAt": created_at, "Status": dict(status or {})}, "Err": ""}


def volume_list(entries: List[Dict[str, str]]) -> Dict[str, Any]:
    return {"Volumes": entries, "Err": ""}
