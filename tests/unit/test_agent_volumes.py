"""Volume decisions: driverOpts validation (the mount helper's parser), reference counts, locks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from efsplug.agent.volumes import (
    LockTable, Volume, mounted_with, new_volume, same_definition, unmount_step, unmounted, validate_driver_opts,
)
from efsplug.errors import UsageError
from efsplug.options import request_from_driver_opts

FS = "fs-0123456789abcdef0"
AP = "fsap-0123456789abcdef0"
ECS_O = f"tls,tlsport=2999,iam,awscredsuri=/v2/credentials/abcd,accesspoint={AP},netns=/proc/42/ns/net"
A, B = "a" * 64, "b" * 64


def volume(**kw: object) -> Volume:
    return new_volume("v1", {"type": "efs", "device": FS, "o": ECS_O}, Path("/var/lib/ecs/volumes"), "T")


def test_ecs_driver_opts_are_accepted_verbatim() -> None:
    v = volume()
    assert (v.device, v.options, v.mountpoint, v.mounted, v.refs) == (FS, ECS_O, "/var/lib/ecs/volumes/v1", False, ())
    req = v.request()
    assert (req.fs_id, req.accesspoint, req.tlsport, req.netns, req.mountpoint) == (
        FS, AP, 2999, "/proc/42/ns/net", "/var/lib/ecs/volumes/v1")


def test_status_shows_no_credentials_uri() -> None:
    status = volume().status()
    assert status == {"FileSystemId": FS, "Path": "/", "Mounted": False, "References": 0, "AccessPoint": AP}
    assert "credentials" not in repr(status)


@pytest.mark.parametrize(
    "opts, message",
    [
        ({}, "volume option 'device' is missing"),
        ({"type": "efs", "o": "tls"}, "volume option 'device' is missing"),
        ({"type": "cifs", "device": FS}, "type='cifs' is not supported; use type=efs, nfs, nfs4 or s3files"),
        ({"device": FS, "size": "10G"}, "volume option 'size' is not supported"),
        ({"device": "fs-xyz"}, "is not an EFS file system"),
    ],
)
def test_bad_driver_opts_name_the_fix(opts: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        validate_driver_opts(opts)


@pytest.mark.parametrize("o", ["iam", "accesspoint=fsap-1", "tls,port=2049", "tls,awscredsuri=/v2/x", "tls,netns=rel"])
def test_option_errors_are_the_mount_helpers_own(o: str) -> None:
    with pytest.raises(UsageError) as ours:
        validate_driver_opts({"device": FS, "o": o})
    with pytest.raises(UsageError) as helpers:
        request_from_driver_opts(FS, o)
    assert str(ours.value) == str(helpers.value)


def test_type_may_be_omitted() -> None:
    assert validate_driver_opts({"device": f"{FS}:/data"}) == ("efs", f"{FS}:/data", "")


def test_references_count_per_id_and_the_same_id_twice_counts_twice() -> None:
    v = mounted_with(mounted_with(mounted_with(volume(), A), A), B)
    assert v.mounted and v.refs_of(A) == 2 and v.refs_of(B) == 1 and v.ref_total == 3
    v, last = unmount_step(v, A)
    assert not last and v.refs_of(A) == 1
    v, last = unmount_step(v, B)
    assert not last and v.refs == ((A, 1),)
    v, last = unmount_step(v, A)
    assert last and v.ref_total == 0 and v.mounted  # the caller unmounts, then marks it
    assert unmounted(v).mounted is False


def test_unmount_of_an_unknown_id_changes_nothing() -> None:
    v = mounted_with(volume(), A)
    after, last = unmount_step(v, B)
    assert after is v and not last
    after, last = unmount_step(volume(), A)
    assert not last and after.refs == ()


def test_same_definition_ignores_creation_time_and_state() -> None:
    v = volume()
    assert same_definition(v, mounted_with(v, A))
    other = new_volume("v1", {"device": FS, "o": "tls"}, Path("/var/lib/ecs/volumes"), "T")
    assert not same_definition(v, other)


def test_lock_table_orders_one_name_and_forgets_idle_names() -> None:
    table = LockTable()
    inside, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with table.hold("v1"):
            inside.set()
            release.wait(10)

    def second() -> None:
        with table.hold("v1"):
            second_in.set()

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    with table.hold("v2"):  # another name: not blocked by v1
        assert not second_in.is_set()
    assert not second_in.wait(0.05)  # v1's second request waits for the first
    release.set()
    assert second_in.wait(10)
    t1.join(10)
    t2.join(10)
    assert len(table) == 0
