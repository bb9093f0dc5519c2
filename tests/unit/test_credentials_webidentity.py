"""Web identity credentials (rolearn + jwtpath, or AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE), STS stubbed."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import botocore.session
import pytest
from botocore.stub import Stubber

from efsplug.credentials import CredentialSource, CredentialsUnavailable, fetch_credentials, find_credentials

ROLE = "arn:aws:iam::123456789012:role/efs-mounter"
EXPIRY = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.fixture
def sts(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, object]]:
    """Every STS client efsplug creates answers through a Stubber; yields the clients' settings."""
    made: List[Dict[str, object]] = []
    real = botocore.session.get_session()
    answers: List[object] = []

    class Session:
        def create_client(self, service: str, **kwargs: object):
            client = real.create_client(service, **{**kwargs, "region_name": kwargs.get("region_name") or "us-east-1"})
            made.append({"service": service, **kwargs, "stubber": Stubber(client)})
            stub = made[-1]["stubber"]
            while answers:
                answer = answers.pop(0)
                if isinstance(answer, tuple):
                    stub.add_client_error("assume_role_with_web_identity", service_error_code=answer[0])
                else:
                    stub.add_response("assume_role_with_web_identity", answer, answer.pop("_expect"))
            stub.activate()
            return client

    monkeypatch.setattr(botocore.session, "get_session", lambda: Session())
    made.append({"answers": answers})  # made[0]: the queue tests fill
    return made


def answer(token: str, role: str = ROLE) -> Dict[str, object]:
    return {
        "Credentials": {"AccessKeyId": "ASIAWEBIDENTITY00001", "SecretAccessKey": "web-secret",
                        "SessionToken": "web-session", "Expiration": EXPIRY},
        "_expect": {"RoleArn": role, "RoleSessionName": "efs-mount-helper", "WebIdentityToken": token},
    }


def test_rolearn_and_jwtpath_are_the_only_source(sts: List[Dict[str, object]], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("eyJhbGciOi.header.sig\n")  # the newline a kubelet writes is not part of the token
    sts[0]["answers"].append(answer("eyJhbGciOi.header.sig"))  # type: ignore[attr-defined]
    env = {"AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/other", "AWS_WEB_IDENTITY_TOKEN_FILE": "/nope"}
    found, source = find_credentials(rolearn=ROLE, jwtpath=str(token), region="eu-west-1", environ=env)
    assert source == CredentialSource("webidentity", f"{ROLE} {token}")
    assert CredentialSource.parse(str(source)) == source
    assert (found.access_key_id, found.session_token, found.expiry) == ("ASIAWEBIDENTITY00001", "web-session", EXPIRY)
    client = sts[1]
    assert (client["service"], client["region_name"]) == ("sts", "eu-west-1")


def test_renewal_from_the_record_needs_no_environment(sts: List[Dict[str, object]], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("renewed-token")
    sts[0]["answers"].append(answer("renewed-token"))  # type: ignore[attr-defined]
    source = CredentialSource.parse(f"webidentity:{ROLE} {token}")
    assert fetch_credentials(source, environ={}).access_key_id == "ASIAWEBIDENTITY00001"


def test_environment_variables_feed_the_same_source(sts: List[Dict[str, object]], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("env-token")
    sts[0]["answers"].append(answer("env-token"))  # type: ignore[attr-defined]
    env = {"HOME": str(tmp_path), "AWS_ROLE_ARN": ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
           "AWS_ENDPOINT_URL_STS": "http://127.0.0.1:9"}
    found, source = find_credentials(environ=env)
    assert source == CredentialSource("webidentity", f"{ROLE} {token}")  # the file is recorded for renewal
    assert found.session_token == "web-session"
    assert sts[1]["endpoint_url"] == "http://127.0.0.1:9"
    # A record written before the file was recorded still renews, from the variable.
    old = CredentialSource.parse(f"webidentity:{ROLE}")
    sts[0]["answers"].append(answer("env-token"))  # type: ignore[attr-defined]
    assert fetch_credentials(old, environ=env).access_key_id == "ASIAWEBIDENTITY00001"


@pytest.mark.parametrize("content, message", [
    (None, "web identity for " + ROLE + ": cannot read token file {token} (No such file or directory)"),
    ("", "web identity for " + ROLE + ": no token (jwtpath= or AWS_WEB_IDENTITY_TOKEN_FILE names an empty file)"),
    (b"\xff\xfe", "cannot read token file {token} (UnicodeDecodeError)"),
], ids=["missing", "empty", "not-text"])
def test_unreadable_token(sts: List[Dict[str, object]], tmp_path: Path, content: object, message: str) -> None:
    token = tmp_path / "token"
    if isinstance(content, bytes):
        token.write_bytes(content)
    elif content is not None:
        token.write_text(content)
    with pytest.raises(CredentialsUnavailable) as raised:
        find_credentials(rolearn=ROLE, jwtpath=str(token), environ={})
    assert message.format(token=token) in str(raised.value)
    assert len(sts) == 1  # STS never asked


def test_sts_refusal_names_the_code_and_never_the_token(sts: List[Dict[str, object]], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret-jwt-value")
    sts[0]["answers"].append(("InvalidIdentityToken",))  # type: ignore[attr-defined]
    with pytest.raises(CredentialsUnavailable) as raised:
        find_credentials(rolearn=ROLE, jwtpath=str(token), environ={})
    message = str(raised.value)
    assert message == (f"web identity for {ROLE}: STS refused AssumeRoleWithWebIdentity (InvalidIdentityToken); "
                       f"check the role's trust policy and the token in {token}")
    assert "secret-jwt-value" not in message
