"""Mount records: round trip, naming, modes, corrupt and future files, crash debris."""

from __future__ import annotations

import dataclasses

import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from efsplug import fsutil, state
from efsplug.state import MountRecord, StateError
from efsplug.tunnel import TunnelIdentity

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def record(**over: object) -> MountRecord:
    base = dict(
        fs_id="fs-0123456789abcdef0",
        mountpoint="/mnt/efs",
        path="/data",
        port=20050,
        tunnel=TunnelIdentity(pid=4321, create_time=1714564800.53, cmdline=("/usr/bin/stunnel4", "/run/efs/x.conf"),
                              start_ticks=123456, boot_id="6300745a-bf2a-4381-a2bd-a23538b15a8d"),
        config_file="/run/efs/x.conf",
        files_created=["/run/efs/x.conf", "/run/efs/fs-0123456789abcdef0+/certificate.pem"],
        credential_source="awscredsuri:/v2/credentials/abc",
        credential_expiry=NOW + timedelta(hours=6),
        cert_not_before=NOW - timedelta(minutes=15),
        cert_not_after=NOW + timedelta(hours=3),
        access_point="fsap-0123456789abcdef0",
        netns="/proc/77/ns/net",
        region="us-east-1",
        mount_time=NOW,
        tls=True,
        iam=True,
    )
    base.update(over)
    return MountRecord(**base)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    rec = record()
    path = state.save(tmp_path / "efs", rec)
    assert state.load(path) == rec
    assert path.name == "fs-0123456789abcdef0.mnt-efs.20050.json"


def test_minimal_record_round_trip(tmp_path: Path) -> None:
    rec = MountRecord(fs_id="fs-01234567", mountpoint="/")
    path = state.save(tmp_path, rec)
    assert path.name == "fs-01234567.-.json"
    assert state.load(path) == rec


def test_modes_of_directory_and_file(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a restrictive umask must not leave the dir unreadable for group
    try:
        path = state.save(tmp_path / "run" / "efs", record())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_overwrites_the_same_mount(tmp_path: Path) -> None:
    state.save(tmp_path, record(region="us-east-1"))
    state.save(tmp_path, record(region="eu-west-1"))
    records, problems = state.load_all(tmp_path)
    assert problems == []
    assert [r.region for r in records] == ["eu-west-1"]


def test_remove_is_idempotent(tmp_path: Path) -> None:
    rec = record()
    state.save(tmp_path, rec)
    state.remove(tmp_path, rec)
    state.remove(tmp_path, rec)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mountpoint, escaped",
    [
        ("/mnt/efs", "mnt-efs"),
        ("/mnt/my-efs/", "mnt-my\\x2defs"),
        ("/mnt/a b", "mnt-a\\x20b"),
        ("/.hidden", "\\x2ehidden"),
        ("/mnt/\u00e9", "mnt-\\xc3\\xa9"),
    ],
)
def test_mountpoint_escaping(mountpoint: str, escaped: str) -> None:
    assert state.escape_path(mountpoint) == escaped


def test_escaping_keeps_distinct_mountpoints_distinct(tmp_path: Path) -> None:
    a = record(mountpoint="/mnt/a-b")
    b = record(mountpoint="/mnt/a/b")
    assert state.file_name(a) != state.file_name(b)


def test_long_mountpoints_get_bounded_distinct_names(tmp_path: Path) -> None:
    a = record(mountpoint="/" + "x" * 300 + "/one")
    b = record(mountpoint="/" + "x" * 300 + "/two")
    assert len(state.file_name(a)) < 200
    assert state.file_name(a) != state.file_name(b)
    state.save(tmp_path, a)
    state.save(tmp_path, b)
    records, problems = state.load_all(tmp_path)
    assert problems == [] and sorted(r.mountpoint for r in records) == sorted([a.mountpoint, b.mountpoint])


@pytest.mark.parametrize(
    "over, message",
    [
        ({"fs_id": "fs-xyz"}, "fs_id"),
        ({"fs_id": "../../etc/passwd"}, "fs_id"),
        ({"mountpoint": "relative"}, "mountpoint"),
        ({"port": 0}, "port"),
        ({"port": "20049"}, "port"),
        ({"tls": "yes"}, "tls"),
        ({"mount_time": datetime(2024, 1, 1)}, "mount_time"),
        ({"files_created": "/a"}, "files_created"),
    ],
)
def test_invalid_records_refused_on_save(tmp_path: Path, over: dict, message: str) -> None:
    with pytest.raises(StateError, match=message):
        state.save(tmp_path, record(**over))


def test_corrupt_file_is_reported_not_fatal(tmp_path: Path) -> None:
    good = state.save(tmp_path, record())
    (tmp_path / "fs-01234567.mnt-x.json").write_bytes(b'{"version": 1, "fs_id": "fs-0')  # torn
    (tmp_path / "fs-01234567.mnt-y.json").write_bytes(b"\xff\xfe")
    (tmp_path / "fs-01234567.mnt-z.json").write_text('["not", "an", "object"]')
    records, problems = state.load_all(tmp_path)
    assert [r.mountpoint for r in records] == ["/mnt/efs"]
    reasons = {p.path.name: p.reason for p in problems}
    assert set(reasons) == {"fs-01234567.mnt-x.json", "fs-01234567.mnt-y.json", "fs-01234567.mnt-z.json"}
    assert "corrupt" in reasons["fs-01234567.mnt-x.json"]
    assert "not a mount record" in reasons["fs-01234567.mnt-z.json"]
    assert good.exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("fs_id"), "'fs_id' is missing"),
        (lambda d: d.pop("version"), "no version"),
        (lambda d: d.update(version=0), "unknown record version"),
        (lambda d: d.update(mount_time="yesterday"), "mount_time"),
        (lambda d: d.update(mount_time="2024-05-01T12:00:00"), "no time zone"),
        (lambda d: d["tunnel"].update(pid=-1), "pid"),
        (lambda d: d["tunnel"].update(create_time="soon"), "create_time"),
        (lambda d: d["tunnel"].update(cmdline="stunnel"), "cmdline"),
        (lambda d: d["tunnel"].pop("boot_id"), "start_ticks and boot_id go together"),
        (lambda d: d["tunnel"].update(start_ticks=-1), "start_ticks"),
        (lambda d: d["tunnel"].update(start_ticks=1.5), "start_ticks"),
        (lambda d: d["tunnel"].update(boot_id="x\n[y]"), "boot_id"),
        (lambda d: d.update(tunnel=5), "tunnel"),
        (lambda d: d.update(region=3), "region"),
    ],
)
def test_malformed_fields_reported_with_file_name(tmp_path: Path, mutate, message: str) -> None:
    data = state.to_dict(record())
    mutate(data)
    path = tmp_path / "fs-0123456789abcdef0.mnt-efs.20050.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StateError, match=message) as err:
        state.load(path)
    assert str(path) in str(err.value)


def test_a_record_written_before_start_ticks_still_loads(tmp_path: Path) -> None:
    data = state.to_dict(record())
    del data["tunnel"]["start_ticks"], data["tunnel"]["boot_id"]
    path = tmp_path / "fs-0123456789abcdef0.mnt-efs.20050.json"
    path.write_text(json.dumps(data))
    tunnel = state.load(path).tunnel
    assert tunnel is not None and tunnel.start_ticks is None and tunnel.boot_id is None
    assert tunnel.create_time == 1714564800.53


def test_future_version_reported_and_left_alone(tmp_path: Path) -> None:
    data = state.to_dict(record())
    data["version"] = state.RECORD_VERSION + 1
    data["new_field"] = {"x": 1}
    path = tmp_path / "fs-0123456789abcdef0.mnt-efs.20050.json"
    path.write_text(json.dumps(data))
    records, problems = state.load_all(tmp_path)
    assert records == []
    assert len(problems) == 1 and f"newer efsplug (record version {state.RECORD_VERSION + 1}" in problems[0].reason
    assert path.exists()


def test_unknown_fields_of_the_same_version_are_ignored(tmp_path: Path) -> None:
    data = state.to_dict(record())
    data["added_later"] = True
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    assert state.load(path) == record()


def test_unreadable_path_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot read"):
        state.load(tmp_path / "missing.json")
    with pytest.raises(StateError, match="cannot read"):
        state.load(tmp_path)  # a directory


def test_missing_state_dir_means_no_mounts(tmp_path: Path) -> None:
    assert state.load_all(tmp_path / "nope") == ([], [])


def test_leftover_temp_file_of_a_dead_writer_is_ignored_and_cleaned(tmp_path: Path) -> None:
    path = state.save(tmp_path, record())
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    debris = tmp_path / f".{path.name}.{dead_pid}.abcd1234{fsutil.TEMP_SUFFIX}"
    debris.write_text('{"version": 1, "fs_id": "fs-0')  # a crash mid-write
    live = tmp_path / f".{path.name}.{os.getpid()}.abcd1234{fsutil.TEMP_SUFFIX}"
    live.write_text("{")  # a writer still running (us): must be left alone
    records, problems = state.load_all(tmp_path)
    assert problems == [] and records == [record()]
    assert not debris.exists()
    assert live.exists()


def test_atomic_write_replaces_without_leaving_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f"
    fsutil.atomic_write(target, b"one", 0o644)
    fsutil.atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    fsutil.atomic_write(target, b"old")
    with pytest.raises(TypeError):
        fsutil.atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_ensure_dir_fixes_mode_and_refuses_files(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o777)
    fsutil.ensure_dir(d, 0o750)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    (tmp_path / "f").write_text("")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        fsutil.ensure_dir(tmp_path / "f", 0o750)


def test_a_shared_tunnel_record_round_trips_and_needs_its_version(tmp_path: Path) -> None:
    hosted = dataclasses.replace(record(), host_config="/var/run/efs/hosts/0123456789abcdef/host.conf",
                                 version=state.HOSTED_VERSION)
    assert state.load(state.save(tmp_path, hosted)) == hosted
    data = state.to_dict(hosted)
    data["version"] = 1  # what an efsplug before shared tunnels would have written: it never sets host_config
    path = tmp_path / "fs-0123456789abcdef0.mnt-efs.20050.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StateError, match="host_config must have version 2"):
        state.load(path)
