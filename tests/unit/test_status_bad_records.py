"""`efsplug status` with bad records in the state directory: the good mounts, one line per
bad record, exit status 0, whatever the bad files hold."""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest

from efsplug import state, status
from efsplug.state import MountRecord
from efsplug.supervisor.cleanup import NAMES

BAD = {
    "fs-01234567.mnt-deep.json": b"[" * 30_000 + b"]" * 30_000,
    "fs-01234567.mnt-int.json": b'{"version": 1, "port": ' + b"9" * 50_000 + b"}",
    "fs-01234567.mnt-pid.json": json.dumps({"version": 1, "fs_id": "fs-01234567", "mountpoint": "/mnt/pid",
                                            "tunnel": {"pid": 10**30, "create_time": 1, "cmdline": []}}).encode(),
    "fs-01234567.mnt-bytes.json": b"\xff\xfe\xfd",
    "fs-01234567.mnt-evil\n.json": b"{",  # a file name that would forge an output line
}


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "efs"
    (tmp_path / "efs-utils.conf").write_text(f"[efsplug]\nstate_dir = {directory}\n")
    monkeypatch.setenv("EFSPLUG_CONFIG", str(tmp_path / "efs-utils.conf"))
    monkeypatch.setenv("EFSPLUG_ECS_CONFIG", str(tmp_path / "none"))
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    state.save(directory, MountRecord(fs_id="fs-01234567", mountpoint="/mnt/good"))
    for name, raw in BAD.items():
        (directory / name).write_bytes(raw)
    with open(directory / "fs-01234567.mnt-huge.json", "wb") as f:
        f.truncate(1 << 30)  # sparse: must be refused by its size, not read
    os.mkfifo(directory / "fs-01234567.mnt-fifo.json")  # must not hang the reader
    state.quarantine(directory / "fs-01234567.mnt-bytes.json", datetime(2024, 5, 1, tzinfo=timezone.utc))
    yield directory


def test_good_mounts_and_one_line_per_bad_record(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.run(argparse.Namespace(json=False, agent_state=state_dir / "no-agent.json")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("/mnt/good  fs-01234567:/  ")
    bad = [line for line in out if line.startswith(("unusable record: ", "quarantined record: "))]
    assert len(bad) == 7, out
    for what in ("mnt-deep.json: nested deeper", "mnt-int.json: not valid JSON", "mnt-pid.json: tunnel pid",
                 "mnt-huge.json: 1073741824 bytes", "mnt-fifo.json: cannot read: not a regular file",
                 "mnt-evil\\n.json: not valid JSON"):
        assert sum(what in line for line in bad) == 1, (what, bad)
    assert sum("mnt-bytes.json.corrupt-20240501T000000.000000Z (unusable" in line for line in bad) == 1
    assert all(len(line) < 400 for line in out)


def test_json_stays_a_list_of_the_good_mounts(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.run(argparse.Namespace(json=True, agent_state=state_dir / "no-agent.json")) == 0
    captured = capsys.readouterr()
    assert [v["mountpoint"] for v in json.loads(captured.out)] == ["/mnt/good"]
    assert len(captured.err.splitlines()) == 7
