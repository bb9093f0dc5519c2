"""Which mounts may share a tunnel (efsplug.sharing's pure part), and who counts as a sibling."""

from __future__ import annotations

from dataclasses import replace

import pytest

from efsplug.sharing import candidates, same_tunnel, share_key, siblings
from efsplug.state import MountRecord
from efsplug.tunnel import TunnelIdentity

BASE = dict(fs_id="fs-12345678", access_point="fsap-0123456789abcdef0", region="us-east-1", netns=None, iam=True,
            credential_source="profile:default",
            tunnel={"connect_host": "10.0.0.5", "check_host": "fs-12345678.efs.us-east-1.amazonaws.com",
                    "verify_level": 2, "cafile": "/etc/amazon/efs/efs-utils.crt", "ocsp": False})
IDENT = TunnelIdentity(pid=4242, create_time=1.0, cmdline=("stunnel", "/run/efs/a/stunnel.conf"))


def record(mountpoint: str, port: int = 20100, config: str = "/run/efs/a/stunnel.conf", key: str = "k") -> MountRecord:
    return MountRecord(fs_id="fs-12345678", mountpoint=mountpoint, port=port, tunnel=IDENT, config_file=config,
                       tls=True, share_key=key)


def test_the_same_settings_give_the_same_key():
    assert share_key(**BASE) == share_key(**dict(BASE, tunnel=dict(reversed(list(BASE["tunnel"].items())))))


@pytest.mark.parametrize("field,value", [
    ("fs_id", "fs-87654321"),
    ("access_point", "fsap-0aaaaaaaaaaaaaaaa"),
    ("access_point", None),
    ("region", "eu-west-1"),
    ("netns", "/var/run/netns/task"),
    ("iam", False),
    ("credential_source", "profile:other"),
    ("credential_source", "awscredsuri:/v2/credentials/task-b"),
    ("credential_source", None),
])
def test_a_different_identity_or_target_never_shares(field, value):
    assert share_key(**BASE) != share_key(**dict(BASE, **{field: value}))


@pytest.mark.parametrize("setting,value", [
    ("connect_host", "10.0.0.6"), ("check_host", None), ("verify_level", 0), ("cafile", "/tmp/other.pem"),
    ("ocsp", True), ("fips", True),
])
def test_different_tls_settings_never_share(setting, value):
    assert share_key(**BASE) != share_key(**dict(BASE, tunnel=dict(BASE["tunnel"], **{setting: value})))


def test_same_tunnel_needs_port_and_config_file():
    a = record("/mnt/a")
    assert same_tunnel(a, record("/mnt/b"))
    assert not same_tunnel(a, record("/mnt/b", port=20101))
    assert not same_tunnel(a, record("/mnt/b", config="/run/efs/b/stunnel.conf"))
    assert not same_tunnel(replace(a, port=None), replace(record("/mnt/b"), port=None))
    assert not same_tunnel(replace(a, config_file=None), replace(record("/mnt/b"), config_file=None))


def test_siblings_are_the_other_records_of_the_tunnel():
    a, b, c = record("/mnt/a"), record("/mnt/b"), record("/mnt/c", port=20101, config="/run/efs/c/stunnel.conf")
    assert siblings(a, [a, b, c]) == [b]
    assert siblings(c, [a, b, c]) == []
    assert siblings(a, [a]) == []


def test_candidates_match_the_key_and_skip_the_same_mount_point():
    a = record("/mnt/a")
    others = [a, record("/mnt/x", key="other"), replace(record("/mnt/y"), tunnel=None)]
    assert candidates("k", others, "/mnt/b") == [a]
    assert candidates("k", others, "/mnt/a/") == []  # its record would have this mount's file name
    assert candidates("nope", others, "/mnt/b") == []


def test_records_without_a_key_are_never_joined():
    old = replace(record("/mnt/a"), share_key=None)  # written before tunnels were shared
    assert candidates(share_key(**BASE), [old], "/mnt/b") == []
