"""The bed's cloud stand-ins on their own: the IAM verifier (pure), the credentials registry,
ganesha, the metadata services and moto."""

from __future__ import annotations

from http.client import HTTPConnection
import json
import shutil
import stat
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from efsbed import iam, procs
from efsbed.aws import MotoServer, client, seed_file_system
from efsbed.credentials import BedCredentials
from efsbed.ganesha import Ganesha
from efsbed.metadata import InstanceMetadata, TaskCredentials
from efsplug import certificate, sigv4
from efsplug.sigv4 import AwsCredentials

FS_ID = "fs-1234abcd"
REGION = "eu-west-1"
AP = "fsap-0123456789abcdef0"
NOW = datetime.now(timezone.utc).replace(microsecond=0)  # issued credentials expire from real now


@pytest.fixture(scope="module")
def key():
    return certificate.new_private_key()


@pytest.fixture
def creds(tmp_path: Path) -> BedCredentials:
    return BedCredentials(tmp_path / "credentials.json")


def make_cert(key, *, credentials: Optional[AwsCredentials], now: datetime = NOW, fs_id: str = FS_ID,
              access_point: Optional[str] = AP, **overrides) -> x509.Certificate:
    request = certificate.certificate_request(
        fs_id=fs_id, region=REGION, hostname="host", now=now, access_point=access_point, credentials=credentials,
    )
    return certificate.build_certificate(key, replace(request, **overrides))


def verify(cert: x509.Certificate, creds: BedCredentials, now: datetime = NOW) -> iam.IamIdentity:
    return iam.verify_client_certificate(
        cert, fs_id=FS_ID, region=REGION, known=creds.active(), revoked=creds.revoked_ids(), now=now,
    )


def refusal(cert: x509.Certificate, creds: BedCredentials, now: datetime = NOW) -> str:
    with pytest.raises(iam.IamRefused) as caught:
        verify(cert, creds, now)
    return caught.value.reason


# --- IAM verifier, no sockets -----------------------------------------------------------

def test_verifier_accepts_temporary_credentials_with_access_point(key, creds: BedCredentials) -> None:
    issued = creds.issue("task")
    identity = verify(make_cert(key, credentials=issued), creds, NOW + timedelta(minutes=5))
    assert identity == iam.IamIdentity(access_point=AP, access_key_id=issued.access_key_id)


def test_verifier_accepts_long_term_key_without_token(key, creds: BedCredentials) -> None:
    issued = creds.issue("user", temporary=False)
    assert issued.access_key_id.startswith("AKIA") and issued.session_token is None
    identity = verify(make_cert(key, credentials=issued, access_point=None), creds)
    assert identity == iam.IamIdentity(access_point=None, access_key_id=issued.access_key_id)


def test_verifier_accepts_certificate_without_iam_block(key, creds: BedCredentials) -> None:
    assert verify(make_cert(key, credentials=None), creds) == iam.IamIdentity(AP, None)


def test_verifier_agrees_with_product_signer(key) -> None:
    c = AwsCredentials("ASIAEXAMPLEEXAMPLE12", "secret/with+chars=", "tok+en/with=chars")
    key_hash = sigv4.public_key_hash(key.public_key())
    cert = make_cert(key, credentials=None)
    assert iam.public_key_hash(cert) == key_hash
    theirs = sigv4.signature(fs_id=FS_ID, region=REGION, public_key_hash=key_hash, credentials=c, when=NOW)
    ours = iam.expected_signature(secret=c.secret_access_key, access_key_id=c.access_key_id,
                                  session_token=c.session_token, fs_id=FS_ID, region=REGION,
                                  key_hash=key_hash, when=NOW)
    assert ours == theirs


def _with(c: AwsCredentials, **changes) -> AwsCredentials:
    return replace(c, **changes)


@pytest.mark.parametrize("case, expected", [
    ("wrong secret", iam.SIGNATURE_MISMATCH),
    ("other token", iam.TOKEN_MISMATCH),
    ("token dropped", iam.TOKEN_MISMATCH),
    ("unknown key", iam.UNKNOWN_KEY),
])
def test_verifier_refuses_bad_credentials(case: str, expected: str, key, creds: BedCredentials) -> None:
    good = creds.issue("victim")
    bad = {
        "wrong secret": _with(good, secret_access_key="x" + good.secret_access_key[1:]),
        "other token": _with(good, session_token="another-token"),
        "token dropped": _with(good, session_token=None),
        "unknown key": _with(good, access_key_id="ASIAUNKNOWNUNKNOWN00"),
    }[case]
    assert refusal(make_cert(key, credentials=bad), creds) == expected


def test_verifier_refuses_revoked_key(key, creds: BedCredentials) -> None:
    issued = creds.issue("gone")
    cert = make_cert(key, credentials=issued)
    creds.revoke(issued.access_key_id)
    with pytest.raises(iam.IamRefused) as caught:
        verify(cert, creds)
    assert (caught.value.reason, caught.value.access_key_id, caught.value.access_point) == (
        iam.REVOKED_KEY, issued.access_key_id, AP)


def test_verifier_refuses_expired_credentials(key, creds: BedCredentials) -> None:
    issued = creds.issue("short", lifetime=timedelta(minutes=10))
    now = datetime.now(timezone.utc)
    cert = make_cert(key, credentials=issued, now=now)
    assert verify(cert, creds, now).access_key_id == issued.access_key_id
    assert refusal(cert, creds, now + timedelta(minutes=11)) == iam.CREDENTIALS_EXPIRED


def test_verifier_checks_certificate_validity_window(key, creds: BedCredentials) -> None:
    cert = make_cert(key, credentials=creds.issue("w"), now=datetime.now(timezone.utc))
    now = datetime.now(timezone.utc)
    assert refusal(cert, creds, now + timedelta(hours=4)) == iam.CERT_EXPIRED
    assert refusal(cert, creds, now - timedelta(hours=1)) == iam.CERT_NOT_YET_VALID


def test_verifier_checks_signature_age(key, creds: BedCredentials) -> None:
    issued = creds.issue("age", lifetime=timedelta(days=10))
    signed = datetime.now(timezone.utc).replace(microsecond=0)
    long_cert = make_cert(key, credentials=issued, now=signed, not_after=signed + timedelta(days=3))
    assert verify(long_cert, creds, signed + timedelta(hours=23)).access_key_id == issued.access_key_id
    assert refusal(long_cert, creds, signed + timedelta(hours=25)) == iam.SIGNATURE_EXPIRED
    early_cert = make_cert(key, credentials=issued, now=signed, not_before=signed - timedelta(hours=2))
    assert refusal(early_cert, creds, signed - timedelta(hours=1)) == iam.SIGNATURE_IN_FUTURE


def test_verifier_refuses_other_file_system(key, creds: BedCredentials) -> None:
    cert = make_cert(key, credentials=creds.issue("fs"), fs_id="fs-99999999")
    assert refusal(cert, creds) == iam.WRONG_FILE_SYSTEM


def _bare_cert(key, extensions: Dict[str, bytes]) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(hours=1)))
    for oid, value in extensions.items():
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(key, hashes.SHA256())


FS_EXT = "1.3.6.1.4.1.4843.7.3"
AUTH_EXT = "1.3.6.1.4.1.4843.7.2"


def test_verifier_refuses_certificate_without_file_system(key, creds: BedCredentials) -> None:
    assert refusal(_bare_cert(key, {}), creds) == iam.NO_FILE_SYSTEM


@pytest.mark.parametrize("extensions", [
    {FS_EXT: b"\x04\x0bfs-1234abcd"},                                     # OCTET STRING, not UTF8String
    {FS_EXT: b"\x0c\x0bfs-1234abcd\x00"},                                 # trailing garbage
    {FS_EXT: b"\x0c\x0bfs-1234abcd", AUTH_EXT: b"\x30\x03\x0c\x01A"},     # too few fields
    {FS_EXT: b"\x0c\x0bfs-1234abcd", AUTH_EXT: b"\x30\x10\x0c\x01A"},     # truncated
    {FS_EXT: b"\x0c\x0bfs-1234abcd",                                       # bad UTCTime
     AUTH_EXT: b"\x30\x0e\x0c\x01A\x04\x02ab\x17\x05notme"},
])
def test_verifier_refuses_malformed_extensions(extensions: Dict[str, bytes], key, creds: BedCredentials) -> None:
    assert refusal(_bare_cert(key, extensions), creds).startswith(iam.MALFORMED)


def test_der_reader_handles_long_lengths_and_utc_century() -> None:
    content = b"x" * 300
    tag, value, end = iam.der_read(b"\x04\x82\x01\x2c" + content)
    assert (tag, value, end) == (0x04, content, 304)
    assert iam.parse_utc_time(b"491231235959Z").year == 2049
    assert iam.parse_utc_time(b"500101000000Z").year == 1950
    with pytest.raises(iam.DerError):
        iam.der_read(b"\x04\x80")


def test_client_auth_repr_hides_signature_and_token() -> None:
    auth = iam.ClientAuth("ASIAKEY", "deadbeef" * 8, NOW, "the-token")
    assert "deadbeef" not in repr(auth) and "the-token" not in repr(auth)


# --- credentials registry ------------------------------------------------------------

def test_registry_issues_aws_shaped_credentials(creds: BedCredentials) -> None:
    temp, long_term = creds.issue("a"), creds.issue("b", temporary=False)
    assert temp.access_key_id.startswith("ASIA") and len(temp.access_key_id) == 20
    assert long_term.access_key_id.startswith("AKIA") and long_term.session_token is None
    assert len(temp.secret_access_key) == 40 and temp.session_token
    assert temp.expiry is not None and temp.expiry > datetime.now(timezone.utc) + timedelta(hours=5)
    assert temp.secret_access_key not in repr(temp) and temp.session_token not in repr(temp)


def test_registry_file_is_private_and_shared_with_readers(creds: BedCredentials) -> None:
    issued = creds.issue("shared")
    assert stat.S_IMODE(creds.path.stat().st_mode) == 0o600
    reader = BedCredentials(creds.path)
    assert reader.active()[issued.access_key_id] == issued
    assert reader.refresh() is False  # nothing changed since it read the file
    creds.revoke(issued.access_key_id)
    assert reader.refresh() is True
    assert issued.access_key_id not in reader.active()
    assert reader.revoked_ids() == {issued.access_key_id}
    assert reader.label_of(issued.access_key_id) == "shared"
    assert issued.secret_access_key not in repr(reader)


def test_registry_refuses_to_revoke_unknown_key(creds: BedCredentials) -> None:
    with pytest.raises(KeyError):
        creds.revoke("AKIANEVERISSUED00000")


# --- ganesha ---------------------------------------------------------------------------

NFS_CAT = shutil.which("nfs-cat")


def test_ganesha_serves_each_export_on_its_own_port_and_stops_cleanly(tmp_path: Path, tag: str) -> None:
    exports = {name: tmp_path / name for name in ("root", "ap-a")}
    for name, directory in exports.items():
        directory.mkdir()
        (directory / "hello.txt").write_text(f"hello from {name}\n")
    servers = [Ganesha(tmp_path / f"g-{name}", d, tag=tag) for name, d in exports.items()]
    with pytest.raises(RuntimeError, match="not started"):
        servers[0].port
    try:
        for g in servers:
            g.start()
        assert len({g.port for g in servers}) == 2
        assert all(g.alive() for g in servers)
        if NFS_CAT:  # an NFSv4 read from user space proves it really serves the export
            for g, name in zip(servers, exports):
                out = subprocess.run([NFS_CAT, f"nfs://127.0.0.1//hello.txt?version=4&nfsport={g.port}"],
                                     capture_output=True, timeout=60)
                assert (out.returncode, out.stdout) == (0, f"hello from {name}\n".encode()), out.stderr
    finally:
        for g in servers:
            g.stop()
    assert not any(g.alive() for g in servers)
    assert procs.tagged_processes(tag) == []
    servers[0].stop()  # a second stop is harmless
    config = servers[0].config_path.read_text()
    for fact in ("Bind_addr = 127.0.0.1", "Graceless = true", "Squash = No_Root_Squash", "Name = VFS"):
        assert fact in config


# --- instance metadata -----------------------------------------------------------------

def request(port: int, method: str, path: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def imds(creds: BedCredentials) -> Iterator[InstanceMetadata]:
    with InstanceMetadata("eu-west-1", "eu-west-1b", "euw1-az2", creds) as service:
        yield service


def test_imds_v2_token_flow(imds: InstanceMetadata) -> None:
    status, token = request(imds.port, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    assert status == 200 and token
    auth = {"X-aws-ec2-metadata-token": token}
    assert request(imds.port, "GET", "/latest/meta-data/placement/region", auth) == (200, "eu-west-1")
    assert request(imds.port, "GET", "/latest/meta-data/placement/availability-zone", auth) == (200, "eu-west-1b")
    assert request(imds.port, "GET", "/latest/meta-data/placement/availability-zone-id", auth) == (200, "euw1-az2")
    status, body = request(imds.port, "GET", "/latest/dynamic/instance-identity/document", auth)
    doc = json.loads(body)
    assert status == 200 and (doc["region"], doc["availabilityZone"]) == ("eu-west-1", "eu-west-1b")
    assert request(imds.port, "GET", "/latest/meta-data/nothing-here", auth)[0] == 404
    assert imds.requests("/latest/api/token") == 1 and imds.requests() == 6


@pytest.mark.parametrize("method, headers, status", [
    ("PUT", {}, 400),                                                    # no TTL
    ("PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "0"}, 400),         # TTL out of range
    ("PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "21601"}, 400),
    ("GET", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, 405),       # token needs PUT
])
def test_imds_rejects_bad_token_requests(imds: InstanceMetadata, method: str, headers: dict, status: int) -> None:
    assert request(imds.port, method, "/latest/api/token", headers)[0] == status


def test_imds_rejects_unknown_token(imds: InstanceMetadata) -> None:
    headers = {"X-aws-ec2-metadata-token": "forged"}
    assert request(imds.port, "GET", "/latest/meta-data/placement/region", headers)[0] == 401


def test_imds_v1_allowed_or_refused(creds: BedCredentials) -> None:
    with InstanceMetadata("eu-west-1", "eu-west-1b", "euw1-az2", creds, allow_v1=True) as v1:
        assert request(v1.port, "GET", "/latest/meta-data/placement/region") == (200, "eu-west-1")
    with InstanceMetadata("eu-west-1", "eu-west-1b", "euw1-az2", creds, allow_v1=False) as v2_only:
        assert request(v2_only.port, "GET", "/latest/meta-data/placement/region")[0] == 401


def test_imds_role_credentials_shape(imds: InstanceMetadata, creds: BedCredentials) -> None:
    assert request(imds.port, "GET", "/latest/meta-data/iam/security-credentials/") == (200, "efsbed-instance-role")
    status, body = request(imds.port, "GET", "/latest/meta-data/iam/security-credentials/efsbed-instance-role")
    doc = json.loads(body)
    assert status == 200
    assert (doc["Code"], doc["Type"]) == ("Success", "AWS-HMAC")
    issued = creds.active()[doc["AccessKeyId"]]
    assert (doc["SecretAccessKey"], doc["Token"]) == (issued.secret_access_key, issued.session_token)
    assert datetime.strptime(doc["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) == issued.expiry
    datetime.strptime(doc["LastUpdated"], "%Y-%m-%dT%H:%M:%SZ")
    rotated = imds.rotate_role_credentials()
    status, body = request(imds.port, "GET", "/latest/meta-data/iam/security-credentials/efsbed-instance-role")
    assert json.loads(body)["AccessKeyId"] == rotated.access_key_id != issued.access_key_id


def test_imds_stop_releases_the_port(creds: BedCredentials) -> None:
    service = InstanceMetadata("eu-west-1", "eu-west-1b", "euw1-az2", creds).start()
    port = service.port
    service.stop()
    with pytest.raises(ConnectionRefusedError):
        request(port, "GET", "/latest/meta-data/placement/region")


# --- ECS task credentials ---------------------------------------------------------------

def test_task_credentials_grant_rotate_revoke(creds: BedCredentials) -> None:
    with TaskCredentials(creds) as agent:
        granted = agent.grant("abcd-1234")
        status, body = request(agent.port, "GET", "/v2/credentials/abcd-1234")
        doc = json.loads(body)
        assert status == 200 and set(doc) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn"}
        assert (doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"]) == (
            granted.access_key_id, granted.secret_access_key, granted.session_token)

        rotated = agent.rotate("abcd-1234")
        assert json.loads(request(agent.port, "GET", "/v2/credentials/abcd-1234")[1])["AccessKeyId"] == rotated.access_key_id

        agent.revoke("abcd-1234")
        status, body = request(agent.port, "GET", "/v2/credentials/abcd-1234")
        assert status == 400 and json.loads(body)["code"] == "InvalidIdInRequest"
        assert rotated.access_key_id in creds.revoked_ids()
        assert granted.access_key_id in creds.active()  # rotation left the old key to expire on its own
        assert agent.requests("abcd-1234") == 3 and agent.requests("other") == 0


def test_task_credentials_unknown_id_and_bad_requests(creds: BedCredentials) -> None:
    with TaskCredentials(creds) as agent:
        assert request(agent.port, "GET", "/v2/credentials/never-granted")[0] == 400
        assert request(agent.port, "GET", "/v1/credentials")[0] == 404
        assert request(agent.port, "PUT", "/v2/credentials/x")[0] == 404
        with pytest.raises(KeyError):
            agent.rotate("never-granted")
        with pytest.raises(KeyError):
            agent.revoke("never-granted")
        assert agent.requests("never-granted") == 1


# --- moto -----------------------------------------------------------------------------

def test_moto_seeding_is_consistent(tmp_path: Path, tag: str) -> None:
    with MotoServer(tmp_path / "moto", tag=tag) as moto:
        seeded = seed_file_system(moto.endpoint_url, "us-east-1", "us-east-1a")
        efs = client("efs", moto.endpoint_url, "us-east-1")
        (target,) = efs.describe_mount_targets(FileSystemId=seeded.fs_id)["MountTargets"]
        assert target["MountTargetId"] == seeded.mount_target_id
        assert target["IpAddress"] == seeded.mount_target_ip and seeded.mount_target_ip.startswith("192.0.2.")
        assert target["AvailabilityZoneName"] == "us-east-1a" == seeded.availability_zone
        assert target["AvailabilityZoneId"] == seeded.availability_zone_id
        assert (target["LifeCycleState"], target["SubnetId"]) == ("available", seeded.subnet_id)
        points = efs.describe_access_points(FileSystemId=seeded.fs_id)["AccessPoints"]
        assert {p["AccessPointId"]: p["RootDirectory"]["Path"] for p in points} == seeded.access_point_roots
        assert sorted(seeded.access_point_roots.values()) == ["/ap-a", "/ap-b"]
        assert all(p["RootDirectory"]["CreationInfo"]["Permissions"] == "0755" for p in points)
        (fs,) = efs.describe_file_systems(FileSystemId=seeded.fs_id)["FileSystems"]
        assert fs["FileSystemId"] == seeded.fs_id
    assert procs.tagged_processes(tag) == []
