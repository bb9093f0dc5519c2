"""The self-signed TLS client certificate that carries EFS IAM authorization.

EFS reads the custom extensions below; the OIDs and their DER layout are the
ones efs-utils writes through OpenSSL's ASN1_generate_nconf.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from efsplug import __version__
from efsplug.errors import MountFailure
from efsplug.sigv4 import AwsCredentials, public_key_hash, signature

KEY_SIZE = 3072
CN_MAX = 64
NOT_BEFORE_SLACK = timedelta(minutes=15)  # tolerate clock skew between client and EFS
DEFAULT_LIFETIME = timedelta(hours=3)

OID_ACCESS_POINT = x509.ObjectIdentifier("1.3.6.1.4.1.4843.7.1")
OID_CLIENT_AUTH = x509.ObjectIdentifier("1.3.6.1.4.1.4843.7.2")
OID_FS_ID = x509.ObjectIdentifier("1.3.6.1.4.1.4843.7.3")
OID_CLIENT_INFO = x509.ObjectIdentifier("1.3.6.1.4.1.4843.7.4")


# --- tiny DER encoder (only what the extensions need) --------------------------

def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def der_utf8(text: str) -> bytes:
    return _der(0x0C, text.encode("utf-8"))


def der_octets(data: bytes) -> bytes:
    return _der(0x04, data)


def der_utctime(when: datetime) -> bytes:
    return _der(0x17, when.astimezone(timezone.utc).strftime("%y%m%d%H%M%SZ").encode("ascii"))


def der_sequence(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def der_explicit(number: int, inner: bytes) -> bytes:
    return _der(0xA0 | number, inner)  # context-specific, constructed


# --- key ---------------------------------------------------------------------

def new_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)


def private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_private_dirs(directory: Path) -> None:
    missing: List[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # a concurrent creator made it first


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SKIP_CHECK = threading.Lock()


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    data = path.read_bytes()
    try:
        try:
            # Our own root-only key, made by new_private_key: the RSA consistency check guards
            # against hostile keys and costs ~140 ms per mount under a slow kernel.
            key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
        except TypeError:  # cryptography < 39 (AL2023 ships 36) has no such switch
            key = _load_unchecked_before_39(data)
    except ValueError:
        raise MountFailure(
            f"private key {path} is not a readable PEM key; delete it so a new one is created"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise MountFailure(f"private key {path} is not an RSA key; delete it so a new one is created")
    return key


def _load_unchecked_before_39(data: bytes):
    """The same skip on cryptography 36-38, whose OpenSSL backend keeps it as a flag of its own
    (the keyword above replaced it in 39): ~90 ms of every IAM mount otherwise."""
    from cryptography.hazmat.backends.openssl.backend import backend

    if not hasattr(backend, "_rsa_skip_check_key"):
        return serialization.load_pem_private_key(data, password=None)
    with _SKIP_CHECK:  # a process-wide flag: set only around this load
        backend._rsa_skip_check_key = True
        try:
            return serialization.load_pem_private_key(data, password=None)
        finally:
            backend._rsa_skip_check_key = False


def load_or_create_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Return the key at ``path``, creating it once (mode 0400) if absent.

    Concurrent creators each write a complete key under a unique temporary
    name and then ``link`` it into place; link never replaces, so exactly one
    wins and everyone returns the winner's key.  Readers never see a partial file.
    """
    path = Path(path)
    if path.exists():
        if path.stat().st_mode & 0o777 != 0o400:
            os.chmod(path, 0o400)
        return _load_key(path)
    _make_private_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        try:
            os.write(fd, private_key_pem(new_private_key()))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except OSError as err:
            if err.errno != errno.EEXIST:
                raise
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)
    return _load_key(path)


# --- certificate ---------------------------------------------------------------

@dataclass(frozen=True)
class CertificateRequest:
    fs_id: str
    region: str
    common_name: str
    not_before: datetime
    not_after: datetime
    signed_at: datetime
    access_point: Optional[str] = None
    credentials: Optional[AwsCredentials] = None
    client_source: str = "efsplug"


def certificate_request(
    *,
    fs_id: str,
    region: str,
    hostname: str,
    now: datetime,
    access_point: Optional[str] = None,
    credentials: Optional[AwsCredentials] = None,
    lifetime: timedelta = DEFAULT_LIFETIME,
    client_source: Optional[str] = None,
) -> CertificateRequest:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    now = now.astimezone(timezone.utc).replace(microsecond=0)
    return CertificateRequest(
        fs_id=fs_id,
        region=region,
        common_name=(hostname or "efsplug")[:CN_MAX],
        not_before=now - NOT_BEFORE_SLACK,
        not_after=now + lifetime,
        signed_at=now,
        access_point=access_point,
        credentials=credentials,
        client_source=client_source or CertificateRequest.client_source,  # [client-info] source, as efs-utils
    )


def client_auth_der(key: rsa.RSAPrivateKey, request: CertificateRequest) -> bytes:
    """DER of the 4843.7.2 extension: who signs, the SigV4 signature and when."""
    creds = request.credentials
    if creds is None:
        raise ValueError("client auth extension needs credentials")
    sig = signature(
        fs_id=request.fs_id,
        region=request.region,
        public_key_hash=public_key_hash(key.public_key()),
        credentials=creds,
        when=request.signed_at,
    )
    items = [
        der_utf8(creds.access_key_id),
        der_octets(sig.encode("ascii")),  # the hex text itself, as efs-utils sends it
        der_utctime(request.signed_at),
    ]
    if creds.session_token:
        items.append(der_explicit(0, der_utf8(creds.session_token)))
    return der_sequence(*items)


def build_certificate(key: rsa.RSAPrivateKey, request: CertificateRequest) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(request.not_before)
        .not_valid_after(request.not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    custom = []
    if request.access_point:
        custom.append((OID_ACCESS_POINT, der_utf8(request.access_point)))
    if request.credentials is not None:
        custom.append((OID_CLIENT_AUTH, client_auth_der(key, request)))
    custom.append((OID_FS_ID, der_utf8(request.fs_id)))
    custom.append(
        (OID_CLIENT_INFO, der_sequence(der_utf8(request.client_source), der_utf8(__version__)))
    )
    for oid, value in custom:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(key, hashes.SHA256())


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
