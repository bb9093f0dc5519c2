"""The IAM client certificate: parsed back with cryptography and an independent DER reader."""

from __future__ import annotations

import multiprocessing
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from efsplug import __version__, certificate, sigv4
from efsplug.certificate import CertificateRequest
from efsplug.errors import MountFailure
from efsbed.iam import cert_validity, der_children, der_read
from efsplug.sigv4 import AwsCredentials

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
FS_ID = "fs-0123456789abcdef0"
AP = "fsap-0123456789abcdef0"
REGION = "us-west-2"
CREDS = AwsCredentials("AKIDEXAMPLE", "secretsecret")
TOKEN = "IQoJ" + "x" * 300  # long enough to need a multi-byte DER length
CREDS_TOKEN = AwsCredentials("ASIAEXAMPLE", "secretsecret", session_token=TOKEN)


# The bed's DER reader (its IAM verifier's): independent of the product's encoder.
def single(data: bytes) -> Tuple[int, bytes]:
    tag, content, end = der_read(data)
    assert end == len(data), "trailing bytes after the DER value"
    return tag, content


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _request(**overrides) -> CertificateRequest:
    args = dict(fs_id=FS_ID, region=REGION, hostname="host.example", now=NOW)
    args.update(overrides)
    return certificate.certificate_request(**args)


def _ext(cert: x509.Certificate, oid: str) -> x509.Extension:
    return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))


def test_certificate_request_window_and_names() -> None:
    req = _request(access_point=AP, credentials=CREDS)
    assert req.not_before == NOW - timedelta(minutes=15)
    assert req.not_after == NOW + timedelta(hours=3)
    assert req.signed_at == NOW
    assert req.common_name == "host.example"
    assert req.client_source == "efsplug"
    assert _request(lifetime=timedelta(minutes=30)).not_after == NOW + timedelta(minutes=30)


def test_client_source_from_client_info(key: rsa.RSAPrivateKey) -> None:
    """[client-info] source travels in 4843.7.4, as with efs-utils; unset, efsplug names itself."""
    cert = certificate.build_certificate(key, _request(client_source="ecs"))
    _, info = single(_ext(cert, "1.3.6.1.4.1.4843.7.4").value.value)
    assert der_children(info)[0] == (0x0C, b"ecs")
    assert _request(client_source=None).client_source == "efsplug"


def test_common_name_truncated_to_64_and_never_empty() -> None:
    long_name = "a" * 63 + "bcdef.example.com"
    assert _request(hostname=long_name).common_name == long_name[:64]
    assert _request(hostname="").common_name == "efsplug"


def test_request_time_is_normalised_to_utc_and_naive_rejected() -> None:
    local = NOW.astimezone(timezone(timedelta(hours=-7))).replace(microsecond=123)
    assert _request(now=local).signed_at == NOW
    assert _request(now=local).signed_at.tzinfo == timezone.utc
    with pytest.raises(ValueError, match="timezone-aware"):
        _request(now=NOW.replace(tzinfo=None))


def test_full_certificate_round_trip(key: rsa.RSAPrivateKey) -> None:
    req = _request(access_point=AP, credentials=CREDS_TOKEN)
    cert = certificate.build_certificate(key, req)
    parsed = x509.load_pem_x509_certificate(certificate.certificate_pem(cert))

    assert parsed.subject == parsed.issuer
    assert parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host.example"
    assert cert_validity(parsed) == (NOW - timedelta(minutes=15), NOW + timedelta(hours=3))
    assert isinstance(parsed.signature_hash_algorithm, hashes.SHA256)
    # Self-signed with the key we hold.
    key.public_key().verify(
        parsed.signature, parsed.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256()
    )
    ski = parsed.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    for oid in ("1.3.6.1.4.1.4843.7.1", "1.3.6.1.4.1.4843.7.2", "1.3.6.1.4.1.4843.7.3", "1.3.6.1.4.1.4843.7.4"):
        assert _ext(parsed, oid).critical is False

    assert single(_ext(parsed, "1.3.6.1.4.1.4843.7.1").value.value) == (0x0C, AP.encode())
    assert single(_ext(parsed, "1.3.6.1.4.1.4843.7.3").value.value) == (0x0C, FS_ID.encode())

    tag, info = single(_ext(parsed, "1.3.6.1.4.1.4843.7.4").value.value)
    assert tag == 0x30
    assert der_children(info) == [(0x0C, b"efsplug"), (0x0C, __version__.encode())]

    tag, auth = single(_ext(parsed, "1.3.6.1.4.1.4843.7.2").value.value)
    assert tag == 0x30
    fields = der_children(auth)
    assert [t for t, _ in fields] == [0x0C, 0x04, 0x17, 0xA0]
    assert fields[0][1] == b"ASIAEXAMPLE"
    expected_sig = sigv4.signature(
        fs_id=FS_ID, region=REGION, public_key_hash=sigv4.public_key_hash(key.public_key()),
        credentials=CREDS_TOKEN, when=NOW,
    )
    assert fields[1][1] == expected_sig.encode("ascii")
    assert fields[2][1] == b"240506070809Z"
    assert single(fields[3][1]) == (0x0C, TOKEN.encode())


def test_certificate_without_token_access_point_or_credentials(key: rsa.RSAPrivateKey) -> None:
    cert = certificate.build_certificate(key, _request(credentials=CREDS))
    _, auth = single(_ext(cert, "1.3.6.1.4.1.4843.7.2").value.value)
    assert [t for t, _ in der_children(auth)] == [0x0C, 0x04, 0x17]
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, "1.3.6.1.4.1.4843.7.1")

    plain = certificate.build_certificate(key, _request())
    with pytest.raises(x509.ExtensionNotFound):
        _ext(plain, "1.3.6.1.4.1.4843.7.2")
    assert single(_ext(plain, "1.3.6.1.4.1.4843.7.3").value.value) == (0x0C, FS_ID.encode())


def test_signature_in_certificate_is_bound_to_the_key(key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    req = _request(credentials=CREDS)
    sig_a = der_children(single(certificate.client_auth_der(key, req))[1])[1][1]
    sig_b = der_children(single(certificate.client_auth_der(other, req))[1])[1][1]
    assert sig_a != sig_b
    with pytest.raises(ValueError, match="needs credentials"):
        certificate.client_auth_der(key, _request())


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 70000])
def test_der_lengths_round_trip(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    assert single(certificate.der_octets(data)) == (0x04, data)


def test_der_helpers_known_encodings() -> None:
    assert certificate.der_utf8("é") == b"\x0c\x02\xc3\xa9"
    assert certificate.der_sequence() == b"\x30\x00"
    assert certificate.der_explicit(0, b"\x05\x00") == b"\xa0\x02\x05\x00"
    assert certificate.der_octets(b"\x00" * 200)[:3] == b"\x04\x81\xc8"
    plus1 = timezone(timedelta(hours=1))
    assert certificate.der_utctime(datetime(2049, 12, 31, 23, 59, 59, tzinfo=plus1)) == b"\x17\x0d491231225959Z"


def test_private_key_pem_is_unencrypted_pkcs8(key: rsa.RSAPrivateKey) -> None:
    pem = certificate.private_key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert loaded.private_numbers() == key.private_numbers()


def test_new_private_key_is_rsa_3072() -> None:
    assert certificate.new_private_key().key_size == 3072


def test_key_created_once_mode_0400_in_private_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "privateKey.pem"
    first = certificate.load_or_create_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    again = certificate.load_or_create_private_key(path)
    assert again.private_numbers() == first.private_numbers()
    assert os.listdir(path.parent) == ["privateKey.pem"]  # no temp file left behind


def test_existing_key_with_loose_mode_is_tightened(tmp_path: Path, key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(certificate.private_key_pem(key))
    os.chmod(path, 0o644)
    loaded = certificate.load_or_create_private_key(path)
    assert loaded.private_numbers() == key.private_numbers()
    assert stat.S_IMODE(path.stat().st_mode) == 0o400


def test_corrupt_or_non_rsa_key_names_the_fix(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"not a key")
    with pytest.raises(MountFailure, match="not a readable PEM key; delete it"):
        certificate.load_or_create_private_key(bad)
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(certificate.private_key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(MountFailure, match="not an RSA key; delete it"):
        certificate.load_or_create_private_key(ec_path)


def _create_concurrently(path: str, barrier, results) -> None:
    barrier.wait(timeout=60)
    key = certificate.load_or_create_private_key(Path(path))
    results.put(certificate.private_key_pem(key))


def test_concurrent_creators_converge_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "run" / "efs" / "privateKey.pem"
    ctx = multiprocessing.get_context("fork")
    workers = 8
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [ctx.Process(target=_create_concurrently, args=(str(path), barrier, results)) for _ in range(workers)]
    try:
        for proc in procs:
            proc.start()
        pems = [results.get(timeout=120) for _ in range(workers)]
        for proc in procs:
            proc.join(timeout=30)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    assert len(set(pems)) == 1
    assert path.read_bytes() == pems[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert os.listdir(path.parent) == ["privateKey.pem"]


def test_our_own_key_loads_without_the_slow_rsa_check_on_every_cryptography(tmp_path: Path) -> None:
    """cryptography >= 39 takes a keyword; 36-38 (AL2023's 36, Debian's 38) a backend flag,
    set only around the load. Either way the key is the one written, and a hostile file is refused."""
    path = tmp_path / "privateKey.pem"
    made = certificate.load_or_create_private_key(path)
    loaded = certificate._load_unchecked_before_39(path.read_bytes())
    assert loaded.private_numbers() == made.private_numbers()
    from cryptography.hazmat.backends.openssl.backend import backend

    assert getattr(backend, "_rsa_skip_check_key", False) is False  # restored for any other load
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(MountFailure, match="not a readable PEM key"):
        certificate._load_key(bad)
