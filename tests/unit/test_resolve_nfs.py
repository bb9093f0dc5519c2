"""Pure decisions of the resolution and NFS edges: target choice, retry policy, error text."""

from __future__ import annotations

import pytest

from efsplug.credentials import CredentialSource
from efsplug.errors import MountFailure
from efsplug.nfs import NfsMount, explain, retryable
from efsplug.resolve import choose_mount_target

TARGETS = [
    {"IpAddress": "192.0.2.10", "LifeCycleState": "creating", "AvailabilityZoneId": "use1-az1"},
    {"IpAddress": "192.0.2.11", "LifeCycleState": "available", "AvailabilityZoneId": "use1-az2"},
    {"IpAddress": "192.0.2.12", "LifeCycleState": "available", "AvailabilityZoneId": "use1-az1"},
]


def test_mount_target_in_own_az_preferred():
    assert choose_mount_target(TARGETS, fs_id="fs-12345678", az_id="use1-az1", dns_name="n") == "192.0.2.12"


def test_mount_target_any_available_when_az_unknown():
    assert choose_mount_target(TARGETS, fs_id="fs-12345678", az_id=None, dns_name="n") == "192.0.2.11"


def test_no_target_in_az_names_the_az_and_fix():
    with pytest.raises(MountFailure, match=r"no available mount target in AZ use1-az9; create one there"):
        choose_mount_target(TARGETS, fs_id="fs-12345678", az_id="use1-az9", dns_name="n")


def test_no_available_target_at_all():
    with pytest.raises(MountFailure, match=r"fs-12345678 has no available mount target"):
        choose_mount_target(TARGETS[:1], fs_id="fs-12345678", az_id=None, dns_name="n")


@pytest.mark.parametrize(
    "stderr, access_point, expected",
    [
        ("mount.nfs4: Connection reset by peer", False, True),
        ("mount.nfs4: access denied by server while mounting 127.0.0.1:/", True, True),
        ("mount.nfs4: access denied by server while mounting 127.0.0.1:/", False, False),
        ("mount.nfs4: No such device", False, False),
    ],
)
def test_retry_policy(stderr, access_point, expected):
    assert retryable(stderr, access_point=access_point) is expected


@pytest.mark.parametrize(
    "stderr, hint",
    [
        ("mount.nfs4: No such device", "load the nfs module"),
        ("mount.nfs4: Connection timed out", "security group allows TCP 2049"),
        ("mount.nfs4: mount point /x does not exist", "mkdir -p /mnt/efs"),
        ("mount.nfs4: access denied by server", "allows ClientMount"),
        ("", "no output"),
    ],
)
def test_nfs_errors_explained(stderr, hint):
    mount = NfsMount("127.0.0.1:/", "/mnt/efs", "nfsvers=4.1", access_point="fsap-0123456789abcdef0")
    message = explain(stderr, mount)
    assert message.startswith("mount.nfs4 failed: ") and hint in message


def test_credential_source_round_trip_and_no_secret():
    source = CredentialSource("awscredsuri", "/v2/credentials/abc")
    assert str(source) == "awscredsuri:/v2/credentials/abc"
    assert CredentialSource.parse(str(source)) == source
    assert CredentialSource.parse("instance") == CredentialSource("instance")
    with pytest.raises(ValueError, match="unknown credential source"):
        CredentialSource.parse("password:hunter2")
