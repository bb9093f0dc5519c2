"""The bed's own certificate authority: it plays Amazon's CA for the emulated EFS endpoints.

A second BedCA serves as the "foreign" CA in tests: a client that trusts it must refuse
the endpoint's certificate.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# EC keys: generated in milliseconds, unlike RSA, and every TLS stack here accepts them.
_CURVE = ec.SECP256R1()
_CA_LIFETIME = dt.timedelta(days=30)
_SERVER_LIFETIME = dt.timedelta(days=7)
# Backdated so a guest clock a little behind the host still sees valid certificates.
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class ServerCert:
    cert_path: Path
    key_path: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class BedCA:
    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self.cert = cert
        self._key = key

    def __repr__(self) -> str:
        return f"BedCA({self.name!r}, {str(self.directory)!r})"

    @property
    def name(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "ca.key"

    @classmethod
    def create(cls, directory: Path, name: str = "efsbed CA") -> "BedCA":
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(_CURVE)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory, cert, key)
        ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(ca.key_path, _key_pem(key))
        return ca

    def issue_server(self, names: Sequence[str], directory: Path) -> ServerCert:
        """A server certificate for DNS names (wildcards allowed), signed by this CA."""
        if not names:
            raise ValueError("a server certificate needs at least one DNS name")
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(_CURVE)
        now = dt.datetime.now(dt.timezone.utc)
        # The CN is informational only (clients check the SAN); a wildcard CN is fine.
        cn = names[0][:64]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _SERVER_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        stem = names[0].replace("*", "wildcard")
        cert_path = directory / f"{stem}.pem"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_path, _key_pem(key))
        return ServerCert(cert_path=cert_path, key_path=key_path)
