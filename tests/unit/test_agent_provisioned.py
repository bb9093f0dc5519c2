"""Volumes with provision=accesspoint in the plugin, with a scripted provisioner: the access
point is made before the volume is recorded, mounts go through it, Remove deletes it as
onRemove says, and no failure leaves one behind. (moto proves the EFS calls: test_accesspoints_host.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from efsbed.agent_harness import FakeMounter
from efsplug.agent import protocol as p
from efsplug.agent.plugin import Plugin
from efsplug.agent.store import ProvisionedOn, StateWriteError, Store, decode
from efsplug.agent.volumes import Volume
from efsplug.errors import MountFailure
from efsplug.options import MountRequest

FS = "fs-0123456789abcdef0"
MADE = "fsap-00000000000000abc"
OPTS = {"type": "efs", "device": FS, "o": "iam", "provision": "accesspoint", "gidRange": "60000-60009"}


class Provisioner:
    def __init__(self, fail_delete: Optional[str] = None) -> None:
        self.calls: List[str] = []
        self.fail_delete = fail_delete

    def create(self, volume: Volume) -> str:
        self.calls.append(f"create {volume.name}")
        return MADE

    def delete(self, volume: Volume, *, data: bool = False) -> None:
        self.calls.append(f"delete {volume.name} {volume.access_point}" + (" and its data" if data else ""))
        if self.fail_delete:
            raise MountFailure(self.fail_delete)


class RequestMounter(FakeMounter):
    requests: List[MountRequest] = []

    def mount(self, request: MountRequest) -> None:
        self.requests.append(request)
        super().mount(request)


def call(plugin: Plugin, endpoint: str, payload: Dict[str, Any]) -> Dict[str, Any]:
    return plugin.handle(endpoint, (json.dumps(payload) + "\n").encode()).body


@pytest.fixture
def provisioner() -> Provisioner:
    return Provisioner()


@pytest.fixture
def plugin(tmp_path: Path, provisioner: Provisioner) -> Plugin:
    RequestMounter.requests = []
    return Plugin(Store(tmp_path / "state" / "volumes.json"), tmp_path / "volumes", mounter=RequestMounter(),
                  provisioner=provisioner)


def test_create_makes_the_access_point_and_records_it(plugin: Plugin, provisioner: Provisioner) -> None:
    assert call(plugin, p.CREATE, {"Name": "v1", "Opts": OPTS}) == {"Err": ""}
    assert call(plugin, p.CREATE, {"Name": "v1", "Opts": OPTS}) == {"Err": ""}  # ECS's retry: nothing new
    assert provisioner.calls == ["create v1"]
    stored = decode(plugin.store.path.read_bytes())["v1"]
    assert stored.access_point == MADE and dict(stored.provision)["gidRange"] == "60000-60009"
    status = call(plugin, p.GET, {"Name": "v1"})["Volume"]["Status"]
    assert status["AccessPoint"] == MADE and status["Provisioned"]["provision"] == "accesspoint"


def test_mounts_go_through_it_with_tls(plugin: Plugin) -> None:
    call(plugin, p.CREATE, {"Name": "v1", "Opts": OPTS})
    assert call(plugin, p.MOUNT, {"Name": "v1", "ID": "a" * 64})["Err"] == ""
    (request,) = RequestMounter.requests
    assert (request.accesspoint, request.tls, request.iam, request.fs_id) == (MADE, True, True, FS)


@pytest.mark.parametrize("on_remove, deleted", [
    ("deleteAccessPoint", [f"delete v1 {MADE}"]),
    ("deleteData", [f"delete v1 {MADE} and its data"]),
    ("keep", []),
])
def test_remove_deletes_it_as_on_remove_says(plugin: Plugin, provisioner: Provisioner, on_remove: str,
                                             deleted: List[str]) -> None:
    call(plugin, p.CREATE, {"Name": "v1", "Opts": dict(OPTS, onRemove=on_remove)})
    assert call(plugin, p.REMOVE, {"Name": "v1"}) == {"Err": ""}
    assert provisioner.calls == ["create v1"] + deleted
    assert "v1" not in plugin.volumes


def test_a_failed_delete_keeps_the_volume_for_a_retry(tmp_path: Path) -> None:
    failing = Provisioner(fail_delete="denied by IAM: elasticfilesystem:DeleteAccessPoint on fs-…")
    plugin = Plugin(Store(tmp_path / "state.json"), tmp_path / "volumes", mounter=RequestMounter(),
                    provisioner=failing)
    call(plugin, p.CREATE, {"Name": "v1", "Opts": OPTS})
    assert call(plugin, p.REMOVE, {"Name": "v1"})["Err"].startswith("denied by IAM")
    assert plugin.volumes["v1"].access_point == MADE


@pytest.mark.parametrize("on_remove", ["deleteAccessPoint", "deleteData"])
def test_a_create_that_cannot_be_recorded_deletes_the_access_point(plugin: Plugin, provisioner: Provisioner,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   on_remove: str) -> None:
    save = plugin.store.save

    def full_disk(volumes: Any, *more: Any) -> None:
        if "v1" in volumes:  # the file system was remembered; recording the volume fails
            raise OSError(28, "No space left on device")
        save(volumes, *more)

    monkeypatch.setattr(plugin.store, "save", full_disk)
    # never the data: the root directory may hold what an earlier volume of that name left
    assert call(plugin, p.CREATE, {"Name": "v1", "Opts": dict(OPTS, onRemove=on_remove)})["Err"] != ""
    assert provisioner.calls == ["create v1", f"delete v1 {MADE}"] and "v1" not in plugin.volumes


@pytest.mark.parametrize("opts, message", [
    (dict(OPTS, o="tls,accesspoint=fsap-0123456789abcdef0"), "accesspoint= (in o=) and provision=accesspoint exclude"),
    (dict(OPTS, device=f"{FS}:/data"), "a provisioned access point chooses its own root directory"),
    (dict(OPTS, onRemove="deleteEverything"), "onRemove='deleteEverything' must be one of"),
    (dict(OPTS, type="nfs4", device="10.0.0.1:/"), "provision=accesspoint is for type=efs volumes only"),
    (dict(OPTS, rootMode="9"), "rootMode='9' must be octal permissions"),
    ({"type": "efs", "device": FS, "gidRange": "1-2"}, "volume option gidRange= needs provision=accesspoint"),
])
def test_bad_provisioning_options_are_one_err_and_make_nothing(plugin: Plugin, provisioner: Provisioner,
                                                               opts: Dict[str, str], message: str) -> None:
    err = call(plugin, p.CREATE, {"Name": "v1", "Opts": opts})["Err"]
    assert message in err and "\n" not in err
    assert provisioner.calls == [] and "v1" not in plugin.volumes


def test_the_file_system_is_remembered_before_efs_is_asked(plugin: Plugin, provisioner: Provisioner,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(volumes: Any, *more: Any) -> None:
        raise StateWriteError("cannot write the agent state: No space left on device")

    monkeypatch.setattr(plugin.store, "save", full_disk)
    assert "No space left" in call(plugin, p.CREATE, {"Name": "v1", "Opts": OPTS})["Err"]
    assert provisioner.calls == []  # nothing made that status could not find again
    monkeypatch.undo()
    assert call(plugin, p.CREATE, {"Name": "v1", "Opts": dict(OPTS, o="iam,region=eu-west-1")}) == {"Err": ""}
    assert call(plugin, p.REMOVE, {"Name": "v1"}) == {"Err": ""}
    assert Store(plugin.store.path).load().provisioned_on == (ProvisionedOn(FS, "eu-west-1"),)
