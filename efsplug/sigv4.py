"""SigV4 signature that EFS checks inside the IAM client certificate.

The canonical request is the one efs-utils has always produced and the EFS
service therefore verifies.  It differs from textbook SigV4 in one place: the
canonical headers are *not* followed by an empty line
(``host:<fs_id>\\nhost\\n`` instead of ``host:<fs_id>\\n\\nhost\\n``).  Everything
else (query canonicalisation, scope, string to sign, key derivation) is plain
SigV4; tests/unit/test_sigv4.py checks each part against botocore.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional, Tuple
from urllib.parse import quote


SERVICE = "elasticfilesystem"
ALGORITHM = "AWS4-HMAC-SHA256"
EXPIRES_SECONDS = 86400
SIGNED_HEADERS = "host"
EMPTY_PAYLOAD_SHA256 = hashlib.sha256(b"").hexdigest()
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
DATE_FORMAT = "%Y%m%d"


@dataclass(frozen=True)
class AwsCredentials:
    """Credentials used to sign; secrets are kept out of repr so they never reach logs."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    expiry: Optional[datetime] = None

    @classmethod
    def from_document(cls, text: str) -> "AwsCredentials":
        """The JSON both IMDS and the ECS credentials endpoint serve; ValueError if malformed."""
        try:
            doc = json.loads(text)
            return cls(doc["AccessKeyId"], doc["SecretAccessKey"], doc.get("Token"), parse_time(doc.get("Expiration")))
        except (KeyError, TypeError, AttributeError):
            raise ValueError("credentials document without AccessKeyId/SecretAccessKey") from None


def parse_time(text: Optional[str]) -> Optional[datetime]:
    """ISO 8601 as AWS writes it (trailing Z); naive times are UTC."""
    if not text:
        return None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError("datetime must be timezone-aware (UTC)")
    return when.astimezone(timezone.utc)


def amz_date(when: datetime) -> str:
    return _utc(when).strftime(AMZ_DATE_FORMAT)


def credential_scope(when: datetime, region: str) -> str:
    return f"{_utc(when).strftime(DATE_FORMAT)}/{region}/{SERVICE}/aws4_request"


def _quote(value: str) -> str:
    # SigV4 URI-encoding: only unreserved characters stay as they are.
    return quote(value, safe="-_.~")


# --- public key hash ---------------------------------------------------------

def _der_header(data: bytes, pos: int) -> Tuple[int, int, int]:
    """Return (tag, content_start, content_length) of the DER element at pos."""
    tag = data[pos]
    first = data[pos + 1]
    if first < 0x80:
        return tag, pos + 2, first
    count = first & 0x7F
    if count == 0 or count > 4:
        raise ValueError("unsupported DER length")
    length = int.from_bytes(data[pos + 2:pos + 2 + count], "big")
    return tag, pos + 2 + count, length


def subject_public_key_bits(spki_der: bytes) -> bytes:
    """The subjectPublicKey BIT STRING's key bytes (unused-bits octet excluded)."""
    tag, start, _ = _der_header(spki_der, 0)
    if tag != 0x30:
        raise ValueError("SubjectPublicKeyInfo is not a SEQUENCE")
    tag, alg_start, alg_len = _der_header(spki_der, start)
    if tag != 0x30:
        raise ValueError("AlgorithmIdentifier is not a SEQUENCE")
    tag, bits_start, bits_len = _der_header(spki_der, alg_start + alg_len)
    if tag != 0x03 or bits_len < 1 or spki_der[bits_start] != 0:
        raise ValueError("subjectPublicKey is not a whole-octet BIT STRING")
    return spki_der[bits_start + 1:bits_start + bits_len]


def public_key_hash(public_key) -> str:
    """base64(SHA-1(subjectPublicKey bits)): ties the signature to one key pair.

    Same bytes efs-utils hashes (it skips tag, length and the unused-bits octet).
    A private key is accepted too and hashed by its public half.
    """
    from cryptography.hazmat.primitives import serialization  # here: IMDS/ECS users need none of it

    if hasattr(public_key, "public_key"):
        public_key = public_key.public_key()
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha1(subject_public_key_bits(spki)).digest()  # noqa: S324 - protocol-mandated
    return base64.b64encode(digest).decode("ascii")


# --- canonical request / string to sign / signature ----------------------------

def canonical_query_string(
    *, public_key_hash: str, credentials: AwsCredentials, region: str, when: datetime
) -> str:
    params = {
        "Action": "Connect",
        "PublicKeyHash": public_key_hash,
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": f"{credentials.access_key_id}/{credential_scope(when, region)}",
        "X-Amz-Date": amz_date(when),
        "X-Amz-Expires": str(EXPIRES_SECONDS),
        "X-Amz-SignedHeaders": SIGNED_HEADERS,
    }
    if credentials.session_token:
        params["X-Amz-Security-Token"] = credentials.session_token
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(params.items()))


def canonical_request(
    *, fs_id: str, region: str, public_key_hash: str, credentials: AwsCredentials, when: datetime
) -> str:
    query = canonical_query_string(
        public_key_hash=public_key_hash, credentials=credentials, region=region, when=when
    )
    # No empty line after the headers: this is what EFS verifies (see module doc).
    return "\n".join(
        ["GET", "/", query, f"host:{fs_id}", SIGNED_HEADERS, EMPTY_PAYLOAD_SHA256]
    )


def string_to_sign(
    *, fs_id: str, region: str, public_key_hash: str, credentials: AwsCredentials, when: datetime
) -> str:
    request = canonical_request(
        fs_id=fs_id, region=region, public_key_hash=public_key_hash,
        credentials=credentials, when=when,
    )
    return "\n".join(
        [
            ALGORITHM,
            amz_date(when),
            credential_scope(when, region),
            hashlib.sha256(request.encode("utf-8")).hexdigest(),
        ]
    )


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_access_key: str, when: datetime, region: str, service: str = SERVICE) -> bytes:
    """kSigning = HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date), region), service), "aws4_request")."""
    k_date = _hmac(("AWS4" + secret_access_key).encode("utf-8"), _utc(when).strftime(DATE_FORMAT))
    k_region = _hmac(k_date, region)
    k_service = _hmac(k_region, service)
    return _hmac(k_service, "aws4_request")


def signature(
    *, fs_id: str, region: str, public_key_hash: str, credentials: AwsCredentials, when: datetime
) -> str:
    """Hex SigV4 signature of the Connect request for this key, file system and time."""
    text = string_to_sign(
        fs_id=fs_id, region=region, public_key_hash=public_key_hash,
        credentials=credentials, when=when,
    )
    key = signing_key(credentials.secret_access_key, when, region)
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()
