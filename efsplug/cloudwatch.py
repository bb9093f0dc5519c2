"""[cloudwatch-log]: mount and agent events to CloudWatch Logs, bounded, never in a mount's way.

What efs-utils 3.2 does, and efsplug keeps: the log group is ``log_group_name`` (default
``/aws/efs/utils``; ``{fs_id}`` is replaced by the file system id, and ``/{fs_id}`` dropped
where there is none), ``retention_in_days`` is put on the group, and the stream is
``<fs-id> - <instance-id> - mount.log`` (``<instance-id> - mount.log``, ``<fs-id> - mount.log``
or ``default - mount.log`` when a part is unknown). A mount's line starts "Successfully
mounted" or "Mount failed, ", so metric filters written for efs-utils still match.
Credentials are botocore's default chain (the instance role), or the mount's
``awsprofile``, as in efs-utils.

What differs: efs-utils creates the group, policy and stream before the mount, in its way.
Here one daemon thread per process does every call; callers only append to a bounded
in-memory queue (overflow is dropped and counted). `mount.efs` waits for it at exit at most
FLUSH_TIMEOUT seconds, then gives up with one warning line naming the cause. A group that
exists, or a denied CreateLogGroup/PutRetentionPolicy (a role allowed only to write), does
not stop delivery; without retention_in_days the group's policy is left as it is (efs-utils
deletes it). `log_stream_name`, which efs-utils does not read, names the stream when set.

This module is the pure part: names, messages, redaction, batches, back-off, the report.
The edge, the queue and its thread and the botocore client, is efsplug.logsink.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from efsplug.optionvalues import REGION_RE

if TYPE_CHECKING:
    from efsplug.options import MountRequest

DEFAULT_GROUP = "/aws/efs/utils"
MOUNT_LOG = "mount.log"  # mount.efs's stream suffix, efs-utils' name
AGENT_LOG = "efsplug-agent.log"  # the agent's (one stream for every volume it mounts)

MAX_MESSAGE_CHARS = 4096  # CloudWatch takes 256 KiB; no line of ours needs more than this
EVENT_OVERHEAD = 26  # bytes PutLogEvents counts per event beyond its message
MAX_BATCH_EVENTS = 500  # CloudWatch: 10,000
MAX_BATCH_BYTES = 256 * 1024  # CloudWatch: 1 MiB
MAX_BATCH_SPAN_MS = 24 * 3600 * 1000 - 1  # CloudWatch: a batch may not span 24 hours
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 300.0

# Fields of MountOptions never shown: the ECS task's credentials path works as a bearer token.
SECRET_OPTIONS = frozenset({"awscredsuri"})
REDACTED = "<redacted>"
_SECRET_PATTERNS: Tuple[Tuple["re.Pattern[str]", str], ...] = (
    (re.compile(r"(awscredsuri[=: ]\s*)[^\s,;)'\"]+", re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(r"(container credentials\s+)[^\s,;)'\"]+", re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(r"(/v[0-9]+/credentials)[/?][^\s,;)'\"]*"), r"\1/" + REDACTED),
    (re.compile(r"((?:secret_?access_?key|session_?token|security-token|signature|authorization)[\"']?\s*[=:]\s*"
                r"[\"']?)[^\s,;&\"']+", re.IGNORECASE), r"\1" + REDACTED),
)


# --- pure: names ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Destination:
    """Where a process's events go; resolved once, in the sink's thread."""

    region: str
    group: str
    stream: str
    retention_days: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.group} / {self.stream} ({self.region})"


def group_name(template: str, fs_id: Optional[str]) -> str:
    """log_group_name with {fs_id} filled in; without a file system, '/{fs_id}' is dropped (efs-utils)."""
    if fs_id:
        return template.replace("{fs_id}", fs_id)
    name = template.replace("/{fs_id}", "").replace("{fs_id}", "")
    return name or DEFAULT_GROUP


def stream_name(configured: Optional[str], *, fs_id: Optional[str], instance_id: Optional[str],
                log_name: str = MOUNT_LOG) -> str:
    """efs-utils' '<fs-id> - <instance-id> - mount.log', its fall-backs, or the configured name."""
    if configured:
        return configured
    parts = [p for p in (fs_id, instance_id) if p] or ["default"]
    return " - ".join(parts + [log_name])


def pick_region(*candidates: Optional[str]) -> Optional[str]:
    """The first candidate that is a region name (option, AWS_REGION, AWS_DEFAULT_REGION, config)."""
    return next((c for c in candidates if c and REGION_RE.fullmatch(c)), None)


def endpoint_url(environ: Mapping[str, str]) -> Optional[str]:
    """AWS_ENDPOINT_URL_LOGS, then AWS_ENDPOINT_URL: passed explicitly, since botocore 1.31 may not read them."""
    return environ.get("AWS_ENDPOINT_URL_LOGS") or environ.get("AWS_ENDPOINT_URL") or None


# --- pure: messages ------------------------------------------------------------------------

def redact(text: str) -> str:
    """Mask what could grant access: awscredsuri values, credential paths, keys, tokens, signatures."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """One line, control characters escaped, at most limit characters."""
    out = []
    for ch in text:
        code = ord(ch)
        if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append({"\n": "\\n", "\r": "\\r", "\t": " "}.get(ch, f"\\x{code:02x}"))
        else:
            out.append(ch)
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def options_text(request: MountRequest) -> str:
    """The request's options as -o would spell them, minus secrets (awscredsuri's value)."""
    from efsplug.options import MountOptions

    items: List[str] = []
    for f in fields(MountOptions):
        value = getattr(request, f.name)
        if f.name == "nfs_options":
            items += [name if v is None else f"{name}={v}" for name, v in value]
        elif f.name == "ocsp":
            if value is not None:
                items.append("ocsp" if value else "noocsp")
        elif value is True:
            items.append(f.name)
        elif value is not None and value is not False:
            items.append(f"{f.name}={REDACTED if f.name in SECRET_OPTIONS else value}")
    return ",".join(items)


def _device(request: MountRequest) -> str:
    return f"{request.fs_id}:{request.path}"


def mount_succeeded(request: MountRequest, port: Optional[int] = None) -> str:
    """The success line: efs-utils' words, then the file system, mount point and options."""
    options = options_text(request)
    through = f"; through 127.0.0.1:{port}" if port else ""
    return f"Successfully mounted {_device(request)} at {request.mountpoint} (options {options or '-'}{through})"


def mount_failed(request: Optional[MountRequest], error: str, exit_code: int) -> str:
    """The failure line: efs-utils' 'Mount failed, ' then what, where, and mount.efs's one-line error."""
    what = f"{_device(request)} at {request.mountpoint}: " if request is not None else ""
    return f"Mount failed, {what}{error} (exit {exit_code})"


# --- pure: batches, back-off, errors, report -----------------------------------------------

@dataclass(frozen=True)
class LogEvent:
    timestamp_ms: int
    message: str

    @property
    def size(self) -> int:
        return len(self.message.encode("utf-8")) + EVENT_OVERHEAD

    def as_api(self) -> dict:
        return {"timestamp": self.timestamp_ms, "message": self.message}


def make_event(message: str, now: float) -> LogEvent:
    return LogEvent(int(now * 1000), clip(redact(message)))


def take_batch(pending: Sequence[LogEvent], *, max_events: int = MAX_BATCH_EVENTS,
               max_bytes: int = MAX_BATCH_BYTES, max_span_ms: int = MAX_BATCH_SPAN_MS) -> int:
    """How many events from the front of pending make the next PutLogEvents (at least one)."""
    if not pending:
        return 0
    first = pending[0].timestamp_ms
    low = high = first
    total = 0
    count = 0
    for event in pending:
        low, high = min(low, event.timestamp_ms), max(high, event.timestamp_ms)
        if count and (count >= max_events or total + event.size > max_bytes or high - low > max_span_ms):
            break
        total += event.size
        count += 1
    return count


def in_order(batch: Sequence[LogEvent]) -> List[LogEvent]:
    """PutLogEvents wants a batch in time order; a clock step back must not make it refuse one."""
    return sorted(batch, key=lambda e: e.timestamp_ms)


def next_backoff(previous: Optional[float], *, first: float = BACKOFF_FIRST, ceiling: float = BACKOFF_MAX) -> float:
    return first if previous is None else min(previous * 2, ceiling)


def error_code(exc: BaseException) -> Optional[str]:
    """The AWS error code of a botocore ClientError (None for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code else "error"
    return None


class SetupError(Exception):
    """The sink cannot know where to send (no region); its text is ours, safe to show."""


def describe_error(exc: BaseException, operation: str) -> str:
    """A cause for one line: the operation and the AWS error code or exception type, and which
    endpoint did not answer. Never the exception's text, which may quote a request."""
    if isinstance(exc, SetupError):
        return f"{operation}: {exc}"
    code = error_code(exc)
    if code is not None:
        return f"{operation} refused: {code}"
    name = type(exc).__name__
    if isinstance(exc, ImportError):
        return "botocore is not installed"
    kwargs = getattr(exc, "kwargs", None)
    url = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
    if url:
        parts = urlsplit(str(url))
        host = parts.hostname or "?"
        where = f"{host}:{parts.port}" if parts.port else host
        return f"{operation}: no answer from {where} ({name})"
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return f"{operation}: no AWS credentials ({name}); attach an instance role with logs:PutLogEvents"
    return f"{operation}: {name}"


@dataclass(frozen=True)
class Report:
    """What happened to a sink's events; `unsent` were still queued or in flight when it closed."""

    emitted: int = 0
    sent: int = 0
    dropped: int = 0  # refused by the full queue or after close
    lost: int = 0  # in a PutLogEvents that failed, or rejected by it
    unsent: int = 0
    cause: Optional[str] = None
    notes: Tuple[str, ...] = ()  # what failed and did not stop delivery (a denied CreateLogGroup)
    destination: Optional[str] = None

    @property
    def missing(self) -> int:
        return self.dropped + self.lost + self.unsent

    def warning(self) -> Optional[str]:
        """One line when events did not arrive, naming the cause; None when all did."""
        if not self.missing:
            return None
        where = f" to {self.destination}" if self.destination else ""
        noun = "event" if self.emitted == 1 else "events"
        return (f"CloudWatch Logs: {self.missing} of {self.emitted} {noun} not delivered{where} "
                f"({self.cause or 'no reason recorded'}); the mount is not affected")

    def summary(self) -> str:
        where = f" to {self.destination}" if self.destination else ""
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        return f"CloudWatch Logs: {self.sent} of {self.emitted} events delivered{where}{notes}"
