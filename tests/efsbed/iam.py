"""The emulated EFS's IAM check of a TLS client certificate (pure: no sockets, no files).

Written from the protocol description, deliberately without efsplug.sigv4: the product's
certificate builder is only proven right if an independent implementation agrees with it.
The canonical request follows efs-utils (what EFS verifies): query values quote_plus'ed,
and the canonical headers `host:<fs_id>` NOT followed by an empty line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import AbstractSet, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote_plus

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from efsplug.sigv4 import AwsCredentials  # the data class only, not the signer

OID_ACCESS_POINT = x509.ObjectIdentifier("1.3.6.1.4.1.4843.7.1")
OID_CLIENT_AUTH = x509.ObjectIdentifier("1.3.6.1.4.1.4843.7.2")
OID_FILE_SYSTEM = x509.ObjectIdentifier("1.3.6.1.4.1.4843.7.3")
OID_CLIENT_INFO = x509.ObjectIdentifier("1.3.6.1.4.1.4843.7.4")

SIGNATURE_LIFETIME = timedelta(seconds=86400)
# Clocks of client and server differ a little; AWS tolerates 15 minutes for SigV4.
CLOCK_SKEW = timedelta(minutes=15)

# Refusal reasons (stable strings: the endpoint logs them and tests assert on them).
CERT_EXPIRED = "certificate expired"
CERT_NOT_YET_VALID = "certificate not yet valid"
MALFORMED = "malformed IAM extension"
NO_FILE_SYSTEM = "certificate names no file system"
WRONG_FILE_SYSTEM = "certificate is for another file system"
UNKNOWN_KEY = "unknown access key"
REVOKED_KEY = "access key revoked"
CREDENTIALS_EXPIRED = "credentials expired"
TOKEN_MISMATCH = "session token mismatch"
SIGNATURE_MISMATCH = "signature mismatch"
SIGNATURE_EXPIRED = "signature expired"
SIGNATURE_IN_FUTURE = "signature date in the future"

_UTF8STRING, _OCTET_STRING, _UTCTIME, _SEQUENCE, _BIT_STRING = 0x0C, 0x04, 0x17, 0x30, 0x03
_CONTEXT_0_EXPLICIT = 0xA0


class IamRefused(Exception):
    """reason is one of the constants above; the ids (never secrets) help whoever reads logs."""

    def __init__(self, reason: str, *, access_point: Optional[str] = None,
                 access_key_id: Optional[str] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.access_point = access_point
        self.access_key_id = access_key_id


@dataclass(frozen=True)
class IamIdentity:
    access_point: Optional[str]
    access_key_id: Optional[str]


@dataclass(frozen=True)
class ClientAuth:
    """The 7.2 block. repr hides the signature and token (they are secrets)."""

    access_key_id: str
    signature_hex: str
    signed_at: datetime
    session_token: Optional[str]

    def __repr__(self) -> str:
        return f"ClientAuth(access_key_id={self.access_key_id!r}, signed_at={self.signed_at.isoformat()})"


# --- a small DER reader ---------------------------------------------------------

class DerError(ValueError):
    pass


def der_read(data: bytes, pos: int = 0) -> Tuple[int, bytes, int]:
    """(tag, content, next position) of the DER element at pos (single-byte tags only)."""
    if pos + 2 > len(data):
        raise DerError("truncated element")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if tag & 0x1F == 0x1F:
        raise DerError("multi-byte tags are not used here")
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise DerError("bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise DerError("truncated content")
    return tag, data[pos:pos + length], pos + length


def der_children(content: bytes) -> List[Tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(content):
        tag, value, pos = der_read(content, pos)
        out.append((tag, value))
    return out


def der_single(data: bytes, expected_tag: int) -> bytes:
    tag, content, end = der_read(data)
    if tag != expected_tag or end != len(data):
        raise DerError(f"expected one element with tag 0x{expected_tag:02x}")
    return content


def _utf8(content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DerError("bad UTF8String") from e


def parse_utc_time(content: bytes) -> datetime:
    text = content.decode("ascii", "replace")
    if len(text) != 13 or not text.endswith("Z") or not text[:12].isdigit():
        raise DerError("UTCTime must be YYMMDDHHMMSSZ")
    year = int(text[0:2])
    year += 1900 if year >= 50 else 2000  # RFC 5280's window
    return datetime(year, int(text[2:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]),
                    int(text[10:12]), tzinfo=timezone.utc)


def parse_client_auth(ext_value: bytes) -> ClientAuth:
    items = der_children(der_single(ext_value, _SEQUENCE))
    if len(items) not in (3, 4):
        raise DerError("client auth needs 3 or 4 fields")
    (t1, key), (t2, sig), (t3, when) = items[:3]
    if (t1, t2, t3) != (_UTF8STRING, _OCTET_STRING, _UTCTIME):
        raise DerError("client auth fields have the wrong types")
    token = None
    if len(items) == 4:
        t4, wrapped = items[3]
        if t4 != _CONTEXT_0_EXPLICIT:
            raise DerError("session token must be [0] EXPLICIT")
        token = _utf8(der_single(wrapped, _UTF8STRING))
    return ClientAuth(_utf8(key), sig.decode("ascii", "replace"), parse_utc_time(when), token)


def public_key_hash(cert: x509.Certificate) -> str:
    """base64 SHA-1 of the subjectPublicKey BIT STRING's key bytes (unused-bits octet out)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fields = der_children(der_single(spki, _SEQUENCE))
    if len(fields) != 2 or fields[1][0] != _BIT_STRING or not fields[1][1]:
        raise DerError("unexpected SubjectPublicKeyInfo")
    bits = fields[1][1]
    return base64.b64encode(hashlib.sha1(bits[1:]).digest()).decode("ascii")  # noqa: S324


# --- SigV4, from the spec ----------------------------------------------------------

def expected_signature(
    *, secret: str, access_key_id: str, session_token: Optional[str], fs_id: str,
    region: str, key_hash: str, when: datetime,
) -> str:
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    day = when.strftime("%Y%m%d")
    scope = f"{day}/{region}/elasticfilesystem/aws4_request"
    query: Dict[str, str] = {
        "Action": "Connect",
        "PublicKeyHash": quote_plus(key_hash),
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": quote_plus(f"{access_key_id}/{scope}"),
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": "86400",
        "X-Amz-SignedHeaders": "host",
    }
    if session_token:
        query["X-Amz-Security-Token"] = quote_plus(session_token)
    canonical = "\n".join([
        "GET", "/", "&".join(f"{k}={query[k]}" for k in sorted(query)),
        f"host:{fs_id}", "host", hashlib.sha256(b"").hexdigest(),
    ])
    to_sign = "\n".join([
        "AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest(),
    ])
    key = ("AWS4" + secret).encode()
    for part in (day, region, "elasticfilesystem", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


# --- the verifier --------------------------------------------------------------

def cert_validity(cert: x509.Certificate) -> Tuple[datetime, datetime]:
    """notBefore and notAfter, aware UTC; cryptography < 42 (AL2023 has 36) has only naive ones."""
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    return cert.not_valid_before.replace(tzinfo=timezone.utc), cert.not_valid_after.replace(tzinfo=timezone.utc)


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> Optional[bytes]:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise DerError(f"extension {oid.dotted_string} was not raw")
    return value.value


def verify_client_certificate(
    cert: x509.Certificate,
    *,
    fs_id: str,
    region: str,
    known: Mapping[str, AwsCredentials],
    now: datetime,
    revoked: AbstractSet[str] = frozenset(),
) -> IamIdentity:
    """Decide, like EFS, whether this client certificate may connect; raise IamRefused."""
    not_before, not_after = cert_validity(cert)
    if now < not_before:
        raise IamRefused(CERT_NOT_YET_VALID)
    if now > not_after:
        raise IamRefused(CERT_EXPIRED)
    try:
        raw_fs = _extension(cert, OID_FILE_SYSTEM)
        raw_ap = _extension(cert, OID_ACCESS_POINT)
        raw_auth = _extension(cert, OID_CLIENT_AUTH)
        cert_fs = _utf8(der_single(raw_fs, _UTF8STRING)) if raw_fs is not None else None
        access_point = _utf8(der_single(raw_ap, _UTF8STRING)) if raw_ap is not None else None
        auth = parse_client_auth(raw_auth) if raw_auth is not None else None
        key_hash = public_key_hash(cert) if auth is not None else ""
    except (DerError, ValueError) as e:
        raise IamRefused(f"{MALFORMED}: {e}") from None
    if cert_fs is None:
        raise IamRefused(NO_FILE_SYSTEM)
    if cert_fs != fs_id:
        raise IamRefused(WRONG_FILE_SYSTEM, access_point=access_point,
                         access_key_id=auth.access_key_id if auth else None)
    if auth is None:
        return IamIdentity(access_point=access_point, access_key_id=None)

    def refuse(reason: str) -> IamRefused:
        return IamRefused(reason, access_point=access_point, access_key_id=auth.access_key_id)

    if auth.access_key_id in revoked:
        raise refuse(REVOKED_KEY)
    creds = known.get(auth.access_key_id)
    if creds is None:
        raise refuse(UNKNOWN_KEY)
    if creds.expiry is not None and now > creds.expiry:
        raise refuse(CREDENTIALS_EXPIRED)
    if (creds.session_token or None) != (auth.session_token or None):
        raise refuse(TOKEN_MISMATCH)
    wanted = expected_signature(
        secret=creds.secret_access_key, access_key_id=auth.access_key_id,
        session_token=auth.session_token, fs_id=fs_id, region=region,
        key_hash=key_hash, when=auth.signed_at,
    )
    if not hmac.compare_digest(wanted, auth.signature_hex):
        raise refuse(SIGNATURE_MISMATCH)
    if auth.signed_at > now + CLOCK_SKEW:
        raise refuse(SIGNATURE_IN_FUTURE)
    if now > auth.signed_at + SIGNATURE_LIFETIME:
        raise refuse(SIGNATURE_EXPIRED)
    return IamIdentity(access_point=access_point, access_key_id=auth.access_key_id)
