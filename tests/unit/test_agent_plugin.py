"""Endpoint logic in process with a scripted mounter: reference counts, Remove, failures, state
written before every answer. (The real mount is proven in the kernel guest.)"""

from __future__ import annotations

import json
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

from efsbed.agent_harness import FakeMounter, plugin_with
from efsplug.agent import protocol as p
from efsplug.agent.othertypes import HelperMissing, TypedMount
from efsplug.agent.plugin import Plugin
from efsplug.agent.store import Store

FS, AP = "fs-0123456789abcdef0", "fsap-0123456789abcdef0"
OPTS = {"type": "efs", "device": FS, "o": f"tls,iam,accesspoint={AP}"}
A, B = "a" * 64, "b" * 64


def call(plugin: Plugin, endpoint: str, payload: Dict[str, Any]) -> Dict[str, Any]:
    answer = plugin.handle(endpoint, (json.dumps(payload) + "\n").encode())
    assert answer.err == answer.body.get("Err", "")
    return answer.body


def on_disk(plugin: Plugin) -> Dict[str, Any]:
    return json.loads(plugin.store.path.read_text())["volumes"]


@pytest.fixture
def mounter() -> FakeMounter:
    return FakeMounter()


@pytest.fixture
def plugin(tmp_path: Path, mounter: FakeMounter) -> Plugin:
    pl = plugin_with(tmp_path, mounter)
    assert call(pl, p.CREATE, {"Name": "v1", "Opts": OPTS}) == {"Err": ""}
    return pl


def test_create_records_without_mounting(plugin: Plugin, mounter: FakeMounter) -> None:
    assert mounter.calls == []
    assert on_disk(plugin)["v1"]["options"] == OPTS["o"]
    got = call(plugin, p.GET, {"Name": "v1"})
    assert got["Volume"]["Mountpoint"] == str(plugin.volumes_root / "v1") and got["Volume"]["Status"]["Mounted"] is False


def test_create_again_same_options_succeeds_different_options_fail(plugin: Plugin) -> None:
    assert call(plugin, p.CREATE, {"Name": "v1", "Opts": OPTS}) == {"Err": ""}
    err = call(plugin, p.CREATE, {"Name": "v1", "Opts": dict(OPTS, o="tls")})["Err"]
    assert err == "volume 'v1' already exists with different options; remove it or choose another name"


def test_create_with_bad_options_gives_the_parsers_message(plugin: Plugin) -> None:
    assert call(plugin, p.CREATE, {"Name": "v2", "Opts": {"device": FS, "o": "iam"}})["Err"] == (
        "option 'iam' requires 'tls'; add tls to -o")
    assert call(plugin, p.CREATE, {"Name": "v3", "Opts": None})["Err"] == (
        "volume option 'device' is missing; add -o device=fs-<id>[:/path]")
    assert set(on_disk(plugin)) == {"v1"}


def test_mount_counts_per_id_and_the_last_unmount_unmounts(plugin: Plugin, mounter: FakeMounter) -> None:
    mp = str(plugin.volumes_root / "v1")
    assert call(plugin, p.MOUNT, {"Name": "v1", "ID": A}) == {"Mountpoint": mp, "Err": ""}
    assert stat.S_IMODE(Path(mp).stat().st_mode) == 0o700
    assert on_disk(plugin)["v1"]["refs"] == {A: 1} and on_disk(plugin)["v1"]["mounted"] is True
    call(plugin, p.MOUNT, {"Name": "v1", "ID": A})  # docker cp mounts the same ID again
    call(plugin, p.MOUNT, {"Name": "v1", "ID": B})
    assert mounter.count("mount") == 1 and on_disk(plugin)["v1"]["refs"] == {A: 2, B: 1}
    for mount_id in (A, B, "c" * 64):  # the unknown ID: success, no change
        assert call(plugin, p.UNMOUNT, {"Name": "v1", "ID": mount_id}) == {"Err": ""}
        assert mounter.count("unmount") == 0
    assert on_disk(plugin)["v1"]["refs"] == {A: 1}
    assert call(plugin, p.UNMOUNT, {"Name": "v1", "ID": A}) == {"Err": ""}
    assert mounter.calls[-1] == ("unmount", mp)
    assert (on_disk(plugin)["v1"]["mounted"], on_disk(plugin)["v1"]["refs"]) == (False, {})
    assert call(plugin, p.UNMOUNT, {"Name": "v1", "ID": A}) == {"Err": ""}
    assert call(plugin, p.UNMOUNT, {"Name": "nosuch", "ID": A}) == {"Err": ""}
    call(plugin, p.MOUNT, {"Name": "v1", "ID": B})
    assert mounter.count("mount") == 2  # mounted again after the last unmount


def test_mount_again_when_the_kernel_mount_vanished(plugin: Plugin, mounter: FakeMounter) -> None:
    call(plugin, p.MOUNT, {"Name": "v1", "ID": A})
    mounter.mounted.clear()  # an operator's umount behind the agent's back
    call(plugin, p.MOUNT, {"Name": "v1", "ID": B})
    assert mounter.count("mount") == 2


def test_mount_failure_is_the_err_and_changes_nothing(plugin: Plugin, mounter: FakeMounter) -> None:
    mounter.fail_with = "connection to fs-0123456789abcdef0 refused; check the security group allows 2049"
    assert call(plugin, p.MOUNT, {"Name": "v1", "ID": A}) == {"Mountpoint": "", "Err": mounter.fail_with}
    assert on_disk(plugin)["v1"]["refs"] == {} and on_disk(plugin)["v1"]["mounted"] is False
    assert call(plugin, p.MOUNT, {"Name": "nosuch", "ID": A})["Err"] == (
        "volume 'nosuch' not found; create it with docker volume create")


def test_state_write_failure_after_mount_undoes_the_mount(plugin: Plugin, mounter: FakeMounter) -> None:
    plugin.store = Store(plugin.store.path.parent / "not-a-dir-file" / "x.json")
    (plugin.store.path.parent).write_text("")  # a file where the directory should be
    err = call(plugin, p.MOUNT, {"Name": "v1", "ID": A})["Err"]
    assert err.startswith("cannot write the agent state")
    assert mounter.calls[-1][0] == "unmount" and not mounter.mounted
    assert plugin.volumes["v1"].refs == ()


def test_remove_unmounts_a_mounted_volume_first(plugin: Plugin, mounter: FakeMounter) -> None:
    call(plugin, p.MOUNT, {"Name": "v1", "ID": A})
    assert call(plugin, p.REMOVE, {"Name": "v1"}) == {"Err": ""}
    assert [kind for kind, _ in mounter.calls] == ["mount", "unmount"]
    assert on_disk(plugin) == {} and not (plugin.volumes_root / "v1").exists()
    assert call(plugin, p.GET, {"Name": "v1"})["Err"] == "volume 'v1' not found; create it with docker volume create"
    assert call(plugin, p.REMOVE, {"Name": "v1"}) == {"Err": ""}  # a retried Remove succeeds


def test_remove_takes_the_mountpoint_away_before_forgetting_the_volume(plugin: Plugin) -> None:
    """Forgotten first, a crash in between left the directory for ever: the retried Remove
    finds no volume. Now a failed state write keeps the volume, and the retry finishes."""
    call(plugin, p.MOUNT, {"Name": "v1", "ID": A})
    call(plugin, p.UNMOUNT, {"Name": "v1", "ID": A})
    good = plugin.store
    plugin.store = Store(plugin.store.path.parent / "not-a-dir-file" / "x.json")
    plugin.store.path.parent.write_text("")
    assert call(plugin, p.REMOVE, {"Name": "v1"})["Err"].startswith("cannot write the agent state")
    assert not (plugin.volumes_root / "v1").exists() and "v1" in plugin.volumes
    plugin.store = good
    assert call(plugin, p.REMOVE, {"Name": "v1"}) == {"Err": ""}
    assert on_disk(plugin) == {}


@dataclass
class LeftoverMounter(FakeMounter):
    """An efs-like mounter: it owns files besides the kernel mount."""

    released: List[str] = field(default_factory=list)
    fail: bool = False

    def release_leftovers(self, mountpoint: str) -> List[str]:
        if self.fail:
            raise OSError("disk on fire")
        self.released.append(mountpoint)
        return [f"record of {Path(mountpoint).name}"]


def test_release_leftovers_at_start_is_for_unmounted_volumes_only(tmp_path: Path) -> None:
    mounter = LeftoverMounter()
    plugin = plugin_with(tmp_path, mounter)
    for name in ("up", "down"):
        call(plugin, p.CREATE, {"Name": name, "Opts": OPTS})
    call(plugin, p.MOUNT, {"Name": "up", "ID": A})
    assert plugin.release_leftovers() == ["volume down: released what an interrupted request left: record of down"]
    assert mounter.released == [str(plugin.volumes_root / "down")] and mounter.count("unmount") == 0
    mounter.fail = True
    assert plugin.release_leftovers() == [
        "volume down: could not release what an interrupted request left: disk on fire"]


def test_release_leftovers_skips_a_mounter_that_owns_nothing_but_the_mount(plugin: Plugin) -> None:
    assert plugin.release_leftovers() == []  # FakeMounter, like HelperMounter: no such method


def test_path_list_capabilities_activate(plugin: Plugin) -> None:
    mp = str(plugin.volumes_root / "v1")
    assert call(plugin, p.PATH, {"Name": "v1"}) == {"Mountpoint": mp, "Err": ""}
    assert call(plugin, p.PATH, {"Name": "v9"})["Err"].startswith("volume 'v9' not found")
    assert call(plugin, p.LIST, {}) == {"Volumes": [{"Name": "v1", "Mountpoint": mp}], "Err": ""}
    assert plugin.handle(p.CAPABILITIES, b"{}\n").body == {"Capabilities": {"Scope": "local"}}
    assert plugin.handle(p.ACTIVATE, b"").body == {"Implements": ["VolumeDriver"]}


def test_a_bug_in_the_mounter_is_an_internal_error_not_a_crash(plugin: Plugin, mounter: FakeMounter,
                                                                capsys: pytest.CaptureFixture) -> None:
    def broken(request: object) -> None:
        raise KeyError("boom")

    mounter.mount = broken  # type: ignore[assignment]
    answer = plugin.handle(p.MOUNT, json.dumps({"Name": "v1", "ID": A}).encode())
    assert answer.status == 500 and answer.err == "internal error (KeyError) in the efsplug agent; see its log"
    assert "KeyError" in capsys.readouterr().err
    assert call(plugin, p.GET, {"Name": "v1"})["Err"] == ""


def test_reads_do_not_wait_for_a_mount_in_progress(tmp_path: Path) -> None:
    mounter = FakeMounter(gate=threading.Event())
    plugin = plugin_with(tmp_path, mounter)
    call(plugin, p.CREATE, {"Name": "slow", "Opts": OPTS})
    call(plugin, p.CREATE, {"Name": "other", "Opts": OPTS})
    worker = threading.Thread(target=call, args=(plugin, p.MOUNT, {"Name": "slow", "ID": A}))
    worker.start()
    try:
        assert mounter.entered.acquire(timeout=10)
        assert call(plugin, p.GET, {"Name": "slow"})["Volume"]["Status"]["Mounted"] is False
        assert len(call(plugin, p.LIST, {})["Volumes"]) == 2
        assert call(plugin, p.PATH, {"Name": "slow"})["Err"] == ""
        assert call(plugin, p.CREATE, {"Name": "third", "Opts": OPTS}) == {"Err": ""}
    finally:
        mounter.gate.set()
        worker.join(10)
    assert plugin.volumes["slow"].mounted


def test_references_per_mountpoint_and_change_notices_for_the_supervisor(plugin: Plugin) -> None:
    seen: list = []
    plugin.on_change = seen.append
    mp = str(plugin.volumes_root / "v1")
    assert plugin.references(mp) == 0 and plugin.references(mp + "/") == 0
    assert plugin.references("/somewhere/else") is None
    call(plugin, p.MOUNT, {"Name": "v1", "ID": A})
    call(plugin, p.MOUNT, {"Name": "v1", "ID": B})
    assert plugin.references(mp) == 2
    call(plugin, p.REMOVE, {"Name": "v1"})
    assert plugin.references(mp) is None
    assert seen == [mp, mp, mp]


# ---- volume types other than efs: `mount -t <type>`, the type mounter's business ----------

NFS_OPTS = {"type": "nfs4", "device": "203.0.113.49:/", "o": "vers=4.1,port=2049"}


@dataclass
class FakeTypeMounter(FakeMounter):
    """FakeMounter that also answers whether a type's helper is installed."""

    installed: Set[str] = field(default_factory=lambda: {"nfs", "nfs4"})
    requests: List[Any] = field(default_factory=list)

    def require_helper(self, fs_type: str) -> None:
        if fs_type not in self.installed:
            raise HelperMissing(f"type={fs_type} needs the mount.{fs_type} helper, which is not installed")

    def mount(self, request: Any) -> None:
        self.require_helper(request.fs_type)
        self.requests.append(request)
        super().mount(request)


@pytest.fixture
def typed(tmp_path: Path, mounter: FakeMounter) -> Plugin:
    pl = Plugin(Store(tmp_path / "state" / "volumes.json"), tmp_path / "volumes", mounter=mounter,
                type_mounter=FakeTypeMounter())
    assert call(pl, p.CREATE, {"Name": "n1", "Opts": NFS_OPTS}) == {"Err": ""}
    return pl


def test_another_type_goes_to_the_type_mounter_with_the_same_reference_counts(typed: Plugin, mounter: FakeMounter) -> None:
    tm = typed.type_mounter
    assert isinstance(tm, FakeTypeMounter)
    mp = str(typed.volumes_root / "n1")
    assert on_disk(typed)["n1"]["fs_type"] == "nfs4"
    assert call(typed, p.GET, {"Name": "n1"})["Volume"]["Status"] == {
        "Type": "nfs4", "Device": "203.0.113.49:/", "Mounted": False, "References": 0}
    assert call(typed, p.MOUNT, {"Name": "n1", "ID": A}) == {"Mountpoint": mp, "Err": ""}
    call(typed, p.MOUNT, {"Name": "n1", "ID": B})
    assert tm.requests == [TypedMount("nfs4", "203.0.113.49:/", "vers=4.1,port=2049", mp)]
    assert mounter.calls == []  # efsplug's own mounter never sees it
    call(typed, p.UNMOUNT, {"Name": "n1", "ID": A})
    assert tm.count("unmount") == 0
    call(typed, p.UNMOUNT, {"Name": "n1", "ID": B})
    assert tm.calls == [("mount", mp), ("unmount", mp)] and on_disk(typed)["n1"]["mounted"] is False
    call(typed, p.MOUNT, {"Name": "n1", "ID": A})
    assert call(typed, p.REMOVE, {"Name": "n1"}) == {"Err": ""}
    assert tm.calls[-1] == ("unmount", mp) and mounter.calls == [] and on_disk(typed) == {}


def test_a_missing_helper_fails_create_with_one_line_and_records_nothing(typed: Plugin) -> None:
    err = call(typed, p.CREATE, {"Name": "s1", "Opts": {"type": "s3files", "device": "fs-0123456789abcdef0"}})["Err"]
    assert err == "type=s3files needs the mount.s3files helper, which is not installed"
    assert set(on_disk(typed)) == {"n1"}


def test_a_helper_removed_after_create_fails_mount_and_changes_nothing(typed: Plugin) -> None:
    tm = typed.type_mounter
    assert isinstance(tm, FakeTypeMounter)
    tm.installed.discard("nfs4")
    assert call(typed, p.MOUNT, {"Name": "n1", "ID": A}) == {
        "Mountpoint": "", "Err": "type=nfs4 needs the mount.nfs4 helper, which is not installed"}
    assert on_disk(typed)["n1"]["refs"] == {} and on_disk(typed)["n1"]["mounted"] is False


def test_the_same_name_with_another_type_is_another_definition(typed: Plugin) -> None:
    assert call(typed, p.CREATE, {"Name": "n1", "Opts": NFS_OPTS}) == {"Err": ""}  # ECS retries
    assert call(typed, p.CREATE, {"Name": "n1", "Opts": dict(NFS_OPTS, type="nfs")})["Err"] == (
        "volume 'n1' already exists with different options; remove it or choose another name")


class BuggyMounter(FakeMounter):
    def mount(self, request) -> None:  # type: ignore[override]
        raise RuntimeError(f"bug while mounting with {request}")  # the message quotes the request


def test_an_internal_error_logs_where_it_happened_but_not_its_message(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plugin = plugin_with(tmp_path, BuggyMounter())
    opts = {"device": "fs-12345678", "o": "tls,iam,awscredsuri=/v2/credentials/s3cr3t-id"}
    assert call(plugin, "/VolumeDriver.Create", {"Name": "v", "Opts": opts})["Err"] == ""
    answer = plugin.handle("/VolumeDriver.Mount", json.dumps({"Name": "v", "ID": "a" * 64}).encode())
    assert answer.status == 500 and "RuntimeError" in answer.err and "s3cr3t" not in answer.err
    logged = capsys.readouterr().err
    assert "internal error (RuntimeError)" in logged and ", in mount" in logged  # where, from the frames
    assert "s3cr3t" not in logged
