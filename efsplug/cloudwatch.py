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

The pure part (names, messages, redaction, batches, back-off, the report) comes first; the
edge (LogSink and the botocore client) after it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from efsplug.optionvalues import REGION_RE

if TYPE_CHECKING:
    from efsplug.config import Config
    from efsplug.options import MountRequest

DEFAULT_GROUP = "/aws/efs/utils"
MOUNT_LOG = "mount.log"  # mount.efs's stream suffix, efs-utils' name
AGENT_LOG = "efsplug-agent.log"  # the agent's (one stream for every volume it mounts)

CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 3.0
FLUSH_TIMEOUT = 5.0  # how long mount.efs waits at exit for its events to be delivered (a loaded host imports botocore in ~1.5 s)
IMDS_TIMEOUT = 1.0  # the instance id is only a stream name: not worth the mount's 2 s x 2
MAX_PENDING = 1000
IDENTITY_DOCUMENT = "latest/dynamic/instance-identity/document"
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")  # i- and 17 hex digits on EC2; only kept printable here
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


# --- the edge: a queue and one thread ------------------------------------------------------

class LogSink:
    """Events in, CloudWatch Logs out, on one daemon thread; `emit` never blocks.

    `resolve` finds the destination and `open_client` makes the botocore client, both in the
    thread (IMDS and botocore's import take time a mount should not wait for). A failure
    drops the batch in hand, and the thread backs off (5 s doubling to 5 min) before the
    next try; events keep queueing meanwhile, up to max_pending. `warn` (the agent) hears
    each new cause once; mount.efs reads the report at close instead.
    """

    def __init__(
        self,
        resolve: Callable[[], Destination],
        open_client: Callable[[Destination], Any],
        *,
        max_pending: int = MAX_PENDING,
        warn: Optional[Callable[[str], None]] = None,
        clock: Callable[[], float] = time.time,
        backoff: Callable[[Optional[float]], float] = next_backoff,
    ) -> None:
        self._resolve = resolve
        self._open_client = open_client
        self._max_pending = max_pending
        self._warn = warn
        self._clock = clock
        self._backoff = backoff
        self._cond = threading.Condition()
        self._pending: Deque[LogEvent] = deque()
        self._closing = False
        self._finished = False  # the thread returned
        self._doing: Optional[str] = None  # the call in flight, for a cause when it never returns
        self._in_flight = 0
        self._emitted = self._sent = self._dropped = self._lost = 0
        self._cause: Optional[str] = None
        self._warned: Optional[str] = None
        self._notes: List[str] = []
        self._destination: Optional[Destination] = None
        self._thread = threading.Thread(target=self._run, name="efsplug-cloudwatch", daemon=True)

    def start(self) -> "LogSink":
        self._thread.start()
        return self

    # -- callers -----------------------------------------------------------------------------

    def emit(self, message: str) -> bool:
        """Queue one event; False when it was dropped (queue full, or the sink closed)."""
        event = make_event(message, self._clock())
        with self._cond:
            self._emitted += 1
            if self._closing or self._finished or len(self._pending) >= self._max_pending:
                self._dropped += 1
                return False
            self._pending.append(event)
            self._cond.notify_all()
        return True

    def close(self, timeout: float = FLUSH_TIMEOUT) -> Report:
        """Deliver what is queued, waiting at most timeout seconds; then leave the thread be."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout))
        with self._cond:
            if not self._finished and self._cause is None:
                doing = f" ({self._doing} in progress)" if self._doing else ""
                self._cause = f"no answer within {timeout:g} s{doing}"
        return self.report()

    def report(self) -> Report:
        with self._cond:
            return Report(
                emitted=self._emitted, sent=self._sent, dropped=self._dropped, lost=self._lost,
                unsent=len(self._pending) + self._in_flight, cause=self._cause, notes=tuple(self._notes),
                destination=str(self._destination) if self._destination else None,
            )

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._deliver()
        except Exception as exc:  # a bug here must never reach a mount: record it and stop
            self._failed(describe_error(exc, "delivery"))
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _deliver(self) -> None:
        client = None
        ready = False
        delay: Optional[float] = None
        while True:
            try:
                if client is None:
                    self._doing = "setup"
                    destination = self._resolve()
                    with self._cond:
                        self._destination = destination
                    client = self._open_client(destination)
                if not ready:
                    self._bootstrap(client)
                    ready = True
                batch = self._next_batch()
                if batch is None:
                    return  # closing, and nothing left
                self._put(client, batch)
                delay = None
            except Exception as exc:
                if error_code(exc) == "ResourceNotFoundException":
                    ready = False  # someone deleted the group or stream: make them again
                delay = self._backoff(delay)
                self._failed(describe_error(exc, self._doing or "delivery"), retry_in=delay)
                with self._cond:
                    # Closing: no one waits for a retry. Otherwise wait out the back-off.
                    if self._cond.wait_for(lambda: self._closing, delay):
                        return
            finally:
                self._doing = None

    def _bootstrap(self, client: Any) -> None:
        """Group (already there is fine), retention policy, stream (already there is fine).

        A refused CreateLogGroup or PutRetentionPolicy is noted and delivery goes on (the
        group may be an administrator's); a stream that cannot be made stops this attempt.
        Anything but an AWS refusal (no answer, no credentials) stops it too: the next call
        would fare no better.
        """
        d = self._destination
        assert d is not None
        self._call(client, "CreateLogGroup", "create_log_group", tolerate=True, logGroupName=d.group)
        if d.retention_days is not None:
            self._call(client, "PutRetentionPolicy", "put_retention_policy", tolerate=True,
                       logGroupName=d.group, retentionInDays=d.retention_days)
        self._call(client, "CreateLogStream", "create_log_stream", tolerate=False,
                   logGroupName=d.group, logStreamName=d.stream)

    def _call(self, client: Any, operation: str, method: str, *, tolerate: bool, **params: Any) -> None:
        self._doing = operation
        try:
            getattr(client, method)(**params)
        except Exception as exc:
            code = error_code(exc)
            if code == "ResourceAlreadyExistsException":
                return
            if code is None or not tolerate:
                raise
            note = describe_error(exc, operation)
            with self._cond:
                if note not in self._notes:  # each retry bootstraps again
                    self._notes.append(note)

    def _next_batch(self) -> Optional[List[LogEvent]]:
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._closing)
            count = take_batch(self._pending)
            if not count:
                return None
            batch = [self._pending.popleft() for _ in range(count)]
            self._in_flight = count
            return batch

    def _put(self, client: Any, batch: List[LogEvent]) -> None:
        d = self._destination
        assert d is not None
        self._doing = "PutLogEvents"
        answer = client.put_log_events(logGroupName=d.group, logStreamName=d.stream,
                                       logEvents=[e.as_api() for e in in_order(batch)])
        rejected = _rejected(answer, len(batch))
        with self._cond:
            self._in_flight = 0
            self._sent += len(batch) - rejected
            self._lost += rejected
            if rejected:
                self._cause = f"PutLogEvents rejected {rejected} events (too old or too new)"
            self._warned = None  # delivery works: a later failure is news again

    def _failed(self, cause: str, retry_in: Optional[float] = None) -> None:
        """Count the batch in hand as lost; tell `warn` about a cause it has not heard yet."""
        with self._cond:
            lost = self._in_flight
            self._lost += lost
            self._in_flight = 0
            self._cause = cause
            tell = self._warn is not None and cause != self._warned
            self._warned = cause
        if tell and self._warn is not None:
            then = f"trying again in {retry_in:g} s" if retry_in is not None else "not trying again"
            try:
                self._warn(f"CloudWatch Logs: {cause}; {lost} events dropped, {then} "
                           f"(new events wait, up to {self._max_pending})")
            except Exception:
                pass


def _rejected(answer: Any, count: int) -> int:
    """How many events PutLogEvents' rejectedLogEventsInfo says it did not take."""
    info = answer.get("rejectedLogEventsInfo") if isinstance(answer, dict) else None
    if not isinstance(info, dict):
        return 0
    rejected = set()
    too_new = info.get("tooNewLogEventStartIndex")
    if isinstance(too_new, int):
        rejected.update(range(too_new, count))
    for key in ("tooOldLogEventEndIndex", "expiredLogEventEndIndex"):
        end = info.get(key)
        if isinstance(end, int):
            rejected.update(range(0, min(end + 1, count)))
    return len(rejected)


class SinkHandler(logging.Handler):
    """A logging handler that hands records to a sink (the supervisor's actions, in the agent)."""

    def __init__(self, sink: LogSink, prefix: str = "supervisor", level: int = logging.INFO) -> None:
        super().__init__(level)
        self.sink = sink
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[0] is not None:
                text += f" ({record.exc_info[0].__name__})"  # the type only: a traceback quotes values
            self.sink.emit(f"{self.prefix} {record.levelname} {text}")
        except Exception:
            self.handleError(record)


# --- the edge: botocore and the destination ------------------------------------------------

def open_client(destination: Destination, *, environ: Mapping[str, str], profile: Optional[str] = None,
                fips: bool = False) -> Any:
    """A CloudWatch Logs client with short timeouts and no retries of its own (the sink backs off)."""
    import botocore.config
    import botocore.session

    session = botocore.session.Session()
    if profile:
        session.set_config_variable("profile", profile)
    options = dict(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                   retries={"mode": "standard", "total_max_attempts": 1})
    if fips:
        options["use_fips_endpoint"] = True
    return session.create_client("logs", region_name=destination.region, endpoint_url=endpoint_url(environ),
                                 config=botocore.config.Config(**options))


def resolve_destination(config: Config, *, fs_id: Optional[str], region: Optional[str], log_name: str,
                        environ: Mapping[str, str]) -> Destination:
    """Region as the mount finds it (option, AWS_REGION, AWS_DEFAULT_REGION, config, IMDS); the
    instance id from IMDS for the stream name, if it answers within IMDS_TIMEOUT."""
    from efsplug.imds import InstanceMetadata, MetadataUnavailable

    cw = config.cloudwatch_log
    imds = InstanceMetadata.from_environment(environ)
    imds.timeout, imds.attempts = IMDS_TIMEOUT, 1
    chosen = pick_region(region, environ.get("AWS_REGION"), environ.get("AWS_DEFAULT_REGION"), config.mount.region)
    if chosen is None:
        try:
            chosen = pick_region(imds.region().strip())
        except MetadataUnavailable:
            chosen = None
        if chosen is None:
            raise SetupError("no region (instance metadata did not say); set region in [mount] of efs-utils.conf")
    instance_id = None if cw.log_stream_name else _instance_id(imds)
    return Destination(
        region=chosen,
        group=group_name(cw.log_group_name, fs_id),
        stream=stream_name(cw.log_stream_name, fs_id=fs_id, instance_id=instance_id, log_name=log_name),
        retention_days=cw.retention_in_days,
    )


def _instance_id(imds: Any) -> Optional[str]:
    """instanceId from the identity document, where efs-utils reads it; None if IMDS does not say."""
    from efsplug.imds import MetadataUnavailable

    try:
        document = json.loads(imds.get(IDENTITY_DOCUMENT))
    except (MetadataUnavailable, ValueError):
        return None
    found = document.get("instanceId") if isinstance(document, dict) else None
    return found if isinstance(found, str) and INSTANCE_ID_RE.fullmatch(found) else None


def start_sink(
    config: Config,
    *,
    fs_id: Optional[str] = None,
    region: Optional[str] = None,
    profile: Optional[str] = None,
    log_name: str = MOUNT_LOG,
    environ: Optional[Mapping[str, str]] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> Optional[LogSink]:
    """The process's one sink when [cloudwatch-log] enabled = true, started; else None."""
    if not config.cloudwatch_log.enabled:
        return None
    env = dict(os.environ if environ is None else environ)

    def resolve() -> Destination:
        return resolve_destination(config, fs_id=fs_id, region=region, log_name=log_name, environ=env)

    def client(destination: Destination) -> Any:
        fips = config.mount_for_region(destination.region).fips_mode_enabled
        return open_client(destination, environ=env, profile=profile, fips=fips)

    return LogSink(resolve, client, warn=warn).start()
