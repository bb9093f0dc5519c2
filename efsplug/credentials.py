"""AWS credentials for `iam` mounts, from the sources efs-utils users rely on, in its order.

The source that answered is returned with the credentials so the supervisor can renew the
certificate later from the same place (a task's credentials endpoint, a profile, ...).
A `CredentialSource` never holds a secret: it names where to look, not what was found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Tuple

from efsplug.imds import InstanceMetadata, MetadataUnavailable, http_request

if TYPE_CHECKING:
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
    from efsplug.sigv4 import AwsCredentials

    try:
        status, text = http_request("GET", url, headers, TIMEOUT_SECONDS)
    except OSError as exc:
        reason = str(exc) or type(exc).__name__
        raise CredentialsUnavailable(f"{label} did not answer ({reason}); is the ECS agent running?") from None
    if status != 200:
        raise CredentialsUnavailable(
            f"{label} answered HTTP {status}; the task's credentials are gone (task stopped?) or the URI is wrong"
        )
    try:
        return AwsCredentials.from_document(text)
    except ValueError:
        raise CredentialsUnavailable(f"{label} answered without AccessKeyId/SecretAccessKey") from None


def _from_profile(name: str, environ: Mapping[str, str]) -> AwsCredentials:
    home = environ.get("HOME", "/root")
    creds_file = environ.get("AWS_SHARED_CREDENTIALS_FILE", f"{home}/.aws/credentials")
    config_file = environ.get("AWS_CONFIG_FILE", f"{home}/.aws/config")
    if not any(os.path.exists(os.path.expanduser(f)) for f in (creds_file, config_file)):
        # The usual case on instances and in tasks; not worth importing botocore for.
        raise CredentialsUnavailable(f"profile {name!r}: neither {creds_file} nor {config_file} exists")
    from botocore.credentials import ConfigProvider, SharedCredentialProvider

    from efsplug.sigv4 import AwsCredentials

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

    from efsplug.sigv4 import AwsCredentials

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
    """The instance profile's role, through efsplug's IMDS client (v2, then v1).

    botocore's InstanceMetadataFetcher does the same requests, but importing it costs
    more than the whole rest of a mount on a small instance.
    """
    try:
        return InstanceMetadata.from_environment(environ).role_credentials()
    except MetadataUnavailable as exc:
        raise CredentialsUnavailable(
            f"instance role: {exc} (no role attached, or IMDS hop limit too low)"
        ) from None


_FETCHERS: Mapping[str, Callable[[str, Mapping[str, str]], AwsCredentials]] = {
    "awscredsuri": _from_task_endpoint,
    "profile": _from_profile,
    "container": _from_container_env,
    "webidentity": _from_web_identity,
    "instance": _from_instance_role,
}
