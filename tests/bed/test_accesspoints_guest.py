"""Access points created in moto while the bed runs, mounted from the real kernel guest.

The endpoint asks moto about an access point it has no route for, creates its root
directory from CreationInfo and serves it with a ganesha that squashes every caller to
the access point's PosixUser, as EFS does; once the access point is deleted in moto, new
mounts through it are refused. Uses the session's bed (one guest boot for all guest
modules); the access points made here stay in its moto, under their own root.
"""

from __future__ import annotations

import secrets
import stat
from pathlib import Path
from typing import Iterator

import pytest

from efsbed.aws import client
from efsbed.bed import Bed
from efsbed.dynamic_exports import ACCESS_POINT_NOT_FOUND
from efsbed.guestmount import NOTHING_LEFT, accepted_as, leftovers, mount, mount_of, new_connections, sh

pytestmark = pytest.mark.guest

UID = GID = 4242
ROOT = "/dyn/app"


def owner_and_mode(path: Path) -> tuple:
    st = path.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture(scope="module")
def efs(bed: Bed):
    return client("efs", bed.moto.endpoint_url, bed.region)


@pytest.fixture(scope="module")
def access_point(bed: Bed, efs) -> Iterator[str]:
    """Created in moto after the bed started: the endpoint has no route for it."""
    made = efs.create_access_point(
        FileSystemId=bed.fs_id, ClientToken="efsbed-dyn-" + secrets.token_hex(4),
        PosixUser={"Uid": UID, "Gid": GID},
        RootDirectory={"Path": ROOT, "CreationInfo": {"OwnerUid": UID, "OwnerGid": GID, "Permissions": "0750"}},
    )
    ap_id = made["AccessPointId"]
    assert ap_id not in {ap.id for ap in bed.access_points}
    yield ap_id
    if any(p["AccessPointId"] == ap_id for p in efs.describe_access_points(FileSystemId=bed.fs_id)["AccessPoints"]):
        efs.delete_access_point(AccessPointId=ap_id)  # the last test deletes it; this is for a failed run


def write_as_root(bed: Bed, mountpoint: str) -> str:
    name = f"from-guest-{secrets.token_hex(4)}"
    res = sh(bed, f"echo {name} > {mountpoint}/{name}")
    assert res.rc == 0, res
    return name


def test_mount_through_a_runtime_access_point_is_squashed_to_its_user(bed: Bed, clean_guest: Bed,
                                                                       access_point: str) -> None:
    root_dir = bed.export_dir / ROOT.lstrip("/")
    before = len(bed.endpoint.connection_events())
    with mount_of(bed, "/mnt/dyn", f"tls,accesspoint={access_point}"):
        name = write_as_root(bed, "/mnt/dyn")
        made = root_dir / name
        assert made.read_text() == name + "\n"
        assert (made.stat().st_uid, made.stat().st_gid) == (UID, GID)  # root in the guest, squashed
        assert owner_and_mode(root_dir) == (UID, GID, 0o750)  # made from CreationInfo
        assert not (bed.export_dir / name).exists()
    accepted_as(bed, before, key=None, access_point=access_point)
    started = [e for e in bed.endpoint.events() if e.get("event") == "export_started"
               and e.get("access_point") == access_point]
    assert [(e["root"], e["uid"], e["gid"]) for e in started] == [(ROOT, UID, GID)]


def test_iam_mount_through_a_runtime_access_point(bed: Bed, clean_guest: Bed, access_point: str) -> None:
    root_dir = bed.export_dir / ROOT.lstrip("/")
    bed.run(["rm", "-rf", "/root/.aws"])  # the instance role signs, as in test_mount_guest
    before = len(bed.endpoint.connection_events())
    with mount_of(bed, "/mnt/dyn-iam", f"tls,iam,accesspoint={access_point}"):
        name = write_as_root(bed, "/mnt/dyn-iam")
        made = root_dir / name
        assert made.read_text() == name + "\n"
        assert (made.stat().st_uid, made.stat().st_gid) == (UID, GID)
    accepted_as(bed, before, key=bed.imds.role_credentials.access_key_id, access_point=access_point)


def test_deleted_access_point_is_refused(bed: Bed, clean_guest: Bed, efs, access_point: str) -> None:
    efs.delete_access_point(AccessPointId=access_point)
    before = len(bed.endpoint.connection_events())
    res = mount(bed, "/mnt/dyn-gone", f"tls,accesspoint={access_point}")
    assert res.rc != 0, res
    assert "access denied by server" in res.stderr, res.stderr
    refusals = new_connections(bed, before)
    assert refusals and {(e["event"], e["reason"], e["access_point"]) for e in refusals} == {
        ("refused", ACCESS_POINT_NOT_FOUND, access_point)}
    assert leftovers(bed) == NOTHING_LEFT
