"""efsplug.cloudwatch and efsplug.logsink without a network: names, messages, redaction, batches, errors, and the
sink's thread driven by a scripted client (no process, no socket)."""

from __future__ import annotations

import io
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from hypothesis import given, strategies as st

from efsplug import cloudwatch as cw
from efsplug import logsink
from efsplug.config import parse_config
from efsplug.options import parse_mount_args

FS = "fs-0123456789abcdef0"
DEST = cw.Destination(region="us-east-1", group="/aws/efs/utils", stream=f"{FS} - i-0abc - mount.log",
                      retention_days=14)


# --- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("template, fs_id, expected", [
    ("/aws/efs/utils", FS, "/aws/efs/utils"),
    ("/aws/efs/{fs_id}", FS, f"/aws/efs/{FS}"),
    ("/aws/efs/{fs_id}", None, "/aws/efs"),  # efs-utils drops '/{fs_id}' without a file system
    ("efs-{fs_id}", None, "efs-"),
    ("{fs_id}", None, cw.DEFAULT_GROUP),
])
def test_group_name(template: str, fs_id: Optional[str], expected: str) -> None:
    assert cw.group_name(template, fs_id) == expected


@pytest.mark.parametrize("fs_id, instance_id, expected", [
    (FS, "i-0abc", f"{FS} - i-0abc - mount.log"),  # efs-utils' name
    (None, "i-0abc", "i-0abc - mount.log"),
    (FS, None, f"{FS} - mount.log"),
    (None, None, "default - mount.log"),
])
def test_stream_name_as_efs_utils(fs_id: Optional[str], instance_id: Optional[str], expected: str) -> None:
    assert cw.stream_name(None, fs_id=fs_id, instance_id=instance_id) == expected


def test_stream_name_configured_and_agent() -> None:
    assert cw.stream_name("my-stream", fs_id=FS, instance_id="i-1") == "my-stream"
    assert cw.stream_name(None, fs_id=None, instance_id="i-1", log_name=cw.AGENT_LOG) == "i-1 - efsplug-agent.log"


def test_region_and_endpoint_choice() -> None:
    assert cw.pick_region(None, "", "not a region", "eu-west-1", "us-east-1") == "eu-west-1"
    assert cw.pick_region(None, None) is None
    assert cw.endpoint_url({"AWS_ENDPOINT_URL": "http://a", "AWS_ENDPOINT_URL_LOGS": "http://b"}) == "http://b"
    assert cw.endpoint_url({"AWS_ENDPOINT_URL": "http://a"}) == "http://a"
    assert cw.endpoint_url({}) is None


# --- messages ------------------------------------------------------------------------------

def request(options: str):
    return parse_mount_args([f"{FS}:/data", "/mnt/efs", "-o", options])


def test_success_line_has_efs_utils_words_and_no_credentials_path() -> None:
    r = request("tls,iam,awscredsuri=/v2/credentials/7d1c5e0f-secret,accesspoint=fsap-0123456789abcdef0,verify=0")
    line = cw.mount_succeeded(r, 20049)
    assert line == (f"Successfully mounted {FS}:/data at /mnt/efs (options tls,iam,awscredsuri=<redacted>,"
                    "accesspoint=fsap-0123456789abcdef0,verify=0; through 127.0.0.1:20049)")
    assert "7d1c5e0f" not in line


def test_plain_mount_line_and_nfs_options() -> None:
    assert cw.mount_succeeded(request("rsize=65536,noocsp")) == (
        f"Successfully mounted {FS}:/data at /mnt/efs (options noocsp,rsize=65536)")
    assert cw.mount_succeeded(parse_mount_args([FS, "/mnt/x"])) == f"Successfully mounted {FS}:/ at /mnt/x (options -)"


def test_failure_line() -> None:
    assert cw.mount_failed(request("tls"), "mount.nfs4 failed: access denied", 32) == (
        f"Mount failed, {FS}:/data at /mnt/efs: mount.nfs4 failed: access denied (exit 32)")
    assert cw.mount_failed(None, "bad", 1) == "Mount failed, bad (exit 1)"


@pytest.mark.parametrize("text, secret", [
    ("awscredsuri /v2/credentials/7d1c5e0f-x did not answer (timed out)", "7d1c5e0f"),
    ("option awscredsuri=/v2/credentials/abc123,tls", "abc123"),
    ("container credentials /v2/credentials/zz9 answered HTTP 404", "zz9"),
    ("GET http://169.254.170.2/v2/credentials/feed-beef", "feed-beef"),
    ("GET /v1/credentials?id=12ab", "12ab"),
    ("aws_secret_access_key = wJalrXUtnFEMI", "wJalrXUtnFEMI"),
    ('"SessionToken": "FwoGZXIvYXdz"', "FwoGZXIvYXdz"),
    ("X-Amz-Security-Token=IQoJb3JpZ2lu&X-Amz-Signature=deadbeef", "IQoJb3JpZ2lu"),
    ("X-Amz-Signature=deadbeef", "deadbeef"),
    ("Authorization: AWS4-HMAC-SHA256", "AWS4-HMAC-SHA256"),
])
def test_redact(text: str, secret: str) -> None:
    assert secret not in cw.redact(text)
    assert cw.REDACTED in cw.redact(text)


def test_redact_leaves_ordinary_lines() -> None:
    line = "endpoint=VolumeDriver.Mount volume=v1 duration_ms=12.0 outcome=ok"
    assert cw.redact(line) == line


@given(st.from_regex(r"[A-Za-z0-9-]{4,40}", fullmatch=True), st.text(max_size=50), st.text(max_size=50))
def test_redact_never_lets_a_credentials_path_through(token: str, before: str, after: str) -> None:
    assert f"/v2/credentials/{token}" not in cw.redact(f"{before} /v2/credentials/{token} {after}")


@given(st.text(max_size=600), st.integers(min_value=10, max_value=500))
def test_clip_is_one_bounded_line(text: str, limit: int) -> None:
    line = cw.clip(text, limit)
    assert len(line) <= limit and "\n" not in line and "\r" not in line
    assert line.isprintable() or not text.isprintable()


def test_event_is_redacted_and_clipped() -> None:
    event = cw.make_event("awscredsuri=/v2/credentials/s3cr3t\n" + "x" * 10000, 1700000000.5)
    assert event.timestamp_ms == 1700000000500
    assert "s3cr3t" not in event.message and "\n" not in event.message
    assert len(event.message) == cw.MAX_MESSAGE_CHARS


# --- batches, back-off ---------------------------------------------------------------------

def events(*stamps: int, size: int = 10) -> List[cw.LogEvent]:
    return [cw.LogEvent(t, "m" * size) for t in stamps]


def test_take_batch_limits() -> None:
    assert cw.take_batch([]) == 0
    assert cw.take_batch(events(1, 2, 3), max_events=2) == 2
    assert cw.take_batch(events(1, 2, 3, size=74), max_bytes=200) == 2  # 100 bytes each with the overhead
    assert cw.take_batch(events(1, size=1000), max_bytes=200) == 1  # one event always goes alone
    day = 24 * 3600 * 1000
    assert cw.take_batch(events(0, day - 1, day)) == 2  # no batch may span 24 hours
    assert cw.take_batch(events(day, 5, 0)) == 2  # a clock step back counts too


@given(st.lists(st.integers(min_value=0, max_value=10 ** 11), min_size=1, max_size=60),
       st.integers(min_value=1, max_value=20), st.integers(min_value=30, max_value=2000))
def test_take_batch_respects_every_bound(stamps: List[int], max_events: int, max_bytes: int) -> None:
    pending = events(*stamps)
    n = cw.take_batch(pending, max_events=max_events, max_bytes=max_bytes)
    assert 1 <= n <= len(pending)
    batch = pending[:n]
    if n > 1:
        assert n <= max_events and sum(e.size for e in batch) <= max_bytes
        assert max(e.timestamp_ms for e in batch) - min(e.timestamp_ms for e in batch) <= cw.MAX_BATCH_SPAN_MS
    ordered = cw.in_order(batch)
    assert [e.timestamp_ms for e in ordered] == sorted(e.timestamp_ms for e in batch)


def test_backoff_doubles_to_a_ceiling() -> None:
    delays = [None]
    for _ in range(10):
        delays.append(cw.next_backoff(delays[-1]))
    assert delays[1:4] == [5.0, 10.0, 20.0] and delays[-1] == cw.BACKOFF_MAX


# --- errors and the report -----------------------------------------------------------------

def client_error(code: str, operation: str = "CreateLogGroup", message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def test_describe_error_names_the_cause_and_nothing_else() -> None:
    denied = client_error("AccessDeniedException", message="User arn:aws:sts::1:assumed-role/r/secret-session")
    assert cw.describe_error(denied, "CreateLogGroup") == "CreateLogGroup refused: AccessDeniedException"
    unreachable = EndpointConnectionError(endpoint_url="https://user:pw@logs.us-east-1.amazonaws.com/")
    assert cw.describe_error(unreachable, "PutLogEvents") == (
        "PutLogEvents: no answer from logs.us-east-1.amazonaws.com (EndpointConnectionError)")
    stalled = ReadTimeoutError(endpoint_url="http://127.0.0.1:4567/")
    assert cw.describe_error(stalled, "CreateLogStream") == (
        "CreateLogStream: no answer from 127.0.0.1:4567 (ReadTimeoutError)")
    assert "no AWS credentials" in cw.describe_error(NoCredentialsError(), "CreateLogGroup")
    assert cw.describe_error(ImportError("botocore"), "setup") == "botocore is not installed"
    assert cw.describe_error(RuntimeError("token=abc"), "delivery") == "delivery: RuntimeError"
    assert cw.describe_error(cw.SetupError("no region"), "setup") == "setup: no region"


def test_report_lines() -> None:
    ok = cw.Report(emitted=1, sent=1, destination=str(DEST))
    assert ok.warning() is None
    assert ok.summary() == f"CloudWatch Logs: 1 of 1 events delivered to {DEST}"
    bad = cw.Report(emitted=1, unsent=1, cause="CreateLogGroup: no answer from h (ReadTimeoutError)")
    assert bad.warning() == ("CloudWatch Logs: 1 of 1 event not delivered (CreateLogGroup: no answer from h "
                             "(ReadTimeoutError)); the mount is not affected")


# --- the sink, with a scripted client ------------------------------------------------------

class FakeLogs:
    """CloudWatch Logs as the sink sees it: records calls; `fail` raises per operation (a list is
    used up one exception per call); `stall` holds every call until set."""

    def __init__(self, fail: Optional[Dict[str, Any]] = None, stall: Optional[threading.Event] = None) -> None:
        self.fail = dict(fail or {})
        self.stall = stall
        self.calls: List[Tuple[str, Dict[str, Any]]] = []  # every call, answered or failed
        self.accepted: List[Tuple[str, Dict[str, Any]]] = []
        self.put_done = threading.Semaphore(0)
        self.entered = threading.Event()

    def _call(self, name: str, params: Dict[str, Any]) -> Dict[str, Any]:
        self.entered.set()
        if self.stall is not None:
            self.stall.wait(30)
        self.calls.append((name, params))
        failure = self.fail.get(name)
        if isinstance(failure, list):
            failure = failure.pop(0) if failure else None
        if failure is not None:
            raise failure
        self.accepted.append((name, params))
        return {}

    def create_log_group(self, **p: Any) -> Dict[str, Any]:
        return self._call("CreateLogGroup", p)

    def put_retention_policy(self, **p: Any) -> Dict[str, Any]:
        return self._call("PutRetentionPolicy", p)

    def create_log_stream(self, **p: Any) -> Dict[str, Any]:
        return self._call("CreateLogStream", p)

    def put_log_events(self, **p: Any) -> Dict[str, Any]:
        try:
            return self._call("PutLogEvents", p)
        finally:
            self.put_done.release()

    def names(self) -> List[str]:
        return [name for name, _ in self.calls]

    def messages(self) -> List[str]:
        """What CloudWatch took."""
        return [e["message"] for name, p in self.accepted if name == "PutLogEvents" for e in p["logEvents"]]


def sink_with(client: FakeLogs, **kw: Any) -> logsink.LogSink:
    return logsink.LogSink(lambda: DEST, lambda d: client, **kw).start()


def test_sink_bootstraps_then_delivers_in_order() -> None:
    client = FakeLogs()
    sink = sink_with(client)
    assert sink.emit("first") and sink.emit("second")
    report = sink.close(10)
    assert client.names()[:3] == ["CreateLogGroup", "PutRetentionPolicy", "CreateLogStream"]
    assert client.calls[1][1] == {"logGroupName": DEST.group, "retentionInDays": 14}
    assert client.calls[2][1] == {"logGroupName": DEST.group, "logStreamName": DEST.stream}
    assert client.messages() == ["first", "second"]
    assert (report.emitted, report.sent, report.missing, report.warning()) == (2, 2, 0, None)


def test_no_retention_policy_call_without_retention_days() -> None:
    client = FakeLogs()
    sink = logsink.LogSink(lambda: cw.Destination("us-east-1", "g", "s"), lambda d: client).start()
    sink.emit("x")
    sink.close(10)
    assert client.names() == ["CreateLogGroup", "CreateLogStream", "PutLogEvents"]


def test_existing_group_and_stream_are_fine() -> None:
    client = FakeLogs(fail={"CreateLogGroup": client_error("ResourceAlreadyExistsException"),
                            "CreateLogStream": client_error("ResourceAlreadyExistsException", "CreateLogStream")})
    sink = sink_with(client)
    sink.emit("again")
    report = sink.close(10)
    assert (report.sent, report.notes, report.warning()) == (1, (), None)


def test_denied_group_creation_is_a_note_not_a_stop() -> None:
    """A role allowed only logs:CreateLogStream and logs:PutLogEvents still ships events."""
    client = FakeLogs(fail={"CreateLogGroup": client_error("AccessDeniedException"),
                            "PutRetentionPolicy": client_error("AccessDeniedException", "PutRetentionPolicy")})
    sink = sink_with(client)
    sink.emit("mounted")
    report = sink.close(10)
    assert report.sent == 1 and report.warning() is None
    assert report.notes == ("CreateLogGroup refused: AccessDeniedException",
                            "PutRetentionPolicy refused: AccessDeniedException")


def test_denied_stream_loses_the_events_with_one_warning_at_close() -> None:
    client = FakeLogs(fail={"CreateLogStream": client_error("AccessDeniedException", "CreateLogStream")})
    sink = sink_with(client, backoff=lambda d: 60.0)
    sink.emit("Mount failed, x")
    report = sink.close(10)
    assert "PutLogEvents" not in client.names()
    assert (report.sent, report.unsent) == (0, 1)
    assert report.warning() == ("CloudWatch Logs: 1 of 1 event not delivered to " + str(DEST) +
                                " (CreateLogStream refused: AccessDeniedException); the mount is not affected")


def test_a_stalled_endpoint_does_not_hold_close_beyond_its_bound() -> None:
    stall = threading.Event()
    client = FakeLogs(stall=stall)
    sink = sink_with(client)
    sink.emit("Successfully mounted")
    assert client.entered.wait(10)
    started = time.monotonic()
    report = sink.close(0.3)
    took = time.monotonic() - started
    stall.set()  # let the thread go (it would be abandoned at exit anyway)
    assert 0.25 <= took < 2.0
    assert report.unsent == 1
    assert report.warning() is not None and "no answer within 0.3 s (CreateLogGroup in progress)" in report.warning()
    assert sink.emit("after close") is False


def test_a_failed_put_is_lost_then_delivery_resumes_after_backoff() -> None:
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/")
    client = FakeLogs(fail={"PutLogEvents": [unreachable]})
    heard: List[str] = []
    backoffs: List[Optional[float]] = []

    def backoff(previous: Optional[float]) -> float:
        backoffs.append(previous)
        return 0.0

    sink = sink_with(client, warn=heard.append, backoff=backoff)
    sink.emit("one")
    assert client.put_done.acquire(timeout=10)
    sink.emit("two")
    assert client.put_done.acquire(timeout=10)
    report = sink.close(10)
    assert client.messages() == ["two"]
    assert (report.sent, report.lost) == (1, 1)
    assert heard == ["CloudWatch Logs: PutLogEvents: no answer from 127.0.0.1:9 (EndpointConnectionError); "
                     f"1 events dropped, trying again in 0 s (new events wait, up to {logsink.MAX_PENDING})"]
    assert backoffs == [None]


def test_the_same_cause_is_told_once() -> None:
    denied = [client_error("AccessDeniedException", "PutLogEvents") for _ in range(3)]
    client = FakeLogs(fail={"PutLogEvents": denied})
    heard: List[str] = []
    sink = sink_with(client, warn=heard.append, backoff=lambda d: 0.0)
    for i in range(4):
        sink.emit(f"e{i}")
        assert client.put_done.acquire(timeout=10)
    report = sink.close(10)
    assert len(heard) == 1 and "PutLogEvents refused: AccessDeniedException" in heard[0]
    assert (report.sent, report.lost, client.messages()) == (1, 3, ["e3"])


def test_a_full_queue_drops_and_counts() -> None:
    stall = threading.Event()
    client = FakeLogs(stall=stall)
    sink = sink_with(client, max_pending=3)
    accepted = [sink.emit(f"e{i}") for i in range(5)]
    assert accepted == [True, True, True, False, False]
    stall.set()
    report = sink.close(10)
    assert (report.emitted, report.sent, report.dropped) == (5, 3, 2)
    assert "2 of 5 events not delivered" in (report.warning() or "")


def test_a_destination_that_cannot_be_found_is_the_cause() -> None:
    def resolve() -> cw.Destination:
        raise cw.SetupError("no region (instance metadata did not say); set region in [mount] of efs-utils.conf")

    sink = logsink.LogSink(resolve, lambda d: FakeLogs()).start()
    sink.emit("x")
    report = sink.close(10)
    assert report.cause == "setup: no region (instance metadata did not say); set region in [mount] of efs-utils.conf"


def test_a_vanished_stream_is_made_again() -> None:
    client = FakeLogs(fail={"PutLogEvents": [client_error("ResourceNotFoundException", "PutLogEvents")]})
    sink = sink_with(client, backoff=lambda d: 0.0)
    sink.emit("one")
    assert client.put_done.acquire(timeout=10)
    sink.emit("two")
    sink.close(10)
    assert client.names().count("CreateLogStream") == 2
    assert client.messages() == ["two"]


def test_rejected_events_are_counted_lost() -> None:
    assert logsink._rejected({"rejectedLogEventsInfo": {"tooOldLogEventEndIndex": 1}}, 4) == 2
    assert logsink._rejected({"rejectedLogEventsInfo": {"tooNewLogEventStartIndex": 3}}, 4) == 1
    assert logsink._rejected({}, 4) == 0


# --- where events come from ----------------------------------------------------------------

class Collect:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def emit(self, message: str) -> bool:
        self.lines.append(message)
        return True


def test_supervisor_records_go_through_the_handler() -> None:
    sink = Collect()
    logger = logging.getLogger("efsplug.test-cloudwatch")
    logger.setLevel(logging.DEBUG)
    handler = logsink.SinkHandler(sink)  # type: ignore[arg-type]
    logger.addHandler(handler)
    try:
        logger.debug("not this one")
        logger.warning("reaped %s (%s)", "/mnt/a", "fs-1")
        try:
            raise ValueError("secret=1")
        except ValueError:
            logger.exception("renewing failed")
    finally:
        logger.removeHandler(handler)
    assert sink.lines == ["supervisor WARNING reaped /mnt/a (fs-1)", "supervisor ERROR renewing failed (ValueError)"]


def test_request_log_line_goes_to_the_sink() -> None:
    from efsplug.agent.plugin import Answer
    from efsplug.agent.server import RequestLog

    sink = Collect()
    out = io.StringIO()
    log = RequestLog(out, sink=sink)  # type: ignore[arg-type]
    log.request("/VolumeDriver.Mount", Answer(200, {}, volume="v1"), 0.0123)
    log.request("/VolumeDriver.Remove", Answer(200, {}, err="volume 'v2' not found", volume="v2"), 0.001)
    assert out.getvalue().splitlines() == sink.lines
    assert sink.lines[0] == "endpoint=VolumeDriver.Mount volume=v1 duration_ms=12.3 outcome=ok"
    assert sink.lines[1].endswith('outcome=error err="volume \'v2\' not found"')


def test_start_sink_only_when_enabled() -> None:
    assert logsink.start_sink(parse_config("").config) is None
    assert logsink.start_sink(parse_config("[cloudwatch-log]\nenabled = false\n").config) is None


# --- the destination, with instance metadata off or scripted ----------------------------------

NO_IMDS = {"AWS_EC2_METADATA_DISABLED": "true"}


def test_destination_region_order_and_names() -> None:
    config = parse_config("[mount]\nregion = eu-west-1\n[cloudwatch-log]\nenabled = true\n"
                          "log_group_name = /efs/{fs_id}\nretention_in_days = 7\n").config
    d = logsink.resolve_destination(config, fs_id=FS, region=None, log_name=cw.MOUNT_LOG, environ=NO_IMDS)
    assert d == cw.Destination("eu-west-1", f"/efs/{FS}", f"{FS} - mount.log", 7)
    d = logsink.resolve_destination(config, fs_id=FS, region="us-west-2", log_name=cw.MOUNT_LOG,
                               environ={**NO_IMDS, "AWS_REGION": "ap-south-1"})
    assert d.region == "us-west-2"  # the mount's region= option first, as the mount itself
    d = logsink.resolve_destination(config, fs_id=None, region=None, log_name=cw.AGENT_LOG,
                               environ={**NO_IMDS, "AWS_DEFAULT_REGION": "ca-central-1"})
    assert (d.region, d.group, d.stream) == ("ca-central-1", "/efs", "default - efsplug-agent.log")


def test_no_region_anywhere_is_a_setup_error() -> None:
    config = parse_config("[cloudwatch-log]\nenabled = true\n").config
    with pytest.raises(cw.SetupError, match="no region"):
        logsink.resolve_destination(config, fs_id=FS, region=None, log_name=cw.MOUNT_LOG, environ=NO_IMDS)


class ScriptedImds:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def get(self, path: str) -> str:
        assert path == logsink.IDENTITY_DOCUMENT
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_instance_id_from_the_identity_document() -> None:
    from efsplug.imds import MetadataUnavailable

    assert logsink._instance_id(ScriptedImds('{"instanceId": "i-0123456789abcdef0", "region": "x"}')) == "i-0123456789abcdef0"
    assert logsink._instance_id(ScriptedImds(MetadataUnavailable("off"))) is None
    assert logsink._instance_id(ScriptedImds("<html>")) is None
    assert logsink._instance_id(ScriptedImds('{"instanceId": "i-1 - x\\n"}')) is None  # not a name to put in a stream
