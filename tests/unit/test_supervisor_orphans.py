"""Orphan tunnels: what proves a tunnel efsplug's, and when a proven one may be stopped (pure rules)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from efsplug.stunnel import MARKER, TunnelSpec, render
from efsplug import state
from efsplug.mounttable import KernelMount
from efsplug.supervisor.orphans import Candidate, judge, layout_stem, marked_port, mount_dirs_of, release_unrecorded
from efsplug.tunnel import TunnelIdentity

STATE = "/var/run/efs"
STEM = "fs-0123456789abcdef0.mnt-efs.20049"
ID = TunnelIdentity(pid=77, create_time=1.0, cmdline=("/usr/bin/stunnel", f"{STATE}/{STEM}/stunnel.conf"))


def candidate(age: float = 60.0, port: int = 20049) -> Candidate:
    return Candidate(ID, STEM, port, age)


@pytest.mark.parametrize("claimed, ports, age, stop", [
    (False, set(), 60.0, True),
    (True, set(), 60.0, False),  # a record (good, corrupt or quarantined) names its directory
    (False, {20049}, 60.0, False),  # a kernel mount uses its port, record or not
    (False, {20050}, 60.0, True),
    (False, set(), 1.0, False),  # a mount in progress: its record comes right after the tunnel listens
])
def test_judge(claimed: bool, ports: set, age: float, stop: bool) -> None:
    verdict = judge(candidate(age), claimed=claimed, ports_used=ports, min_age=10.0)
    assert verdict.stop is stop
    assert (verdict.recheck_in == 9.0) if age < 10.0 and not claimed and not ports else verdict.recheck_in is None


def test_a_port_unknown_is_not_a_reason_to_keep_but_a_claim_is() -> None:
    assert judge(candidate(port=None), claimed=False, ports_used={20049}, min_age=0).stop  # type: ignore[arg-type]
    assert not judge(candidate(port=None), claimed=True, ports_used=set(), min_age=0).stop  # type: ignore[arg-type]


@pytest.mark.parametrize("cmdline, stem", [
    (["/usr/bin/stunnel", f"{STATE}/{STEM}/stunnel.conf"], STEM),
    (["stunnel5", f"{STATE}/fs-01234567.mnt-a\\x2db~0123456789abcdef/stunnel.conf"],
     "fs-01234567.mnt-a\\x2db~0123456789abcdef"),
    (["/usr/bin/stunnel4", f"{STATE}/fs-01234567.-/stunnel.conf"], "fs-01234567.-"),
    # amazon-efs-utils: its config lies in the state dir itself, its cert dir ends in "+"
    (["/usr/bin/stunnel", f"{STATE}/stunnel-config.fs-0123456789abcdef0.mnt.efs.20049"], None),
    (["/usr/bin/stunnel5", f"{STATE}/fs-0123456789abcdef0.mnt.efs.20049+/stunnel.conf"], None),
    (["/usr/bin/efs-proxy", f"{STATE}/stunnel-config.fs-0123456789abcdef0.mnt.efs.20049", "--tls"], None),
    (["/usr/bin/efs-proxy", f"{STATE}/{STEM}/stunnel.conf"], None),
    # not exactly `stunnel <config>`
    (["/usr/bin/stunnel", f"{STATE}/{STEM}/stunnel.conf", "-fd", "0"], None),
    (["/usr/bin/stunnel"], None),
    # elsewhere, or named otherwise
    (["/usr/bin/stunnel", f"/tmp/{STEM}/stunnel.conf"], None),
    (["/usr/bin/stunnel", f"{STATE}/{STEM}/other.conf"], None),
    (["/usr/bin/stunnel", f"{STATE}/orphan/stunnel.conf"], None),
    (["/usr/bin/stunnel", f"{STATE}/x/{STEM}/stunnel.conf"], None),
    (["/usr/bin/stunnel", f"{STATE}/{STEM}/../{STEM}/stunnel.conf"], None),
    (["/usr/bin/stunnel", f"efs/{STEM}/stunnel.conf"], None),
])
def test_layout_stem(cmdline: list, stem: object) -> None:
    assert layout_stem(cmdline, os.path.realpath(STATE)) == stem


def test_the_marker_is_the_first_line_efsplug_writes(tmp_path: Path) -> None:
    text = render(TunnelSpec(accept_port=20123, connect_host="127.0.0.1", verify_level=0))
    assert text.splitlines()[0] == MARKER
    ours = tmp_path / "ours.conf"
    ours.write_text(text)
    assert marked_port(str(ours)) == (True, 20123)
    theirs = tmp_path / "theirs.conf"
    theirs.write_text("\n".join(text.splitlines()[1:]) + "\n")  # the same config without the marker
    assert marked_port(str(theirs)) == (False, None)
    later = tmp_path / "later.conf"
    later.write_text("fips = no\n" + text)  # the marker must open the file
    assert marked_port(str(later)) == (False, None)
    link = tmp_path / "link.conf"
    link.symlink_to(ours)
    assert marked_port(str(link)) == (False, None)
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    assert marked_port(str(fifo)) == (False, None)  # and no hang
    assert marked_port(str(tmp_path / "gone.conf")) == (False, None)


FS17 = "fs-0123456789abcdef0"


def _dir_of(state_dir: Path, mountpoint: str, port: int, fs_id: str = FS17) -> str:
    name = state.file_name(state.MountRecord(fs_id=fs_id, mountpoint=mountpoint, port=port))[: -len(state.SUFFIX)]
    (state_dir / name).mkdir()
    (state_dir / name / "certificate.pem").write_text("cert")
    return name


def test_mount_dirs_of_names_only_that_mountpoints_directories(tmp_path: Path) -> None:
    mine = [_dir_of(tmp_path, "/v/a", 20049), _dir_of(tmp_path, "/v/a", 20050, fs_id="fs-01234567")]
    _dir_of(tmp_path, "/v/a-b", 20051)  # escapes to a longer name starting the same way
    _dir_of(tmp_path, "/v", 20052)
    (tmp_path / (mine[0] + ".json")).write_text("{}")  # a record is a file, not a directory
    (tmp_path / "fs-0123456789abcdef0.v-a.0").mkdir()  # no such port
    (tmp_path / "fs-0123456789abcdef0.v-a.020049").mkdir()  # not how a port is written
    assert mount_dirs_of(tmp_path, "/v/a") == sorted(mine)
    assert mount_dirs_of(tmp_path / "missing", "/v/a") == []


def _nfs(mountpoint: str, port: int) -> KernelMount:
    return KernelMount(1, mountpoint, "nfs4", "127.0.0.1:/", f"rw,port={port}", port)


def test_release_unrecorded_removes_only_unclaimed_unused_directories(tmp_path: Path) -> None:
    cut = _dir_of(tmp_path, "/v/a", 20049)  # a mount killed before its record was saved
    recorded = _dir_of(tmp_path, "/v/a", 20050)
    (tmp_path / (recorded + ".json")).write_text("{}")
    in_use = _dir_of(tmp_path, "/v/a", 20051)  # another mount talks through its port
    other = _dir_of(tmp_path, "/v/b", 20052)
    assert release_unrecorded(tmp_path, "/v/a", [_nfs("/v/c", 20051)]) == [cut]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted([recorded, in_use, other])
    assert release_unrecorded(tmp_path, "/v/a", []) == [in_use]
