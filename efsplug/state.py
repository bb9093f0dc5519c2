"""One JSON record per mount: what the supervisor needs to watch, renew and clean up.

Records are written atomically (fsutil.atomic_write) so a crash leaves the old record or
the new one. A record that does not parse is reported, never fatal: one bad file must
not stop the supervisor from looking after every other mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from efsplug.fsutil import atomic_write, ensure_dir, fsync_dir, is_temp_name, leftover_temp_files
from efsplug.tunnel import TunnelIdentity

RECORD_VERSION = 1
DIR_MODE = 0o750
FILE_MODE = 0o600
SUFFIX = ".json"
_FS_ID = re.compile(r"fs-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_MAX_ESCAPED = 150  # keeps the whole file name well under NAME_MAX (255)
_ESCAPE_KEEP = re.compile(r"[A-Za-z0-9:_.]")


class StateError(ValueError):
    """A state file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class StateProblem:
    path: Path
    reason: str


@dataclass
class MountRecord:
    fs_id: str
    mountpoint: str
    path: str = "/"
    port: Optional[int] = None  # local tunnel port; None without TLS
    tunnel: Optional[TunnelIdentity] = None
    config_file: Optional[str] = None
    files_created: List[str] = field(default_factory=list)  # removed when the mount goes
    credential_source: Optional[str] = None  # where IAM credentials came from; never secrets
    credential_expiry: Optional[datetime] = None
    cert_not_before: Optional[datetime] = None
    cert_not_after: Optional[datetime] = None
    access_point: Optional[str] = None
    netns: Optional[str] = None
    region: Optional[str] = None
    mount_time: Optional[datetime] = None
    tls: bool = False
    iam: bool = False
    version: int = RECORD_VERSION


_DATETIME_FIELDS = ("credential_expiry", "cert_not_before", "cert_not_after", "mount_time")
_OPTIONAL_STR_FIELDS = ("config_file", "credential_source", "access_point", "netns", "region")


def escape_path(path: str) -> str:
    """systemd-escape --path: /mnt/my-efs -> mnt-my\\x2defs (one-to-one, no '/')."""
    trimmed = path.strip("/")
    if not trimmed:
        return "-"
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif _ESCAPE_KEEP.fullmatch(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def file_name(record: MountRecord) -> str:
    """`<fs_id>.<escaped mountpoint>[.<port>].json`, bounded in length."""
    _validate(record)
    escaped = escape_path(record.mountpoint)
    if len(escaped) > _MAX_ESCAPED:
        digest = hashlib.sha256(record.mountpoint.encode()).hexdigest()[:16]
        escaped = f"{escaped[:_MAX_ESCAPED - 17]}~{digest}"
    port = "" if record.port is None else f".{record.port}"
    return f"{record.fs_id}.{escaped}{port}{SUFFIX}"


def record_path(state_dir: Path, record: MountRecord) -> Path:
    return Path(state_dir) / file_name(record)


def save(state_dir: Path, record: MountRecord) -> Path:
    """Write record atomically under state_dir (0750), as a 0600 file; returns its path."""
    ensure_dir(state_dir, DIR_MODE)
    path = record_path(state_dir, record)
    atomic_write(path, (json.dumps(to_dict(record), indent=2, sort_keys=True) + "\n").encode(), FILE_MODE)
    return path


def remove(state_dir: Path, record: MountRecord) -> None:
    """Delete record's file (idempotent)."""
    try:
        os.unlink(record_path(state_dir, record))
    except FileNotFoundError:
        return
    fsync_dir(state_dir)


def load(path: Path) -> MountRecord:
    """Read one record; StateError (with the file name) for anything unusable."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{path}: not valid JSON ({e}); the file is corrupt") from None
    try:
        return from_dict(data)
    except StateError as e:
        raise StateError(f"{path}: {e}") from None


def load_all(state_dir: Path) -> Tuple[List[MountRecord], List[StateProblem]]:
    """Every readable record, plus one problem per file that could not be used.

    Temp files left by a writer that crashed mid-write are deleted (their target is
    intact by construction); a missing state_dir simply means no mounts.
    """
    records: List[MountRecord] = []
    problems: List[StateProblem] = []
    directory = Path(state_dir)
    if not directory.is_dir():
        return records, problems
    for leftover in leftover_temp_files(directory):
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            problems.append(StateProblem(leftover, f"cannot remove leftover temp file: {e.strerror}"))
    for entry in sorted(directory.iterdir()):
        if is_temp_name(entry.name) or not entry.name.endswith(SUFFIX):
            continue
        try:
            records.append(load(entry))
        except StateError as e:
            problems.append(StateProblem(entry, str(e)))
    return records, problems


def to_dict(record: MountRecord) -> Dict[str, Any]:
    data = asdict(record)
    for name in _DATETIME_FIELDS:
        value = getattr(record, name)
        data[name] = None if value is None else value.isoformat()
    if record.tunnel is not None:
        data["tunnel"]["cmdline"] = list(record.tunnel.cmdline)
    return data


def from_dict(data: object) -> MountRecord:
    if not isinstance(data, dict):
        raise StateError("not a mount record (expected a JSON object)")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StateError("not a mount record (no version)")
    if version > RECORD_VERSION:
        raise StateError(
            f"written by a newer efsplug (record version {version}, this one reads "
            f"{RECORD_VERSION}); left untouched"
        )
    if version < 1:
        raise StateError(f"unknown record version {version}")
    known = {f.name for f in fields(MountRecord)}
    values: Dict[str, Any] = {k: v for k, v in data.items() if k in known}
    for name in ("fs_id", "mountpoint"):
        if name not in values:
            raise StateError(f"field {name!r} is missing")
    for name in _DATETIME_FIELDS:
        values[name] = _parse_datetime(name, values.get(name))
    values["tunnel"] = _parse_identity(values.get("tunnel"))
    record = MountRecord(**values)
    _validate(record)
    return record


def _parse_datetime(name: str, value: object) -> Optional[datetime]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StateError(f"field {name!r} must be an ISO 8601 time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise StateError(f"field {name!r} must be an ISO 8601 time, got {value!r}") from None
    if parsed.tzinfo is None:
        raise StateError(f"field {name!r} has no time zone: {value!r}")
    return parsed


def _parse_identity(value: object) -> Optional[TunnelIdentity]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StateError("field 'tunnel' must be an object")
    pid, create_time, cmdline = value.get("pid"), value.get("create_time"), value.get("cmdline")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise StateError(f"tunnel pid must be a positive integer, got {pid!r}")
    if not isinstance(create_time, (int, float)) or isinstance(create_time, bool):
        raise StateError(f"tunnel create_time must be a number, got {create_time!r}")
    if not isinstance(cmdline, list) or not all(isinstance(a, str) for a in cmdline):
        raise StateError("tunnel cmdline must be a list of strings")
    return TunnelIdentity(pid=pid, create_time=float(create_time), cmdline=tuple(cmdline))


def _validate(record: MountRecord) -> None:
    """Types and shapes, so a record is trustworthy once loaded (or before it is named)."""
    if not isinstance(record.fs_id, str) or not _FS_ID.fullmatch(record.fs_id):
        raise StateError(f"fs_id {record.fs_id!r} is not a file system id (fs-<8 or 17 hex>)")
    for name in ("mountpoint", "path"):
        value = getattr(record, name)
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            raise StateError(f"{name} {value!r} must be an absolute path")
    port = record.port
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
        raise StateError(f"port {port!r} must be an integer between 1 and 65535")
    if record.tunnel is not None and not isinstance(record.tunnel, TunnelIdentity):
        raise StateError("tunnel must be a TunnelIdentity")
    for name in _OPTIONAL_STR_FIELDS:
        value = getattr(record, name)
        if value is not None and not isinstance(value, str):
            raise StateError(f"field {name!r} must be a string, got {value!r}")
    if not isinstance(record.files_created, list) or not all(isinstance(p, str) for p in record.files_created):
        raise StateError("files_created must be a list of paths")
    for name in ("tls", "iam"):
        if not isinstance(getattr(record, name), bool):
            raise StateError(f"field {name!r} must be true or false")
    for name in _DATETIME_FIELDS:
        value = getattr(record, name)
        if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
            raise StateError(f"field {name!r} must be a time-zone aware datetime")
