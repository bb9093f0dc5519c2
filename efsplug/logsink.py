"""The edge of [cloudwatch-log]: one bounded queue and one daemon thread per process, and
the botocore client it sends through (what is sent, and how it is named, is the pure
efsplug.cloudwatch).

Callers only append to the queue (overflow is dropped and counted); nothing here ever
blocks a mount. mount.efs waits for delivery at exit at most FLUSH_TIMEOUT seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Mapping, Optional

from efsplug.cloudwatch import (
    MOUNT_LOG, Destination, LogEvent, Report, SetupError, describe_error, endpoint_url, error_code, group_name,
    in_order, make_event, next_backoff, pick_region, stream_name, take_batch,
)

if TYPE_CHECKING:
    from efsplug.config import Config

CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 3.0
FLUSH_TIMEOUT = 5.0  # how long mount.efs waits at exit for its events to be delivered (a loaded host imports botocore in ~1.5 s)
IMDS_TIMEOUT = 1.0  # the instance id is only a stream name: not worth the mount's 2 s x 2
MAX_PENDING = 1000
IDENTITY_DOCUMENT = "latest/dynamic/instance-identity/document"
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")  # i- and 17 hex digits on EC2; only kept printable here


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
