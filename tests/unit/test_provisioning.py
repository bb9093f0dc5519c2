"""Access points on demand: driver options to a CreateAccessPoint call (pure)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from efsplug.agent import provisioning as p
from efsplug.errors import UsageError

FS = "fs-12345678"


def test_no_provisioning_options_means_none() -> None:
    assert p.parse({"type": "efs", "device": FS, "o": "tls"}) is None


def test_defaults_allocate_the_lowest_free_gid_and_name_the_directory_after_the_volume() -> None:
    spec = p.parse({"provision": "accesspoint"})
    request = p.build_request(spec, fs_id=FS, volume="ecs-web-3-data-ab12", used_gids=[50000, 50001, 50003])
    assert (request.uid, request.gid) == (50002, 50002)
    assert request.path == "/ecs-web-3-data-ab12"
    assert (request.owner_uid, request.owner_gid, request.mode) == (50002, 50002, "0750")
    args = request.api_arguments()
    assert args["PosixUser"] == {"Uid": 50002, "Gid": 50002}
    assert args["RootDirectory"]["CreationInfo"] == {"OwnerUid": 50002, "OwnerGid": 50002, "Permissions": "0750"}
    assert {"Key": p.VOLUME_TAG, "Value": "ecs-web-3-data-ab12"} in args["Tags"]


def test_everything_given() -> None:
    spec = p.parse({"provision": "accesspoint", "uid": "1001", "gid": "2002", "rootOwner": "0:2002",
                    "rootMode": "770", "basePath": "/teams//web/", "rootName": "{volume}-{uid}",
                    "onRemove": "deleteData"})
    request = p.build_request(spec, fs_id=FS, volume="v1", used_gids=[2002])  # a given GID may be shared
    assert (request.uid, request.gid, request.owner_uid, request.owner_gid) == (1001, 2002, 0, 2002)
    assert (request.path, request.mode, spec.on_remove) == ("/teams/web/v1-1001", "0770", "deleteData")


def test_the_client_token_is_stable_per_volume_and_file_system() -> None:
    a = p.client_token(FS, "v1")
    assert a == p.client_token(FS, "v1") and len(a) <= 64
    assert a != p.client_token(FS, "v2") and a != p.client_token("fs-87654321", "v1")


def test_the_volume_is_found_again_from_its_tags() -> None:
    assert p.volume_of({"Tags": p.tags("v1")}) == "v1"
    assert p.volume_of({"Tags": [{"Key": "Name", "Value": "x"}]}) is None
    assert p.volume_of({}) is None


@pytest.mark.parametrize("opts, message", [
    ({"provision": "yes"}, "provision='yes' is not supported; use provision=accesspoint"),
    ({"uid": "5"}, "volume option uid= needs provision=accesspoint"),
    ({"provision": "accesspoint", "uid": "-1", "gid": "1"}, "uid='-1' must be a number from 0 to 4294967294"),
    ({"provision": "accesspoint", "gid": "4294967295"}, "gid='4294967295' must be a number"),
    ({"provision": "accesspoint", "gid": "007"}, "gid='007' must be a number"),
    ({"provision": "accesspoint", "uid": "5"}, "uid= needs gid= too"),
    ({"provision": "accesspoint", "gid": "5", "gidRange": "1-9"}, "gid= and gidRange= exclude each other"),
    ({"provision": "accesspoint", "gidRange": "9-1"}, "gidRange='9-1' must be <low>-<high>"),
    ({"provision": "accesspoint", "gidRange": "100"}, "gidRange='100' must be <low>-<high>"),
    ({"provision": "accesspoint", "rootOwner": "1"}, "rootOwner='1' must be <uid>:<gid>"),
    ({"provision": "accesspoint", "rootMode": "0999"}, "rootMode='0999' must be octal permissions"),
    ({"provision": "accesspoint", "rootMode": "1777x"}, "rootMode='1777x' must be octal"),
    ({"provision": "accesspoint", "basePath": "rel/path"}, "basePath='rel/path' must be an absolute path"),
    ({"provision": "accesspoint", "basePath": "/a/../b"}, "basePath='/a/../b' must be an absolute path"),
    ({"provision": "accesspoint", "basePath": "/a b"}, "basePath='/a b' must be an absolute path"),
    ({"provision": "accesspoint", "rootName": "{name}"}, "unknown placeholder {name}"),
    ({"provision": "accesspoint", "rootName": "a/b"}, "rootName='a/b' must be one directory name"),
    ({"provision": "accesspoint", "onRemove": "purge"}, "onRemove='purge' must be one of deleteAccessPoint"),
])
def test_bad_options_are_refused_with_one_line_naming_them(opts, message) -> None:
    with pytest.raises(UsageError) as raised:
        p.parse(opts)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_exhausted_gid_range_says_how_to_widen_it() -> None:
    spec = p.parse({"provision": "accesspoint", "gidRange": "7-9"})
    with pytest.raises(UsageError, match="GID range 7-9 is exhausted.*widen gidRange="):
        p.build_request(spec, fs_id=FS, volume="v", used_gids=[7, 8, 9])


def test_a_directory_name_efs_would_refuse_is_refused_here() -> None:
    spec = p.parse({"provision": "accesspoint", "basePath": "/" + "b" * 90})
    with pytest.raises(UsageError, match="longer than EFS allows"):
        p.build_request(spec, fs_id=FS, volume="v" * 20, used_gids=[])
    with pytest.raises(UsageError, match="must be letters, digits"):
        p.build_request(p.parse({"provision": "accesspoint"}), fs_id=FS, volume=".hidden", used_gids=[])


@given(st.text(min_size=1, max_size=40), st.text(max_size=20))
def test_any_volume_name_gives_a_plain_path_or_one_clear_refusal(volume: str, base: str) -> None:
    try:
        spec = p.parse({"provision": "accesspoint", "basePath": "/" + base})
        path = p.root_directory(spec, volume, 1, 1)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    assert path.startswith("/") and len(path) <= p.MAX_PATH
    assert re.fullmatch(r"(/[A-Za-z0-9][A-Za-z0-9_.-]*)+", path), path


def _ap(ap_id: str, path: object) -> dict:
    return {"AccessPointId": ap_id, "RootDirectory": {"Path": path}} if path is not None else {"AccessPointId": ap_id}


@pytest.mark.parametrize("others, refused", [
    ([], None),
    ([_ap("fsap-b", "/teams/web/v1-other")], None),   # a sibling name that merely starts alike
    ([_ap("fsap-b", "/teams")], None),                # above ours: its own data is elsewhere
    ([_ap("fsap-b", "/teams/web/v1")], "access point 'fsap-b' uses '/teams/web/v1'"),
    ([_ap("fsap-b", "/teams/web/v1/sub")], "access point 'fsap-b' uses '/teams/web/v1/sub'"),
    ([_ap("fsap-a", "/teams/web/v1")], None),         # ourselves, as listed
])
def test_data_is_deleted_only_when_no_other_access_point_uses_it(others, refused) -> None:
    assert p.data_shared_with(_ap("fsap-a", "/teams//web/v1/"), others) == refused


@pytest.mark.parametrize("path", [None, "/", "", 7])
def test_the_file_system_root_is_never_deleted(path) -> None:
    assert p.data_shared_with(_ap("fsap-a", path), []) == "its root directory is the file system's root"
