"""The agent's state file when it is hostile: bounded reads, bounded parsing, quarantine, never a crash."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efsplug.agent.store import CorruptState, ProvisionedOn, Store, decode, decode_all, encode

WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def deep(n: int) -> bytes:
    return b'{"version": 1, "volumes": ' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize("content, problem", [
    (deep(100_000), "nested deeper"),
    (b'{"version": 1, "volumes": {"v": {"refs": {"a": 1' + b"0" * 5000 + b"}}}}", "digits"),
    (b'{"version": 1, "volumes": {}, "x": NaN}', "NaN"),
    (b'{"version": 1e999, "volumes": {}}', "out of range"),
])
def test_hostile_content_is_refused_before_it_costs_anything(content: bytes, problem: str) -> None:
    with pytest.raises(CorruptState, match=problem):
        decode(content)


@pytest.mark.parametrize("make", ["fifo", "symlink", "directory"])
def test_a_state_path_that_is_no_file_is_moved_aside_without_blocking(tmp_path: Path, make: str) -> None:
    path = tmp_path / "volumes.json"
    if make == "fifo":
        os.mkfifo(path)
    elif make == "symlink":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    loaded = Store(path).load(now=WHEN)
    assert loaded.volumes == {} and loaded.quarantined is not None and not os.path.lexists(path)
    assert "cannot read" in (loaded.problem or "")


def test_a_huge_state_file_is_quarantined_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import efsplug.agent.store as store_module

    monkeypatch.setattr(store_module, "MAX_STATE_BYTES", 1024)
    path = tmp_path / "volumes.json"
    path.write_bytes(b" " * 2048)
    loaded = Store(path).load(now=WHEN)
    assert loaded.volumes == {} and "larger than it can be" in (loaded.problem or "")


_json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=2000),
    _json_like.map(lambda v: repr(v).encode()),
    st.dictionaries(st.text(max_size=30), _json_like, max_size=4).map(
        lambda vols: ('{"version": 1, "volumes": %s}' % repr(vols).replace("'", '"')).encode()),
))
def test_any_bytes_give_volumes_or_corrupt_state_never_anything_else(raw: bytes) -> None:
    try:
        volumes = decode(raw)
    except CorruptState:
        return
    assert isinstance(volumes, dict)


@pytest.mark.parametrize("entries", [
    '{"fs_id": "fs-1"}',                              # not a file system id
    '{"fs_id": "fs-0123456789abcdef0", "region": "us-east-1\\n[x]"}',
    '{"fs_id": "fs-0123456789abcdef0", "region": 7}',
    '"fs-0123456789abcdef0"',
    ", ".join(['{"fs_id": "fs-0123456789abcdef0"}'] * 1001),  # more than status would ever ask EFS about
])
def test_remembered_file_systems_that_are_not_file_systems_are_refused(entries: str) -> None:
    with pytest.raises(CorruptState, match="provisioned_on"):
        decode_all(('{"version": 1, "volumes": {}, "provisioned_on": [%s]}' % entries).encode())


def test_remembered_file_systems_survive_a_round_trip() -> None:
    remembered = (ProvisionedOn("fs-0123456789abcdef0", "eu-west-1"), ProvisionedOn("fs-0123456789abcdef0"))
    assert decode_all(encode({}, remembered + remembered[:1])) == ({}, tuple(sorted(remembered)))
    assert b"provisioned_on" not in encode({})  # files without provisioning stay as they were
