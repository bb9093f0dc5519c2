"""One JSON record per mount: what the supervisor needs to watch, renew and clean up.

Records are written atomically (fsutil.atomic_write) so a crash leaves the old record or
the new one. A record that does not parse is reported, never fatal: one bad file must
not stop the supervisor from looking after every other mount. So load() trusts nothing
in a file: its size is bounded before it is read, its nesting and numbers before they
are parsed, and every field's type and range before a record is made; whatever is
wrong comes out as a StateError, never as another exception.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from efsplug import procinfo
from efsplug.errors import shown
from efsplug.fsutil import atomic_write, ensure_dir, fsync_dir, is_temp_name, leftover_temp_files
from efsplug.tunnel import TunnelIdentity

RECORD_VERSION = 2  # the newest this reads
# Records of tunnels in a shared stunnel process: an efsplug that predates them must not
# take their section for a whole config, so they carry a version it refuses.
HOSTED_VERSION = 2
DIR_MODE = 0o750
FILE_MODE = 0o600
SUFFIX = ".json"
_FS_ID = re.compile(r"fs-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_MAX_ESCAPED = 150  # keeps the whole file name well under NAME_MAX (255)
_ESCAPE_KEEP = re.compile(r"[A-Za-z0-9:_.]")
# A record is ~1-2 KiB; anything much larger is not one, and is refused before it is read.
MAX_RECORD_BYTES = 64 * 1024
_MAX_DEPTH = 8  # a record nests 3 deep (record > tunnel > cmdline)
_MAX_NUMBER_CHARS = 32  # pids, ports, versions and times; a longer number is no record's
_MAX_CMDLINE = 64
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT: no pid is larger
_TIME_RANGE = (datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(9000, 1, 1, tzinfo=timezone.utc))
_STRING_OR_ESCAPE = re.compile(rb'"(?:[^"\\]|\\.)*"')
QUARANTINE_MARK = ".corrupt-"  # <record>.json.corrupt-<UTC time>: kept for a person to read


class StateError(ValueError):
    """A state file that cannot be used; the message names the file and the reason.

    corrupt: the file itself is bad (quarantine it); False for a file that may be fine
    but not for this process (written by a newer efsplug, not readable right now).
    """

    def __init__(self, message: str, *, corrupt: bool = True) -> None:
        super().__init__(message)
        self.corrupt = corrupt


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
    # Set when the tunnel is a section of a shared stunnel process (efsplug.tunnelhost):
    # that process's own config; `tunnel` is then that process, shared with other tunnels.
    host_config: Optional[str] = None
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
    # Mounts whose tunnel settings and identity match share one tunnel (efsplug.sharing).
    share_key: Optional[str] = None
    version: int = 1


_DATETIME_FIELDS = ("credential_expiry", "cert_not_before", "cert_not_after", "mount_time")
_OPTIONAL_STR_FIELDS = ("config_file", "host_config", "credential_source", "access_point", "netns", "region", "share_key")


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
            # surrogateescape: a non-UTF-8 mount point (from argv) keeps its original bytes.
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
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
    """Read one record; StateError (with the file name) for anything unusable, nothing else."""
    raw = read_bounded(Path(path))
    try:
        data = parse_json(raw)
        return from_dict(data)
    except StateError as e:
        raise StateError(f"{path}: {e}", corrupt=e.corrupt) from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        # Every check above should have caught it; this keeps the promise if one did not.
        raise StateError(f"{path}: unusable record ({type(e).__name__})") from None


def read_bounded(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes:
    """The file's bytes if it is a regular file of at most limit bytes.

    O_NONBLOCK: a FIFO named like a record must not hang the reader; O_NOFOLLOW: a
    symlink (to /dev/zero, to a huge file) is not a record.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror}", corrupt=False) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateError(f"{path}: cannot read: not a regular file", corrupt=False)
        if info.st_size > limit:
            raise StateError(f"{path}: {info.st_size} bytes, larger than it can be ({limit}); corrupt")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror}", corrupt=False) from None
    finally:
        os.close(fd)
    if size > limit:  # grew while being read
        raise StateError(f"{path}: larger than it can be ({limit} bytes); corrupt")
    return b"".join(chunks)


def parse_json(raw: bytes) -> object:
    """JSON with limits a record never reaches: nesting, number length, no NaN/Infinity."""
    if _depth(raw) > _MAX_DEPTH:
        raise StateError(f"nested deeper than {_MAX_DEPTH} levels; the file is corrupt")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise StateError(f"not valid JSON ({shown(e, 120)}); the file is corrupt") from None


def _depth(raw: bytes) -> int:
    """Deepest nesting of [ and { outside strings (cheap: strings removed by one regex)."""
    deepest = depth = 0
    for byte in _STRING_OR_ESCAPE.sub(b"", raw):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def _parse_int(text: str) -> int:
    if len(text) > _MAX_NUMBER_CHARS:
        raise StateError(f"a number of {len(text)} digits; the file is corrupt")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text) if len(text) <= _MAX_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        raise StateError("a number out of range; the file is corrupt")
    return value


def _refuse_constant(name: str) -> float:
    raise StateError(f"{name} is not a number a record holds; the file is corrupt")


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


def quarantine(path: Path, when: datetime) -> Path:
    """Move a corrupt record aside (no longer *.json, so no reader sees it again)."""
    target = Path(path).with_name(f"{Path(path).name}{QUARANTINE_MARK}{when.strftime('%Y%m%dT%H%M%S.%fZ')}")
    os.replace(path, target)
    fsync_dir(Path(path).parent)
    return target


def quarantined_files(state_dir: Path) -> List[Path]:
    """Records quarantine() moved aside, for `efsplug status` to mention."""
    try:
        return sorted(p for p in Path(state_dir).iterdir() if SUFFIX + QUARANTINE_MARK in p.name)
    except OSError:
        return []


def claimed(state_dir: Path, stem: str) -> bool:
    """A record, good, bad or quarantined, is named after the per-mount directory stem."""
    directory = Path(state_dir)
    if os.path.lexists(directory / (stem + SUFFIX)):
        return True
    prefix = stem + SUFFIX + QUARANTINE_MARK
    try:
        return any(name.startswith(prefix) for name in os.listdir(directory))
    except OSError:
        return True  # cannot tell: assume it is, so nothing is stopped on a guess


def to_dict(record: MountRecord) -> Dict[str, Any]:
    data = asdict(record)
    for name in _DATETIME_FIELDS:
        value = getattr(record, name)
        data[name] = None if value is None else value.isoformat()
    if record.tunnel is not None:
        data["tunnel"] = identity_dict(record.tunnel)
    return data


def identity_dict(identity: TunnelIdentity) -> Dict[str, Any]:
    """A TunnelIdentity as JSON takes it (parse_identity reads it back)."""
    data: Dict[str, Any] = {"pid": identity.pid, "create_time": identity.create_time, "cmdline": list(identity.cmdline)}
    if identity.start_ticks is not None and identity.boot_id is not None:
        data.update(start_ticks=identity.start_ticks, boot_id=identity.boot_id)
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
            f"{RECORD_VERSION}); left untouched", corrupt=False,
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
    values["tunnel"] = parse_identity(values.get("tunnel"))
    record = MountRecord(**values)
    _validate(record)
    return record


def _parse_datetime(name: str, value: object) -> Optional[datetime]:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise StateError(f"field {name!r} must be an ISO 8601 time, got {shown(value)}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise StateError(f"field {name!r} must be an ISO 8601 time, got {shown(value)}") from None
    if parsed.tzinfo is None:
        raise StateError(f"field {name!r} has no time zone: {shown(value)}")
    return parsed


def parse_identity(value: object) -> Optional[TunnelIdentity]:
    """A TunnelIdentity from JSON, every field checked; StateError if malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StateError("field 'tunnel' must be an object")
    pid, create_time, cmdline = value.get("pid"), value.get("create_time"), value.get("cmdline")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= PID_MAX:
        raise StateError(f"tunnel pid must be an integer between 1 and {PID_MAX}, got {shown(pid)}")
    if not isinstance(create_time, (int, float)) or isinstance(create_time, bool) \
            or not (math.isfinite(create_time) and create_time >= 0):
        raise StateError(f"tunnel create_time must be a time in seconds, got {shown(create_time)}")
    if not isinstance(cmdline, list) or len(cmdline) > _MAX_CMDLINE or not all(_is_path_text(a) for a in cmdline):
        raise StateError("tunnel cmdline must be a list of strings")
    # Both or neither: records written before they existed compare by create_time.
    start_ticks, boot_id = value.get("start_ticks"), value.get("boot_id")
    if (start_ticks is None) != (boot_id is None):
        raise StateError("tunnel start_ticks and boot_id go together; one is missing")
    if start_ticks is not None:
        if not isinstance(start_ticks, int) or isinstance(start_ticks, bool) or not 0 <= start_ticks < 2**63:
            raise StateError(f"tunnel start_ticks must be a count of clock ticks, got {shown(start_ticks)}")
        if not isinstance(boot_id, str) or not procinfo.is_boot_id(boot_id):
            raise StateError(f"tunnel boot_id must be a boot id like the kernel's, got {shown(boot_id)}")
    return TunnelIdentity(
        pid=pid, create_time=float(create_time), cmdline=tuple(cmdline), start_ticks=start_ticks, boot_id=boot_id,
    )


def _is_path_text(value: object) -> bool:
    """A str the os module can take: a lone surrogate (valid in JSON) would raise later."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        os.fsencode(value)
    except UnicodeError:
        return False
    return True


def _validate(record: MountRecord) -> None:
    """Types and shapes, so a record is trustworthy once loaded (or before it is named)."""
    if not isinstance(record.fs_id, str) or not _FS_ID.fullmatch(record.fs_id):
        raise StateError(f"fs_id {shown(record.fs_id)} is not a file system id (fs-<8 or 17 hex>)")
    for name in ("mountpoint", "path"):
        value = getattr(record, name)
        if not _is_path_text(value) or not value.startswith("/"):
            raise StateError(f"{name} {shown(value)} must be an absolute path")
    port = record.port
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
        raise StateError(f"port {shown(port)} must be an integer between 1 and 65535")
    if record.tunnel is not None and not isinstance(record.tunnel, TunnelIdentity):
        raise StateError("tunnel must be a TunnelIdentity")
    for name in _OPTIONAL_STR_FIELDS:
        value = getattr(record, name)
        if value is not None and not _is_path_text(value):
            raise StateError(f"field {name!r} must be a string, got {shown(value)}")
    if record.host_config is not None and record.version < HOSTED_VERSION:
        raise StateError(f"a record with host_config must have version {HOSTED_VERSION} or newer")
    files = record.files_created
    if not isinstance(files, list) or len(files) > _MAX_CMDLINE or not all(_is_path_text(p) for p in files):
        raise StateError("files_created must be a list of paths")
    for name in ("tls", "iam"):
        if not isinstance(getattr(record, name), bool):
            raise StateError(f"field {name!r} must be true or false")
    for name in _DATETIME_FIELDS:
        value = getattr(record, name)
        if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
            raise StateError(f"field {name!r} must be a time-zone aware datetime")
        # Far-off years overflow the arithmetic the supervisor does with them (renewal times).
        if value is not None and not _TIME_RANGE[0] <= value <= _TIME_RANGE[1]:
            raise StateError(f"field {name!r} is out of range: {value.isoformat()}")
