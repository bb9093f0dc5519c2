"""A stand-in for STS's AssumeRoleWithWebIdentity: the source behind `rolearn`+`jwtpath`.

A small HTTP server on 127.0.0.1 speaking STS's query protocol (form POST in, XML out), as
botocore calls it; the guest reaches it at 10.0.2.2 through AWS_ENDPOINT_URL_STS. Only a
trusted (role ARN, token) pair gets credentials, issued by the bed's credential store, so
the EFS endpoint can check the signature they make. Nothing here logs a token or a secret.
"""

from __future__ import annotations

import secrets
from typing import Dict, List, Tuple
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from efsbed.credentials import BedCredentials
from efsbed.metadata import Reply, _LoopbackHttpService, _iso_z
from efsplug.sigv4 import AwsCredentials

NS = "https://sts.amazonaws.com/doc/2011-06-15/"
ACTION = "AssumeRoleWithWebIdentity"


def _error(status: int, code: str, message: str) -> Reply:
    body = (f'<ErrorResponse xmlns="{NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error><RequestId>{secrets.token_hex(8)}</RequestId></ErrorResponse>")
    return status, "text/xml", body


class WebIdentitySts(_LoopbackHttpService):
    def __init__(self, credentials: BedCredentials) -> None:
        super().__init__()
        self._bed_credentials = credentials
        self._trusted: Dict[Tuple[str, str], None] = {}
        self._issued: List[Tuple[str, AwsCredentials]] = []  # (role ARN, credentials), in order

    def __repr__(self) -> str:
        return f"WebIdentitySts({len(self._trusted)} trusted, port={self._server and self.port})"

    def trust(self, role_arn: str, token: str) -> None:
        """From now on, token may assume role_arn (the role's trust policy names its issuer)."""
        with self._lock:
            self._trusted[(role_arn, token)] = None

    def issued(self, role_arn: str) -> List[AwsCredentials]:
        with self._lock:
            return [c for arn, c in self._issued if arn == role_arn]

    def respond(self, method: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Reply:
        if method != "POST":
            return _error(405, "InvalidAction", "STS takes POST")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if form.get("Action") != ACTION:
            return _error(400, "InvalidAction", f"only {ACTION} is served here")
        role_arn, token = form.get("RoleArn", ""), form.get("WebIdentityToken", "")
        if not form.get("RoleSessionName"):
            return _error(400, "ValidationError", "RoleSessionName is required")
        with self._lock:
            trusted = (role_arn, token) in self._trusted
        if not trusted:
            return _error(403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
        c = self._bed_credentials.issue(f"web-identity:{role_arn}")
        with self._lock:
            self._issued.append((role_arn, c))
        session = escape(form["RoleSessionName"])
        return 200, "text/xml", (
            f'<AssumeRoleWithWebIdentityResponse xmlns="{NS}"><AssumeRoleWithWebIdentityResult>'
            f"<Credentials><AccessKeyId>{c.access_key_id}</AccessKeyId>"
            f"<SecretAccessKey>{c.secret_access_key}</SecretAccessKey>"
            f"<SessionToken>{c.session_token}</SessionToken><Expiration>{_iso_z(c.expiry)}</Expiration></Credentials>"
            f"<AssumedRoleUser><Arn>{escape(role_arn)}/{session}</Arn><AssumedRoleId>AROAEFSBED:{session}</AssumedRoleId>"
            "</AssumedRoleUser><Audience>sts.amazonaws.com</Audience></AssumeRoleWithWebIdentityResult>"
            f"<ResponseMetadata><RequestId>{secrets.token_hex(8)}</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>"
        )
