"""The supervisor's view of the record directory: new and rewritten records are handed out
once each, bad ones are reported once (corrupt ones quarantined), nothing raises."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from efsplug import state
from efsplug.state import MountRecord
from efsplug.supervisor.records import RecordDir

WHEN = datetime(2024, 5, 1, tzinfo=timezone.utc)
HELD = frozenset({"fs-01234567.mnt-a.json", "fs-01234567.mnt-good.json", "fs-01234567.mnt-race.json",
                  "fs-01234567.mnt-newer.json"})  # what the supervisor holds entries for


def rec(mountpoint: str, **over: object) -> MountRecord:
    return MountRecord(fs_id="fs-01234567", mountpoint=mountpoint, **over)  # type: ignore[arg-type]


@pytest.fixture
def records(tmp_path: Path) -> RecordDir:
    return RecordDir(tmp_path, now=lambda: WHEN)


def test_new_and_rewritten_records_are_handed_out_once(tmp_path: Path, records: RecordDir) -> None:
    a = state.save(tmp_path, rec("/mnt/a")).name
    scan = records.scan(HELD)
    assert scan.present == {a} and [x.key for x in scan.loaded] == [a]
    assert records.scan(HELD).loaded == []  # unchanged: not parsed again
    state.save(tmp_path, rec("/mnt/a", region="eu-west-1"))  # rewritten by another process
    assert [x.record.region for x in records.scan(HELD).loaded] == ["eu-west-1"]
    records.reload_later(a)
    assert [x.key for x in records.scan(HELD).loaded] == [a]
    assert [x.key for x in records.scan(set()).loaded] == [a]  # dropped by the caller: handed out again
    os.unlink(tmp_path / a)
    assert records.scan(HELD).present == set()


def test_a_bad_record_is_reported_once_and_quarantined(tmp_path: Path, records: RecordDir,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="efsplug.supervisor")
    good = state.save(tmp_path, rec("/mnt/good")).name
    (tmp_path / "fs-01234567.mnt-deep.json").write_bytes(b"[" * 20_000 + b"]" * 20_000)
    newer = tmp_path / "fs-01234567.mnt-newer.json"
    newer.write_text(json.dumps({"version": 9, "fs_id": "fs-01234567", "mountpoint": "/mnt/newer"}))
    for _ in range(5):  # one scan per mount-table event
        assert records.scan(HELD).present == {good}
    assert not (tmp_path / "fs-01234567.mnt-deep.json").exists()
    assert (tmp_path / "fs-01234567.mnt-deep.json.corrupt-20240501T000000.000000Z").exists()
    assert newer.exists()  # a newer efsplug's: left for it
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "quarantined" in messages[0] and "nested deeper" in messages[0]
    assert "newer efsplug" in messages[1]
    newer.write_text(json.dumps({"version": 9, "fs_id": "fs-01234567", "mountpoint": "/mnt/newer", "x": 1}))
    records.scan(HELD)
    assert len(caplog.records) == 3  # a new version of the file is looked at (and reported) again
    state.save(tmp_path, rec("/mnt/newer"))  # an older efsplug's record replaces it: fine again
    assert "fs-01234567.mnt-newer.json" in records.scan(HELD).present


def test_a_record_rewritten_while_judged_is_not_quarantined(tmp_path: Path, records: RecordDir,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "fs-01234567.mnt-race.json"
    bad.write_bytes(b"{")
    real_load = state.load

    def load_then_rewrite(path: Path) -> MountRecord:
        try:
            return real_load(path)
        finally:
            state.save(tmp_path, rec("/mnt/race"))  # the writer's good version lands meanwhile

    monkeypatch.setattr(state, "load", load_then_rewrite)
    assert records.scan(HELD).present == set()
    monkeypatch.setattr(state, "load", real_load)
    assert state.quarantined_files(tmp_path) == []
    assert [x.record.mountpoint for x in records.scan(HELD).loaded] == ["/mnt/race"]
