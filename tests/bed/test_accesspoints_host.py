"""Access points on demand against the EFS API: moto for the real calls, scripted servers
for the failures moto does not produce (IAM, limits, a stall, an access point stuck in
`creating`). botocore parses real HTTP answers in both."""

from __future__ import annotations

import re
import secrets
from typing import Iterator

import pytest

from efsbed.aws import DUMMY_ENV, MotoServer, client
from efsbed.faulty import JsonAnswer, SilentServer
from efsplug.accesspoints import AccessPointError, AccessPoints
from efsplug.agent import provisioning
from efsplug.errors import MountFailure, UsageError

REGION = "us-east-1"
AP_ID = "fsap-0123456789abcdef0"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory, tag: str) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto"), tag=tag) as server:
        yield server


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**DUMMY_ENV, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
                       "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def fs_id(moto: MotoServer) -> str:
    efs = client("efs", moto.endpoint_url, REGION)
    return efs.create_file_system(CreationToken=secrets.token_hex(8))["FileSystemId"]


def request_for(aps: AccessPoints, fs: str, volume: str, **opts: str) -> provisioning.AccessPointRequest:
    spec = provisioning.parse({"provision": "accesspoint", **opts})
    used = [ap["PosixUser"]["Gid"] for ap in aps.list(fs) if ap.get("PosixUser")]
    return provisioning.build_request(spec, fs_id=fs, volume=volume, used_gids=used)


def test_two_volumes_get_two_access_points_with_the_lowest_free_gids(moto: MotoServer, fs_id: str) -> None:
    aps = AccessPoints(REGION, endpoint_url=moto.endpoint_url)
    first = aps.create(request_for(aps, fs_id, "vol-a"))
    second = aps.create(request_for(aps, fs_id, "vol-b"))
    assert first != second
    assert re.fullmatch(r"fsap-[0-9a-f]{17}", first), first  # as EFS makes them (the bed's moto)
    found = {provisioning.volume_of(ap): ap for ap in aps.list(fs_id)}
    assert set(found) == {"vol-a", "vol-b"}
    assert found["vol-a"]["PosixUser"] == {"Uid": 50000, "Gid": 50000}
    assert found["vol-b"]["PosixUser"] == {"Uid": 50001, "Gid": 50001}
    assert found["vol-b"]["RootDirectory"]["Path"] == "/vol-b"
    assert found["vol-b"]["RootDirectory"]["CreationInfo"] == {"OwnerUid": 50001, "OwnerGid": 50001,
                                                                "Permissions": "0750"}


def test_a_repeated_create_and_a_create_after_a_lost_state_write_give_one_access_point(
        moto: MotoServer, fs_id: str) -> None:
    aps = AccessPoints(REGION, endpoint_url=moto.endpoint_url)
    request = request_for(aps, fs_id, "vol-retried")
    # What a killed agent leaves: the access point exists, the agent's state does not know it.
    made = client("efs", moto.endpoint_url, REGION).create_access_point(**request.api_arguments())["AccessPointId"]
    assert aps.create(request) == made
    assert aps.create(request_for(aps, fs_id, "vol-retried")) == made  # a retried Create: adopted again
    mine = [ap for ap in aps.list(fs_id) if provisioning.volume_of(ap) == "vol-retried"]
    assert [ap["AccessPointId"] for ap in mine] == [made]


def test_the_client_token_alone_makes_create_idempotent(moto: MotoServer, fs_id: str) -> None:
    aps = AccessPoints(REGION, endpoint_url=moto.endpoint_url)
    arguments = request_for(aps, fs_id, "vol-token").api_arguments()
    efs = client("efs", moto.endpoint_url, REGION)
    assert efs.create_access_point(**arguments)["AccessPointId"] == efs.create_access_point(**arguments)["AccessPointId"]


def test_an_unknown_file_system_is_named(moto: MotoServer) -> None:
    aps = AccessPoints(REGION, endpoint_url=moto.endpoint_url)
    with pytest.raises(AccessPointError, match="CreateAccessPoint failed .FileSystemNotFound.: file system "
                                               "fs-0000000000000000a does not exist in region us-east-1"):
        aps.create(request_for(aps, "fs-0000000000000000a", "vol-x"))


def test_delete_is_idempotent(moto: MotoServer, fs_id: str) -> None:
    aps = AccessPoints(REGION, endpoint_url=moto.endpoint_url)
    ap_id = aps.create(request_for(aps, fs_id, "vol-gone"))
    aps.delete(fs_id, ap_id)
    assert aps.find_for_volume(fs_id, "vol-gone") is None
    aps.delete(fs_id, ap_id)  # a retried Remove


def test_an_exhausted_gid_range_is_named(moto: MotoServer, fs_id: str) -> None:
    aps = AccessPoints(REGION, endpoint_url=moto.endpoint_url)
    aps.create(request_for(aps, fs_id, "vol-1", gidRange="7-7"))
    with pytest.raises(UsageError, match="GID range 7-7 is exhausted"):
        request_for(aps, fs_id, "vol-2", gidRange="7-7")


@pytest.mark.parametrize("status, code, message", [
    (403, "AccessDeniedException", "denied by IAM: elasticfilesystem:DescribeAccessPoints on fs-12345678; allow it"),
    (404, "FileSystemNotFound", "file system fs-12345678 does not exist in region us-east-1; check device="),
    (403, "AccessPointLimitExceeded", "fs-12345678 has as many access points as EFS allows; delete unused ones"),
])
def test_efs_refusals_are_one_line_with_the_fix(status: int, code: str, message: str) -> None:
    with JsonAnswer(status, {"ErrorCode": code, "Message": "no"}, code) as server:
        aps = AccessPoints(REGION, endpoint_url=server.url)
        spec = provisioning.parse({"provision": "accesspoint", "gid": "1"})
        request = provisioning.build_request(spec, fs_id="fs-12345678", volume="v", used_gids=[])
        with pytest.raises(AccessPointError) as raised:
            aps.create(request)
    text = str(raised.value)
    assert message in text and "\n" not in text, text


def test_a_stalled_api_is_given_up_on() -> None:
    with SilentServer() as server:
        aps = AccessPoints(REGION, endpoint_url=server.url, call_deadline=1.0)
        with pytest.raises(AccessPointError, match="EFS did not answer DescribeAccessPoints for fs-12345678 within 1s"):
            aps.list("fs-12345678")


def test_an_access_point_that_stays_creating_times_out() -> None:
    body = {"AccessPointId": AP_ID, "LifeCycleState": "creating", "FileSystemId": "fs-12345678",
            "AccessPoints": [{"AccessPointId": AP_ID, "LifeCycleState": "creating"}]}
    with JsonAnswer(200, body) as server:
        aps = AccessPoints(REGION, endpoint_url=server.url)
        spec = provisioning.parse({"provision": "accesspoint", "gid": "1"})
        request = provisioning.build_request(spec, fs_id="fs-12345678", volume="v", used_gids=[])
        with pytest.raises(AccessPointError, match=f"access point {AP_ID} of fs-12345678 was not available within "
                                                   "0.5s .*retry the volume create"):
            aps.create(request, wait=0.5)


class RootRefused:
    """A mounter whose mount of the file system's root is refused, as EFS refuses an identity
    without ClientRootAccess; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list = []

    def is_mounted(self, mountpoint: str) -> bool:
        return False

    def mount(self, request) -> None:
        self.asked.append((request.path, request.accesspoint, request.mountpoint))
        raise MountFailure("mount.nfs4 failed: access denied by server; the server refused IAM identity instance")

    def unmount(self, mountpoint: str) -> None:
        raise AssertionError("nothing was mounted")


def test_delete_data_whose_root_mount_is_refused_keeps_everything(moto: MotoServer, fs_id: str,
                                                                  monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from efsplug.agent.provisioner import AccessPointProvisioner
    from efsplug.agent.volumes import Volume
    from efsplug.config import parse_config

    monkeypatch.setenv("AWS_ENDPOINT_URL_EFS", moto.endpoint_url)
    aps = AccessPoints(REGION, endpoint_url=moto.endpoint_url)
    made = aps.create(request_for(aps, fs_id, "v1", onRemove="deleteData"))
    config = parse_config(f"[efsplug]\nstate_dir = {tmp_path}\n").config
    mounter = RootRefused()
    volume = Volume(name="v1", device=fs_id, options=f"iam,region={REGION}", mountpoint="/var/lib/ecs/volumes/v1",
                    created_at="2026-12-01T00:00:00Z", provision=(("onRemove", "deleteData"), ("provision", "accesspoint")),
                    access_point=made)
    with pytest.raises(AccessPointError) as raised:
        AccessPointProvisioner(lambda: config, mounter=mounter).delete(volume, data=True)
    assert str(raised.value) == ("volume 'v1': its data was kept: the file system's root could not be mounted to "
                                 "delete it (mount.nfs4 failed: access denied by server; the server refused IAM "
                                 "identity instance)")
    assert mounter.asked == [("/", None, str(tmp_path.resolve() / "deleting" / "v1"))]  # the root, not the access point
    assert aps.describe(fs_id, made) is not None  # the access point stays too: Remove can be retried
    assert list((tmp_path / "deleting").iterdir()) == []  # its mountpoint went
