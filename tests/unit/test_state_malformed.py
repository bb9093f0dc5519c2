"""Malformed mount records: whatever a file holds, load() returns a record or raises
StateError, quickly and in bounded memory, and load_all() reports it without stopping.

Hypothesis writes files of every shape (wrong JSON types, deep nesting, huge numbers,
out-of-range pids and ports, non-UTF-8 bytes, lone surrogates, huge files) next to the
record shapes efsplug writes, and the few that must never get through are spelled out.
"""

from __future__ import annotations

import json
import os
import resource
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from efsplug import state
from efsplug.state import MountRecord, StateError
from efsplug.tunnel import TunnelIdentity

GOOD: Dict[str, Any] = state.to_dict(MountRecord(
    fs_id="fs-0123456789abcdef0", mountpoint="/mnt/efs", port=20050, tls=True, config_file="/run/efs/x/stunnel.conf",
    tunnel=TunnelIdentity(pid=4321, create_time=1714564800.53, cmdline=("/usr/bin/stunnel", "/run/efs/x/stunnel.conf"),
                          start_ticks=123456, boot_id="6300745a-bf2a-4381-a2bd-a23538b15a8d"),
    mount_time=datetime(2024, 5, 1, tzinfo=timezone.utc), files_created=["/run/efs/x"]))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
wild_ints = st.one_of(st.integers(), st.integers(min_value=2**62, max_value=2**200), st.integers(max_value=-1),
                      st.just(0), st.just(2**22 + 1), st.just(65536))
field_values = st.one_of(json_values, wild_ints, st.text(st.characters(exclude_categories=()), max_size=20))


@st.composite
def mutated_records(draw) -> bytes:
    """An efsplug record with some fields (top level or the tunnel's) replaced by junk."""
    data = json.loads(json.dumps(GOOD))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "tunnel"]))
        target = data if where == "top" or not isinstance(data.get("tunnel"), dict) else data["tunnel"]
        key = draw(st.sampled_from(sorted(target) + ["version", "pid", "create_time", "cmdline", "start_ticks", "boot_id", "extra"]))
        target[key] = draw(field_values)
    # Lone surrogates travel as \\ud800 escapes (ensure_ascii) or as raw, invalid UTF-8.
    return json.dumps(data, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _raw_shapes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        mutated_records(),
        st.integers(10, 200_000).map(deep),
        st.integers(1, 60_000).map(lambda n: b'{"version": 1, "port": ' + b"9" * n + b"}"),
        st.sampled_from([b"NaN", b"Infinity", b'{"version": 1e999}', b'{"version": 1, "fs_id": "\\ud800"}',
                         b"\xff\xfe\x00", b'{"a": "' + b"\\" * 5000 + b'"}']),
    )


def load_bytes(tmp_path: Path, raw: bytes) -> object:
    path = tmp_path / "fs-0123456789abcdef0.mnt-efs.20050.json"
    path.write_bytes(raw)
    try:
        record = state.load(path)
    except StateError as exc:
        assert str(path) in str(exc) and len(str(exc)) < 600 and "\n" not in str(exc)
        return exc
    # Whatever loads must be usable by the supervisor: named, and its times comparable.
    state.file_name(record)
    for when in (record.mount_time, record.cert_not_before, record.cert_not_after, record.credential_expiry):
        if when is not None:
            when.timestamp()
    return record


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_raw_shapes())
def test_any_bytes_give_a_record_or_a_state_error(tmp_path: Path, raw: bytes) -> None:
    load_bytes(tmp_path, raw)


@pytest.mark.parametrize("raw, reason", [
    (deep(100_000), "larger than it can be"),  # the issue's case: refused before parsing
    (deep(30_000), "nested deeper"),  # within the size limit: refused before json recurses
    (b'{"version": 1, "fs_id": "fs-01234567", "mountpoint": "/m", "port": ' + b"1" * 10_000 + b"}", "digits"),
    (json.dumps({**GOOD, "port": 70000}).encode(), "port"),
    (json.dumps({**GOOD, "port": -1}).encode(), "port"),
    (json.dumps({**GOOD, "tunnel": {**GOOD["tunnel"], "pid": 2**22 + 1}}).encode(), "pid"),
    (json.dumps({**GOOD, "tunnel": {**GOOD["tunnel"], "pid": 10**30}}).encode(), "pid"),
    (json.dumps({**GOOD, "tunnel": {**GOOD["tunnel"], "pid": 0}}).encode(), "pid"),
    (json.dumps({**GOOD, "tunnel": {**GOOD["tunnel"], "create_time": -5}}).encode(), "create_time"),
    (json.dumps({**GOOD, "tunnel": {**GOOD["tunnel"], "create_time": 1e308 * 10}}).encode(), "number"),
    (json.dumps({**GOOD, "tunnel": {**GOOD["tunnel"], "cmdline": ["x"] * 65}}).encode(), "cmdline"),
    (json.dumps({**GOOD, "tunnel": {**GOOD["tunnel"], "start_ticks": 2**63}}).encode(), "start_ticks"),
    (json.dumps({**GOOD, "tunnel": {**GOOD["tunnel"], "boot_id": "a" * 65}}).encode(), "boot_id"),
    (json.dumps({**GOOD, "mountpoint": "/mnt/\ud800"}).encode(), "mountpoint"),
    (json.dumps({**GOOD, "cert_not_after": "9999-12-31T23:59:59+00:00"}).encode(), "out of range"),
    (json.dumps({**GOOD, "mount_time": "0001-01-01T00:00:00+01:00"}).encode(), "mount_time"),
    (json.dumps({**GOOD, "files_created": [{"a": 1}]}).encode(), "files_created"),
    (b"\xff" + json.dumps(GOOD).encode(), "not valid JSON"),
    (b'{"version": NaN}', "NaN"),
])
def test_the_cases_the_issue_names_are_refused(tmp_path: Path, raw: bytes, reason: str) -> None:
    result = load_bytes(tmp_path, raw)
    assert isinstance(result, StateError) and result.corrupt, result
    assert reason in str(result)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(4 << 30)  # 4 GiB, sparse: reading it would exhaust memory
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(StateError, match="larger than it can be") as err:
        state.load(path)
    assert err.value.corrupt
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: nothing was read


def test_a_fifo_or_a_symlink_named_like_a_record_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(StateError, match="not a regular file"):
        state.load(fifo)  # would block forever in a plain read
    link = tmp_path / "link.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(StateError, match="cannot read"):
        state.load(link)


def test_load_all_reports_each_bad_file_once_and_keeps_the_good(tmp_path: Path) -> None:
    good = MountRecord(fs_id="fs-01234567", mountpoint="/mnt/good")
    state.save(tmp_path, good)
    (tmp_path / "fs-01234567.mnt-deep.json").write_bytes(deep(100_000))
    (tmp_path / "fs-01234567.mnt-int.json").write_bytes(b'{"version": ' + b"7" * 100_000 + b"}")
    records, problems = state.load_all(tmp_path)
    assert records == [good]
    assert sorted(p.path.name for p in problems) == ["fs-01234567.mnt-deep.json", "fs-01234567.mnt-int.json"]


def test_newer_versions_are_not_corrupt_and_quarantine_moves_a_file_aside(tmp_path: Path) -> None:
    newer = tmp_path / "fs-01234567.mnt-new.json"
    newer.write_text(json.dumps({**GOOD, "version": state.RECORD_VERSION + 1}))
    with pytest.raises(StateError) as err:
        state.load(newer)
    assert not err.value.corrupt  # left alone for the newer efsplug
    bad = tmp_path / "fs-01234567.mnt-bad.json"
    bad.write_bytes(b"{")
    moved = state.quarantine(bad, datetime(2024, 5, 1, tzinfo=timezone.utc))
    assert not bad.exists() and moved.read_bytes() == b"{"
    assert moved.name == "fs-01234567.mnt-bad.json.corrupt-20240501T000000.000000Z"
    assert state.quarantined_files(tmp_path) == [moved]
    assert state.load_all(tmp_path)[1] == [state.StateProblem(newer, state.load_all(tmp_path)[1][0].reason)]
    assert state.claimed(tmp_path, "fs-01234567.mnt-bad") and state.claimed(tmp_path, "fs-01234567.mnt-new")
    assert not state.claimed(tmp_path, "fs-01234567.mnt-other")
