"""The agent's state file: versioned round trip, 0600, quarantine of anything unusable."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest

from efsplug.agent.store import FORMAT_VERSION, StateWriteError, Store, encode
from efsplug.agent.volumes import Volume

V1 = Volume("v1", "fs-12345678", "tls,iam,awscredsuri=/v2/credentials/abc", "/vols/v1", "2024-05-01T10:00:00Z",
            mounted=True, refs=(("a" * 64, 2), ("b" * 64, 1)))
V2 = Volume("v2", "fs-12345678:/x", "", "/vols/v2", "2024-05-01T10:00:01Z")
V3 = Volume("v3", "203.0.113.49:/", "vers=4.1", "/vols/v3", "2024-05-01T10:00:02Z", mounted=True,
            refs=(("c" * 64, 1),), fs_type="nfs4")
WHEN = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def test_round_trip_is_exact_and_versioned(tmp_path: Path) -> None:
    store = Store(tmp_path / "data" / "volumes.json")
    store.save({"v2": V2, "v1": V1})
    data = json.loads(store.path.read_text())
    assert data["version"] == FORMAT_VERSION and sorted(data["volumes"]) == ["v1", "v2"]
    assert data["volumes"]["v1"]["refs"] == {"a" * 64: 2, "b" * 64: 1}
    assert store.load().volumes == {"v1": V1, "v2": V2}
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600  # it holds credentials URIs
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700


def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    Store(tmp_path / "volumes.json").save({})
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    loaded = Store(tmp_path / "none.json").load()
    assert loaded.volumes == {} and loaded.quarantined is None


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[]", "not an object with 'volumes'"),
        (b'{"version": 1}', "not an object with 'volumes'"),
        (b'{"version": 2, "volumes": {}}', "format version 2 is not 1"),
        (b'{"volumes": {}}', "format version missing or not a number"),
        (b'{"version": 1, "volumes": {"../x": {}}}', "a volume name is invalid"),
        (b'{"version": 1, "volumes": {"v": []}}', "volume v: not an object"),
        (b'{"version": 1, "volumes": {"v": {"device": "fs-12345678"}}}', "'options' is missing"),
        (encode({"v1": V1}).replace(b": 2", b": -2"), "'refs' must map"),
        (encode({"v1": V1}).replace(b'"mounted": true', b'"mounted": "yes"'), "'mounted' is not true/false"),
        (encode({"v3": V3}).replace(b'"nfs4"', b'"cifs"'), "volume v3: 'fs_type' is not one of efs, nfs, nfs4, s3files"),
        (encode({"v3": V3}).replace(b'"nfs4"', b'["nfs4"]'), "'fs_type' is not one of"),
    ],
)
def test_unusable_file_is_quarantined_with_a_timestamp(tmp_path: Path, content: bytes, problem: str) -> None:
    store = Store(tmp_path / "volumes.json")
    store.path.write_bytes(content)
    loaded = store.load(now=WHEN)
    assert loaded.volumes == {} and problem in (loaded.problem or "")
    assert loaded.quarantined == tmp_path / "volumes.json.corrupt-20240501T120000.123456Z"
    assert loaded.quarantined.read_bytes() == content and not store.path.exists()
    assert store.quarantined_files() == [loaded.quarantined]
    store.save({"v2": V2})  # and the agent carries on with a fresh file
    assert store.load().volumes == {"v2": V2}


def test_problem_text_never_echoes_file_content(tmp_path: Path) -> None:
    store = Store(tmp_path / "volumes.json")
    for content in ('{"version": "SECRETTOKEN", "volumes": {}}', '{"SECRETTOKEN": ', '{"version": 1, "volumes": {"v": {"device": "SECRETTOKEN"}}}'):
        store.path.write_text(content)
        problem = store.load().problem
        assert problem and "SECRETTOKEN" not in problem


def test_write_failure_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    store = Store(tmp_path / "ro" / "sub" / "volumes.json")
    if os.geteuid() == 0:  # root ignores directory modes: make the parent a file instead
        store = Store(tmp_path / "file" / "volumes.json")
        (tmp_path / "file").write_text("x")
    with pytest.raises(StateWriteError, match="cannot write the agent state .*volumes.json"):
        store.save({"v2": V2})


def test_the_volume_type_round_trips_and_files_without_it_are_efs(tmp_path: Path) -> None:
    store = Store(tmp_path / "volumes.json")
    store.save({"v1": V1, "v3": V3})
    assert json.loads(store.path.read_text())["volumes"]["v3"]["fs_type"] == "nfs4"
    assert store.load().volumes == {"v1": V1, "v3": V3}
    old = json.loads(store.path.read_text())
    for item in old["volumes"].values():
        del item["fs_type"]  # as written before volume types existed
    store.path.write_text(json.dumps(old))
    loaded = store.load().volumes
    assert loaded["v1"] == V1 and loaded["v1"].fs_type == "efs" and loaded["v3"].fs_type == "efs"
