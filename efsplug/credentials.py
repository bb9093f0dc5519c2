"""AWS credentials for `iam` mounts, from the sources efs-utils users rely on, in its order.

The source that answered is returned with the credentials so the supervisor can renew the
certificate later from the same place (a task's credentials endpoint, a profile, ...).
A `CredentialSource` never holds a secret: it names where to look, not what was found.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Tuple

from efsplug.sigv4 import AwsCredentials

ECS_CREDENTIALS_ENDPOINT = "http://169.254.170.2"
TIMEOUT_SECONDS = 3.0


class CredentialsUnavailable(Exception):
    """No credentials from the requested or any default source; the message says where we looked."""


@dataclass(frozen=True)
class CredentialSource:
    kind: str  # awscredsuri | profile | container | webidentity | instance
    detail: str = ""  # the URI, profile name or role ARN; never a secret

    def __str__(self) -> str:
        return f"{self.kind}:{self.detail}" if self.detail else self.kind

    @classmethod
    def parse(cls, text: str) -> "CredentialSource":
        kind, _, detail = text.partition(":")
        if kind not in _FETCHERS:
            raise ValueError(f"unknown credential source {text!r}")
        return cls(kind, detail)


def find_credentials(
    *,
    awsprofile: Optional[str] = None,
    awscredsuri: Optional[str] = None,
    environ: Mapping[str, str] = os.environ,
) -> Tuple[AwsCredentials, CredentialSource]:
    """The first source that has credentials, in efs-utils' order.

    An explicit awscredsuri or awsprofile is the only source tried: silently falling
    back to the instance role would mount with an identity the operator did not ask for.
    """
    if awscredsuri:
        candidates = [CredentialSource("awscredsuri", awscredsuri)]
    elif awsprofile:
        candidates = [CredentialSource("profile", awsprofile)]
    else:
        candidates = _default_chain(environ)
    tried: List[str] = []
    for source in candidates:
        try:
            return fetch_credentials(source, environ=environ), source
        except CredentialsUnavailable as exc:
            if awscredsuri or awsprofile:
                raise
            tried.append(str(exc))
    raise CredentialsUnavailable(
        "no AWS credentials found for iam (tried: " + "; ".join(tried) + "); "
        "pass awsprofile=<name> or awscredsuri=<path>, or attach an instance role"
    )


def fetch_credentials(source: CredentialSource, *, environ: Mapping[str, str] = os.environ) -> AwsCredentials:
    """Credentials from exactly this source (used again for renewal)."""
    return _FETCHERS[source.kind](source.detail, environ)


def _default_chain(environ: Mapping[str, str]) -> List[CredentialSource]:
    chain = [CredentialSource("profile", environ.get("AWS_PROFILE") or "default")]
    if environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        chain.append(CredentialSource("container", environ["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]))
    elif environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        chain.append(CredentialSource("container", environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"]))
    if environ.get("AWS_ROLE_ARN") and environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        chain.append(CredentialSource("webidentity", environ["AWS_ROLE_ARN"]))
    chain.append(CredentialSource("instance"))
    return chain


def _from_task_endpoint(uri: str, environ: Mapping[str, str]) -> AwsCredentials:
    return _get_container_json(ECS_CREDENTIALS_ENDPOINT + uri, headers={}, label=f"awscredsuri {uri}")


def _from_container_env(detail: str, environ: Mapping[str, str]) -> AwsCredentials:
    if detail.startswith("/"):
        return _get_container_json(ECS_CREDENTIALS_ENDPOINT + detail, headers={}, label=f"container credentials {detail}")
    headers = {}
    token_file = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    token = Path(token_file).read_text().strip() if token_file else environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    if token:
        headers["Authorization"] = token
    return _get_container_json(detail, headers=headers, label="container credentials (full URI)")


def _get_container_json(url: str, *, headers: Mapping[str, str], label: str) -> AwsCredentials:
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            body = json.loads(response.read())
        return AwsCredentials(
            access_key_id=body["AccessKeyId"],
            secret_access_key=body["SecretAccessKey"],
            session_token=body.get("Token"),
            expiry=_parse_time(body.get("Expiration")),
        )
    except urllib.error.HTTPError as exc:
        raise CredentialsUnavailable(
            f"{label} answered HTTP {exc.code}; the task's credentials are gone (task stopped?) or the URI is wrong"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CredentialsUnavailable(f"{label} did not answer ({reason}); is the ECS agent running?") from None
    except (ValueError, KeyError, TypeError):
        raise CredentialsUnavailable(f"{label} answered without AccessKeyId/SecretAccessKey") from None


def _from_profile(name: str, environ: Mapping[str, str]) -> AwsCredentials:
    from botocore.credentials import ConfigProvider, SharedCredentialProvider

    home = environ.get("HOME", "/root")
    creds_file = environ.get("AWS_SHARED_CREDENTIALS_FILE", f"{home}/.aws/credentials")
    config_file = environ.get("AWS_CONFIG_FILE", f"{home}/.aws/config")
    for provider in (
        SharedCredentialProvider(creds_filename=os.path.expanduser(creds_file), profile_name=name),
        ConfigProvider(config_filename=os.path.expanduser(config_file), profile_name=name),
    ):
        try:
            found = provider.load()
        except Exception:  # botocore raises a zoo of parse errors for broken files
            raise CredentialsUnavailable(f"profile {name!r}: cannot read {creds_file} or {config_file}") from None
        if found is not None:
            frozen = found.get_frozen_credentials()
            return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token or None)
    raise CredentialsUnavailable(f"profile {name!r} has no keys in {creds_file} or {config_file}")


def _from_web_identity(role_arn: str, environ: Mapping[str, str]) -> AwsCredentials:
    import botocore.session

    session = botocore.session.get_session()
    provider = session.get_component("credential_provider").get_provider("assume-role-with-web-identity")
    try:
        found = provider.load()
        frozen = found.get_frozen_credentials() if found else None
    except Exception as exc:  # STS errors come in many classes; the class name is the useful part
        raise CredentialsUnavailable(f"web identity for {role_arn}: {type(exc).__name__}") from None
    if frozen is None:
        raise CredentialsUnavailable(f"web identity for {role_arn}: AWS_WEB_IDENTITY_TOKEN_FILE gave no credentials")
    expiry = getattr(found, "_expiry_time", None)
    return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token, expiry)


def _from_instance_role(_detail: str, environ: Mapping[str, str]) -> AwsCredentials:
    from botocore.utils import InstanceMetadataFetcher

    endpoint = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254/")
    fetched = InstanceMetadataFetcher(timeout=1, num_attempts=1, base_url=endpoint).retrieve_iam_role_credentials()
    if not fetched:
        raise CredentialsUnavailable(
            "instance role: instance metadata gave no role credentials (no role attached, or IMDS hop limit too low)"
        )
    return AwsCredentials(fetched["access_key"], fetched["secret_key"], fetched.get("token"),
                          _parse_time(fetched.get("expiry_time")))


def _parse_time(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


_FETCHERS: Mapping[str, Callable[[str, Mapping[str, str]], AwsCredentials]] = {
    "awscredsuri": _from_task_endpoint,
    "profile": _from_profile,
    "container": _from_container_env,
    "webidentity": _from_web_identity,
    "instance": _from_instance_role,
}
