"""SigV4 for the EFS Connect request, checked against botocore and AWS's published examples."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, quote_plus

import pytest
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from efsplug import sigv4
from efsplug.sigv4 import AwsCredentials

FS_ID = "fs-0123456789abcdef0"
REGION = "eu-west-1"
WHEN = datetime(2024, 2, 29, 23, 59, 58, tzinfo=timezone.utc)
# A hash with all three characters that need escaping in a query ("+", "/", "=").
PK_HASH = "ab+cd/ef0123456789ABCDEFGHIJ="
CREDS = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
CREDS_TOKEN = AwsCredentials(
    "ASIAEXAMPLE", "secret/with+chars", session_token="IQoJb3JpZ2luX2VjE+/tok=en=="
)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _botocore(creds: AwsCredentials, pk_hash: str = PK_HASH, when: datetime = WHEN):
    """Run botocore's own SigV4 query signer on the same Connect request."""
    signer = SigV4QueryAuth(
        Credentials(creds.access_key_id, creds.secret_access_key, creds.session_token),
        "elasticfilesystem",
        REGION,
        expires=86400,
    )
    request = AWSRequest(
        method="GET",
        url=f"https://{FS_ID}/?Action=Connect&PublicKeyHash={quote(pk_hash, safe='')}",
    )
    request.context["timestamp"] = when.strftime("%Y%m%dT%H%M%SZ")
    signer._modify_request_before_signing(request)
    return signer, request, signer.canonical_request(request)


def _kwargs(creds: AwsCredentials, pk_hash: str = PK_HASH, when: datetime = WHEN) -> dict:
    return dict(fs_id=FS_ID, region=REGION, public_key_hash=pk_hash, credentials=creds, when=when)


@pytest.mark.parametrize("creds", [CREDS, CREDS_TOKEN], ids=["long-term", "session-token"])
def test_canonical_request_matches_botocore_except_the_efs_header_block(creds: AwsCredentials) -> None:
    _, _, boto_cr = _botocore(creds)
    ours = sigv4.canonical_request(**_kwargs(creds))
    # EFS verifies the efs-utils form, which has no empty line after the headers.
    assert f"host:{FS_ID}\n\nhost\n" in boto_cr
    assert ours == boto_cr.replace(f"host:{FS_ID}\n\nhost\n", f"host:{FS_ID}\nhost\n")
    # The query part is byte-identical to botocore's canonical query string.
    assert ours.split("\n")[2] == boto_cr.split("\n")[2]


@pytest.mark.parametrize("creds", [CREDS, CREDS_TOKEN], ids=["long-term", "session-token"])
def test_string_to_sign_and_signature_match_botocore(creds: AwsCredentials) -> None:
    signer, request, _ = _botocore(creds)
    ours_cr = sigv4.canonical_request(**_kwargs(creds))
    assert sigv4.string_to_sign(**_kwargs(creds)) == signer.string_to_sign(request, ours_cr)
    expected = signer.signature(signer.string_to_sign(request, ours_cr), request)
    assert sigv4.signature(**_kwargs(creds)) == expected


def test_matches_an_independent_efs_utils_style_computation() -> None:
    """Rebuild the request the way efs-utils writes it (quote_plus, sorted dict)."""
    when = WHEN
    date = when.strftime("%Y%m%d")
    scope = f"{date}/{REGION}/elasticfilesystem/aws4_request"
    params = {
        "Action": "Connect",
        "PublicKeyHash": quote_plus(PK_HASH),
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": quote_plus(f"{CREDS_TOKEN.access_key_id}/{scope}"),
        "X-Amz-Date": quote_plus(when.strftime("%Y%m%dT%H%M%SZ")),
        "X-Amz-Expires": 86400,
        "X-Amz-SignedHeaders": "host",
        "X-Amz-Security-Token": quote_plus(CREDS_TOKEN.session_token or ""),
    }
    query = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    request = "GET\n/\n" + query + "\n" + f"host:{FS_ID}\n" + "host\n" + hashlib.sha256(b"").hexdigest()
    sts = "AWS4-HMAC-SHA256\n{}\n{}\n{}".format(
        when.strftime("%Y%m%dT%H%M%SZ"), scope, hashlib.sha256(request.encode()).hexdigest()
    )
    assert sigv4.string_to_sign(**_kwargs(CREDS_TOKEN)) == sts

    def h(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    key = h(h(h(h(b"AWS4" + CREDS_TOKEN.secret_access_key.encode(), date), REGION), "elasticfilesystem"), "aws4_request")
    assert sigv4.signature(**_kwargs(CREDS_TOKEN)) == hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()


def test_security_token_sorts_before_signed_headers_and_is_escaped() -> None:
    query = sigv4.canonical_query_string(
        public_key_hash=PK_HASH, credentials=CREDS_TOKEN, region=REGION, when=WHEN
    )
    names = [part.split("=", 1)[0] for part in query.split("&")]
    assert names == [
        "Action", "PublicKeyHash", "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date",
        "X-Amz-Expires", "X-Amz-Security-Token", "X-Amz-SignedHeaders",
    ]
    assert "PublicKeyHash=ab%2Bcd%2Fef0123456789ABCDEFGHIJ%3D" in query
    assert "X-Amz-Security-Token=IQoJb3JpZ2luX2VjE%2B%2Ftok%3Den%3D%3D" in query
    assert f"X-Amz-Credential=ASIAEXAMPLE%2F20240229%2F{REGION}%2Felasticfilesystem%2Faws4_request" in query
    assert "X-Amz-Security-Token" not in sigv4.canonical_query_string(
        public_key_hash=PK_HASH, credentials=CREDS, region=REGION, when=WHEN
    )


def test_signing_key_matches_aws_documented_example() -> None:
    # AWS General Reference, "Examples of how to derive a signing key for Signature Version 4".
    key = sigv4.signing_key(
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        datetime(2012, 2, 15, tzinfo=timezone.utc), "us-east-1", "iam",
    )
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_signature_of_aws_documented_string_to_sign() -> None:
    # AWS General Reference SigV4 test: IAM ListUsers, 2015-08-30T12:36:00Z.
    key = sigv4.signing_key(
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        datetime(2015, 8, 30, 12, 36, tzinfo=timezone.utc), "us-east-1", "iam",
    )
    sts = (
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\n"
        "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
    )
    assert hmac.new(key, sts.encode(), hashlib.sha256).hexdigest() == (
        "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
    )


def test_non_utc_time_is_converted_and_naive_time_rejected() -> None:
    plus2 = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert sigv4.signature(**_kwargs(CREDS, when=plus2)) == sigv4.signature(**_kwargs(CREDS))
    with pytest.raises(ValueError, match="timezone-aware"):
        sigv4.signature(**_kwargs(CREDS, when=WHEN.replace(tzinfo=None)))


def test_signature_depends_on_every_input() -> None:
    base = sigv4.signature(**_kwargs(CREDS))
    assert sigv4.signature(**dict(_kwargs(CREDS), fs_id="fs-01234567")) != base
    assert sigv4.signature(**dict(_kwargs(CREDS), region="us-east-1")) != base
    assert sigv4.signature(**_kwargs(CREDS, pk_hash="x" + PK_HASH[1:])) != base
    assert sigv4.signature(**_kwargs(CREDS, when=WHEN + timedelta(seconds=1))) != base
    assert sigv4.signature(**_kwargs(CREDS_TOKEN)) != base
    assert len(base) == 64 and int(base, 16) >= 0


def test_public_key_hash_is_sha1_of_the_rsa_public_key_bits(rsa_key: rsa.RSAPrivateKey) -> None:
    pkcs1 = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    expected = base64.b64encode(hashlib.sha1(pkcs1).digest()).decode()
    assert sigv4.public_key_hash(rsa_key.public_key()) == expected
    assert sigv4.public_key_hash(rsa_key) == expected  # a private key hashes its public half


def test_public_key_hash_works_for_non_rsa_keys() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert sigv4.public_key_hash(key) == base64.b64encode(hashlib.sha1(point).digest()).decode()


@pytest.mark.parametrize(
    "der, message",
    [
        (b"\x31\x03\x30\x01\x00", "not a SEQUENCE"),
        (b"\x30\x05\x02\x00\x03\x01\x00", "AlgorithmIdentifier"),
        (b"\x30\x06\x30\x00\x03\x02\x07\x80", "whole-octet BIT STRING"),
        (b"\x30\x06\x30\x00\x04\x02\x00\x80", "whole-octet BIT STRING"),
        (b"\x30\x80\x30\x00", "unsupported DER length"),
    ],
)
def test_malformed_spki_is_rejected(der: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sigv4.subject_public_key_bits(der)


def test_credentials_repr_hides_secrets() -> None:
    text = repr(CREDS_TOKEN)
    assert "ASIAEXAMPLE" in text
    assert CREDS_TOKEN.secret_access_key not in text
    assert "IQoJ" not in text
