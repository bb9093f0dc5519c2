"""Pure decisions of the resolution and NFS edges: target choice, retry policy, error text."""

from __future__ import annotations

import pytest

from efsplug.credentials import CredentialSource, shown_source
from efsplug.errors import MountFailure
from efsplug.nfs import NfsMount, explain, retryable
from efsplug.tunnellog import read_tunnel_log, tunnel_diagnosis
from efsplug.resolve import choose_mount_target

TARGETS = [
    {"IpAddress": "192.0.2.10", "LifeCycleState": "creating", "AvailabilityZoneId": "use1-az1"},
    {"IpAddress": "192.0.2.11", "LifeCycleState": "available", "AvailabilityZoneId": "use1-az2"},
    {"IpAddress": "192.0.2.12", "LifeCycleState": "available", "AvailabilityZoneId": "use1-az1"},
]


def test_mount_target_in_own_az_preferred():
    assert choose_mount_target(TARGETS, fs_id="fs-12345678", az_id="use1-az1", dns_name="n") == "192.0.2.12"


def test_ipv6_only_mount_target():
    targets = [{"Ipv6Address": "2001:db8::7", "LifeCycleState": "available", "AvailabilityZoneId": "use1-az1"}]
    assert choose_mount_target(targets, fs_id="fs-12345678", az_id="use1-az1", dns_name="n") == "2001:db8::7"
    dual = [{**targets[0], "IpAddress": "192.0.2.7"}]
    assert choose_mount_target(dual, fs_id="fs-12345678", az_id=None, dns_name="n") == "192.0.2.7"


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
    assert source.persisted == "awscredsuri:/v2/credentials/abc"
    assert CredentialSource.parse(source.persisted) == source
    assert CredentialSource.parse("instance") == CredentialSource("instance")
    with pytest.raises(ValueError, match="unknown credential source kind 'password'") as err:
        CredentialSource.parse("password:hunter2")
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("source", [
    CredentialSource("awscredsuri", "/v2/credentials/6f1e2d3c-secret"),
    CredentialSource("container", "/v2/credentials/6f1e2d3c-secret"),
    CredentialSource("container", "http://169.254.170.23/v1/credentials/6f1e2d3c-secret"),
])
def test_a_credentials_uri_is_shown_only_as_a_tag(source: CredentialSource) -> None:
    """The URI fetches the task role's keys: shown, it is a short tag that cannot be turned back."""
    text = str(source)
    assert "secret" not in text and "/v2/" not in text
    assert text.startswith(source.kind + " #") and len(text) == len(source.kind) + 10
    assert shown_source(source.persisted) == text
    assert str(CredentialSource("awscredsuri", "/v2/credentials/other")) != text


def test_sources_without_secrets_are_shown_whole() -> None:
    assert str(CredentialSource("profile", "efs-team")) == "profile:efs-team"
    assert shown_source("instance") == "instance" and shown_source(None) is None
    assert shown_source("password:hunter2") == "unknown source"


# --- what the tunnel's log tells (pure) --------------------------------------------------------

REFUSED_LOG = """\
LOG5[0]: Service [efs] accepted connection from 127.0.0.1:48982
LOG5[0]: s_connect: connected 192.0.2.4:2049
LOG5[0]: Certificate accepted at depth=0: CN=fs-12345678.efs.us-east-1.amazonaws.com
LOG5[0]: Connection closed: 44 byte(s) sent to TLS, 0 byte(s) sent to socket
"""
CASES_LOG = {
    "refused": (REFUSED_LOG * 12, "refused IAM identity profile:default (access key AKIAX)"),
    "cert": ("LOG4[0]: CERT: Verification error: unable to get local issuer certificate\n"
             "LOG3[0]: SSL_connect: ssl/statem/statem_clnt.c:1889: error:0A000086:SSL routines::certificate verify "
             "failed\nLOG5[0]: Connection reset: 0 byte(s) sent to TLS, 0 byte(s) sent to socket\n" * 12,
             "rejected 127.0.0.1's certificate (CERT: Verification error: unable to get local issuer"),
    "unreachable": ("LOG3[0]: s_connect: connect 192.0.2.4:2049: Connection refused (111)\n"
                    "LOG5[0]: Connection reset: 0 byte(s) sent to TLS, 0 byte(s) sent to socket\n" * 12,
                    "cannot reach 127.0.0.1 port 2049 (192.0.2.4:2049: Connection refused (111))"),
}


@pytest.mark.parametrize("case", sorted(CASES_LOG))
def test_tunnel_log_diagnosis(case: str) -> None:
    text, expected = CASES_LOG[case]
    verdict = read_tunnel_log(text)
    mount = NfsMount("127.0.0.1:/", "/mnt/x", "", target="127.0.0.1",
                     identity="IAM identity profile:default (access key AKIAX)")
    assert verdict.hopeless
    assert expected in (tunnel_diagnosis(verdict, mount) or "")


def test_tunnel_log_of_a_good_connection_names_no_cause() -> None:
    """A connection still open (no close line yet) says nothing; "connected" is not a connect error."""
    verdict = read_tunnel_log(REFUSED_LOG.rsplit("LOG5[0]: Connection closed", 1)[0])
    assert verdict == type(verdict)()
    assert tunnel_diagnosis(verdict, NfsMount("127.0.0.1:/", "/mnt/x", "")) is None


def test_tunnel_log_with_answers_is_not_a_refusal() -> None:
    text = REFUSED_LOG * 20 + "LOG5[9]: Connection closed: 4320 byte(s) sent to TLS, 4904 byte(s) sent to socket\n"
    verdict = read_tunnel_log(text)
    assert (verdict.refused, verdict.answered, verdict.hopeless) == (20, 1, False)
    assert tunnel_diagnosis(verdict, NfsMount("127.0.0.1:/", "/mnt/x", "")) is None
